"""The HTML report: self-contained, escaped, its charts are the right matplotlib SVGs, and a real
browser at 1400 px shows it without clipping."""

import base64
import io
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from storefixtures import random_rows, tiny_info

from evaluation.evaluate import EvalConfig, evaluate
from evaluation.report import (
    CHART_METRICS,
    CURVES,
    SUMMARY_METRICS,
    budget_label,
    fmt,
    image_data_uri,
    load_images,
    prior_budget,
    render_report,
    report_context,
    verdict,
    write_report,
)
from storage_schema import StoreWriter, build_table
from training.export import STATE, model_card
from training.prior import build_prior

NASTY = '<script>alert("x")</script> & a red square'
SVG = "{http://www.w3.org/2000/svg}"


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []
        self.best: list[str] = []  # the first text after each td class="best"
        self._in_best = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_best = tag == "td" and a.get("class") == "best"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_best and data.strip():
            self.best.append(data.strip())
            self._in_best = False


def svg_titles(html: str) -> list[str]:
    """The <title> of every inline SVG, in page order."""
    svgs = ["<svg" + s.split("</svg>")[0] + "</svg>" for s in html.split("<svg")[1:]]
    return [ET.fromstring(s).find(f"{SVG}title").text for s in svgs]


def summary(value: float, lo: float, hi: float) -> dict:
    return {"value": value, "ci": [lo, hi], "n": 10}


def synthetic_result() -> dict:
    """Every section of a report, with long names and captions: what the browser test renders."""
    models = {f"eclipse-λ{lam}-a-rather-long-run-name-s{s}": ("prior", 0.8 + 0.01 * s + lam / 100)
              for lam in (0.2, 2) for s in range(3)}
    models |= {"TextEmb": ("baseline", 0.3), "text-shift": ("baseline", 0.85), "ridge": ("baseline", 0.84),
               "mean-image": ("baseline", 0.7)}
    metric_info = {k: {"what": f"what {k} measures, said at some length so that the title must wrap twice over "
                               f"in a chart of ordinary width", "better": "higher"} for k in SUMMARY_METRICS}
    res = {
        "created": "2026-01-01 00:00:00", "elapsed_s": 1.0, "metric_info": metric_info,
        "store": {"path": "/a/store", "rows": 100, "encoder": {"preset": "test", "image_dim": 16}},
        "split": {"heldout_fraction": 0.1, "heldout_seed": 0, "source": "run config", "heldout_rows": 10},
        "settings": {"seeds": 3, "n_boot": 100, "ci": 0.95},
        "dataset": {"cos_text_image": summary(0.3, 0.28, 0.32)},
        "models": {n: {"kind": kind, "objective": "eclipse" if kind == "prior" else None,
                       "metrics": {k: summary(v + 0.00123, v - 0.0213, v + 0.0187) for k in SUMMARY_METRICS}}
                   for n, (kind, v) in models.items()},
        "comparisons": [{"a": "TextEmb", "b": "ridge", "metric": "cos_image", **summary(-0.5, -0.6, -0.4)}]
        + [{"a": "eclipse-λ2-a-rather-long-run-name-s2", "b": n, "metric": m, **summary(d, d - 0.012, d + 0.012)}
           for n, (_, v) in models.items() if n != "eclipse-λ2-a-rather-long-run-name-s2"
           for m in ("cos_image", "r1") for d in [0.8 + 0.02 + 0.02 - v]],
        "probe": {"words": ["red", "blue"], "train_rows": 50,
                  "models": {n: summary(0.6, 0.5, 0.7) for n in models},
                  "families": {"color": {"words": ["red", "blue"],
                                         "models": {n: summary(0.6, 0.5, 0.7) for n in models}},
                               "shape": {"words": ["square"],
                                         "models": {n: summary(0.543, 0.5, 0.7) for n in models}},
                               "spatial": {"skipped": "no spatial word (6: left, right) occurs"}}},
        "training": {n: {"curves": {"train": {"step": [0, 100, 200, 300], "loss": [2.0 + i, 1.5, 1.2, 1.0 + i / 10]},
                                    "eval": {"step": [800], "loss": [1.1], "cos_to_image": [0.7 + i / 50]}},
                         "config": {"steps": 1000 * (1 + i // 3), "batch_size": 32}}  # the λ 2 runs: twice the steps
                     for i, n in enumerate(list(models)[:6])},
    }
    cats = ("color", "shape", "texture", "spatial")
    swaps = [["a red cube", "a blue cube"]]
    res["prompts"] = {"encoder": "test", "overall": {n: {"swap_acc": summary(0.7, 0.6, 0.8)} for n in models},
                      "categories": {c: {"n_prompts": 10, "n_swaps": 5, "swap_examples": swaps,
                                         "models": {n: {m: summary(0.5 + 0.05 * i, 0.45, 0.6)
                                                        for m in ("swap_acc", "cos_nearest_image", "cos_text")}
                                                    for i, n in enumerate(models)}} for c in cats}}
    res["examples"] = [{"key": "k1", "caption": "a very long caption " * 20, "image": "img-k1",
                        "models": {n: {"true_rank": 1, "cos_true": 0.9, "neighbours": [
                            {"key": f"k{j}", "cos": 0.9, "is_true": j == 1, "caption": "a caption " * 20,
                             "image": f"img-k{j}"} for j in range(1, 4)]} for n in models}}]
    return res


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A small random store (storage_schema's writer), one image per row in a folder named by key."""
    root = tmp_path_factory.mktemp("report")
    info = tiny_info(dim=16, hidden=16)
    writer = StoreWriter(root / "store", info)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        rows = random_rows(60, info, seed=s, prefix=f"s{s}-")
        rows["captions"][0] = NASTY  # must come out escaped
        writer.write_shard(f"{s:05d}", build_table(info, **rows))
        for k in rows["keys"]:
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build_prior("tiny", embedding_dim=16).save_pretrained(root / "prior")
    out = root / "out"
    res = evaluate(EvalConfig([root / "prior"], root / "store", out, heldout_fraction=0.5, seeds=3, n_boot=100,
                              prompt_suite=True, image_source=root / "images", n_examples=60, device="cpu"))
    return res, out


def test_report_is_self_contained_and_embeds_its_images(evaluated):
    res, out = evaluated
    html = (out / "report.html").read_text(encoding="utf-8")
    p = Collect()
    p.feed(html)
    assert p.imgs, "example images should be embedded"
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "PNG" and min(im.size) > 0
    assert not [r for r in p.refs if not r.startswith("data:")], "nothing may be fetched from elsewhere"
    assert "<script>" not in html and "&lt;script&gt;" in html  # captions are escaped
    text = " ".join(p.text)
    for section in ("Embedding metrics on the held-out split", "TextEmb", "text-shift", "mean-image", "ridge",
                    "Paired differences", "Examples"):
        assert section in text
    # the store's encoder ("test-enc") cannot be loaded: the suite is skipped, and the report says why
    assert "skipped" in res["prompts"] and "test-enc" in res["prompts"]["skipped"]
    assert "Prompt suites" in text and "unavailable" in text
    assert "skipped" in res["probe"]  # random captions: no attribute word to probe
    # a prior folder has no training log: no curves, and the report names it
    prior = next(n for n, m in res["models"].items() if m["kind"] == "prior")
    assert f"No training log for: {prior} (pass a run folder" in text


def test_the_charts_are_the_metric_bars(evaluated):
    res, out = evaluated
    html = (out / "report.html").read_text(encoding="utf-8")
    info = res["metric_info"]
    # probe and prompt suites skipped, no training log: exactly one bar chart per chart metric
    assert svg_titles(html) == [f"{k}: {info[k]['what']}" for k in CHART_METRICS]


def test_the_best_value_of_each_column_is_marked():
    res = synthetic_result()
    res["models"] = {"low": {"kind": "prior", "objective": "eclipse", "metrics": {
                         "cos_image": summary(0.2, 0.1, 0.3), "frechet": summary(5.0, 4.0, 6.0)}},
                     "high": {"kind": "baseline", "metrics": {
                         "cos_image": summary(0.9, 0.8, 1.0), "frechet": summary(9.0, 8.0, 10.0)}}}
    res["metric_info"] = {"cos_image": {"what": "cos", "better": "higher"},
                          "frechet": {"what": "fd", "better": "lower"}}
    res["probe"] = {"skipped": "no words"}
    rows = report_context(res)["summary"]["rows"]
    assert [(r["name"], [best for _, best in r["cells"]]) for r in rows] == [("low", [False, True]),
                                                                           ("high", [True, False])]
    p = Collect()
    p.feed(render_report(res))
    assert p.best == ["5", "0.9"]  # Fréchet distance of "low" (row 1), cos_image of "high" (row 2)


def test_every_section_renders_and_the_page_is_deterministic(tmp_path):
    res = synthetic_result()
    images = {f"img-k{j}": Image.new("RGB", (40, 30), (60 * j, 0, 0)) for j in range(1, 4)}
    html = write_report(res, tmp_path / "r.html", images).read_text(encoding="utf-8")
    assert html == render_report(res, images)  # fixed SVG ids and no dates: the same bytes twice
    titles = svg_titles(html)
    assert titles[-3:] == ["training loss", "held-out cos(pred, image) during training",
                           "held-out loss during training"]
    assert len(titles) == len(CHART_METRICS) + 1 + 3 + 3  # metric bars, probe, prompt charts with data, curves
    assert html.count("data:image/png;base64,") == 1 + 3 * 10  # the example's image + 3 neighbours x 10 models
    assert "a red cube → a blue cube" in html


BALANCE_TITLES = ["L_proj (Eq. 3) during training (log scale)",
                  "λ·L_CLS (Eq. 4 times λ) during training (log scale)",
                  "gradient balance ‖∇ λ·L_CLS‖ / ‖∇ L_proj‖ at the prior's output layer (log scale)"]


def balance_result() -> dict:
    """synthetic_result with training curves that hold the trainer's terms of Eq. 5 and their
    gradient ratio, for runs at three λ (and a projection run, which logs L_proj only)."""
    res = synthetic_result()
    steps = [10, 20, 30, 40]
    res["training"] = {f"eclipse-λ{lam}-a-rather-long-run-name": {"curves": {"train": {
        "step": steps, "loss": [900.0, 500.0, 300.0, 200.0], "loss_proj": [899.0, 499.0, 299.0, 199.0],
        "loss_cls_weighted": [lam * 5.5, lam * 5.0, None, lam * 4.0],
        "grad_ratio_cls_proj": [lam * 0.006, lam * 0.01, lam * 0.02, lam * 0.05]}}} for lam in (0.2, 2, 20)}
    res["training"]["projection"] = {"curves": {"train": {"step": steps, "loss": [9.0, 5.0, 3.0, 2.0],
                                                          "loss_proj": [9.0, 5.0, 3.0, 2.0]}}}
    return res


def test_the_terms_of_eq5_and_their_gradient_ratio_are_plotted_for_the_runs_that_logged_them():
    res = balance_result()
    html = render_report(res)
    assert svg_titles(html)[-4:] == ["training loss", *BALANCE_TITLES]  # no eval records: no held-out curves
    assert len(report_context(res)["curve_charts"]) == len(CURVES)
    # which runs each chart draws, and on which scale: the matplotlib figures the report draws
    from evaluation import figures as F

    st = F.styles(res["training"])
    drawn = {}
    for kind, key, title, options in CURVES[3:]:
        series = [(n, t["curves"][kind]["step"], t["curves"][kind][key]) for n, t in res["training"].items()
                  if key in t["curves"][kind]]
        ax = F.line_chart(title, series, st, **options).axes[0]
        drawn[key] = (ax.get_yscale(), [line.get_label() for line in ax.lines])
    names = [f"eclipse-λ{lam}-a-rather-long-run-name" for lam in (0.2, 2, 20)]
    wrapped = [F.wrap(n, F.LABEL_CHARS) for n in names]
    assert drawn["loss_proj"] == ("log", [*wrapped, "projection"])
    assert drawn["loss_cls_weighted"] == ("log", wrapped)
    assert drawn["grad_ratio_cls_proj"][0] == "log" and drawn["grad_ratio_cls_proj"][1][:3] == wrapped
    # the warning's floor and ceiling
    assert [label.split(":")[0] for label in drawn["grad_ratio_cls_proj"][1][3:]] == ["0.01", "10"]
    # a run from before these keys existed: no such chart, and the page still renders
    old = synthetic_result()
    assert not set(BALANCE_TITLES) & set(svg_titles(render_report(old)))


def test_the_probe_families_table():
    res = synthetic_result()
    html = render_report(res)
    table = html.split("<h3>Per family</h3>", 1)[1].split("</table>", 1)[0]
    assert "spatial skipped: no spatial word (6: left, right) occurs." in table
    assert "<th>color</th><th>shape</th></tr>" in table  # the skipped family has no column
    assert table.count("<tr><td") == len(res["models"]) and table.count("0.543") == len(res["models"])
    res["probe"] = {"skipped": "no attribute word", "families": {"color": {"skipped": "none"}}}
    html = render_report(res)
    assert "color skipped: none." in html and "<th>color</th>" not in html  # every family skipped: no table


def test_images_come_back_from_the_evaluation_folder(evaluated, tmp_path):
    res, out = evaluated
    images = load_images(out / "images")
    assert images and set(images) == {p.stem for p in (out / "images").glob("*.png")}
    again = write_report(res, tmp_path / "r.html", images).read_text(encoding="utf-8")
    assert again == (out / "report.html").read_text(encoding="utf-8")  # a re-render equals the original
    assert load_images(tmp_path / "missing") == {}
    without = write_report(res, tmp_path / "r2.html").read_text(encoding="utf-8")
    assert "no image" not in again and "no image" in without


def verdict_result(steps_c: int = 2000, cos_a_c: tuple[float, float, float] = (0.004, 0.001, 0.007)) -> dict:
    """Three priors and a baseline. Cosine: A leads, A − B an effect, A − C (by default) excludes 0 but lies
    within 0.01 of it, A − text-shift unclear. R@1: C leads with effects over both (stored as A − C and B − C, as
    `scoring.comparisons` orders them). Probe: no paired intervals. C trained for `steps_c` steps, A and B 1,000."""
    figures = {"A": (0.85, 0.40, 0.70), "B": (0.80, 0.38, 0.65), "C": (0.846, 0.45, 0.60),
               "text-shift": (0.84, 0.30, 0.5)}  # cos_image, r1, probe AUC
    pairs = [("A", "B", "cos_image", (0.05, 0.03, 0.07)), ("A", "C", "cos_image", cos_a_c),
             ("A", "text-shift", "cos_image", (0.01, -0.002, 0.022)), ("A", "C", "r1", (-0.05, -0.07, -0.03)),
             ("B", "C", "r1", (-0.07, -0.09, -0.05)), ("C", "text-shift", "r1", (0.15, 0.12, 0.18))]
    return {
        "settings": {"ci": 0.95}, "metric_info": {"cos_image": {"better": "higher"}, "r1": {"better": "higher"}},
        "models": {n: {"kind": "baseline" if n == "text-shift" else "prior",
                       "metrics": {"cos_image": summary(c, c - 0.01, c + 0.01), "r1": summary(r, r - 0.02, r + 0.02)}}
                   for n, (c, r, _) in figures.items()},
        "comparisons": [{"a": a, "b": b, "metric": m, **summary(*d)} for a, b, m, d in pairs],
        "probe": {"words": ["red"], "train_rows": 50,
                  "models": {n: summary(p, p - 0.05, p + 0.05) for n, (_, _, p) in figures.items()}},
        "training": {n: {"config": {"steps": steps_c if n == "C" else 1000, "batch_size": 32}} for n in "ABC"},
    }


def test_the_verdict_claims_effects_only_past_the_threshold_and_flags_differing_budgets():
    recs = verdict(verdict_result())
    metric = {r["metric"]: r for r in recs if r["kind"] == "metric"}
    assert [r["kind"] for r in recs] == ["rule", "budgets", "flag", "metric", "metric", "metric"]
    assert "excludes 0 and lies at least 0.01 from it" in recs[0]["text"]
    assert recs[1]["text"] == ("Training budgets (steps × batch): 1,000 steps × batch 32 per process: A, B; "
                               "2,000 steps × batch 32 per process: C.")
    assert recs[2]["text"].startswith("⚠ Priors trained with different budgets are compared (1,000 steps × batch 32 "
                                      "per process; 2,000 steps × batch 32 per process)")
    # cosine: A leads, but only B is clearly behind it
    cos = metric["cos_image"]
    assert (cos["top"], cos["best"]) == ("A", False)
    assert cos["text"] == ("held-out cosine to the true image embedding (higher is better): A (1,000 steps × batch 32 "
                           "per process) has the best value of the priors, 0.850, but is not clearly better than "
                           "every other.")
    assert [c["text"] for c in cos["clauses"]] == [
        "A − B = +0.050 [+0.030, +0.070]: A is better, an effect",
        "A − C = +0.004 [+0.001, +0.007]: no clear difference (the interval excludes 0 but lies within 0.01 of it) "
        "(⚠ different budgets)",
        "A − text-shift = +0.010 [-0.002, +0.022]: no clear difference"]
    # R@1: another prior leads, clearly ahead of both (its differences stored the other way round)
    r1 = metric["r1"]
    assert (r1["top"], r1["best"]) == ("C", True)
    assert r1["text"].endswith(": C (2,000 steps × batch 32 per process) is the best prior, 0.450.")
    assert [c["text"] for c in r1["clauses"]] == [
        "C − A = +0.050 [+0.030, +0.070]: C is better, an effect (⚠ different budgets)",
        "C − B = +0.070 [+0.050, +0.090]: C is better, an effect (⚠ different budgets)",
        "C − text-shift = +0.150 [+0.120, +0.180]: C is better, an effect"]
    # the probe has no paired interval: a leader, no effect
    probe = metric["probe_auc"]
    assert probe["top"] == "A" and not probe["best"]
    assert [c["text"] for c in probe["clauses"]] == ["no paired interval for this figure, so no effect is claimed"]

    # the same budgets: no flag; a cosine difference that clears 0.01 makes A the best prior there
    recs = verdict(verdict_result(steps_c=1000, cos_a_c=(0.02, 0.012, 0.028)))
    assert "flag" not in [r["kind"] for r in recs] and "⚠" not in str(recs)
    cos = next(r for r in recs if r.get("metric") == "cos_image")
    assert cos["best"] and cos["text"].endswith(": A (1,000 steps × batch 32 per process) is the best prior, 0.850.")
    assert cos["clauses"][1]["text"] == "A − C = +0.020 [+0.012, +0.028]: A is better, an effect"


def test_the_summary_opens_the_report():
    html = render_report(verdict_result())
    body = html.split("<body>", 1)[1]
    assert body.index("<h1>Prior evaluation</h1>") < body.index('<div class="verdict">') < body.index("<table")
    assert '<li class="flag">⚠ Priors trained with different budgets are compared' in html
    assert ('<li class="effect">C − A = +0.050 [+0.030, +0.070]: C is better, an effect (⚠ different budgets).</li>'
            in html)


def test_a_priors_budget_comes_from_its_checkpoint_its_model_card_or_its_run_config(tmp_path):
    state = {"step": 600, "world_size": 2, "samples_seen": 600 * 64, "embedding_dim": 16,
             "config": {"batch_size": 32, "steps": 1000, "objective": "eclipse", "preset": "tiny"}}
    ckpt = tmp_path / "run" / "checkpoints" / "step_600"
    (ckpt / "prior").mkdir(parents=True)
    (ckpt / STATE).write_text(json.dumps(state))
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "README.md").write_text(model_card(state, ckpt, False, 1000))  # what export writes beside the weights
    res = {"models": {"checkpoint": {"weights": str(ckpt / "prior")}, "exported": {"weights": str(exported)},
                      "configured": {"weights": str(tmp_path / "bare")}, "bare": {"weights": str(tmp_path / "bare")}},
           "training": {"configured": {"config": {"steps": 1000, "batch_size": 32}}, "bare": {"config": None}}}
    assert budget_label(prior_budget(res, "checkpoint")) == "600 steps × batch 64"  # 2 processes × 32
    assert budget_label(prior_budget(res, "exported")) == "600 steps × batch 64"
    assert budget_label(prior_budget(res, "configured")) == "1,000 steps × batch 32 per process"
    assert prior_budget(res, "bare") is None and budget_label(None) == "budget unknown"


def test_formatting_helpers():
    assert [fmt(0.123456), fmt(3), fmt(None), fmt(float("nan")), fmt(0.5, 3)] == ["0.1235", "3", "n/a", "n/a", "0.5"]
    uri = image_data_uri(Image.new("RGB", (1000, 500), (255, 0, 0)), max_side=100)
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (100, 50)


# -- in a real browser ---------------------------------------------------------------------------------

WIDTH = 1400
# Runs in the page once loaded: every SVG drawing inside its SVG, the SVG and every table inside the
# viewport's width, no scroll box that needs scrolling, no horizontal scrolling of the page.
MEASURE = """<script>
window.addEventListener("load", () => {
  const out = {scrollWidth: document.documentElement.scrollWidth, svgs: [], outside: [], tables: [], scrolls: []};
  for (const svg of document.querySelectorAll("svg")) {
    const box = svg.getBoundingClientRect();
    out.svgs.push({title: svg.querySelector("title").textContent, left: box.left, right: box.right,
                   width: box.width});
    for (const el of svg.querySelectorAll("path, use, text, line, rect")) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue;
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        out.outside.push(svg.querySelector("title").textContent);
    }
  }
  const v = document.querySelector(".verdict");  // the summary in words (test_grid's page has none)
  if (v) {
    const vb = v.getBoundingClientRect(), style = getComputedStyle(v);
    out.verdict = {left: vb.left, right: vb.right, top: vb.top, bottom: vb.bottom, height: vb.height,
                   overflows: v.scrollWidth > v.clientWidth || v.scrollHeight > v.clientHeight,
                   hidden: style.visibility !== "visible" || style.display === "none",
                   clipped: [...v.querySelectorAll("li")].filter(li => { const r = li.getBoundingClientRect();
                     return r.height === 0 || r.left < vb.left - 1 || r.right > vb.right + 1; }).length,
                   below: [...document.querySelectorAll("table, svg")]
                     .every(el => el.getBoundingClientRect().top >= vb.bottom)};
  }
  for (const t of document.querySelectorAll("table")) out.tables.push(t.getBoundingClientRect().right);
  for (const w of document.querySelectorAll(".wide"))
    if (w.scrollWidth > w.clientWidth) out.scrolls.push(w.querySelector("th").textContent);
  const pre = document.createElement("pre");
  pre.id = "measure";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("no Chromium on PATH under CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no Chromium on PATH (apt-get install chromium) for the browser rendering test")
    return exe


def browse(exe: str, page, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},2000",
           "--virtual-time-budget=5000", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.slow
def test_the_report_fits_a_1400px_browser_window(tmp_path):
    exe = chromium()
    res = synthetic_result()
    images = {f"img-k{j}": Image.new("RGB", (40, 30), (60 * j, 0, 0)) for j in range(1, 4)}
    page = write_report(res, tmp_path / "r.html", images)
    html = page.read_text(encoding="utf-8")
    page.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = browse(exe, page, "--dump-dom").stdout
    m = json.loads(dom.split('<pre id="measure">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&"))
    assert m["scrollWidth"] <= WIDTH
    assert [s["title"] for s in m["svgs"]] == svg_titles(html)
    assert all(0 <= s["left"] and s["right"] <= WIDTH and s["width"] >= 500 for s in m["svgs"]), m["svgs"]
    assert m["outside"] == []  # no title, label, bar or legend past its chart's edge
    assert len(m["tables"]) == html.count("<table") and max(m["tables"]) <= WIDTH
    assert m["scrolls"] == []  # every table fits, none needs scrolling (11 metrics + the probe in the summary)
    v = m["verdict"]  # the summary in words: above every table and chart, whole, in the first screen
    assert v["below"] and not v["hidden"] and not v["overflows"] and v["clipped"] == 0, v
    assert 0 <= v["left"] and v["right"] <= WIDTH and 0 < v["height"] and v["bottom"] <= 2000, v

    shot = tmp_path / "r.png"
    browse(exe, page, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[1] == WIDTH and pixels.std() > 10  # drawn, not a blank page


@pytest.mark.slow
def test_the_training_balance_charts_fit_a_1400px_browser_window(tmp_path):
    exe = chromium()
    page = write_report(balance_result(), tmp_path / "r.html")
    html = page.read_text(encoding="utf-8")
    page.write_text(html.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = browse(exe, page, "--dump-dom").stdout
    m = json.loads(dom.split('<pre id="measure">', 1)[1].split("</pre>", 1)[0].replace("&amp;", "&"))
    assert m["scrollWidth"] <= WIDTH
    titles = [s["title"] for s in m["svgs"]]
    assert titles == svg_titles(html) and set(BALANCE_TITLES) <= set(titles)
    assert all(0 <= s["left"] and s["right"] <= WIDTH and s["width"] >= 500 for s in m["svgs"]), m["svgs"]
    assert m["outside"] == []  # no title, label, line or legend past its chart's edge


def test_a_missing_section_is_skipped_but_printing_a_missing_value_raises():
    import jinja2

    from evaluation.report import environment

    env = environment()
    assert env.from_string("{% if r.prompts %}x{% else %}none{% endif %}").render(r={}) == "none"
    with pytest.raises(jinja2.UndefinedError, match="typo"):
        env.from_string("{{ r.typo }}").render(r={})
