"""benchmarks/loss_balance.py: a seconds-long smoke run of both parts, and the stream the trained part learns."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "loss_balance.py"


def _module():
    spec = importlib.util.spec_from_file_location("loss_balance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_stream_has_real_clips_matched_cosine_and_a_learnable_part():
    stream = _module().PairStream(dim=256, norm=21.0, text_len=4)
    image, text, hidden, mask = stream.next(4000)
    assert image.norm(dim=-1).mean() == pytest.approx(21.0, rel=1e-4) and mask.all()
    assert float(F.cosine_similarity(image, text, dim=-1).mean()) == pytest.approx(0.3, abs=0.05)
    # the best prediction knows u as well as t: the mean image direction given the latent
    best = F.normalize(0.3 * F.normalize(text, dim=-1) + 0.6 * F.normalize(image - 0.3 * text, dim=-1), dim=-1)
    assert float(F.cosine_similarity(best, image, dim=-1).mean()) > 0.6


def test_both_parts_run_and_print_their_figures():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--presets", "tiny", "--norms", "1", "21", "--batch-size", "8",
                          "--steps", "10", "--layers", "1", "--text-length", "4"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split("=") for line in out.stdout.strip().splitlines()[-8:])
    assert set(figures) == {f"{part}_tiny_z{z}_{r}" for part in ("init", "trained") for z in (1, 21)
                            for r in ("mean", "sum")}
    values = {k: float(v) for k, v in figures.items()}
    assert all(math.isfinite(v) and v > 0 for v in values.values())
    for z in (1, 21):  # L_proj summed over D is D times the mean: its gradient too, so the ratio is D times smaller
        assert values[f"init_tiny_z{z}_mean"] == pytest.approx(32 * values[f"init_tiny_z{z}_sum"], rel=1e-3)
    assert "after training" in out.stdout and "converged" in out.stdout


