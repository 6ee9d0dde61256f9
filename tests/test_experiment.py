"""The demo's experiment summary on hand-built evaluation results and a small real store."""

import math

import numpy as np
import pytest
from storefixtures import tiny_info

from storage_schema import EmbeddingStore, StoreWriter, build_table
from training.experiment import _t_interval, format_table, oracle_metrics, summarize


def _result(values: dict[str, dict[str, float]]) -> dict:
    return {"models": {n: {"metrics": {m: {"value": v} for m, v in ms.items() if m != "probe_auc"}}
                       for n, ms in values.items()},
            "probe": {"models": {n: {"value": ms["probe_auc"]} for n, ms in values.items() if "probe_auc" in ms}}}


def test_t_interval_matches_a_hand_computation():
    lo, hi = _t_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)
    assert lo == pytest.approx(0.2 - half) and hi == pytest.approx(0.2 + half)
    assert _t_interval([0.5]) is None


def test_summary_pairs_objectives_by_seed():
    vals = {"eclipse-s0": {"cos_image": 0.9, "probe_auc": 0.95}, "eclipse-s1": {"cos_image": 0.8, "probe_auc": 0.9},
            "projection-s0": {"cos_image": 0.7, "probe_auc": 0.8}, "projection-s1": {"cos_image": 0.75,
                                                                                     "probe_auc": 0.85},
            "TextEmb": {"cos_image": 0.3}, "text-shift": {"cos_image": 0.95}, "ridge": {"cos_image": 0.9},
            "mean-image": {"cos_image": 0.8}}
    table = summarize({"heldout": _result(vals)}, {"eclipse": ["eclipse-s0", "eclipse-s1"],
                                                   "projection": ["projection-s0", "projection-s1"]})
    assert table["objectives"]["eclipse"]["heldout"]["cos_image"]["mean"] == pytest.approx(0.85)
    cos = next(p for p in table["paired"] if p["metric"] == "cos_image")
    assert cos["per_seed"] == pytest.approx([0.2, 0.05]) and cos["worst_seed"] == pytest.approx(0.05)
    assert cos["mean"] == pytest.approx(0.125) and cos["ci_over_seeds"][0] < 0.125 < cos["ci_over_seeds"][1]
    assert table["baselines"]["TextEmb"]["heldout"]["cos_image"] == 0.3
    text = format_table(table, splits=("heldout",))
    assert "eclipse - projection" in text and "text-shift" in text


def test_oracle_is_the_mean_of_the_other_renders_of_a_caption(tmp_path):
    info = tiny_info(dim=4, hidden=4)
    rng = np.random.default_rng(0)
    protos = {"a red circle": np.array([1, 0, 0, 0.0]), "a blue square": np.array([0, 1, 0, 0.0])}
    caps = ["a red circle"] * 3 + ["a blue square"] * 3 + ["a lonely star"]
    img = np.stack([protos.get(c, np.array([0, 0, 1, 0.0])) + 0.01 * rng.standard_normal(4) for c in caps])
    StoreWriter(tmp_path / "s", info).write_shard("00000", build_table(
        info, [f"k{i}" for i in range(7)], caps, img.astype(np.float16), img.astype(np.float16),
        [np.zeros((2, 4), np.float16)] * 7, [False] * 7))
    res = oracle_metrics(EmbeddingStore(tmp_path / "s"), ["00000.parquet"])
    assert res["rows"] == 6 and res["rows_without_another_render"] == 1
    assert res["metrics"]["cos_image"]["value"] > 0.99
