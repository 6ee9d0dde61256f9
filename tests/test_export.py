"""Export of checkpoints as diffusers-style prior folders with a model card."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from storefixtures import write_synthetic_store

from cli.main import main as cli_main
from training.config import TrainConfig
from training.export import export_checkpoint, resolve_checkpoint
from training.prior import PriorTransformer, load_prior
from training.trainer import train

DATA = Path(__file__).parent / "data"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    write_synthetic_store(root / "store", rows=128, dim=32, shards=2)
    cfg = TrainConfig(store=str(root / "store"), out=str(root / "run"), preset="tiny", objective="eclipse", steps=12,
                      batch_size=16, lr=1e-3, ema_decay=0.5, heldout_fraction=0.2, eval_batches=1, ckpt_every=6,
                      log_every=3, num_threads=1, progress=False)
    train(cfg)
    return root / "run"


def test_every_run_ends_with_an_exported_prior(run):
    out = run / "prior"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", WEIGHTS, "eclipse_training.json"]
    config = json.loads((out / "config.json").read_text())
    released = json.loads((DATA / "eclipse-prior-config.json").read_text())
    assert set(config) == set(released) and config["_class_name"] == "PriorTransformer"
    assert isinstance(load_prior(out), PriorTransformer)
    card = (out / "README.md").read_text()
    for needle in ("ECLIPSE (eq. 5): MSE (mean over D) + 0.2 x InfoNCE", "steps | 12 of 12", "EMA (decay 0.5)",
                   "encoder `synthetic` (image `synthetic/vision`", "train/loss",
                   "eval/cos_to_image", "32,352"):
        assert needle in card, needle


def test_export_uses_ema_weights_by_default_and_raw_on_request(run, tmp_path):
    ckpt = resolve_checkpoint(run)
    ema = load_file(ckpt / "ema" / WEIGHTS)
    raw = load_file(ckpt / "prior" / WEIGHTS)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    default = load_file(export_checkpoint(run, tmp_path / "a") / WEIGHTS)
    assert all(torch.equal(default[k], ema[k]) for k in ema)
    plain = load_file(export_checkpoint(ckpt, tmp_path / "b", use_ema=False) / WEIGHTS)
    assert all(torch.equal(plain[k], raw[k]) for k in raw)
    assert "raw (no EMA)" in (tmp_path / "b" / "README.md").read_text()


def test_export_of_an_older_checkpoint_and_replacing_an_export(run, tmp_path):
    older = run / "checkpoints" / "step_00000006"
    out = export_checkpoint(older, tmp_path / "p")
    assert "steps | 6 of 12" in (out / "README.md").read_text()
    export_checkpoint(run, tmp_path / "p")  # replaces the folder once the new one is complete
    assert "steps | 12 of 12" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temp or old folders left


def test_incomplete_or_unknown_folders_are_refused(run, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        export_checkpoint(half, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="neither"):
        export_checkpoint(tmp_path, tmp_path / "x")


def test_cli_export(run, tmp_path, capsys):
    assert cli_main(["export", str(run), "--out", str(tmp_path / "cli"), "--no-ema"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert isinstance(load_prior(tmp_path / "cli"), PriorTransformer)
