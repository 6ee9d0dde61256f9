"""The trivial baselines every prior is compared with, fitted on the training side of the split.

    base = Baselines.fit(scan_training_split(store, split, keep_fraction=1.0, probe_fraction=0.1))
    base.predict(text_embeds) -> {"TextEmb": ..., "text-shift": ..., "mean-image": ..., "ridge": ...}

One streamed pass keeps only moments (ridge needs X'X and X'Y), plus a key-hash sample of real image
embeddings and captions for the attribute probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluation import metrics as M
from evaluation.split import SAMPLE_SALT_PROBE, Split
from storage_schema import CAPTION, IMAGE_EMBED, KEY, TEXT_EMBED, EmbeddingStore
from training.data import is_heldout

BASELINES = {
    "TextEmb": "the text embedding used as the prediction",
    "text-shift": "text embedding - mean text embedding + mean image embedding (training split)",
    "mean-image": "the mean image embedding of the training split, for every row",
    "ridge": "ridge regression text -> image, fitted on the training split (penalty by validation MSE)",
}


@dataclass
class TrainStats:
    fit: M.Moments  # text -> image moments, 9 rows in 10
    val: M.Moments  # every 10th row: picks the ridge penalty
    probe_images: np.ndarray
    probe_captions: list[str]
    rows: int


def scan_training_split(store: EmbeddingStore, split: Split, keep_fraction: float, probe_fraction: float,
                        batch_size: int = 4096) -> TrainStats:
    """Moments for the baselines (training rows subsampled to keep_fraction by key hash) and, for the
    probe, real image embeddings + captions of a further key-hash subsample of them (probe_fraction)."""
    dim_t, dim_i = store.encoder.text_dim, store.encoder.image_dim
    fit, val = M.Moments(dim_t, dim_i), M.Moments(dim_t, dim_i)
    probe_img: list[np.ndarray] = []
    probe_cap: list[str] = []
    rows = 0
    keep = split.row_filter(heldout=False, keep_fraction=keep_fraction)
    for raw in store.iter_batches(batch_size, [KEY, CAPTION, IMAGE_EMBED, TEXT_EMBED], row_filter=keep,
                                  shards=split.shards(store, heldout=False)):
        n = len(raw[KEY])
        text = raw[TEXT_EMBED].astype(np.float64)
        image = raw[IMAGE_EMBED].astype(np.float64)
        is_val = (np.arange(rows, rows + n) % 10) == 9  # 1 row in 10 picks the ridge penalty
        fit.add(text[~is_val], image[~is_val])
        val.add(text[is_val], image[is_val])
        if probe_fraction > 0:
            pick = is_heldout(raw[KEY], probe_fraction, split.seed + SAMPLE_SALT_PROBE) if probe_fraction < 1 else (
                np.ones(n, dtype=bool))
            probe_img.append(raw[IMAGE_EMBED][pick].astype(np.float32))
            probe_cap += [str(c) for c in raw[CAPTION][pick]]
        rows += n
    if rows < 2:
        raise ValueError(f"{store.dir}: {rows} training rows (outside the held-out split); the baselines need some")
    images = np.concatenate(probe_img) if probe_img else np.zeros((0, dim_i), np.float32)
    return TrainStats(fit, val, images, probe_cap, rows)


@dataclass
class Baselines:
    mean_text: np.ndarray
    mean_image: np.ndarray
    ridge: M.Ridge

    @classmethod
    def fit(cls, stats: TrainStats) -> Baselines:
        allm = stats.fit.merged(stats.val)
        return cls(allm.mean_x, allm.mean_y, M.fit_ridge(stats.fit, stats.val))

    def predict(self, text: np.ndarray) -> dict[str, np.ndarray]:
        text = np.asarray(text, dtype=np.float64)
        return {
            "TextEmb": text,
            "text-shift": M.text_shift(text, self.mean_text, self.mean_image),
            "mean-image": np.broadcast_to(self.mean_image, text.shape).copy(),
            "ridge": self.ridge.predict(text),
        }
