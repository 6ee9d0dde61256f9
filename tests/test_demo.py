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


def test_demo_flags_choose_the_lambda_sweep():
    from cli.main import build_parser, demo_params

    parse = build_parser().parse_args
    assert demo_params(parse(["demo"])).lambdas == [0.02, 0.2, 2.0]
    wide = demo_params(parse(["demo", "--lambdas", "0.2", "20", "200"]))
    assert wide.lambdas == [0.2, 20.0, 200.0] and wide.images == 8000
    quick = demo_params(parse(["demo", "--quick", "--lambdas", "2"]))
    assert quick.lambdas == [2.0] and quick.images < 8000
    assert set(quick.objectives()) == {"projection", "eclipse-2", "eclipse-sum-0.2", "diffusion"}


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"  # a fresh folder, as the README's first command runs it (smaller)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_HOME", None)  # the demo keeps its own Prefect state under OUT/.prefect
    cmd = [sys.executable, "-m", "cli.main", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "paired differences" in first.stdout + first.stderr and str(out / "report.html") in first.stdout

    # teacher: an ordinary encoder folder; the testbed figures are measured and recorded whichever way they fall
    m = json.loads((out / "metrics.json").read_text())
    assert load_encoder(out / "teacher").info.image_dim == 64
    tb = m["testbed"]
    assert set(tb["zero_shot"]) == {"color", "shape", "texture", "position"}
    gap = tb["heldout_gap"]
    assert gap["gap"] == pytest.approx(gap["oracle_cos"] - gap["text_shift_cos"])
    # The quick testbed can tell a good prior from a constant vector (0.15 measured; 0.05 at logit scale 50).
    assert gap["gap"] >= 0.10 and tb["met"]["gap"]
    assert set(tb["met"]) == {"zero_shot_color", "zero_shot_shape", "zero_shot_texture", "zero_shot_position",
                              "matched_cos", "gap", "store_gap"}
    # ... and on the store the priors train and are scored on: room beyond "text + a constant vector" there too
    base = m["experiment"]["baselines"]
    store = tb["store_gap"]
    oracle, shift = base["oracle"]["heldout"]["cos_image"], base["text-shift"]["heldout"]["cos_image"]
    assert store["gap"] == pytest.approx(oracle - shift)
    assert store["gap"] >= 0.10 and tb["met"]["store_gap"], store
    assert "store level:" in first.stdout and "teacher level:" in first.stdout
    # The teacher learns colors and shapes (chance: 1/8 and 1/6; an untrained tower fails), and training
    # (no offset by hand) leaves a modality gap (0.66 against 0.92) that a prior can close on held-out captions.
    assert tb["zero_shot"]["color"] >= 0.8 and tb["zero_shot"]["shape"] >= 0.4
    assert tb["matched_cos"] < m["teacher"]["image_image_cos"] - 0.2 and gap["oracle_cos"] > gap["text_emb_cos"]
    saved = json.loads((out / "teacher" / "teacher_report.json").read_text())
    assert saved["report"]["shape_acc"] == m["teacher"]["shape_acc"] and saved["config"]["steps"] == 600
    assert "held-out oracle cos" in first.stdout

    report = inspect_store(out / "data" / "store")
    assert report["problems"] == [] and report["rows"] == m["split"]["heldin_rows"] + m["split"]["heldout_rows"]
    objectives = {"projection", "eclipse-0.2", "eclipse-sum-0.2", "diffusion"}
    assert set(m["experiment"]["objectives"]) == objectives
    for obj in objectives:
        assert load_prior(out / "runs" / f"{obj}-s0" / "prior").config.embedding_dim == 64
    saved_config = {obj: json.loads((out / "runs" / f"{obj}-s0" / "train_config.json").read_text())
                    for obj in ("eclipse-0.2", "eclipse-sum-0.2")}
    assert [(c["eclipse_lambda"], c["proj_reduction"]) for c in saved_config.values()] == [(0.2, "mean"), (0.2, "sum")]
    # The priors learned something: checks an untrained prior fails (its prediction is a random
    # direction: cosine ~0 to the image and probe AUC ~0.5, chance, like the mean image's).
    base, exp = m["experiment"]["baselines"], m["experiment"]["objectives"]
    for obj in objectives:
        heldin = {k: exp[obj]["heldin"][k]["mean"] for k in ("cos_image", "probe_auc")}
        assert heldin["cos_image"] > base["TextEmb"]["heldin"]["cos_image"] + 0.1, (obj, heldin)
        assert heldin["probe_auc"] > base["mean-image"]["heldin"]["probe_auc"] + 0.1, (obj, heldin)
    assert m["budget"]["steps"] == 150 and m["budget"]["prior_parameters"] > 35_000
    assert [p["lambda"] for p in m["tradeoff"]] == [0.0, 0.2]  # the literal form is no point of the mean's sweep
    assert {p["a"] + "-" + p["b"] for p in m["experiment"]["paired"]} == {
        "eclipse-0.2-projection", "eclipse-sum-0.2-projection", "eclipse-0.2-diffusion"}
    html = (out / "report.html").read_text()
    assert "Demo: the ECLIPSE experiment" in html and "data:image/png;base64," in html
    assert "caption R@1 (right composition) vs cosine to the real image" in html and "Testbed figures" in html

    # a rerun resumes: every stage finds its work done and nothing is rewritten
    watched = [out / "teacher" / "encoder.json", out / "data" / "store" / "_manifest.json",
               out / "runs" / "eclipse-0.2-s0" / "prior" / "config.json", out / "eval-heldout" / "metrics.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in watched] == before
    timings = json.loads((out / "timings.json").read_text())  # the time profile, printed and kept
    assert set(timings) >= {"teacher", "precompute", "training priors", "evaluation", "report"}
    assert "time profile of this run" in second.stdout


def test_demo_runs_every_lambda_and_pairs_diffusion_with_the_papers():
    from flows.demo import DemoParams

    p = DemoParams()
    assert p.objectives() == {"projection": ("projection", 0.0, "mean"), "eclipse-0.02": ("eclipse", 0.02, "mean"),
                              "eclipse-0.2": ("eclipse", 0.2, "mean"), "eclipse-2": ("eclipse", 2.0, "mean"),
                              "eclipse-sum-0.2": ("eclipse", 0.2, "sum"),  # Eq. 3's letter, beside the sweep
                              "diffusion": ("diffusion", None, "mean")}
    assert p.sweep() == {"projection": 0.0, "eclipse-0.02": 0.02, "eclipse-0.2": 0.2, "eclipse-2": 2.0}
    assert p.seeds >= 3 and DemoParams.quick().objectives().keys() == {"projection", "eclipse-0.2", "eclipse-sum-0.2",
                                                                        "diffusion"}


def test_demo_refuses_to_resume_a_folder_made_with_other_settings(prefect_harness, tmp_path):
    from flows.demo import DemoParams, demo

    (tmp_path / "demo_state.json").write_text(json.dumps({"port": 1, "params": DemoParams().model_dump()}))
    with pytest.raises(ValueError, match="holds a demo run with other settings"):
        demo(out=str(tmp_path), params=DemoParams.quick())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_state.json"]  # nothing started
