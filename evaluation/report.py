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
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import jinja2
from markupsafe import Markup
from PIL import Image

from evaluation import figures as F
from evaluation import metrics as M
from storage_schema.atomic import atomic_write_text
from training.export import STATE
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


# -- the verdict: what the figures let one say, in words, at the top of the page -----------------------------

# The smallest paired difference the summary calls an effect, per figure it judges (docs/report.md): BENCHMARKS
# uses 0.01 for figures in [0, 1] (metrics.MIN_EFFECT: less changes no decoder's image). A figure not listed is
# never judged.
EFFECT_THRESHOLDS: dict[str, float] = {m: M.MIN_EFFECT for m in ("cos_image", "r1", "caption_r1", "probe_auc")}
VERDICT_METRICS = ("cos_image", "r1", "probe_auc")  # the evaluation's main figures, in the summary's order
VERDICT_LABELS = {"cos_image": "held-out cosine to the true image embedding",
                  "r1": "R@1 of the true image among the held-out images",
                  "caption_r1": "caption R@1 (the right composition)",
                  "probe_auc": "attribute probe AUC"}
_CARD_STEPS = re.compile(r"^\| steps \| (\d+) of ", re.M)  # training/export.py's model_card rows
_CARD_BATCH = re.compile(r"^\| batch \| (\d+) per process x (\d+) processes \|", re.M)


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _budget(steps, per_process, processes: int | None, source: str) -> dict | None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (steps, per_process)):
        return None
    return {"steps": steps, "batch": per_process * (processes or 1), "processes": processes, "source": source}


def prior_budget(result: Mapping, name: str) -> dict | None:
    """A prior's training budget {"steps", "batch" (all processes), "processes", "source"}: from the checkpoint
    its weights came from (state.json), else the model card export wrote beside them, else its run's
    train_config.json as metrics.json holds it (planned steps, batch per process: processes unknown).
    None where none of them says."""
    entry = result.get("models", {}).get(name) or {}
    if entry.get("budget"):  # what evaluate found when it ran
        return dict(entry["budget"])
    weights = entry.get("weights")
    if weights:
        w = Path(weights)
        state = _read_json(w.parent / STATE)  # RUN/checkpoints/step_N/{prior,ema}
        if state is not None:
            found = _budget(state.get("step"), (state.get("config") or {}).get("batch_size"),
                            state.get("world_size"), f"checkpoint {w.parent / STATE}")
            if found:
                return found
        try:
            card = (w / "README.md").read_text()
        except OSError:
            card = ""
        steps, batch = _CARD_STEPS.search(card), _CARD_BATCH.search(card)
        if steps and batch:
            return _budget(int(steps[1]), int(batch[1]), int(batch[2]), f"model card {w / 'README.md'}")
    cfg = ((result.get("training") or {}).get(name) or {}).get("config") or {}
    return _budget(cfg.get("steps"), cfg.get("batch_size"), None, "train_config.json (planned steps)")


def budget_label(budget: Mapping | None) -> str:
    """"1,000 steps × batch 32" (per process where the processes are unknown); "budget unknown" for None."""
    if not budget:
        return "budget unknown"
    per = " per process" if budget.get("processes") is None else ""
    return f"{budget['steps']:,} steps × batch {budget['batch']}{per}"


def _key(budget: Mapping | None) -> tuple[int, int] | None:
    return (budget["steps"], budget["batch"]) if budget else None


def _num(v: float, signed: bool = False) -> str:
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _interval(ci) -> list[float] | None:
    """A finite [low, high], or None (no interval: one seed, NaN, not computed)."""
    if not ci or len(ci) != 2 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in ci):
        return None
    return [float(ci[0]), float(ci[1])]


def _judge(a: str, b: str, diff: float, ci, metric: str, better: str, budgets: Mapping) -> dict:
    """One paired difference a − b read with the metric's threshold: an effect (and who is better) or not."""
    ci = _interval(ci)
    threshold = EFFECT_THRESHOLDS.get(metric)
    reading = M.verdict(ci, threshold) if ci is not None and threshold is not None else "no interval"
    effect = reading in ("a > b", "a < b")
    winner = (a if (reading == "a > b") == (better == "higher") else b) if effect else None
    differ = bool(budgets.get(a) and budgets.get(b)) and _key(budgets[a]) != _key(budgets[b])
    text = f"{a} − {b} = {_num(diff, True)}" + (f" [{_num(ci[0], True)}, {_num(ci[1], True)}]" if ci else "")
    if effect:
        text += f": {winner} is better, an effect"
    elif reading == "no interval":
        text += (": no paired interval, so no effect is claimed" if threshold is not None else
                 ": no threshold is set for this figure, so no effect is claimed")
    else:
        text += ": no clear difference"
        if reading.startswith("negligible"):
            text += f" (the interval excludes 0 but lies within {threshold:g} of it)"
    if differ:
        text += " (⚠ different budgets)"
    return {"a": a, "b": b, "diff": diff, "ci": ci, "reading": reading, "effect": effect, "winner": winner,
            "budgets_differ": differ, "text": text}


def _best_name(values: Mapping[str, float | None], better: str) -> str | None:
    best = _best(dict(values), better)
    return next((n for n in values if n in best), None)


def build_verdict(figures: Sequence[Mapping], budgets: Mapping[str, Mapping | None], interval: str,
                  noun: str = "prior") -> list[dict]:
    """The summary's sentences as records {"kind", "text", ...}, in page order: the rule, the budgets, flags, then
    one record per figure.

    figures: {"metric", "scope" (e.g. " on held-in rows"), "better" ("higher" | "lower"), "values" (candidate:
    a prior or an objective -> value), "pairs" ([{"a", "b", "diff", "ci"}]: paired a − b, the differences to
    state)}; budgets: candidate -> `prior_budget` (None: unknown); interval: what the intervals are; noun: what a
    candidate is. A candidate is called best only where it has an effect over every other candidate; otherwise
    its value is named as the highest, with each difference's reading.
    """
    names = list(dict.fromkeys(n for f in figures for n in f["values"]))
    thresholds = sorted({EFFECT_THRESHOLDS[f["metric"]] for f in figures if f["metric"] in EFFECT_THRESHOLDS})
    records = [{"kind": "rule", "text": (
        f"An effect is claimed only where a paired difference's {interval} excludes 0 and lies at least "
        f"{' / '.join(f'{t:g}' for t in thresholds) or 'a set threshold'} from it (cosine, R@1 and AUC lie in "
        f"[0, 1]; a smaller gain changes no decoder's image); anything else is reported as no clear difference.")}]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(budget_label(budgets.get(n)), []).append(n)
    records.append({"kind": "budgets", "budgets": {n: budgets.get(n) for n in names},
                    "text": "Training budgets (steps × batch): "
                            + "; ".join(f"{label}: {', '.join(ns)}" for label, ns in groups.items()) + "."}
                   if names else {"kind": "note", "text": f"No {noun} has figures to compare."})
    known = {n: _key(budgets.get(n)) for n in names if budgets.get(n)}
    if len(set(known.values())) > 1:
        records.append({"kind": "flag", "text": (
            f"⚠ {noun.capitalize()}s trained with different budgets are compared ("
            + "; ".join(dict.fromkeys(budget_label(budgets[n]) for n in known))
            + "): a difference between them may come from the budget, not the objective.")})
    unknown = [n for n in names if not budgets.get(n)]
    if len(names) > 1 and unknown:
        records.append({"kind": "flag", "text": (
            f"⚠ Training budget unknown for {', '.join(unknown) if len(unknown) < len(names) else f'every {noun}'} "
            f"(no checkpoint state, model card or run config beside the weights): whether the {noun}s compared had "
            f"the same budget cannot be checked.")})

    for f in figures:
        m, better = f["metric"], f["better"]
        vals = {n: v for n, v in f["values"].items() if v is not None and math.isfinite(v)}
        if not vals:
            continue
        top = _best_name(vals, better)
        clauses = [_judge(p["a"], p["b"], p["diff"], p.get("ci"), m, better, budgets) for p in f["pairs"]]
        beaten = {c["b"] if c["winner"] == c["a"] else c["a"] for c in clauses if c["winner"] == top}
        best = len(vals) > 1 and set(vals) - {top} <= beaten
        label = f"{VERDICT_LABELS.get(m, m)}{f.get('scope', '')} ({better} is better)"
        top_tag = f"{top} ({budget_label(budgets.get(top))})"
        tied = [n for n in vals if n in _best(vals, better)]
        if len(vals) == 1:
            head = f"{label}: {top_tag} {_num(vals[top])}."
        elif len(tied) > 1:
            head = f"{label}: {', '.join(tied)} share the best value, {_num(vals[top])}."
        elif best:
            head = f"{label}: {top_tag} is the best {noun}, {_num(vals[top])}."
        else:
            head = (f"{label}: {top_tag} has the best value of the {noun}s, {_num(vals[top])}, but is not clearly "
                    f"better than {'the other' if len(vals) == 2 else 'every other'}.")
        if not clauses and len(vals) > 1:
            clauses.append({"text": "no paired interval for this figure, so no effect is claimed", "effect": False})
        records.append({"kind": "metric", "metric": m, "scope": f.get("scope", ""), "top": top, "best": best,
                        "text": head, "clauses": clauses})
    return records


def verdict(result: Mapping) -> list[dict]:
    """The evaluation's summary (`build_verdict`): for each main figure the prior with the best value, its paired
    differences from every other prior and from the strongest baseline (metrics.json "comparisons"); each
    prior's training budget beside its name, and a flag where the budgets differ."""
    models = result.get("models", {})
    priors = [n for n, m in models.items() if m.get("kind") == "prior"]
    baselines = [n for n, m in models.items() if m.get("kind") != "prior"]
    probe = _probe_models(result)
    info = result.get("metric_info", {})
    compared = {(c["a"], c["b"], c["metric"]): c for c in result.get("comparisons") or []}

    def value(name: str, metric: str) -> float | None:
        s = probe.get(name) if metric == "probe_auc" else models[name]["metrics"].get(metric)
        return s.get("value") if isinstance(s, Mapping) else None

    def pair(a: str, b: str, metric: str) -> dict | None:
        """a − b from the comparisons, turned round where they hold b − a."""
        if (c := compared.get((a, b, metric))) is not None and c.get("value") is not None:
            return {"a": a, "b": b, "diff": c["value"], "ci": c.get("ci")}
        if (c := compared.get((b, a, metric))) is not None and c.get("value") is not None:
            ci = _interval(c.get("ci"))
            return {"a": a, "b": b, "diff": -c["value"], "ci": [-ci[1], -ci[0]] if ci else None}
        return None

    figures = []
    for m in VERDICT_METRICS:
        values = {n: value(n, m) for n in priors}
        if all(v is None for v in values.values()):
            continue
        better = info.get(m, {}).get("better") or "higher"
        top = _best_name({n: v for n, v in values.items() if v is not None}, better)
        base = _best_name({n: value(n, m) for n in baselines}, better)
        pairs = [pair(top, other, m) for other in [n for n in priors if n != top] + ([base] if base else [])]
        figures.append({"metric": m, "better": better, "values": values, "pairs": [p for p in pairs if p]})
    level = int(round(100 * result.get("settings", {}).get("ci", 0.95)))
    records = build_verdict(figures, {n: prior_budget(result, n) for n in priors},
                            f"{level} % paired bootstrap interval over the held-out rows")
    if warning := result.get("split", {}).get("warning"):
        records.insert(1, {"kind": "flag", "text": f"⚠ {warning}"})
    return records


def report_context(result: dict, images: Mapping[str, Image.Image] | None = None) -> dict:
    """Everything report.html renders: the result itself and what is computed from it."""
    images = images or {}
    prompts = result.get("prompts")
    names = [*result["models"], *_probe_models(result), *(result.get("training") or {}),
             *(prompts.get("overall", {}) if isinstance(prompts, dict) else {})]
    st = F.styles(names)  # one style per model across every chart

    def image_uri(image_id: str | None) -> str | None:
        return image_data_uri(images[image_id]) if image_id in images else None

    return {"result": result, "verdict": verdict(result), "header": _header(result), "summary": _summary(result),
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
