"""evaluation.gate: the promotion decision, metric by metric, and the registry it writes."""

import json

import pytest

from evaluation.gate import DECISIONS, PROMOTED, Gate, decide, read_promoted, record


def result(**models: dict[str, float]) -> dict:
    """An evaluation result as evaluate() writes it, with only the parts the gate reads."""
    return {
        "metric_info": {"cos_image": {"better": "higher"}, "frechet": {"better": "lower"},
                        "norm_ratio": {"better": "1"}},
        "models": {name: {"metrics": {k: {"value": v} for k, v in metrics.items()}}
                   for name, metrics in models.items()},
    }


def test_first_candidate_is_promoted():
    assert decide(result(new={"cos_image": 0.1}), "new", None, Gate())["promote"] is True


@pytest.mark.parametrize("metric, new, old, regression", [
    ("cos_image", 0.80, 0.90, 0.10),  # higher is better: a drop of 0.1
    ("cos_image", 0.95, 0.90, -0.05),
    ("frechet", 1.50, 1.00, 0.50),  # lower is better: a rise of 0.5
    ("norm_ratio", 1.30, 0.90, 0.20),  # closer to 1 is better: |0.3| - |-0.1|
    ("norm_ratio", 0.95, 1.20, -0.15),
])
def test_regression_is_measured_in_each_metrics_direction(metric, new, old, regression):
    res = result(new={metric: new}, old={metric: old})
    decision = decide(res, "new", "old", Gate(metrics=[metric], tolerance=0.01))
    (check,) = decision["checks"]
    assert check["regression"] == pytest.approx(regression)
    assert decision["promote"] is (regression <= 0.01)


def test_tolerance_allows_a_small_drop_and_names_what_failed():
    res = result(new={"cos_image": 0.896, "frechet": 1.2}, old={"cos_image": 0.9, "frechet": 1.0})
    assert decide(res, "new", "old", Gate(metrics=["cos_image"], tolerance=0.005))["promote"] is True
    refused = decide(res, "new", "old", Gate(metrics=["cos_image", "frechet"], tolerance=0.005))
    assert refused["promote"] is False and "['frechet']" in refused["reason"]


def test_a_missing_metric_is_an_error_not_a_pass():
    with pytest.raises(KeyError, match="no metric 'r1' for 'new'"):
        decide(result(new={"cos_image": 1.0}, old={"cos_image": 1.0}), "new", "old", Gate(metrics=["r1"]))


def test_record_appends_every_decision_and_replaces_the_promoted_prior_only_on_promotion(tmp_path):
    reg = tmp_path / "registry"
    assert read_promoted(reg) is None
    record(reg, {"promote": True, "reason": "first"}, {"prior": "a"})
    record(reg, {"promote": False, "reason": "worse"}, {"prior": "b"})
    assert read_promoted(reg) == {"prior": "a"}
    record(reg, {"promote": True, "reason": "better"}, {"prior": "c"})
    assert read_promoted(reg) == {"prior": "c"}
    lines = [json.loads(line) for line in (reg / DECISIONS).read_text().splitlines()]
    assert [d["reason"] for d in lines] == ["first", "worse", "better"] and all("time" in d for d in lines)
    assert sorted(p.name for p in reg.iterdir()) == sorted([DECISIONS, PROMOTED])  # no temp file left
