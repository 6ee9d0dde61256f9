"""training.config: the paper's defaults, our documented choices, and the precedence of config sources."""

import json
from pathlib import Path

import pytest

from training.config import TrainConfig, cli_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_where_it_states_them():
    """The paper states: the eclipse objective, lambda 0.2, AdamW, lr 5e-5, 256 per GPU, CosineAnnealingWarmRestarts.

    AdamW and the scheduler are what `train` builds (the lr curve is checked below)."""
    cfg = TrainConfig()
    assert (cfg.objective, cfg.eclipse_lambda, cfg.lr, cfg.batch_size) == ("eclipse", 0.2, 5e-5, 256)


def test_defaults_the_paper_leaves_open_are_our_documented_choices():
    cfg = TrainConfig()
    assert (cfg.eclipse_tau, cfg.proj_reduction, cfg.weight_decay, cfg.sched_t0) == (0.07, "mean", 0.01, None)
    assert (cfg.steps, cfg.inference_steps, cfg.guidance_scale) == (60_000, 25, 4.0)
    assert cfg.preset is None and cfg.precision == "auto"  # None: the store's D decides (training.trainer)


def test_shipped_config_file_is_the_default_recipe():
    path = REPO / "training" / "configs" / "kandinsky22-eclipse.yaml"
    assert load_config(path, {"store": "/s", "out": "/o"}) == TrainConfig(store="/s", out="/o", preset="kandinsky22")


def test_config_file_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: /s\nout: /o\nlr: 1.0e-4\nsteps: 10\nema_decay: 0.999\n")
    cfg = cli_config(str(path), {"steps": 20, "lr": None}, ["eclipse_tau=0.05", "compile=true"], resume=False)
    assert (cfg.lr, cfg.steps, cfg.ema_decay, cfg.eclipse_tau, cfg.compile) == (1e-4, 20, 0.999, 0.05, True)
    (tmp_path / "c.json").write_text(json.dumps({"store": "/s", "out": "/o", "betas": [0.9, 0.95]}))
    assert load_config(tmp_path / "c.json").betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(path, {"learning_rate": 1})
    with pytest.raises(ValueError, match="objective"):
        load_config(path, {"objective": "gan"})


def test_resume_starts_from_the_saved_config(tmp_path):
    saved = TrainConfig(store="/s", out=str(tmp_path), lr=0.5).to_dict()
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    cfg = cli_config(None, {"out": str(tmp_path), "steps": 99}, None, resume=True)
    assert (cfg.lr, cfg.steps, cfg.resume, cfg.store) == (0.5, 99, True, "/s")


def test_architecture_knobs_default_to_the_preset_as_released_and_are_checked():
    cfg = TrainConfig()
    assert (cfg.num_layers, cfg.dropout, cfg.text_hidden) == (None, 0.0, True)
    base = {"store": "/s", "out": "/o"}
    assert load_config(None, base | {"dropout": 0.3, "num_layers": 4}).dropout == 0.3
    for bad, match in (({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                       ({"num_layers": 0}, "num_layers"),
                       ({"text_hidden": False, "objective": "diffusion"}, "text_hidden")):
        with pytest.raises(ValueError, match=match):
            load_config(None, base | bad)


def test_eclipse_refuses_a_batch_with_no_negatives():
    with pytest.raises(ValueError, match="eclipse needs batch_size >= 2"):
        load_config(None, {"store": "/s", "out": "/o", "batch_size": 1})
    assert load_config(None, {"store": "/s", "out": "/o", "batch_size": 1, "objective": "projection"}).batch_size == 1

