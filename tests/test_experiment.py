"""The demo's experiment summary on hand-built evaluation results and a small real store."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from storefixtures import tiny_info

from demo.experiment import (
    experiment_verdict,
    format_table,
    format_testbed,
    format_tradeoff,
    oracle_metrics,
    report_section,
    store_gap,
    summarize,
    summarize_testbed,
    tradeoff,
    tradeoff_charts,
    write_demo_report,
)
from storage_schema import EmbeddingStore, StoreWriter, build_table


def _result(values: dict[str, dict[str, float]]) -> dict:
    return {"models": {n: {"metrics": {m: {"value": v} for m, v in ms.items() if m != "probe_auc"}}
                       for n, ms in values.items()},
            "probe": {"models": {n: {"value": ms["probe_auc"]} for n, ms in values.items() if "probe_auc" in ms}}}


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
    assert cos["mean"] == pytest.approx(0.125) and cos["ci"][0] < 0.125 < cos["ci"][1]
    assert table["baselines"]["TextEmb"]["heldout"]["cos_image"] == 0.3
    lines = format_table(table, splits=("heldout",)).splitlines()
    assert lines[1].split() == ["eclipse", "(mean", "over", "seeds)", "0.850", "—", "0.925"]
    assert lines[-2:] == [  # t(0.975; 1) = 12.706: two seeds give wide intervals
        "  eclipse - projection    heldout  cos_image  +0.125 [-0.828, +1.078]  worst seed +0.050  no clear difference",
        "  eclipse - projection    heldout  probe_auc  +0.100 [-0.535, +0.735]  worst seed +0.050  no clear difference"]
    # an interval that excludes 0 but lies within 0.01 of it is no effect worth claiming
    cos.update(mean=0.002, ci=[0.001, 0.003])
    assert format_table(table, splits=("heldout",)).splitlines()[-2].endswith("negligible (< 0.01)")
    cos.update(mean=0.05, ci=[0.02, 0.08])
    assert format_table(table, splits=("heldout",)).splitlines()[-2].endswith("a > b")


def test_the_probe_families_are_paired_per_seed_too():
    res = _result({f"{o}-s{s}": {"cos_image": 0.5} for o in ("eclipse", "projection") for s in range(3)})
    shape = {f"eclipse-s{s}": 0.80 + 0.01 * s for s in range(3)} | {f"projection-s{s}": 0.70 for s in range(3)}
    res["probe"]["families"] = {"shape": {"models": {n: {"value": v} for n, v in shape.items()}}}
    table = summarize({"heldout": res}, {o: [f"{o}-s{s}" for s in range(3)] for o in ("eclipse", "projection")})
    assert table["objectives"]["eclipse"]["heldout"]["probe_shape"]["mean"] == pytest.approx(0.81)
    assert table["objectives"]["eclipse"]["heldout"]["probe_color"]["mean"] is None  # not evaluated
    paired = {p["metric"]: p for p in table["paired"]}
    assert set(paired) == {"cos_image", "probe_shape"}
    assert paired["probe_shape"]["per_seed"] == pytest.approx([0.10, 0.11, 0.12])
    assert "eclipse - projection    heldout  probe_shape +0.110 [+0.085, +0.135]" in format_table(table, ("heldout",))


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
    gap = {"oracle_cos": 0.95, "text_shift_cos": 0.88, "gap": 0.07, "captions": 100, "renders_per_caption": 6}
    tb = summarize_testbed(teacher, gap)
    assert tb["zero_shot"] == {"color": 0.99, "shape": 0.85, "texture": 0.95}
    assert tb["met"] == {"zero_shot_color": True, "zero_shot_shape": False, "zero_shot_texture": True,
                         "matched_cos": True, "gap": False}
    text = format_testbed(tb)
    assert text.count("GOAL MISSED") == 2 and "0.950 - text-shift cos 0.880 = 0.070" in text
    assert "store level" not in text  # measured once the priors are evaluated
    assert summarize_testbed({**teacher, "matched_cos": 0.6}, {**gap, "gap": 0.12})["met"]["matched_cos"] is False
    # the store level: the evaluation's oracle and text-shift rows on held-out compositions
    table = {"baselines": {"oracle": {"heldout": {"cos_image": 0.90}}, "text-shift": {"heldout": {"cos_image": 0.82}}}}
    sg = store_gap(table)
    assert sg["gap"] == pytest.approx(0.08) and (sg["oracle_cos"], sg["text_shift_cos"]) == (0.90, 0.82)
    both = summarize_testbed(teacher, {**gap, "gap": 0.12}, sg)
    assert both["met"]["gap"] is True and both["met"]["store_gap"] is False
    text = format_testbed(both)
    assert "teacher level" in text and "store level:   held-out oracle cos 0.900 - text-shift cos 0.820 = 0.080" in text
    assert text.count("GOAL MISSED") == 2  # shape, the store gap


def test_tradeoff_points_follow_lambda_with_seed_intervals():
    vals = {f"{o}-s{s}": {"cos_image": c + 0.01 * s, "probe_auc": 0.8 + 0.01 * s}
            for o, c in (("projection", 0.9), ("eclipse-2", 0.5), ("eclipse-0.2", 0.8)) for s in range(3)}
    runs = {o: [f"{o}-s{s}" for s in range(3)] for o in ("projection", "eclipse-2", "eclipse-0.2")}
    table = summarize({"heldout": _result(vals)}, runs, pairs=[("eclipse-0.2", "projection")])
    pts = tradeoff(table, {"eclipse-2": 2.0, "projection": 0.0, "eclipse-0.2": 0.2})
    assert [p["lambda"] for p in pts] == [0.0, 0.2, 2.0]
    assert pts[2]["cos_image"]["mean"] == pytest.approx(0.51)
    lo, hi = pts[2]["cos_image"]["ci"]
    assert lo < 0.51 < hi and pts[2]["caption_r1"]["mean"] is None  # not evaluated here
    assert "0.2" in format_tradeoff(pts).splitlines()[2]
    charts = tradeoff_charts(pts, table)  # caption R@1 was not evaluated: only the probe's two charts
    assert [ET.fromstring(c).find("{http://www.w3.org/2000/svg}title").text for c in charts] == [
        "heldout: attribute probe AUC vs cosine, the λ sweep",
        "heldout: attribute probe AUC vs cosine to the real image"]
    paired = [p for p in table["paired"] if p["metric"] == "cos_image"]
    assert [(p["a"], p["b"]) for p in paired] == [("eclipse-0.2", "projection")]
    assert paired[0]["mean"] == pytest.approx(-0.1)


def _demo_table() -> tuple[dict, list[dict]]:
    vals = {f"{o}-s{s}": {"cos_image": c + 0.01 * s, "probe_auc": 0.8 + 0.01 * s}
            for o, c in (("projection", 0.9), ("eclipse-0.2", 0.8)) for s in range(2)}
    vals |= {"TextEmb": {"cos_image": 0.3, "probe_auc": 0.5}, "text-shift": {"cos_image": 0.85}}
    runs = {o: [f"{o}-s{s}" for s in range(2)] for o in ("projection", "eclipse-0.2")}
    table = summarize({"heldout": _result(vals)}, runs, pairs=[("eclipse-0.2", "projection")])
    return table, tradeoff(table, {"projection": 0.0, "eclipse-0.2": 0.2})


def test_the_experiment_section_shows_the_table_and_escapes_text():
    table, points = _demo_table()
    html = report_section(table, {"matched_cos": 0.31, "steps": 100, "path": "/x"}, "<b>5 & 6</b>",
                          splits=("heldout",), points=points)
    assert "<p>&lt;b&gt;5 &amp; 6&lt;/b&gt;</p>" in html  # notes are text
    assert '<tr><td class="l"><b>eclipse-0.2</b></td><td>0.805</td><td>—</td><td>0.805</td></tr>' in html
    assert '<tr><td class="l">TextEmb</td><td>0.300</td><td>—</td><td>0.500</td></tr>' in html
    assert "<td>-0.100</td>" in html and "<td>-0.100, -0.100</td>" in html  # mean and per seed, eclipse − projection
    assert ('<tr><td class="l">matched_cos</td><td>0.310</td></tr><tr><td class="l">steps</td><td>100</td></tr>'
            in html)  # no path
    assert html.count("<svg") == 2 and "Testbed figures" not in html


def test_the_demo_report_puts_the_experiment_on_the_evaluation_report(tmp_path):
    table, points = _demo_table()
    ev = tmp_path / "eval-heldout"
    (ev / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(ev / "images" / "img-1.png")
    result = {"models": {"TextEmb": {"kind": "baseline", "metrics": {"cos_image": {"value": 0.3, "ci": [0.2, 0.4]}}}},
              "metric_info": {"cos_image": {"what": "cosine", "better": "higher"}},
              "examples": [{"key": "k1", "caption": "a red circle", "image": "img-1", "models": {
                  "TextEmb": {"true_rank": 1, "cos_true": 0.9, "neighbours": []}}}]}
    (ev / "metrics.json").write_text(json.dumps(result))
    path = write_demo_report(tmp_path / "report.html", ev, table, {"matched_cos": 0.31}, "notes here",
                             splits=("heldout",), points=points)
    html = path.read_text(encoding="utf-8")
    assert html.count("<body>") == 1 and html.count("<h1>") == 2
    assert html.index("<h1>Demo: the ECLIPSE experiment") < html.index("<h1>Prior evaluation</h1>")
    assert html.count("data:image/png;base64,") == 1  # the evaluation's image, read back from images/
    assert html.count("<svg") == 2 + 1  # the λ sweep's probe charts, the evaluation's cos_image bars


def _budget_results(projection_steps: tuple[int, int, int] = (1000, 1000, 1000)) -> dict:
    """Held-out figures of three objectives x three seeds, with the runs' configs as metrics.json holds them.
    eclipse-0.2 − projection: caption R@1 an effect, cosine within 0.01 of 0, probe unclear; diffusion trained
    twice the steps of the others."""
    figures = {"eclipse-0.2": ([0.80, 0.81, 0.82], [0.45, 0.46, 0.47], [0.90, 0.80, 0.95]),
               "projection": ([0.798, 0.808, 0.817], [0.40, 0.41, 0.43], [0.85, 0.88, 0.86]),
               "diffusion": ([0.70, 0.71, 0.73], [0.20, 0.25, 0.22], [0.70, 0.72, 0.71])}
    vals = {f"{o}-s{s}": {"cos_image": cos[s], "probe_auc": auc[s]} for o, (cos, _, auc) in figures.items()
            for s in range(3)}
    res = _result(vals)
    res["caption_retrieval"] = {"models": {f"{o}-s{s}": {"value": r1[s]} for o, (_, r1, _) in figures.items()
                                           for s in range(3)}}
    steps = {"eclipse-0.2": (1000,) * 3, "projection": projection_steps, "diffusion": (2000,) * 3}
    res["training"] = {f"{o}-s{s}": {"config": {"steps": steps[o][s], "batch_size": 32}} for o in figures
                       for s in range(3)}
    return res


def _budget_table(**kw) -> dict:
    runs = {o: [f"{o}-s{s}" for s in range(3)] for o in ("eclipse-0.2", "projection", "diffusion")}
    return summarize({"heldout": _budget_results(**kw)}, runs,
                     pairs=[("eclipse-0.2", "projection"), ("eclipse-0.2", "diffusion")])


def test_the_experiment_verdict_reads_the_paired_differences_and_the_budgets():
    table = _budget_table()
    assert table["budgets"]["diffusion"]["diffusion-s1"]["steps"] == 2000  # from the runs' configs
    recs = experiment_verdict(table, splits=("heldout",))
    assert [r["kind"] for r in recs] == ["rule", "budgets", "flag", "metric", "metric", "metric"]
    assert "95 % t-interval over training seeds excludes 0 and lies at least 0.01 from it" in recs[0]["text"]
    assert recs[1]["text"] == ("Training budgets (steps × batch): 1,000 steps × batch 32 per process: eclipse-0.2, "
                               "projection; 2,000 steps × batch 32 per process: diffusion.")
    assert recs[2]["text"].startswith("⚠ Objectives trained with different budgets are compared")
    metric = {r["metric"]: r for r in recs if r["kind"] == "metric"}
    r1 = metric["caption_r1"]
    assert r1["text"] == ("caption R@1 (the right composition) on held-out compositions (higher is better): "
                          "eclipse-0.2 (1,000 steps × batch 32 per process) is the best objective, 0.460.")
    assert r1["clauses"][0]["text"] == ("eclipse-0.2 − projection = +0.047 [+0.032, +0.061]: eclipse-0.2 is better, "
                                        "an effect")
    assert r1["clauses"][1]["text"].endswith(": eclipse-0.2 is better, an effect (⚠ different budgets)")
    cos = metric["cos_image"]
    assert not cos["best"] and "has the best value of the objectives, 0.810" in cos["text"]
    assert cos["clauses"][0]["text"] == ("eclipse-0.2 − projection = +0.002 [+0.001, +0.004]: no clear difference "
                                         "(the interval excludes 0 but lies within 0.01 of it)")
    probe = metric["probe_auc"]
    assert not probe["best"] and probe["clauses"][0]["text"].endswith(": no clear difference")
    assert not probe["clauses"][0]["effect"] and probe["clauses"][0]["ci"][0] < 0 < probe["clauses"][0]["ci"][1]

    # one objective's seeds trained with different budgets: flagged, and its budget is not one number
    recs = experiment_verdict(_budget_table(projection_steps=(1000, 1500, 1000)), splits=("heldout",))
    mixed = [r["text"] for r in recs if r["kind"] == "flag" and "training seeds" in r["text"]]
    assert mixed == ["⚠ The training seeds of one objective had different budgets: projection (projection-s0: "
                     "1,000 steps × batch 32 per process; projection-s1: 1,500 steps × batch 32 per process; "
                     "projection-s2: 1,000 steps × batch 32 per process)."]
    assert "budget unknown: projection" in recs[1]["text"]


def test_the_demo_report_opens_with_the_experiment_verdict(tmp_path):
    table = _budget_table()
    ev = tmp_path / "eval-heldout"
    ev.mkdir()
    result = _budget_results()
    result["probe"] |= {"words": ["red"], "train_rows": 10}
    for m in result["models"].values():  # as evaluate writes them: priors, with intervals
        m["kind"] = "prior"
        cos = m["metrics"]["cos_image"]
        cos["ci"] = [cos["value"] - 0.01, cos["value"] + 0.01]
    (ev / "metrics.json").write_text(json.dumps(result | {"metric_info": {}}))
    html = write_demo_report(tmp_path / "report.html", ev, table, {"matched_cos": 0.31}, "notes",
                             splits=("heldout",)).read_text(encoding="utf-8")
    body = html.split("<body>", 1)[1]
    demo_h1, evaluation_h1 = body.index("<h1>Demo: the ECLIPSE experiment"), body.index("<h1>Prior evaluation</h1>")
    verdicts = [i for i in range(len(body)) if body.startswith('<div class="verdict">', i)]
    assert len(verdicts) == 2  # the experiment's, then the evaluation's own
    assert demo_h1 < verdicts[0] < body.index("<p>notes</p>") < evaluation_h1 < verdicts[1]
    top = body[verdicts[0]:body.index("</div>", verdicts[0])]
    assert '<li class="flag">⚠ Objectives trained with different budgets are compared' in top
    assert "eclipse-0.2 − projection = +0.047 [+0.032, +0.061]: eclipse-0.2 is better, an effect." in top
    # the paired-differences table still reads each difference
    assert "<td>negligible (&lt; 0.01)</td>" in html and "<td>a &gt; b</td>" in html
