"""The demo's experiment: priors of several objectives and training seeds, evaluated on held-in
rows and on held-out compositions, summarised per objective with paired differences.

Inputs are `training.evaluate.evaluate` results (metrics.json) of the same priors on the two
splits. Training seeds are the unit of the paired differences (eclipse seed s vs projection
seed s): the interval is a t-interval over seeds, and every seed's own figure is reported too.
"""

import html
import math
from collections.abc import Sequence

import numpy as np

from storage_schema import CAPTION, IMAGE_EMBED, TEXT_EMBED, EmbeddingStore
from training import metrics as M

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


def oracle_metrics(store: EmbeddingStore, shards: Sequence[str], n_boot: int = 200, seed: int = 0) -> dict:
    """The oracle prediction: the mean image embedding of the *other* renders of the same caption.

    Rows whose caption has no other render are left out (their count is reported).
    """
    images, texts, captions = [], [], []
    for b in store.iter_batches(4096, [CAPTION, IMAGE_EMBED, TEXT_EMBED], shards=list(shards)):
        images.append(b[IMAGE_EMBED].astype(np.float64))
        texts.append(b[TEXT_EMBED].astype(np.float64))
        captions += [str(c) for c in b[CAPTION]]
    image, text = np.concatenate(images), np.concatenate(texts)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
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
                      heldout_shards: Sequence[str] | None, seeds: int = 3, n_boot: int = 200) -> dict:
    """R@1 among caption prototypes: is the prediction nearest to the mean real image embedding of its own
    caption, among the prototypes of every caption in the store? Row-level retrieval cannot tell apart
    renders of one caption; this asks what a decoder needs: the right composition.

    Returns model name -> summary (priors under `seeds` noise seeds; TextEmb, text-shift, ridge; oracle).
    """
    from training.evaluate import Baselines, predict_heldout, resolve_split, scan_training_split
    from training.generate import open_prior

    handles = [open_prior(p, "cpu") for p in priors]
    split = resolve_split(handles, None, None, train_shards, heldout_shards, store)
    held = predict_heldout(store, split, handles, seeds, 1.0, 256)
    base = Baselines.fit(scan_training_split(store, split, 1.0, 0.0))

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for b in store.iter_batches(4096, [CAPTION, IMAGE_EMBED]):
        for c, e in zip(b[CAPTION], b[IMAGE_EMBED].astype(np.float64), strict=True):
            sums[str(c)] = sums.get(str(c), 0) + e
            counts[str(c)] = counts.get(str(c), 0) + 1
    names = sorted(sums)
    protos = M.l2_normalize(np.stack([sums[c] / counts[c] for c in names]))
    target = np.array([names.index(c) for c in held.captions])

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
        lines.append(f"  {p['a']} - {p['b']:<11} {p['split']:<8} {p['metric']:<10} {p['mean']:+.3f} {ci_s}  "
                     f"worst seed {p['worst_seed']:+.3f}")
    return "\n".join(lines)


def report_section(table: dict, teacher: dict, notes: str, splits: Sequence[str] = ("heldin", "heldout")) -> str:
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
        f"<td>{', '.join(_f(v, True) for v in p['per_seed'])}</td></tr>" for p in table["paired"])
    t = teacher
    teacher_rows = "".join(f"<tr><td>{esc(k)}</td><td>{_f(v) if isinstance(v, float) else esc(str(v))}</td></tr>"
                           for k, v in t.items() if v is not None and k != "path")
    return (
        "<h1>Demo: the ECLIPSE experiment on a synthetic compositional world</h1>"
        f"<p>{notes}</p>"
        "<h2>Results per objective (mean over training seeds) and baselines</h2>"
        f"<table><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"
        "<h2>Paired differences (same training seed)</h2>"
        "<table><tr><th>a − b</th><th>split</th><th>metric</th><th>mean</th><th>95 % CI over seeds</th>"
        f"<th>worst seed</th><th>per seed</th></tr>{paired}</table>"
        f"<h2>Teacher CLIP</h2><table>{teacher_rows}</table><hr>"
    )


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "—"
