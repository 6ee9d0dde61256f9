"""Scoring held-out predictions: every figure with its bootstrap interval, paired comparisons, the attribute
probe and nearest-neighbour examples. Inputs are arrays; `evaluation.metrics` holds the formulas.

    summaries, rows = embedding_metrics(models, held.image, held.text, n_boot, level, boot_seed, n_boot_fd)

models: name -> [S, N, D] predictions (S noise seeds; 1 for a deterministic baseline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from evaluation import metrics as M
from evaluation.baselines import TrainStats
from evaluation.images import ImageSource
from evaluation.predict import Heldout
from evaluation.prompts import probe_vocabulary

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
                  boot_seed: int, min_pos: int = PROBE_MIN_POSITIVES) -> dict:
    """Attribute probe: logistic classifiers for attribute words in the caption, trained on real image
    embeddings of the training split only (a stand-in for a decoder, which only sees image embeddings),
    applied to each model's predictions on the held-out rows; mean ROC AUC over words."""
    vocab = probe_vocabulary()
    if len(stats.probe_captions) == 0:
        return {"skipped": "no training rows for the probe"}
    y_train = word_labels(stats.probe_captions, vocab)
    y_held = word_labels(held.captions, vocab)
    keep = [i for i in range(len(vocab))
            if min_pos <= y_train[:, i].sum() <= len(y_train) - min_pos and 2 <= y_held[:, i].sum() <= len(y_held) - 2]
    if not keep:
        return {"skipped": f"no attribute word ({len(vocab)} color/shape/texture words) occurs in at least "
                           f"{min_pos} training captions and 2 held-out captions (and is absent from as many)"}
    words = [vocab[i] for i in keep]
    probe = M.fit_probe(stats.probe_images, y_train[:, keep], words, seed=boot_seed)
    labels = y_held[:, keep]
    idx_draws = M.bootstrap_indices(len(labels), min(n_boot, PROBE_MAX_DRAWS), boot_seed)
    out_models = {}
    for name, preds in {"real images (ceiling)": held.image[None], **models}.items():
        scores = [probe.scores(p) for p in preds]
        point = [M.mean_auc(s, labels) for s in scores]
        draws = [float(np.mean([M.mean_auc(s[idx], labels[idx]) for s in scores])) for idx in idx_draws]
        out_models[name] = M.set_summary(point, draws, len(labels), level)
    return {"words": words, "train_rows": int(len(y_train)), "positives_heldout": labels.sum(0).tolist(),
            "models": out_models}


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
