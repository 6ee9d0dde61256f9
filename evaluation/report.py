"""A self-contained HTML report of an evaluation: tables, matplotlib charts, images inlined.

    write_report(metrics, "eval/report.html", images) -> Path

The page is a jinja2 template (evaluation/templates/report.html, on base.html); charts are inline
SVG from `evaluation.figures`, images are PNG data URIs, so the file opens anywhere offline and
can be attached to a run. `metrics` is the dict `evaluation.evaluate.evaluate` writes to
metrics.json; `images` maps the image ids it references to PIL images (`load_images` reads
them back from the evaluation's images/ folder). A page that extends report.html fills its
`top` block (the demo's experiment section does).
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import jinja2
from markupsafe import Markup
from PIL import Image

from evaluation import figures as F
from storage_schema.atomic import atomic_write_text
from training.monitor import RATIO_CEILING, RATIO_FLOOR

SUMMARY_METRICS = ("cos_image", "cos_text", "cos_unrelated_text", "cos_image_minus_baseline", "r1", "r5", "r10",
                   "rank", "frechet", "norm_ratio", "mse")
CHART_METRICS = ("cos_image", "cos_image_minus_baseline", "r1", "r10", "frechet", "norm_ratio")
PROMPT_CHARTS = (("swap_acc", "swap-pair accuracy (own prompt closer than the swapped one)"),
                 ("cos_nearest_image", "cos to the nearest real image embedding (gap-sensitive)"),
                 ("cos_text", "cos(pred, prompt text embedding)"),
                 ("text_r1", "own prompt retrieved first among the category's prompts"))
PROMPT_COLUMNS = tuple(m for m, _ in PROMPT_CHARTS) + ("swap_margin", "norm_ratio")
# (record type, key, title, line_chart options): a chart is drawn for each key some run logged.
# The last three are the terms of Eq. 5 and their gradient balance, as the trainer logs them
# (training/trainer.py; log scale: they span decades over a run and across a lambda sweep).
CURVES = (("train", "loss", "training loss", {}),
          ("eval", "cos_to_image", "held-out cos(pred, image) during training", {}),
          ("eval", "loss", "held-out loss during training", {}),
          ("train", "loss_proj", "L_proj (Eq. 3) during training (log scale)", {"log_y": True}),
          ("train", "loss_cls_weighted", "λ·L_CLS (Eq. 4 times λ) during training (log scale)", {"log_y": True}),
          ("train", "grad_ratio_cls_proj", "gradient balance ‖∇ λ·L_CLS‖ / ‖∇ L_proj‖ at the prior's output "
           "layer (log scale)", {"log_y": True, "hlines": (
               (RATIO_FLOOR, f"{RATIO_FLOOR:g}: below it the contrastive term does next to nothing"),
               (RATIO_CEILING, f"{RATIO_CEILING:g}: above it the contrastive term swamps L_proj"))}))


def fmt(v, digits: int = 4) -> str:
    """A number to `digits` significant digits; "n/a" for None, NaN, inf or a missing value."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        return "n/a"
    if isinstance(v, numbers.Integral):
        return str(v)
    return f"{v:.{digits}g}"


def breakable(name: str) -> Markup:
    """A snake_case name that may wrap after its underscores (a narrow table header)."""
    return Markup("_<wbr>").join(name.split("_"))


def image_data_uri(image: Image.Image, max_side: int = 256) -> str:
    """A PNG data URI of the image, downscaled to max_side (keeps the report small)."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_images(folder: str | os.PathLike) -> dict[str, Image.Image]:
    """The images an evaluation saved (folder/ID.png), by id; {} when there is no folder."""
    folder = Path(folder)
    return {p.stem: Image.open(p) for p in sorted(folder.glob("*.png"))} if folder.is_dir() else {}


class PrintStrictUndefined(jinja2.ChainableUndefined):
    """Optional result sections may be absent (`{% if r.prompts %}` is false), but printing a missing
    value is a template bug: it raises instead of rendering blank."""

    __str__ = jinja2.Undefined._fail_with_undefined_error
    __html__ = jinja2.Undefined._fail_with_undefined_error


@cache
def environment(*packages: str) -> jinja2.Environment:
    """The report's templates, autoescaped; templates of `packages` (their templates/ folders) come
    first, so a page there can extend report.html."""
    loader = jinja2.ChoiceLoader([jinja2.PackageLoader(p, "templates") for p in (*packages, "evaluation")])
    env = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(), trim_blocks=True,
                             lstrip_blocks=True, undefined=PrintStrictUndefined)
    env.filters["fmt"] = fmt
    env.filters["breakable"] = breakable
    return env


# -- what the template shows, computed from the result ------------------------------------------------


def _best(values: dict[str, float | None], better: str) -> set[str]:
    """The model names with the best value: highest, lowest, or (better == "1") closest to one."""
    vals = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if not vals:
        return set()
    if better == "higher":
        target = max(vals.values())
    elif better == "lower":
        target = min(vals.values())
    else:
        target = min(vals.values(), key=lambda v: abs(v - 1))
    return {k for k, v in vals.items() if v == target}


def _header(result: dict) -> list[tuple[str, str]]:
    st, sp, se = result.get("store", {}), result.get("split", {}), result.get("settings", {})
    enc = st.get("encoder", {})
    return [
        ("store", f"{st.get('path')} ({st.get('rows')} rows)"),
        ("encoder", f"{enc.get('preset')} (image {enc.get('image_model')}, text {enc.get('text_model')}, "
                    f"D={enc.get('image_dim')})"),
        ("held-out split", f"fraction {sp.get('heldout_fraction')}, seed {sp.get('heldout_seed')} "
                           f"({sp.get('source')}): {sp.get('heldout_rows')} rows evaluated = retrieval gallery; "
                           f"baselines fitted on {sp.get('train_rows_used')} training rows"),
        ("statistics", f"{se.get('seeds')} noise seeds per prior, averaged per row; {int(100 * se.get('ci', 0.95))} % "
                       f"bootstrap intervals over rows ({se.get('n_boot')} draws, seed {se.get('bootstrap_seed')}; "
                       f"Fréchet distance: {se.get('n_boot_fd')} draws)"),
        ("created", f"{result.get('created')} ({result.get('elapsed_s')} s)"),
    ] + ([("warning", sp["warning"])] if sp.get("warning") else [])


def _probe_models(result: dict) -> dict[str, dict]:
    probe = result.get("probe")
    return probe.get("models", {}) if isinstance(probe, dict) else {}


def _summary(result: dict) -> dict:
    """The summary table: columns (metrics some model has, then the probe) and per model its cells,
    each (summary, whether it is the column's best)."""
    models, info = result["models"], result.get("metric_info", {})
    probe = _probe_models(result)
    columns = [{"name": k, "what": info.get(k, {}).get("what", k), "better": info.get(k, {}).get("better", "")}
               for k in SUMMARY_METRICS if any(k in m["metrics"] for m in models.values())]
    values = {c["name"]: {n: m["metrics"].get(c["name"]) for n, m in models.items()} for c in columns}
    if probe:
        columns.append({"name": "probe_auc", "what": "attribute probe AUC", "better": "higher"})
        values["probe_auc"] = {n: probe.get(n) for n in models}
    best = {c["name"]: _best({n: (s or {}).get("value") for n, s in values[c["name"]].items()},
                             c["better"] or "higher") for c in columns}
    rows = [{"name": n, "sub": m.get("objective", "") if m.get("kind") == "prior" else "baseline",
             "cells": [(values[c["name"]][n], n in best[c["name"]]) for c in columns]} for n, m in models.items()]
    return {"columns": columns, "rows": rows}


def _ci(s: Mapping) -> tuple[float | None, float | None]:
    lo, hi = s.get("ci") or (None, None)
    return lo, hi


def _metric_charts(result: dict, st: Mapping[str, F.Style]) -> list[str]:
    info = result.get("metric_info", {})
    charts = []
    for k in CHART_METRICS:
        items = [(n, s.get("value"), *_ci(s)) for n, m in result["models"].items() if (s := m["metrics"].get(k))]
        if items:
            what = info.get(k, {})
            charts.append(F.to_svg(F.bar_chart(f"{k}: {what.get('what', '')}", items, st,
                                               f"better: {what.get('better', '')}")))
    if probe := _probe_models(result):
        items = [(n, s.get("value"), *_ci(s)) for n, s in probe.items()]
        charts.append(F.to_svg(F.bar_chart("attribute probe AUC (probe trained on real image embeddings)", items, st,
                                           "better: higher; 0.5 = chance")))
    return charts


def _prompt_charts(result: dict, st: Mapping[str, F.Style]) -> list[str]:
    p = result.get("prompts")
    if not isinstance(p, dict) or "skipped" in p:
        return []
    cats, names = p["categories"], list(p["overall"])
    charts = []
    for metric, title in PROMPT_CHARTS:
        series = []
        for n in names:
            pts = [(s["value"], *_ci(s)) if (s := cats[c]["models"].get(n, {}).get(metric)) else (None, None, None)
                   for c in cats]
            if any(v is not None for v, _, _ in pts):
                series.append((n, pts))
        charts.append(F.to_svg(F.grouped_bar_chart(title, list(cats), series, st)))
    return charts


def _curve_charts(result: dict, st: Mapping[str, F.Style]) -> list[str]:
    training = result.get("training") or {}
    charts = []
    for kind, key, title, options in CURVES:
        series = [(n, s["step"], s[key]) for n, t in training.items()
                  if key in (s := (t.get("curves") or {}).get(kind, {})) and "step" in s]
        charts.append(F.to_svg(F.line_chart(title, series, st, **options)))
    return charts


def report_context(result: dict, images: Mapping[str, Image.Image] | None = None) -> dict:
    """Everything report.html renders: the result itself and what is computed from it."""
    images = images or {}
    prompts = result.get("prompts")
    names = [*result["models"], *_probe_models(result), *(result.get("training") or {}),
             *(prompts.get("overall", {}) if isinstance(prompts, dict) else {})]
    st = F.styles(names)  # one style per model across every chart

    def image_uri(image_id: str | None) -> str | None:
        return image_data_uri(images[image_id]) if image_id in images else None

    return {"result": result, "header": _header(result), "summary": _summary(result),
            "metric_charts": _metric_charts(result, st), "prompt_charts": _prompt_charts(result, st),
            "prompt_columns": PROMPT_COLUMNS, "curve_charts": _curve_charts(result, st),
            "no_training_log": [n for n, t in (result.get("training") or {}).items() if not t.get("curves")],
            "image_uri": image_uri}


def render_report(result: dict, images: Mapping[str, Image.Image] | None = None) -> str:
    """The report's HTML."""
    return environment().get_template("report.html").render(report_context(result, images))


def write_report(result: dict, path: str | os.PathLike, images: Mapping[str, Image.Image] | None = None) -> Path:
    """Write the self-contained HTML report of an evaluation result."""
    path = Path(path)
    atomic_write_text(path, render_report(result, images))
    return path
