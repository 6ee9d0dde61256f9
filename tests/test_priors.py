"""Opening priors for inference and reading what their run folders record."""

import json

import pytest
import torch

from evaluation.priors import open_prior, read_training_log
from training.prior import build_prior


def test_training_log_becomes_curves(tmp_path):
    log = tmp_path / "train.jsonl"
    records = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.5, "ok": True},
               {"type": "eval", "step": 2, "cos_to_image": 0.5}, {"no_step": 1}]
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 3, "lo')  # a line cut by a kill
    curves = read_training_log(log)
    assert curves == {"train": {"step": [1.0, 2.0], "loss": [2.0, 1.5], "lr": [1e-4, None]},
                      "eval": {"step": [2.0], "cos_to_image": [0.5]}}


def test_open_prior_from_a_run_folder(tmp_path):
    run = tmp_path / "my-run"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_prior("tiny", embedding_dim=16).save_pretrained(run / "prior")
    (run / "train_config.json").write_text(json.dumps({"objective": "eclipse", "heldout_fraction": 0.1}))
    handle = open_prior(run, "cpu")
    assert (handle.name, handle.objective_name, handle.prior_dir) == ("my-run", "eclipse", run / "prior")
    assert handle.train_config["heldout_fraction"] == 0.1 and handle.log_path is None
    assert handle.embedding_dim == 16 and handle.text_length == 77
    with pytest.raises(FileNotFoundError, match="not a prior folder"):
        open_prior(tmp_path, "cpu")
