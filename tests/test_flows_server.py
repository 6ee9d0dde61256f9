"""A real Prefect server on loopback, `eclipse-prior serve`, and `prefect deployment run ... --watch`."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name
from prefectserver import prefect_env, prefect_server, wait_for_url

from demo.server import stop_process
from storage_schema import EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_deployment(api: str, name: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    wait_for_url(f"{api}/deployments/name/{name}", proc, log, timeout)


def _watch(env: dict, deployment: str, *args: str) -> subprocess.CompletedProcess:
    # COLUMNS: rich wraps the streamed log lines at 80 columns when stdout is not a terminal.
    return subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment, *args, "--watch",
                           "--watch-timeout", "300"], env={**env, "COLUMNS": "1000"}, capture_output=True, text=True,
                          timeout=360)


@pytest.mark.slow
def test_served_local_precompute_deployment_runs_to_completion(image_server, tmp_path, monkeypatch):  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    good = {image_server.url(f"/img/{i}.jpg"): f"served picture {i}" for i in range(4)}
    pd.DataFrame({"url": list(good), "caption": list(good.values())}).to_parquet(data / "urls.parquet")
    home = tmp_path / "prefect"
    # As the README starts it: the server streams run logs, so --watch prints them (the error included).
    for setting in ("PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED", "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"):
        monkeypatch.setenv(setting, "true")
    with prefect_server(home) as api:
        env = {**prefect_env(home, api), "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}
        # The serving machine is offline: the dataset presets cannot fetch their metadata.
        serve_env = {**env, "ECLIPSE_OFFLINE": "1", "ECLIPSE_METADATA_CACHE": str(tmp_path / "meta"),
                     "HF_HUB_CACHE": str(tmp_path / "hf")}
        log = tmp_path / "serve.log"
        with open(log, "w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--data", str(data)],
                                     env=serve_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_deployment(api, "precompute/local", serve, log)
            for name in ("precompute/laion-highres-5m", "train/kandinsky22", "evaluate/karlo"):
                _wait_for_deployment(api, name, serve, log)
            _wait_for_deployment(api, "retrain/kandinsky22", serve, log)
            with urllib.request.urlopen(f"{api}/deployments/name/retrain/kandinsky22", timeout=5) as r:
                schedules = json.loads(r.read())["schedules"]
            assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * 0"]
            params = {  # relative paths: taken under `serve --data`, not the serve process's cwd
                "urls": "urls.parquet", "encoder": "tiny-clip", "out": "out",
                "download": {"image_size": 32, "processes_count": 1, "thread_count": 4,
                             "number_sample_per_shard": 2, "timeout": 3},
                "encode": {"batch_size": 2}, "cluster": {"n_workers": 1},
            }
            run = _watch(env, "precompute/local", "--params", json.dumps(params))
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log.read_text()[-4000:]
            assert "Completed" in run.stdout + run.stderr
            store = EmbeddingStore(data / "out" / "store", verify=True)
            assert store.num_rows == 4 and len(store.shards) == 2
            assert f"wrote {data / 'out'}: store {data / 'out' / 'store'} (4 rows in 2 shards)" in run.stdout

            # Offline: the encoder's files are checked before the download (hours at this size), in one
            # attempt, and --watch shows why the run failed, not only "Failed".
            offline = _watch(env, "precompute/laion-highres-5m")
            shown = offline.stdout + offline.stderr
            assert offline.returncode == 1, shown[-3000:]
            assert "EncoderLoadError" in shown and "hf download kandinsky-community/kandinsky-2-2-prior" in shown, \
                shown[-3000:]
            assert "Retrying" not in shown and "prefect.task-run" not in shown, shown[-3000:]  # no task started

            # An unknown encoder fails before the download, and the message (which once held rich markup,
            # `[/<pretrained tag>]`, that crashed --watch) reaches the watcher whole.
            typo = _watch(env, "precompute/local", "--params", json.dumps({**params, "encoder": "no-such-encoder"}))
            shown = typo.stdout + typo.stderr
            assert typo.returncode == 1, shown[-3000:]
            assert "unknown encoder 'no-such-encoder'" in shown and "<model>/<pretrained tag>`" in shown, shown[-3000:]
            assert "MarkupError" not in shown

            # The weekly retrain before any precompute: skipped (not failed), naming what to run first.
            skipped = _watch(env, "retrain/kandinsky22")
            assert skipped.returncode == 0, skipped.stdout[-3000:] + skipped.stderr[-3000:]
            assert "'Skipped'" in skipped.stdout and "precompute/laion-highres-5m" in skipped.stdout

            bad = subprocess.run(
                [sys.executable, "-m", "prefect", "deployment", "run", "precompute/local", "--params",
                 json.dumps({**params, "download": {"image_size": -5}})],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert bad.returncode != 0
            assert "image_size" in bad.stdout + bad.stderr
        finally:
            stop_process(serve, 30, group=True)
