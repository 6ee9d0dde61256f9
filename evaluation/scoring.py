"""Scoring held-out predictions: every figure with its bootstrap interval, paired comparisons, the attribute
probe and nearest-neighbour examples. Inputs are arrays; `evaluation.metrics` holds the formulas.

    summaries, rows = embedding_metrics(models, held.image, held.text, n_boot, level, boot_seed, n_boot_fd)

models: name -> [S, N, D] predictions (S noise seeds; 1 for a deterministic baseline).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from evaluation import metrics as M
from evaluation.baselines import TrainStats
from evaluation.images import ImageSource
from evaluation.predict import Heldout
from evaluation.prompts import probe_families, probe_vocabulary

# What each row-level figure is, and which direction is better (report and metrics.json).
METRIC_INFO: dict[str, tuple[str, str]] = {
    "cos_image": ("cos(pred, true image)", "higher"),
    "cos_text": ("cos(pred, own caption's text embedding)", "higher"),
    "cos_unrelated_text": ("cos(pred, another row's text embedding)", "lower"),
    "cos_image_minus_baseline": ("cos(pred, image) - cos(text, image): LAION's difference from baseline", "higher"),
    "norm_ratio": ("|pred| / |true image|", "1"),
    "mse": ("mean squared error to the true image embedding", "lower"),
    "r1": ("recall@1 of the true image in the held-out gallery", "higher"),
    "r5": ("recall@5", "higher"),
    "r10": ("recall@10", "higher"),
    "rank": ("median rank of the true image", "lower"),
    "frechet": ("Fréchet distance to the real image embeddings", "lower"),
    "probe_auc": ("attribute probe AUC (probe trained on real image embeddings only)", "higher"),
}
PROBE_MIN_POSITIVES = 10
PROBE_MAX_DRAWS = 200  # each draw scores every model again: more would only cost time


def embedding_metrics(models: dict[str, np.ndarray], image: np.ndarray, text: np.ndarray, n_boot: int,
                      level: float, boot_seed: int, n_boot_fd: int) -> tuple[dict, dict]:
    """(summaries per model and metric, per-row values per model and metric [S, N])."""
    summaries: dict[str, dict] = {}
    rows: dict[str, dict[str, np.ndarray]] = {}
    for name, preds in models.items():
        per_seed = [M.row_metrics(p, image, text) for p in preds]
        rows[name] = {k: np.stack([r[k] for r in per_seed]) for k in per_seed[0]}
        summaries[name] = {
            k: M.summarize(v if len(v) > 1 else v[0], n_boot, level, boot_seed,
                           "median" if k == "rank" else "mean").to_dict()
            for k, v in rows[name].items()
        }
    for name, frechet in frechet_summaries(models, image, level, boot_seed, n_boot_fd).items():
        summaries[name]["frechet"] = frechet
    return summaries, rows


def frechet_summaries(models: dict[str, np.ndarray], image: np.ndarray, level: float, boot_seed: int,
                      n_boot: int) -> dict[str, dict]:
    """The Fréchet distance of every model to the real embeddings, with a bootstrap over rows: one
    factorisation of the real side per draw, shared by all models."""
    ref = M.FrechetReference(image)
    point = {name: [ref.distance(p) for p in preds] for name, preds in models.items()}
    draws: dict[str, list[float]] = {name: [] for name in models}
    for idx in M.bootstrap_indices(len(image), n_boot, boot_seed):
        r = M.FrechetReference(image[idx])
        for name, preds in models.items():
            draws[name].append(float(np.mean([r.distance(p[idx]) for p in preds])))
    return {name: M.set_summary(point[name], draws[name], len(image), level) for name in models}


def comparisons(rows: dict[str, dict[str, np.ndarray]], priors: list[str], n_boot: int, level: float,
                boot_seed: int, metrics: Sequence[str] = ("cos_image", "r1")) -> list[dict]:
    """Paired differences (same rows, seed-averaged) of each prior against every other model."""
    out = []
    for a in priors:
        for b in rows:
            if b == a or (b in priors and priors.index(b) < priors.index(a)):
                continue
            for m in metrics:
                s = M.paired_difference(rows[a][m], rows[b][m], n_boot, level, boot_seed).to_dict()
                out.append({"a": a, "b": b, "metric": m, **s})
    return out


def word_labels(captions: Sequence[str], words: Sequence[str]) -> np.ndarray:
    """[captions, words] bool: does the caption contain the word (whole word, case-insensitive)?"""
    pats = [re.compile(rf"\b{re.escape(w)}\b") for w in words]
    low = [c.lower() for c in captions]
    return np.array([[bool(p.search(c)) for p in pats] for c in low], dtype=bool).reshape(len(captions), len(words))


def caption_probe(stats: TrainStats, held: Heldout, models: dict[str, np.ndarray], n_boot: int, level: float,
                  boot_seed: int, min_pos: int = PROBE_MIN_POSITIVES,
                  families: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Attribute probe: logistic classifiers for attribute words in the caption, trained on real image
    embeddings of the training split only (a stand-in for a decoder, which only sees image embeddings),
    applied to each model's predictions on the held-out rows; mean ROC AUC over words.

    families: family -> words; each family gets the same figure over its own words (from the same fitted
    classifiers and the same bootstrap draws), under "families"; one without a usable word is
    {"skipped": why}. None: `probe_families()` (color, shape, texture, spatial), the overall figure then over
    the color/shape/texture words as always (the spatial words get classifiers of their own). Given: the
    overall figure is over all their words.
    """
    fams = {name: _unique_lower(words) for name, words in (probe_families() if families is None
                                                            else families).items()}
    vocab = probe_vocabulary() if families is None else sorted({w for ws in fams.values() for w in ws})
    extra = sorted({w for ws in fams.values() for w in ws} - set(vocab))  # family words outside the overall figure
    if len(stats.probe_captions) == 0:
        why = "no training rows for the probe"
        return {"skipped": why, "families": {f: {"skipped": why} for f in fams}}
    everything = vocab + extra
    y_train = word_labels(stats.probe_captions, everything)
    y_held = word_labels(held.captions, everything)
    n_train, n_held = len(y_train), len(y_held)
    usable = {w for i, w in enumerate(everything)
              if min_pos <= y_train[:, i].sum() <= n_train - min_pos and 2 <= y_held[:, i].sum() <= n_held - 2}
    rule = f"occurs in at least {min_pos} training captions and 2 held-out captions (and is absent from as many)"
    # One probe on the overall words (fitted exactly as it always was), one on the words only families use.
    groups = [[w for w in vocab if w in usable], [w for w in extra if w in usable]]
    probes = [M.fit_probe(stats.probe_images, y_train[:, [everything.index(w) for w in g]], g, seed=boot_seed)
              for g in groups if g]
    scored = [w for g in groups for w in g]  # the probes' columns, in order
    labels = y_held[:, [everything.index(w) for w in scored]]
    col = {w: j for j, w in enumerate(scored)}
    fam_cols = {f: [col[w] for w in ws if w in col] for f, ws in fams.items()}
    idx_draws = M.bootstrap_indices(len(labels), min(n_boot, PROBE_MAX_DRAWS), boot_seed)

    def summary(aucs: list[np.ndarray], draw_aucs: list[list[np.ndarray]], cols: list[int]) -> dict:
        point = [_mean_auc(a[cols]) for a in aucs]
        draws = [float(np.mean([_mean_auc(a[cols]) for a in per_seed])) for per_seed in draw_aucs]
        return M.set_summary(point, draws, len(labels), level)

    out_models: dict[str, dict] = {}
    fam_models: dict[str, dict[str, dict]] = {f: {} for f in fams}
    if scored:
        for name, preds in {"real images (ceiling)": held.image[None], **models}.items():
            scores = [np.hstack([p.scores(x) for p in probes]) for x in preds]  # per seed: [N, words]
            aucs = [M.auc_per_column(s, labels) for s in scores]
            draw_aucs = [[M.auc_per_column(s[idx], labels[idx]) for s in scores] for idx in idx_draws]
            if groups[0]:
                out_models[name] = summary(aucs, draw_aucs, list(range(len(groups[0]))))
            for f, cols in fam_cols.items():
                if cols:
                    fam_models[f][name] = summary(aucs, draw_aucs, cols)
    out_fams = {}
    for f, ws in fams.items():
        if fam_cols[f]:
            words = [scored[j] for j in fam_cols[f]]
            out_fams[f] = {"words": words, "positives_heldout": labels[:, fam_cols[f]].sum(0).tolist(),
                           "models": fam_models[f]}
        else:
            out_fams[f] = {"skipped": f"no {f} word ({len(ws)}: {_listing(ws)}) {rule}" if ws else
                           f"no {f} words given"}
    if not groups[0]:
        what = "color/shape/texture words" if families is None else f"words of {', '.join(fams)}"
        return {"skipped": f"no attribute word ({len(vocab)} {what}) {rule}", "families": out_fams}
    main = labels[:, : len(groups[0])]
    return {"words": groups[0], "train_rows": int(n_train), "positives_heldout": main.sum(0).tolist(),
            "models": out_models, "families": out_fams}


def _mean_auc(aucs: np.ndarray) -> float:
    """`metrics.mean_auc` of AUCs already computed: the mean over the words that have both classes."""
    return float(np.nanmean(aucs)) if np.any(~np.isnan(aucs)) else float("nan")


def _unique_lower(words: Sequence[str]) -> list[str]:
    """The words lowercased (captions are matched lowercased), first occurrence kept."""
    return list(dict.fromkeys(w.lower() for w in words))


def _listing(words: Sequence[str], n: int = 8) -> str:
    return ", ".join(words[:n]) + (", ..." if len(words) > n else "")


def spread_rows(n_total: int, n: int) -> list[int]:
    """About n row indices spread evenly over 0..n_total-1 (the first and the last included)."""
    return np.unique(np.linspace(0, n_total - 1, num=min(n, n_total)).astype(int)).tolist()


def nearest_examples(held: Heldout, models: dict[str, np.ndarray], shown: Sequence[str], n: int, k: int,
                     src: ImageSource, images: dict[str, Image.Image]) -> list[dict]:
    """For n held-out rows: each shown model's k nearest real rows (held-out gallery) to its prediction (seed 0).

    The real images found by `src` are added to `images` under the ids the examples name."""
    if n <= 0:
        return []

    def image_id(i: int) -> str | None:
        im_id = f"row-{i}"
        if im_id not in images:
            im = src.get(held.keys[i], held.urls[i])
            if im is None:
                return None
            images[im_id] = im
        return im_id

    out = []
    for i in spread_rows(len(held.keys), n):
        ex = {"row": i, "key": held.keys[i], "caption": held.captions[i], "image": image_id(i), "models": {}}
        for name in shown:
            pred = models[name][0][i : i + 1]
            idx, cos = M.nearest_neighbours(pred, held.image, k)
            ex["models"][name] = {
                "true_rank": int(M.retrieval_ranks(pred, held.image, np.array([i]))[0]),
                "cos_true": float(M.rowwise_cosine(pred, held.image[i : i + 1])[0]),
                "neighbours": [{"row": int(j), "key": held.keys[j], "caption": held.captions[j], "cos": float(c),
                                "image": image_id(int(j)), "is_true": bool(j == i)}
                               for j, c in zip(idx[0], cos[0], strict=True)],
            }
        out.append(ex)
    return out
