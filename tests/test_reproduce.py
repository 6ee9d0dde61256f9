"""The reproduce flow: the Table-2 grid as one resumable run (flags, the paper's grid offline, kill and resume)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storefixtures import write_store

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_flags_choose_the_grid():
    from cli.main import build_parser, reproduce_params
    from training.plan import PAPER_PAIRS

    parse = build_parser().parse_args
    default = reproduce_params(parse(["reproduce"]))
    assert default.datasets == ["world:1500", "world:12000"] and default.seeds == 3
    assert default.columns() == [("projection", None), ("eclipse", 0.2), ("diffusion", None)]  # at the default λ
    paper = reproduce_params(parse(["reproduce", "--paper"]))
    assert [tuple(p) for p in paper.pairs] == list(PAPER_PAIRS) and paper.data_rows() == list(PAPER_PAIRS)
    assert (paper.steps, paper.batch_size) == (60_000, 1024)
    crossed = reproduce_params(parse(["reproduce", "--paper", "--datasets", "cc3m",
                                      "--decoders", "karlo", "kandinsky22"]))
    assert crossed.data_rows() == [("cc3m", "karlo"), ("cc3m", "kandinsky22")] and crossed.steps == 60_000
    quick = reproduce_params(parse(["reproduce", "--quick", "--lambdas", "0.2", "20", "--seeds", "2"]))
    assert quick.columns() == [("projection", None), ("eclipse", 0.2), ("eclipse", 20.0), ("diffusion", None)]
    assert quick.seeds == 2 and quick.data_rows() == []
    cheap = reproduce_params(parse(["reproduce", "--quick", "--teacher-steps", "20"]))
    assert cheap.world.teacher_steps == 20 and cheap.world.shard_size == quick.world.shard_size


@pytest.mark.slow
def test_the_paper_grid_fails_fast_offline_after_writing_its_plan(tmp_path, monkeypatch, prefect_harness):
    from flows.reproduce import ReproduceParams, reproduce

    monkeypatch.setenv("ECLIPSE_OFFLINE", "1")
    # the decoders' encoders are checked before any download (the datasets' metadata would be next)
    with pytest.raises(RuntimeError, match="no row of the grid has a store: .*EncoderLoadError.*hf download"):
        reproduce(out=str(tmp_path), params=ReproduceParams.paper())
    plan = json.loads((tmp_path / "plan.json").read_text())  # the cost came first
    assert len(plan["precompute"]) == 5 and plan["config"]["steps"] == 60_000
    assert not (tmp_path / "cells").exists()


def _records(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / "cells").glob("*/*.json"))
            if not p.name.startswith("_")}  # cell records, not the row's caches (_caption_r1.json)


def _done(out: Path) -> list[str]:
    return [k for k in _records(out) if json.loads((out / k).read_text())["status"] == "done"]


@pytest.mark.slow
def test_reproduce_quick_resumes_after_sigkill_and_reports_a_failed_row(tmp_path):
    other = tmp_path / "tiny-store"  # a store made by another encoder: its row fails, the others go on
    write_store(other, shards=1, rows=20)
    out = tmp_path / "grid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_HOME", None)  # the command keeps its Prefect state under OUT/.prefect
    # A 20-step teacher: this test is about the grid's resume, not the testbed (the demo test checks that one).
    cmd = [sys.executable, "-m", "cli.main", "reproduce", "--quick", "--teacher-steps", "20", "--out", str(out),
           "--datasets", "world:300", "world:600", str(other)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _done(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _done(out), (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # mid-grid: the command and its Dask workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {k: v for k, v in _records(out).items() if k in _done(out)}
    assert not (out / "table.json").exists()  # the kill came before the table

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "cells failed" in second.stdout and "reasons in the table" in second.stdout
    after = _records(out)
    assert {k: after[k] for k in before} == before  # finished cells were not redone
    table = json.loads((out / "table.json").read_text())
    rows = {(r["dataset"], r["decoder"]): r for r in table["rows"]}
    assert set(rows) == {("world-300", "teacher"), ("world-600", "teacher"), ("tiny-store", "kandinsky22")}
    assert table["columns"] == ["projection", "eclipse-0.2", "diffusion"]
    bad = rows[("tiny-store", "kandinsky22")]
    assert [f["objective"] for f in bad["failed"]] == table["columns"]
    assert all("encoded by 'test-enc', not by kandinsky22's encoder" in f["reason"] for f in bad["failed"])
    for key in (("world-300", "teacher"), ("world-600", "teacher")):
        row = rows[key]
        assert row["failed"] == [] and {c["status"] for c in row["cells"].values()} == {"done"}
        for col in table["columns"]:
            assert row["cells"][col]["cos_image"]["n"] == 1
            assert 0 <= row["cells"][col]["caption_r1"]["mean"] <= 1  # scored on the cells' kept predictions
        assert {p["b"] for p in row["paired"]} == {"projection", "diffusion"}
        assert set(row["baselines"]) >= {"ridge", "text-shift"}
    # one run folder and one record per cell: no duplicates from the killed run
    assert sorted(after) == sorted(f"cells/{r}__teacher/{c}-s0.json" for r in ("world-300", "world-600")
                                   for c in table["columns"])
    assert len(list((out / "cells").glob("*/*-s0"))) == 6
    csv = (out / "table.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,decoder,objective,metric,mean,ci_low,ci_high")
    assert len([x for x in csv[1:] if " - " not in x.split(",")[2]]) == 3 * 3 * len(table["metrics"])
    assert "world-600 × teacher" in (out / "report.html").read_text()
