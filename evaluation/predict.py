"""Every prior's predictions on the held-out rows, under several noise seeds, in one pass over the store.

    held = predict_heldout(store, split, handles, seeds=3, keep_fraction=1.0, batch_size=256)
    held.preds["eclipse"] -> [seeds, rows, D]

`evaluate` keeps them in OUT/heldout_predictions.npz (`save_heldout` / `load_heldout`), so that later
figures over the same rows (the demo's caption retrieval) do not predict again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.priors import PriorHandle
from evaluation.split import Split
from storage_schema import CAPTION, IMAGE_EMBED, KEY, TEXT_EMBED, TEXT_HIDDEN, TEXT_MASK, URL, EmbeddingStore
from storage_schema.atomic import atomic_path


@dataclass
class Heldout:
    keys: list[str]
    captions: list[str]
    urls: list[str | None]
    image: np.ndarray  # [N, D] float32
    text: np.ndarray  # [N, D] float32
    preds: dict[str, np.ndarray] = field(default_factory=dict)  # prior name -> [S, N, D] float32


def predict_heldout(store: EmbeddingStore, split: Split, handles: Sequence[PriorHandle], seeds: int,
                    keep_fraction: float, batch_size: int) -> Heldout:
    """One pass over the held-out rows; every prior predicts every row under `seeds` noise seeds.

    One generator per (prior, seed), consumed in store order: reruns give the same numbers.
    """
    pad = handles[0].text_length if handles else 77
    gens = {(h.name, s): torch.Generator(device=h.device).manual_seed(s) for h in handles for s in range(seeds)}
    keys: list[str] = []
    caps: list[str] = []
    urls: list = []
    imgs, texts = [], []
    preds: dict[str, list[list[np.ndarray]]] = {h.name: [[] for _ in range(seeds)] for h in handles}
    cols = [KEY, CAPTION, URL, IMAGE_EMBED, TEXT_EMBED, TEXT_HIDDEN]
    keep = split.row_filter(heldout=True, keep_fraction=keep_fraction)
    for raw in store.iter_batches(batch_size, cols, pad_to=pad, row_filter=keep, shards=split.shards(store, True)):
        n = len(raw[KEY])
        keys += [str(k) for k in raw[KEY][:n]]
        caps += [str(c) for c in raw[CAPTION][:n]]
        urls += [None if u is None else str(u) for u in raw[URL][:n]]
        imgs.append(raw[IMAGE_EMBED][:n].astype(np.float32))
        texts.append(raw[TEXT_EMBED][:n].astype(np.float32))
        for h in handles:
            for s in range(seeds):
                p = h.predict(raw[TEXT_EMBED][:n], raw[TEXT_HIDDEN][:n], raw[TEXT_MASK][:n], gens[(h.name, s)])
                preds[h.name][s].append(p.cpu().numpy())
    if len(keys) < 2:
        raise ValueError(f"{store.dir}: {len(keys)} held-out rows with fraction={split.fraction}, seed={split.seed}; "
                         f"evaluation needs at least 2 (a larger store or held-out fraction)")
    return Heldout(keys, caps, urls, np.concatenate(imgs), np.concatenate(texts),
                   {name: np.stack([np.concatenate(p) for p in per_seed]) for name, per_seed in preds.items()})


PREDICTIONS_FILE = "heldout_predictions.npz"  # written by `evaluation.evaluate.evaluate` beside metrics.json


def save_heldout(held: Heldout, path: str | os.PathLike) -> Path:
    """Write `held` as one .npz (atomically): `numpy.load(path)` gives keys, captions, image, text, the prior
    names and `pred_<i>` = prior i's predictions [seeds, rows, D]."""
    path = Path(path)
    names = list(held.preds)
    arrays = {"keys": np.array(held.keys, dtype=str), "captions": np.array(held.captions, dtype=str),
              "urls": np.array(["" if u is None else u for u in held.urls], dtype=str),
              "image": held.image, "text": held.text, "priors": np.array(names, dtype=str),
              **{f"pred_{i}": held.preds[n] for i, n in enumerate(names)}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def merge_heldout(paths: Sequence[str | os.PathLike]) -> Heldout:
    """The rows of the first file with every file's predictions, aligned by key: runs over the same rows may
    hold them in another order (a store encoded again from the same images); other rows are refused."""
    held = load_heldout(paths[0])
    for path in paths[1:]:
        other = load_heldout(path)
        if sorted(other.keys) != sorted(held.keys):
            raise ValueError(f"{path} holds predictions for other rows than {paths[0]}: evaluated with other settings")
        at = {k: i for i, k in enumerate(other.keys)}
        order = np.array([at[k] for k in held.keys], dtype=np.int64)
        held.preds.update({name: p[:, order] for name, p in other.preds.items()})
    return held


def load_heldout(path: str | os.PathLike) -> Heldout:
    """The `Heldout` that `save_heldout` wrote (no pickles: strings are stored as numpy unicode arrays)."""
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["priors"]]
        return Heldout([str(k) for k in z["keys"]], [str(c) for c in z["captions"]],
                       [str(u) or None for u in z["urls"]], z["image"], z["text"],
                       {n: z[f"pred_{i}"] for i, n in enumerate(names)})
