"""`eclipse-prior demo --quick` end to end, as the README's first command runs it (smaller)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.encoders import load_encoder
from storage_schema.inspect import inspect_store
from training.prior import load_prior

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_HOME", None)  # the demo keeps its own Prefect state under OUT/.prefect
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "paired differences" in first.stdout + first.stderr and str(out / "report.html") in first.stdout

    # teacher: an ordinary encoder folder with a realistic modality gap (ranges for the 250-step quick run;
    # the full 600-step teacher reaches color ~1.00, shape ~0.98, matched cos ~0.34: pipeline/teacher.py)
    m = json.loads((out / "metrics.json").read_text())
    t = m["teacher"]
    assert t["color_acc"] >= 0.9 and t["shape_acc"] >= 0.3
    assert 0.2 <= t["matched_cos"] <= 0.5 and t["image_image_cos"] >= 0.9
    assert load_encoder(out / "teacher").info.image_dim == 64

    report = inspect_store(out / "data" / "store")
    assert report["problems"] == [] and report["rows"] == m["split"]["heldin_rows"] + m["split"]["heldout_rows"]
    for obj in ("projection", "eclipse", "diffusion"):
        assert load_prior(out / "runs" / f"{obj}-s0" / "prior").config.embedding_dim == 64
        for split in ("heldin", "heldout"):
            for metric in ("cos_image", "caption_r1", "probe_auc"):
                assert m["experiment"]["objectives"][obj][split][metric]["mean"] is not None, (obj, split, metric)
    for base in ("TextEmb", "text-shift", "ridge", "oracle"):
        assert base in m["experiment"]["baselines"]
    assert {p["a"] + "-" + p["b"] for p in m["experiment"]["paired"]} == {"eclipse-projection", "eclipse-diffusion"}
    html = (out / "report.html").read_text()
    assert "Demo: the ECLIPSE experiment" in html and "<svg" in html and "data:image/png;base64," in html

    # a rerun resumes: every stage finds its work done and nothing is rewritten
    watched = [out / "teacher" / "encoder.json", out / "data" / "store" / "_manifest.json",
               out / "runs" / "eclipse-s0" / "prior" / "config.json", out / "eval-heldout" / "metrics.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_demo_refuses_to_resume_a_folder_made_with_other_settings(prefect_harness, tmp_path):
    from flows.demo import DemoParams, demo

    (tmp_path / "demo_state.json").write_text(json.dumps({"port": 1, "params": DemoParams().model_dump()}))
    with pytest.raises(ValueError, match="holds a demo run with other settings"):
        demo(out=str(tmp_path), params=DemoParams.quick())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_state.json"]  # nothing started
