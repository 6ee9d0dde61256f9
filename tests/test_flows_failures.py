"""Flows fail fast on errors a retry cannot fix, and say why in the run's final state (temporary Prefect API)."""

import io
import urllib.error

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from wdsfixtures import render, write_tar

from flows.failures import retry_unless_permanent
from flows.params import ClusterParams, DownloadParams
from flows.precompute import encode_shards_flow, precompute
from flows.retrain import retrain
from flows.train import train
from pipeline.encode import EncodeConfig
from pipeline.errors import SourceAccessError, SourceUnavailableError

ATTEMPTS: list[str] = []


def _raise_wrapping(outer: type[Exception], code: int) -> None:
    try:
        raise urllib.error.HTTPError("https://hub.invalid/meta.parquet", code, "status", {}, io.BytesIO())
    except urllib.error.HTTPError as err:
        raise outer(f"fetching metadata failed with HTTP {code}") from err


@task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_permanent)
def fetch_metadata(code: int) -> None:
    ATTEMPTS.append(str(code))
    _raise_wrapping(SourceAccessError if code < 500 else SourceUnavailableError, code)


@flow
def fetch_flow(code: int) -> None:
    fetch_metadata(code)


def _task_runs(state) -> dict:
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def test_permanent_errors_fail_at_once_and_transient_ones_are_retried(prefect_harness):
    ATTEMPTS.clear()
    state = fetch_flow(403, return_state=True)
    assert state.is_failed() and ATTEMPTS == ["403"]  # one attempt, not three
    assert "SourceAccessError: fetching metadata failed with HTTP 403" in state.message
    ATTEMPTS.clear()
    assert fetch_flow(503, return_state=True).is_failed() and ATTEMPTS == ["503"] * 3  # the retry policy ran


def test_offline_preset_precompute_fails_once_with_the_cause(prefect_harness, tmp_path, monkeypatch):
    for var, value in {"ECLIPSE_OFFLINE": "1", "ECLIPSE_METADATA_CACHE": str(tmp_path / "meta"),
                       "HF_HUB_CACHE": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(var, value)
    state = precompute(urls="laion-highres-5m", encoder="tiny-clip", out=str(tmp_path / "out"),
                       download=DownloadParams(processes_count=1), cluster=ClusterParams(n_workers=1),
                       return_state=True)
    assert state.is_failed()
    assert "SourceUnavailableError" in state.message and "ECLIPSE_OFFLINE is set" in state.message, state.message
    runs = _task_runs(state)
    # One attempt: not retried twice more after 10 s and 20 s.
    assert [r.run_count for name, r in runs.items() if name.startswith("download")] == [1], runs


def test_retrain_without_a_store_is_skipped_with_the_precompute_to_run(prefect_harness, tmp_path):
    store = tmp_path / "data" / "laion-highres-5m" / "store"
    state = retrain(store=str(store), registry=str(tmp_path / "registry"), return_state=True)
    assert state.is_completed() and state.name == "Skipped"
    assert "`prefect deployment run precompute/laion-highres-5m`" in state.message
    assert state.result()["promote"] is False
    assert not (tmp_path / "registry").exists()  # no run folder, no decision recorded


def test_train_without_a_store_fails_naming_the_precompute(prefect_harness, tmp_path):
    state = train(store=str(tmp_path / "mine" / "store"), out=str(tmp_path / "run"), preset="tiny",
                  return_state=True)
    assert state.is_failed()
    assert f"StoreError: no embedding store at {tmp_path / 'mine' / 'store'} yet" in state.message
    assert f"eclipse-prior precompute --urls URLS --encoder ENCODER --out {tmp_path / 'mine'}" in state.message


def test_encoder_that_cannot_load_fails_every_shard_once_with_the_cause(prefect_harness, tmp_path):
    for i in range(2):
        write_tar(tmp_path / "images" / f"{i:05d}.tar", [{"key": f"{i}0", "jpg": render(i), "txt": "a photo"}])
    # A folder that looks like a CLIPModel snapshot (its name passes the check before any work) but is broken.
    (tmp_path / "broken-encoder").mkdir()
    (tmp_path / "broken-encoder" / "config.json").write_text("{}")
    state = encode_shards_flow(str(tmp_path / "images"), str(tmp_path / "store"),
                               EncodeConfig(encoder=str(tmp_path / "broken-encoder")), return_state=True)
    assert state.is_failed()
    assert "EncodeFailed: 2 of 2 shard(s) failed (not retried: EncoderLoadError: could not load" in state.message
    assert sorted(r.run_count for r in _task_runs(state).values()) == [1, 1]
    # A name that is no encoder at all fails before any shard's task
    state = encode_shards_flow(str(tmp_path / "images"), str(tmp_path / "store"),
                               EncodeConfig(encoder=str(tmp_path / "no-such-encoder")), return_state=True)
    assert state.is_failed() and "EncoderLoadError: unknown encoder" in state.message
    assert _task_runs(state) == {}


def test_no_message_of_the_library_holds_rich_markup():
    """`prefect deployment run --watch` prints run logs as rich markup: `[/x]` in a message crashes it
    (the user never sees why the run failed) and `[x]` vanishes. Every string constant outside docstrings
    counts, since any may end up in a log line or an exception; the CLI's argparse help and the store's
    column descriptions (data, compared across writers) never reach Prefect."""
    import ast
    from pathlib import Path

    from rich.markup import RE_TAGS

    root = Path(__file__).resolve().parents[1]
    exempt = {"cli/main.py", "storage_schema/schema.py"}
    found = []
    for package in ("storage_schema", "pipeline", "training", "evaluation", "demo", "flows"):
        for path in sorted((root / package).rglob("*.py")):
            if path.relative_to(root).as_posix() in exempt:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                          and node.body and isinstance(node.body[0], ast.Expr)}
            found += [f"{path.relative_to(root)}:{node.lineno}: {m.group(0)}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                      for m in RE_TAGS.finditer(node.value)]
    assert found == []
