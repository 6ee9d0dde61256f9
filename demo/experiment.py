"""The demo's experiment: priors of several objectives and training seeds, evaluated on held-in
rows and on held-out compositions, summarised per objective with paired differences, the
eclipse λ sweep (the paper's trade-off between composition and closeness to real images), and
the testbed figures that say whether the world could tell a good prior from a bad one.

Inputs are `evaluation.evaluate.evaluate` results (metrics.json) of the same priors on the two
splits. Training seeds are the unit of the paired differences (eclipse seed s vs projection
seed s): the interval is a t-interval over seeds, and every seed's own figure is reported too.
"""

import html
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from evaluation import metrics as M
from storage_schema import CAPTION, IMAGE_EMBED, TEXT_EMBED, EmbeddingStore

HEADLINE = ("cos_image", "caption_r1", "probe_auc")
BASELINES = ("TextEmb", "text-shift", "ridge", "mean-image")
# two-sided 97.5 % quantiles of Student's t for 1..9 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def model_value(result: dict, name: str, metric: str) -> float | None:
    if metric == "caption_r1":
        models = result.get("caption_retrieval", {}).get("models", {})
        return models[name]["value"] if name in models else None
    if metric == "probe_auc":
        probe = result.get("probe", {}).get("models", {})
        return probe[name]["value"] if name in probe else None
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
                      keep: float = 1.0, group: Callable[[str], str] | None = None) -> dict:
    """R@1 among caption prototypes: is the prediction nearest to the mean real image embedding of its own
    caption, among the prototypes of every caption in the store? Row-level retrieval cannot tell apart
    renders of one caption; this asks what a decoder needs: the right composition.

    `group` maps a caption to its prototype's key (as in `oracle_metrics`; default: the caption).
    `keep`: the fraction of the evaluated rows to score (a key-hash sample, as `evaluate` draws it).
    Returns model name -> summary (priors under `seeds` noise seeds; TextEmb, text-shift, ridge; oracle).
    """
    from evaluation.baselines import Baselines, scan_training_split
    from evaluation.predict import predict_heldout
    from evaluation.priors import open_prior
    from evaluation.split import resolve_split

    handles = [open_prior(p, "cpu") for p in priors]
    split = resolve_split(handles, None, None, train_shards, heldout_shards, store)
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


def _t_interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    a = np.asarray(values, dtype=np.float64)
    half = _T975[min(len(a) - 2, len(_T975) - 1)] * a.std(ddof=1) / math.sqrt(len(a))
    return [float(a.mean() - half), float(a.mean() + half)]


def summarize(results: dict[str, dict], runs: dict[str, list[str]], oracle: dict[str, dict] | None = None,
              pairs: Sequence[tuple[str, str]] = (("eclipse", "projection"), ("eclipse", "diffusion"))) -> dict:
    """results: split name ("heldin", "heldout") -> evaluate() result; runs: objective -> model names in
    seed order (the same seeds for every objective, so seed s of two objectives pairs up)."""
    table: dict = {"objectives": {}, "baselines": {}, "paired": []}
    for obj, names in runs.items():
        table["objectives"][obj] = {
            split: {m: _over_seeds([model_value(res, n, m) for n in names]) for m in HEADLINE}
            for split, res in results.items()
        }
    for base in BASELINES:
        table["baselines"][base] = {split: {m: model_value(res, base, m) for m in HEADLINE}
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
            for m in HEADLINE:
                per_seed = [_diff(res, x, y, m) for x, y in zip(runs[a], runs[b], strict=True)]
                if any(v is None for v in per_seed):
                    continue
                rows_ci = [_row_ci(res, x, y, m) for x, y in zip(runs[a], runs[b], strict=True)]
                table["paired"].append({
                    "a": a, "b": b, "split": split, "metric": m, "per_seed": per_seed,
                    "mean": float(np.mean(per_seed)), "worst_seed": float(min(per_seed)),
                    "ci_over_seeds": _t_interval(per_seed), "row_ci_per_seed": rows_ci,
                })
    return table


def _over_seeds(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "seeds": values}
    return {"mean": float(np.mean(vals)), "seeds": values, "ci_over_seeds": _t_interval(vals)}


#: The testbed's goals (a world worth testing priors on): zero-shot accuracy of the teacher per
#: mentioned attribute, real CLIP's matched text-image cosine, and room beyond a constant vector.
GOALS = {"zero_shot_min": 0.9, "matched_cos": (0.2, 0.4), "gap_min": 0.10}


def summarize_testbed(teacher: Mapping, gap: Mapping) -> dict:
    """The testbed figures with their goals and whether each is met: `teacher` is a TeacherReport
    dict, `gap` the `demo.teacher.heldout_gap` dict."""
    zero_shot = {a: teacher[f"{a}_acc"] for a in ("color", "shape", "texture", "position")
                 if teacher.get(f"{a}_acc") is not None}
    lo, hi = GOALS["matched_cos"]
    met = {f"zero_shot_{a}": v >= GOALS["zero_shot_min"] for a, v in zero_shot.items()}
    met["matched_cos"] = lo <= teacher["matched_cos"] <= hi
    met["gap"] = gap["gap"] >= GOALS["gap_min"]
    return {"zero_shot": zero_shot, "matched_cos": teacher["matched_cos"], "heldout_gap": dict(gap),
            "goals": GOALS, "met": met}


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
                       **{m: {"mean": by_metric[m]["mean"], "ci_over_seeds": by_metric[m].get("ci_over_seeds"),
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
    lines.append("paired differences (a - b, same training seed; CI: t-interval over seeds)")
    for p in table["paired"]:
        ci = p["ci_over_seeds"]
        ci_s = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "(one seed: no interval)"
        lines.append(f"  {p['a']} - {p['b']:<13} {p['split']:<8} {p['metric']:<10} {p['mean']:+.3f} {ci_s}  "
                     f"worst seed {p['worst_seed']:+.3f}  {verdict(ci)}")
    return "\n".join(lines)


def verdict(ci: Sequence[float] | None) -> str:
    """What a paired interval lets one say: an effect only where it excludes 0."""
    if not ci:
        return "no interval"
    if ci[0] > 0:
        return "a > b"
    if ci[1] < 0:
        return "a < b"
    return "no clear difference"


def format_testbed(tb: dict) -> str:
    """The testbed figures with their goals, one line each."""
    g, met = tb["goals"], tb["met"]
    gap = tb["heldout_gap"]
    mark = {True: "goal met", False: "GOAL MISSED"}
    lines = [f"  zero-shot {a:<9} {v:.3f}  (goal >= {g['zero_shot_min']}: {mark[met['zero_shot_' + a]]})"
             for a, v in tb["zero_shot"].items()]
    lo, hi = g["matched_cos"]
    lines.append(f"  matched text-image cos {tb['matched_cos']:.3f}  (goal {lo}-{hi}: {mark[met['matched_cos']]})")
    lines.append(f"  held-out oracle cos {gap['oracle_cos']:.3f} - text-shift cos {gap['text_shift_cos']:.3f} = "
                 f"{gap['gap']:.3f}  (goal >= {g['gap_min']}: {mark[met['gap']]})")
    return "\n".join(lines)


def format_tradeoff(points: Sequence[dict], metrics: Sequence[str] = ("cos_image", "caption_r1", "probe_auc")) -> str:
    """The λ sweep as text: mean [t-interval over seeds] per metric."""
    lines = [f"{'λ':>6} {'objective':<16}" + "".join(f"{m:>26}" for m in metrics)]
    for pt in points:
        cells = []
        for m in metrics:
            v = pt[m]
            cells.append(f"{_f(v['mean'])} {_ci(v['ci_over_seeds'])}".rjust(26))
        lines.append(f"{pt['lambda']:>6g} {pt['objective']:<16}" + "".join(cells))
    return "\n".join(lines)


def tradeoff_charts(points: Sequence[dict], table: dict, split: str = "heldout") -> str:
    """SVG charts of the λ sweep: each composition score against cosine to the real image, one point
    per λ (mean over seeds, t-interval whiskers on both axes), the curve in λ order; once with the
    λ points alone (their scale), once with the baselines and the diffusion prior as references."""
    from evaluation.report import BASELINE_COLORS, PRIOR_COLORS, svg_scatter

    charts = []
    curve = [f"λ={pt['lambda']:g} ({pt['objective']})" for pt in points]
    for score, label in (("caption_r1", "caption R@1 (right composition)"),
                         ("probe_auc", "attribute probe AUC")):
        pts = []
        for i, pt in enumerate(points):
            x, y = pt["cos_image"], pt[score]
            pts.append((f"λ={pt['lambda']:g} ({pt['objective']})", PRIOR_COLORS[i % len(PRIOR_COLORS)],
                        (x["mean"], *(x["ci_over_seeds"] or (None, None))),
                        (y["mean"], *(y["ci_over_seeds"] or (None, None)))))
        charts.append(svg_scatter(f"{split}: {label} vs cosine, the λ sweep", pts, "cosine to the real image",
                                  label, curve=curve))
        swept = {pt["objective"] for pt in points}
        for obj, by_split in table["objectives"].items():
            if obj in swept or split not in by_split:
                continue
            x, y = by_split[split]["cos_image"], by_split[split][score]
            pts.append((obj, PRIOR_COLORS[len(pts) % len(PRIOR_COLORS)], (x["mean"], *(x.get("ci_over_seeds") or
                        (None, None))), (y["mean"], *(y.get("ci_over_seeds") or (None, None)))))
        for j, base in enumerate(("TextEmb", "text-shift", "ridge")):
            v = table["baselines"].get(base, {}).get(split, {})
            pts.append((base, BASELINE_COLORS[j], (v.get("cos_image"), None, None), (v.get(score), None, None)))
        charts.append(svg_scatter(f"{split}: {label} vs cosine to the real image", pts, "cosine to the real image",
                                  label, curve=curve))
    return "".join(charts)


def report_section(table: dict, teacher: dict, notes: str, splits: Sequence[str] = ("heldin", "heldout"),
                   testbed_figures: dict | None = None, points: Sequence[dict] = ()) -> str:
    """The experiment's HTML section (goes on top of the held-out evaluation report)."""
    esc = html.escape
    head = "".join(f"<th>{esc(s)}<br>{esc(m)}</th>" for s in splits for m in HEADLINE)
    rows = []
    for obj, by_split in table["objectives"].items():
        rows.append(f"<tr><td><b>{esc(obj)}</b></td>" + "".join(
            f"<td>{_f(by_split[s][m]['mean'])}</td>" for s in splits for m in HEADLINE) + "</tr>")
    for base, by_split in table["baselines"].items():
        rows.append(f"<tr><td>{esc(base)}</td>" + "".join(
            f"<td>{_f(by_split.get(s, {}).get(m))}</td>" for s in splits for m in HEADLINE) + "</tr>")
    paired = "".join(
        f"<tr><td>{esc(p['a'])} − {esc(p['b'])}</td><td>{esc(p['split'])}</td><td>{esc(p['metric'])}</td>"
        f"<td>{_f(p['mean'], True)}</td><td>{_ci(p['ci_over_seeds'])}</td><td>{_f(p['worst_seed'], True)}</td>"
        f"<td>{', '.join(_f(v, True) for v in p['per_seed'])}</td><td>{esc(verdict(p['ci_over_seeds']))}</td></tr>"
        for p in table["paired"])
    t = teacher
    teacher_rows = "".join(f"<tr><td>{esc(k)}</td><td>{_f(v) if isinstance(v, float) else esc(str(v))}</td></tr>"
                           for k, v in t.items() if v is not None and k != "path")
    testbed_html = ""
    if testbed_figures:
        testbed_html = f"<h2>Testbed figures</h2><pre>{esc(format_testbed(testbed_figures))}</pre>"
    sweep_html = ""
    if points:
        sweep_html = ("<h2>The λ trade-off (held-out compositions)</h2>"
                      "<p>The paper: too small a λ does not distil the composition, too large a λ pulls the "
                      "prediction to the text side of the modality gap. Intervals: t over training seeds.</p>"
                      + tradeoff_charts(points, table) + f"<pre>{esc(format_tradeoff(points))}</pre>")
    return (
        "<h1>Demo: the ECLIPSE experiment on a synthetic compositional world</h1>"
        f"<p>{notes}</p>{testbed_html}{sweep_html}"
        "<h2>Results per objective (mean over training seeds) and baselines</h2>"
        f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
        "<h2>Paired differences (same training seed)</h2>"
        "<table><tr><th>a − b</th><th>split</th><th>metric</th><th>mean</th><th>95 % CI over seeds</th>"
        f"<th>worst seed</th><th>per seed</th><th>reading</th></tr>{paired}</table>"
        f"<h2>Teacher CLIP</h2><table>{teacher_rows}</table><hr>"
    )


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "—"
