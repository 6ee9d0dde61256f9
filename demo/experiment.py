"""The demo's experiment: priors of several objectives and training seeds, evaluated on held-in
rows and on held-out compositions, summarised per objective with paired differences, the
eclipse λ sweep (the paper's trade-off between composition and closeness to real images), and
the testbed figures that say whether the world could tell a good prior from a bad one.

Inputs are `evaluation.evaluate.evaluate` results (metrics.json) of the same priors on the two
splits. Training seeds are the unit of the paired differences (eclipse seed s vs projection
seed s): the interval is a t-interval over seeds, and every seed's own figure is reported too.
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from evaluation import figures as F
from evaluation import metrics as M
from evaluation.metrics import MIN_EFFECT, over_seeds, t_interval, verdict
from evaluation.report import budget_label, build_verdict, environment, load_images, prior_budget, report_context
from storage_schema import CAPTION, IMAGE_EMBED, TEXT_EMBED, EmbeddingStore
from storage_schema.atomic import atomic_write_text

HEADLINE = ("cos_image", "caption_r1", "probe_auc")
# the attribute probe's AUC per T2I-CompBench family: in the paired differences and metrics.json, not the table
FAMILIES = tuple(f"probe_{f}" for f in ("color", "shape", "texture", "spatial"))
BASELINES = ("TextEmb", "text-shift", "ridge", "mean-image")


def model_value(result: dict, name: str, metric: str) -> float | None:
    if metric == "caption_r1":
        models = result.get("caption_retrieval", {}).get("models", {})
        return models[name]["value"] if name in models else None
    if metric == "probe_auc":
        probe = result.get("probe", {}).get("models", {})
        return probe[name]["value"] if name in probe else None
    if metric in FAMILIES:
        family = result.get("probe", {}).get("families", {}).get(metric.removeprefix("probe_"), {}).get("models", {})
        return family[name]["value"] if name in family else None
    model = result["models"].get(name)
    return model["metrics"][metric]["value"] if model else None


def oracle_metrics(store: EmbeddingStore, shards: Sequence[str], n_boot: int = 200, seed: int = 0,
                   group: Callable[[str], str] | None = None) -> dict:
    """The oracle prediction: the mean image embedding of the *other* renders of the same caption.

    `group` maps a caption to the key rows are grouped by (default: the caption itself; the demo
    strips the template, which is drawn independently of the image). Rows whose group has no
    other render are left out (their count is reported).
    """
    images, texts, captions = [], [], []
    for b in store.iter_batches(4096, [CAPTION, IMAGE_EMBED, TEXT_EMBED], shards=list(shards)):
        images.append(b[IMAGE_EMBED].astype(np.float64))
        texts.append(b[TEXT_EMBED].astype(np.float64))
        captions += [str(c) for c in b[CAPTION]]
    image, text = np.concatenate(images), np.concatenate(texts)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(group(c) if group else c, []).append(i)
    pred = np.full_like(image, np.nan)
    for rows in groups.values():
        if len(rows) > 1:
            total = image[rows].sum(0)
            pred[rows] = (total[None] - image[rows]) / (len(rows) - 1)
    ok = ~np.isnan(pred[:, 0])
    per_row = M.row_metrics(pred[ok], image[ok], text[ok])
    return {"rows": int(ok.sum()), "rows_without_another_render": int((~ok).sum()),
            "metrics": {k: M.summarize(per_row[k], n_boot, 0.95, seed).to_dict() for k in ("cos_image", "r1")}}


def caption_retrieval(store: EmbeddingStore, priors: Sequence[str], train_shards: Sequence[str],
                      heldout_shards: Sequence[str] | None, seeds: int = 3, n_boot: int = 200,
                      keep: float = 1.0, group: Callable[[str], str] | None = None,
                      predictions: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """R@1 among caption prototypes: is the prediction nearest to the mean real image embedding of its own
    caption, among the prototypes of every caption in the store? Row-level retrieval cannot tell apart
    renders of one caption; this asks what a decoder needs: the right composition.

    `group` maps a caption to its prototype's key (as in `oracle_metrics`; default: the caption).
    `keep`: the fraction of the evaluated rows to score (a key-hash sample, as `evaluate` draws it).
    `predictions`: `evaluate` runs' OUT/heldout_predictions.npz (one, or one per prior) for these priors and
    split: their rows and predictions are scored instead of predicting again (`keep` and `seeds` are the runs').
    Returns model name -> summary (priors under `seeds` noise seeds; TextEmb, text-shift, ridge; oracle).
    """
    from evaluation.baselines import Baselines, scan_training_split
    from evaluation.predict import merge_heldout, predict_heldout
    from evaluation.priors import open_prior
    from evaluation.split import resolve_split

    handles = [open_prior(p, "cpu") for p in priors]
    split = resolve_split(handles, None, None, train_shards, heldout_shards, store)
    if predictions is not None:
        held = merge_heldout([predictions] if isinstance(predictions, str | os.PathLike) else list(predictions))
        missing = [h.name for h in handles if h.name not in held.preds]
        if missing:
            raise ValueError(f"{predictions} has no predictions of {missing} (only of {sorted(held.preds)})")
    else:
        held = predict_heldout(store, split, handles, seeds, keep, 256)
    base = Baselines.fit(scan_training_split(store, split, 1.0, 0.0))

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for b in store.iter_batches(4096, [CAPTION, IMAGE_EMBED]):
        for c, e in zip(b[CAPTION], b[IMAGE_EMBED].astype(np.float64), strict=True):
            k = group(str(c)) if group else str(c)
            sums[k] = sums.get(k, 0) + e
            counts[k] = counts.get(k, 0) + 1
    names = sorted(sums)
    protos = M.l2_normalize(np.stack([sums[c] / counts[c] for c in names]))
    index = {c: i for i, c in enumerate(names)}
    target = np.array([index[group(c) if group else c] for c in held.captions])

    def hits(pred: np.ndarray) -> np.ndarray:
        return (np.argmax(M.l2_normalize(pred) @ protos.T, axis=1) == target).astype(np.float64)

    out = {h.name: M.summarize(np.stack([hits(p) for p in held.preds[h.name]]), n_boot).to_dict()
           for h in handles}
    for name, pred in base.predict(held.text).items():
        if name != "mean-image":
            out[name] = M.summarize(hits(pred), n_boot).to_dict()
    return {"rows": len(held.keys), "captions_in_gallery": len(names), "models": out}


def summarize(results: dict[str, dict], runs: dict[str, list[str]], oracle: dict[str, dict] | None = None,
              pairs: Sequence[tuple[str, str]] = (("eclipse", "projection"), ("eclipse", "diffusion"))) -> dict:
    """results: split name ("heldin", "heldout") -> evaluate() result; runs: objective -> model names in
    seed order (the same seeds for every objective, so seed s of two objectives pairs up)."""
    table: dict = {"objectives": {}, "baselines": {}, "paired": [], "budgets": {}}
    for obj, names in runs.items():
        # each run's training budget, from the first evaluation that holds it (`report.prior_budget`)
        table["budgets"][obj] = {n: next((b for res in results.values() if n in res.get("models", {})
                                          and (b := prior_budget(res, n))), None) for n in names}
        table["objectives"][obj] = {
            split: {m: over_seeds([model_value(res, n, m) for n in names]) for m in HEADLINE + FAMILIES}
            for split, res in results.items()
        }
    for base in BASELINES:
        table["baselines"][base] = {split: {m: model_value(res, base, m) for m in HEADLINE + FAMILIES}
                                    for split, res in results.items()}
    for split, res in results.items():
        ceiling = res.get("probe", {}).get("models", {}).get("real images (ceiling)")
        table["baselines"].setdefault("real images (probe ceiling)", {})[split] = {
            "probe_auc": ceiling["value"] if ceiling else None}
    if oracle:
        table["baselines"]["oracle"] = {split: {m: o["metrics"][m]["value"] for m in ("cos_image", "r1")}
                                        for split, o in oracle.items()}
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        for split, res in results.items():
            for m in HEADLINE + FAMILIES:
                per_seed = [_diff(res, x, y, m) for x, y in zip(runs[a], runs[b], strict=True)]
                if any(v is None for v in per_seed):
                    continue
                rows_ci = [_row_ci(res, x, y, m) for x, y in zip(runs[a], runs[b], strict=True)]
                table["paired"].append({
                    "a": a, "b": b, "split": split, "metric": m, "per_seed": per_seed,
                    "mean": float(np.mean(per_seed)), "worst_seed": float(min(per_seed)),
                    "ci": t_interval(per_seed), "row_ci_per_seed": rows_ci,
                })
    return table


#: The testbed's goals (a world worth testing priors on): zero-shot accuracy of the teacher per
#: mentioned attribute, real CLIP's matched text-image cosine, and room beyond a constant vector.
GOALS = {"zero_shot_min": 0.9, "matched_cos": (0.2, 0.4), "gap_min": 0.10}


def store_gap(table: dict, split: str = "heldout") -> dict:
    """The gap on the store the priors train and are scored on: the oracle's cosine to the real image (the mean
    image embedding of the other renders of the same description among the split's rows: `oracle_metrics`) minus
    text-shift's (text embedding + the held-in rows' mean image - mean text: `evaluation.baselines`)."""
    oracle = table["baselines"]["oracle"][split]["cos_image"]
    shift = table["baselines"]["text-shift"][split]["cos_image"]
    return {"oracle_cos": oracle, "text_shift_cos": shift, "gap": oracle - shift, "split": split}


def summarize_testbed(teacher: Mapping, gap: Mapping, store: Mapping | None = None) -> dict:
    """The testbed figures with their goals and whether each is met: `teacher` is a TeacherReport
    dict, `gap` the `demo.teacher.heldout_gap` dict (the teacher level), `store` the `store_gap` dict
    (the store level, once the priors are evaluated)."""
    zero_shot = {a: teacher[f"{a}_acc"] for a in ("color", "shape", "texture", "position")
                 if teacher.get(f"{a}_acc") is not None}
    lo, hi = GOALS["matched_cos"]
    met = {f"zero_shot_{a}": v >= GOALS["zero_shot_min"] for a, v in zero_shot.items()}
    met["matched_cos"] = lo <= teacher["matched_cos"] <= hi
    met["gap"] = gap["gap"] >= GOALS["gap_min"]
    bed = {"zero_shot": zero_shot, "matched_cos": teacher["matched_cos"], "heldout_gap": dict(gap),
           "goals": GOALS, "met": met}
    if store is not None:
        bed["store_gap"] = dict(store)
        met["store_gap"] = store["gap"] >= GOALS["gap_min"]
    return bed


def tradeoff(table: dict, lambdas: Mapping[str, float], split: str = "heldout",
             metrics: Sequence[str] = ("cos_image", "caption_r1", "probe_auc")) -> list[dict]:
    """The λ sweep as points: for each objective in `lambdas` (projection is λ = 0), the mean over
    training seeds and the t-interval over seeds of each metric, in λ order."""
    points = []
    for name, lam in sorted(lambdas.items(), key=lambda kv: kv[1]):
        by_metric = table["objectives"].get(name, {}).get(split)
        if by_metric is None:
            continue
        points.append({"objective": name, "lambda": lam, "split": split,
                       **{m: {"mean": by_metric[m]["mean"], "ci": by_metric[m].get("ci"),
                              "seeds": by_metric[m]["seeds"]} for m in metrics}})
    return points


def _diff(res: dict, a: str, b: str, metric: str) -> float | None:
    va, vb = model_value(res, a, metric), model_value(res, b, metric)
    return None if va is None or vb is None else float(va - vb)


def _row_ci(res: dict, a: str, b: str, metric: str) -> list[float] | None:
    """The paired row-bootstrap interval of one seed pair, when the evaluation computed it."""
    for c in res.get("comparisons", []):
        if c["metric"] == metric and {c["a"], c["b"]} == {a, b}:
            lo, hi = c["ci"]
            return [lo, hi] if c["a"] == a else [-hi, -lo]
    return None


def _f(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_table(table: dict, splits: Sequence[str] = ("heldin", "heldout")) -> str:
    """A plain-text results table for the terminal."""
    cols = [f"{s}:{m}" for s in splits for m in HEADLINE]
    lines = [f"{'model':<28}" + "".join(f"{c:>20}" for c in cols)]
    for obj, by_split in table["objectives"].items():
        lines.append(f"{obj + ' (mean over seeds)':<28}"
                     + "".join(f"{_f(by_split[s][m]['mean']):>20}" for s in splits for m in HEADLINE))
    for base, by_split in table["baselines"].items():
        lines.append(f"{base:<28}" + "".join(f"{_f(by_split.get(s, {}).get(m)):>20}" for s in splits
                                              for m in HEADLINE))
    lines.append("")
    lines.append(f"paired differences (a - b, same training seed; CI: t-interval over seeds; an effect only where "
                 f"the interval lies at least {MIN_EFFECT:g} from 0)")
    for p in table["paired"]:
        ci = p["ci"]
        ci_s = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "(one seed: no interval)"
        lines.append(f"  {p['a']} - {p['b']:<13} {p['split']:<8} {p['metric']:<10} {p['mean']:+.3f} {ci_s}  "
                     f"worst seed {p['worst_seed']:+.3f}  {verdict(ci, MIN_EFFECT)}")
    return "\n".join(lines)


def format_testbed(tb: dict) -> str:
    """The testbed figures with their goals, one line each."""
    g, met = tb["goals"], tb["met"]
    gap = tb["heldout_gap"]
    mark = {True: "goal met", False: "GOAL MISSED"}
    lines = [f"  zero-shot {a:<9} {v:.3f}  (goal >= {g['zero_shot_min']}: {mark[met['zero_shot_' + a]]})"
             for a, v in tb["zero_shot"].items()]
    lo, hi = g["matched_cos"]
    lines.append(f"  matched text-image cos {tb['matched_cos']:.3f}  (goal {lo}-{hi}: {mark[met['matched_cos']]})")
    lines.append(f"  teacher level: held-out oracle cos {gap['oracle_cos']:.3f} - text-shift cos "
                 f"{gap['text_shift_cos']:.3f} = {gap['gap']:.3f}  (goal >= {g['gap_min']}: {mark[met['gap']]})")
    lines.append(f"    (on {gap['captions']} held-out captions rendered {gap['renders_per_caption']} times each for "
                 f"it: oracle = the mean of a caption's other renders)")
    if "store_gap" in tb:
        sg = tb["store_gap"]
        lines.append(f"  store level:   held-out oracle cos {sg['oracle_cos']:.3f} - text-shift cos "
                     f"{sg['text_shift_cos']:.3f} = {sg['gap']:.3f}  (goal >= {g['gap_min']}: "
                     f"{mark[met['store_gap']]})")
        lines.append("    (on the store's held-out-composition rows the priors are scored on: oracle = the mean of the "
                     "other rows with the same description; text-shift fitted on the held-in rows)")
    return "\n".join(lines)


def format_tradeoff(points: Sequence[dict], metrics: Sequence[str] = ("cos_image", "caption_r1", "probe_auc")) -> str:
    """The λ sweep as text: mean [t-interval over seeds] per metric."""
    lines = [f"{'λ':>6} {'objective':<16}" + "".join(f"{m:>26}" for m in metrics)]
    for pt in points:
        cells = []
        for m in metrics:
            v = pt[m]
            cells.append(f"{_f(v['mean'])} {_ci(v['ci'])}".rjust(26))
        lines.append(f"{pt['lambda']:>6g} {pt['objective']:<16}" + "".join(cells))
    return "\n".join(lines)


SWEEP_SCORES = (("caption_r1", "caption R@1 (right composition)"), ("probe_auc", "attribute probe AUC"))


def _point(label: str, x: Mapping, y: Mapping) -> F.Point:
    """A scatter point from two {"mean", "ci"} entries."""
    return (label, (x["mean"], *(x.get("ci") or (None, None))),
            (y["mean"], *(y.get("ci") or (None, None))))


def tradeoff_charts(points: Sequence[dict], table: dict, split: str = "heldout") -> list[str]:
    """SVG charts of the λ sweep: each composition score against cosine to the real image, one point
    per λ (mean over seeds, t-interval error bars on both axes), the curve in λ order; once with the
    λ points alone (their scale), once with the other objectives and the baselines as references.
    A score no point has (not evaluated) gives no chart."""
    curve = [f"λ={pt['lambda']:g} ({pt['objective']})" for pt in points]
    swept = {pt["objective"] for pt in points}
    others = [obj for obj, by_split in table["objectives"].items() if obj not in swept and split in by_split]
    bases = ("TextEmb", "text-shift", "ridge")
    st = F.styles([*curve, *others, *bases])
    xlabel = "cosine to the real image"
    charts = []
    for score, label in SWEEP_SCORES:
        pts = [_point(name, pt["cos_image"], pt[score]) for name, pt in zip(curve, points, strict=True)]
        charts.append(F.to_svg(F.scatter_chart(f"{split}: {label} vs cosine, the λ sweep", pts, st, xlabel, label,
                                               curve=curve)))
        pts += [_point(obj, table["objectives"][obj][split]["cos_image"], table["objectives"][obj][split][score])
                for obj in others]
        for base in bases:
            v = table["baselines"].get(base, {}).get(split, {})
            pts.append((base, (v.get("cos_image"), None, None), (v.get(score), None, None)))
        charts.append(F.to_svg(F.scatter_chart(f"{split}: {label} vs cosine to the real image", pts, st, xlabel,
                                               label, curve=curve)))
    return [c for c in charts if c]


SPLIT_SCOPES = {"heldout": " on held-out compositions", "heldin": " on held-in rows"}


def experiment_verdict(table: dict, splits: Sequence[str] = ("heldin", "heldout")) -> list[dict]:
    """The experiment's summary (`evaluation.report.build_verdict`), held-out compositions first: per split and
    headline figure the objective with the best mean over training seeds and the experiment's paired
    differences (same training seed, t-interval over seeds); each objective's budget beside its name."""
    budgets: dict[str, dict | None] = {}
    mixed = []
    for obj in table["objectives"]:
        runs = (table.get("budgets") or {}).get(obj) or {}
        labels = {budget_label(b) for b in runs.values()}
        budgets[obj] = next(iter(runs.values())) if len(labels) == 1 else None
        if len(labels) > 1:
            mixed.append(f"{obj} ({'; '.join(f'{n}: {budget_label(b)}' for n, b in runs.items())})")
    figures = []
    for split in sorted(splits, key=lambda s: s != "heldout"):
        for m in HEADLINE:
            values = {obj: by_split[split][m]["mean"] for obj, by_split in table["objectives"].items()
                      if split in by_split}
            pairs = [{"a": p["a"], "b": p["b"], "diff": p["mean"], "ci": p["ci"]}
                     for p in table["paired"] if p["split"] == split and p["metric"] == m]
            figures.append({"metric": m, "scope": SPLIT_SCOPES.get(split, f" on {split}"), "better": "higher",
                            "values": values, "pairs": pairs})
    records = build_verdict(figures, budgets, "95 % t-interval over training seeds", noun="objective")
    if mixed:
        records.insert(2, {"kind": "flag", "text": "⚠ The training seeds of one objective had different budgets: "
                                                   + "; ".join(mixed) + "."})
    return records


def experiment_context(table: dict, teacher: dict, notes: str, splits: Sequence[str] = ("heldin", "heldout"),
                       testbed_figures: dict | None = None, points: Sequence[dict] = ()) -> dict:
    """What the experiment section (demo/templates/experiment.html) shows."""
    rows = [(obj, True, [_f(by_split[s][m]["mean"]) for s in splits for m in HEADLINE])
            for obj, by_split in table["objectives"].items()]
    rows += [(base, False, [_f(by_split.get(s, {}).get(m)) for s in splits for m in HEADLINE])
             for base, by_split in table["baselines"].items()]
    return {"notes": notes, "table": table, "teacher": teacher, "rows": rows,
            "columns": [(s, m) for s in splits for m in HEADLINE],
            "testbed_text": format_testbed(testbed_figures) if testbed_figures else "",
            "tradeoff_text": format_tradeoff(points) if points else "",
            "sweep_charts": tradeoff_charts(points, table) if points else [],
            "experiment_verdict": experiment_verdict(table, splits),
            "f": _f, "ci": _ci, "reading": lambda ci: verdict(ci, MIN_EFFECT), "min_effect": MIN_EFFECT}


def report_section(table: dict, teacher: dict, notes: str, splits: Sequence[str] = ("heldin", "heldout"),
                   testbed_figures: dict | None = None, points: Sequence[dict] = ()) -> str:
    """The experiment's HTML section alone (`write_demo_report` puts it on top of the evaluation report)."""
    context = experiment_context(table, teacher, notes, splits, testbed_figures, points)
    return environment("demo").get_template("experiment.html").render(context)


def write_demo_report(path: str | os.PathLike, heldout_eval: str | os.PathLike, table: dict, teacher: dict,
                      notes: str, splits: Sequence[str] = ("heldin", "heldout"), testbed_figures: dict | None = None,
                      points: Sequence[dict] = ()) -> Path:
    """The demo's report.html: the held-out evaluation's report (read back from its folder, metrics.json
    and images/) with the experiment section on top."""
    heldout_eval = Path(heldout_eval)
    result = json.loads((heldout_eval / "metrics.json").read_text())
    context = report_context(result, load_images(heldout_eval / "images"))
    context |= experiment_context(table, teacher, notes, splits, testbed_figures, points)
    html = environment("demo").get_template("demo_report.html").render(context)
    path = Path(path)
    atomic_write_text(path, html)
    return path


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "—"
