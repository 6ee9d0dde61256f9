"""The demo's experiment summary on hand-built evaluation results and a small real store."""

import math

import numpy as np
import pytest
from storefixtures import tiny_info

from demo.experiment import (
    _t_interval,
    format_table,
    format_testbed,
    format_tradeoff,
    oracle_metrics,
    summarize,
    summarize_testbed,
    tradeoff,
    tradeoff_charts,
    verdict,
)
from storage_schema import EmbeddingStore, StoreWriter, build_table


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
    # Grouped by a key (the demo strips templates): the lonely star joins the circles' group here.
    star = oracle_metrics(EmbeddingStore(tmp_path / "s"), ["00000.parquet"],
                          group=lambda c: "a red circle" if c == "a lonely star" else c)
    assert star["rows"] == 7 and star["rows_without_another_render"] == 0
    assert star["metrics"]["cos_image"]["value"] < res["metrics"]["cos_image"]["value"]


def test_testbed_figures_say_which_goals_are_met():
    teacher = {"color_acc": 0.99, "shape_acc": 0.85, "texture_acc": 0.95, "position_acc": None, "matched_cos": 0.31}
    gap = {"oracle_cos": 0.95, "text_shift_cos": 0.88, "gap": 0.07}
    tb = summarize_testbed(teacher, gap)
    assert tb["zero_shot"] == {"color": 0.99, "shape": 0.85, "texture": 0.95}
    assert tb["met"] == {"zero_shot_color": True, "zero_shot_shape": False, "zero_shot_texture": True,
                         "matched_cos": True, "gap": False}
    text = format_testbed(tb)
    assert text.count("GOAL MISSED") == 2 and "0.950 - text-shift cos 0.880 = 0.070" in text
    assert summarize_testbed({**teacher, "matched_cos": 0.6}, {**gap, "gap": 0.12})["met"]["matched_cos"] is False


def test_tradeoff_points_follow_lambda_with_seed_intervals():
    vals = {f"{o}-s{s}": {"cos_image": c + 0.01 * s, "probe_auc": 0.8 + 0.01 * s}
            for o, c in (("projection", 0.9), ("eclipse-2", 0.5), ("eclipse-0.2", 0.8)) for s in range(3)}
    runs = {o: [f"{o}-s{s}" for s in range(3)] for o in ("projection", "eclipse-2", "eclipse-0.2")}
    table = summarize({"heldout": _result(vals)}, runs, pairs=[("eclipse-0.2", "projection")])
    pts = tradeoff(table, {"eclipse-2": 2.0, "projection": 0.0, "eclipse-0.2": 0.2})
    assert [p["lambda"] for p in pts] == [0.0, 0.2, 2.0]
    assert pts[2]["cos_image"]["mean"] == pytest.approx(0.51)
    lo, hi = pts[2]["cos_image"]["ci_over_seeds"]
    assert lo < 0.51 < hi and pts[2]["caption_r1"]["mean"] is None  # not evaluated here
    assert "0.2" in format_tradeoff(pts).splitlines()[2]
    charts = tradeoff_charts(pts, table)  # caption R@1 was not evaluated: only the probe's two charts
    assert charts.count("<svg") == 2 and "attribute probe AUC vs cosine, the λ sweep" in charts
    paired = [p for p in table["paired"] if p["metric"] == "cos_image"]
    assert [(p["a"], p["b"]) for p in paired] == [("eclipse-0.2", "projection")]
    assert paired[0]["mean"] == pytest.approx(-0.1)


def test_a_difference_is_claimed_only_where_its_interval_excludes_zero():
    assert verdict([0.01, 0.2]) == "a > b" and verdict([-0.3, -0.02]) == "a < b"
    assert verdict([-0.01, 0.2]) == "no clear difference" and verdict(None) == "no interval"
