"""Evaluate priors against each other and against trivial baselines; write metrics.json + report.html.

    evaluate(["runs/eclipse", "runs/projection"], "stores/cc3m", "eval/cc3m") -> metrics dict

On the store's held-out split (the key-hash split the trainer never reads, `training.data.is_heldout`):
every prior predicts image embeddings with several noise seeds; the baselines
are fitted on the training split only: TextEmb (the text embedding itself),
text-shift (text - mean text + mean image), the mean image embedding, and ridge regression
text -> image. Every figure is averaged over the seeds and given with a seeded bootstrap
interval over rows. Then, when the store's text encoder loads: the T2I-CompBench prompt suites
(`evaluation.prompts`); optionally images through a decoder and image metrics (`evaluation.generate`).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation import metrics as M
from evaluation.generate import (
    ClipImageScorer,
    Decoder,
    ImageMetricUnavailable,
    PriorHandle,
    WeightsMissingError,
    fid_between,
    negative_embeddings,
    open_prior,
    pickscore_preference,
    prompt_embeddings,
)
from evaluation.prompts import CATEGORIES, load_prompts, probe_vocabulary, run_prompt_suite
from storage_schema import (
    CAPTION,
    IMAGE_EMBED,
    KEY,
    TEXT_EMBED,
    TEXT_HIDDEN,
    TEXT_MASK,
    URL,
    EmbeddingStore,
    EncoderInfo,
)
from training.data import check_store_dims, is_heldout

METRICS_SCHEMA = 1
DEFAULT_HELDOUT_FRACTION = 0.01  # training.config.TrainConfig's default
BASELINES = {
    "TextEmb": "the text embedding used as the prediction",
    "text-shift": "text embedding - mean text embedding + mean image embedding (training split)",
    "mean-image": "the mean image embedding of the training split, for every row",
    "ridge": "ridge regression text -> image, fitted on the training split (penalty by validation MSE)",
}
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
# Salts of the key hashes that subsample each side of the split (independent of the split's own hash).
SAMPLE_SALT_HELDOUT, SAMPLE_SALT_TRAIN, SAMPLE_SALT_PROBE = 1_000_003, 2_000_003, 3_000_017


# -- the held-out split -----------------------------------------------------------------------------


@dataclass
class Split:
    """Which rows are evaluated and which rows fit the baselines.

    By default both sides come from every shard, split by key hash (fraction, seed), as in training.
    train_shards restricts both sides to the shards the priors trained on. heldout_shards (a
    composition hold-out: shards the priors never read) makes every row of those shards the
    evaluation side; the training side stays the non-held-out rows of the training shards.
    """

    fraction: float
    seed: int
    source: str  # where the numbers came from
    train_shards: tuple[str, ...] | None = None
    heldout_shards: tuple[str, ...] | None = None

    def heldout(self, keys) -> np.ndarray:
        return is_heldout(keys, self.fraction, self.seed)

    def shards(self, store: EmbeddingStore, heldout: bool) -> list[str]:
        if heldout and self.heldout_shards:
            return list(self.heldout_shards)
        if self.train_shards:
            return list(self.train_shards)
        return [s for s in store.shards if s not in set(self.heldout_shards or ())]

    def count(self, store: EmbeddingStore) -> tuple[int, int]:
        """(held-out rows, training rows) of the store; reads only the key column."""
        held = train = 0
        held_shards, train_shards = set(self.shards(store, True)), set(self.shards(store, False))
        for shard, keys in store.keys():
            by_hash = self.heldout(keys)
            if shard in train_shards:
                train += int((~by_hash).sum())
            if shard in held_shards:
                held += len(keys) if self.heldout_shards else int(by_hash.sum())
        return held, train

    def row_filter(self, heldout: bool, keep_fraction: float):
        """Rows of one side of the split, subsampled by a second key hash when keep_fraction < 1: every shard
        contributes alike (taking the first rows in shard order would favour the first shards/sources)."""
        salt = self.seed + (SAMPLE_SALT_HELDOUT if heldout else SAMPLE_SALT_TRAIN)
        whole_shards = heldout and bool(self.heldout_shards)

        def keep(keys) -> np.ndarray:
            side = np.ones(len(keys), dtype=bool) if whole_shards else self.heldout(keys) == heldout
            return side & is_heldout(keys, keep_fraction, salt) if keep_fraction < 1.0 else side

        return keep


def resolve_split(handles: Sequence[PriorHandle], fraction: float | None, seed: int | None,
                  train_shards: Sequence[str] | None = None, heldout_shards: Sequence[str] | None = None,
                  store: EmbeddingStore | None = None) -> Split:
    """The split, with the shard restrictions checked against the runs (see `_split_by_hash`)."""
    split = _split_by_hash(handles, fraction, seed)
    recorded = {h.name: h.train_config.get("shards") for h in handles if h.train_config}
    if train_shards is None:
        known = [tuple(v) for v in recorded.values() if v]
        train_shards = known[0] if known and all(k == known[0] for k in known) else None
    if heldout_shards:
        for name, used in recorded.items():
            if used is None:
                raise ValueError(f"prior {name} trained on every shard; held-out shards {list(heldout_shards)} "
                                 f"would be rows it trained on")
            if overlap := sorted(set(used) & set(heldout_shards)):
                raise ValueError(f"prior {name} trained on {overlap}, which are given as held-out shards")
    if store is not None:
        unknown = sorted((set(train_shards or ()) | set(heldout_shards or ())) - set(store.shards))
        if unknown:
            raise ValueError(f"{store.dir}: no shards {unknown}")
    split.train_shards = tuple(train_shards) if train_shards else None
    split.heldout_shards = tuple(heldout_shards) if heldout_shards else None
    return split


def _split_by_hash(handles: Sequence[PriorHandle], fraction: float | None, seed: int | None) -> Split:
    """The split to evaluate on: the one the runs trained with, unless given.

    A given split must lie inside every run's held-out split (same seed, fraction no larger: the
    key hash is compared with fraction * 2^64, so a smaller fraction selects a subset); otherwise
    some evaluation rows would be training rows of that prior.
    """
    recorded = [(h.name, float(h.train_config["heldout_fraction"]), int(h.train_config.get("heldout_seed", 0)))
                for h in handles if h.train_config and "heldout_fraction" in h.train_config]
    source = "argument"
    if fraction is None and not recorded:
        return Split(DEFAULT_HELDOUT_FRACTION, 0 if seed is None else seed,
                     "default (no run config beside the priors: the split they trained with is unknown)")
    if fraction is None:
        if len({s for _, _, s in recorded}) > 1:
            raise ValueError(f"the priors were trained with different held-out seeds {recorded}; no held-out "
                             f"split is held out from all of them")
        fraction = min(f for _, f, _ in recorded)  # the smallest split is held out from every run (same seed)
        seed = recorded[0][2] if seed is None else seed
        source = "run config"
    seed = 0 if seed is None else seed
    if fraction <= 0:
        raise ValueError(f"held-out fraction {fraction}: every row is a training row (a run trained with "
                         f"heldout_fraction=0 kept none back); evaluation needs rows the priors never saw")
    for name, f, s in recorded:
        if s != seed or fraction > f + 1e-12:
            raise ValueError(f"held-out split fraction={fraction}, seed={seed} is not inside prior {name}'s "
                             f"held-out split (fraction={f}, seed={s}): it would evaluate on rows it trained on")
    return Split(float(fraction), seed, source)


# -- the training split: baselines and probe data -------------------------------------------------------


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


# -- the held-out split: predictions -------------------------------------------------------------------


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


# -- figures ---------------------------------------------------------------------------------------------


def embedding_metrics(models: dict[str, np.ndarray], image: np.ndarray, text: np.ndarray, n_boot: int,
                      level: float, boot_seed: int, n_boot_fd: int) -> tuple[dict, dict]:
    """(summaries per model and metric, per-row values per model and metric [S, N]).

    models: name -> [S, N, D] predictions (S = 1 for deterministic baselines).
    """
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
    # Fréchet distance: one factorisation of the real side per bootstrap draw, shared by all models.
    ref = M.FrechetReference(image)
    point = {name: [ref.distance(p) for p in preds] for name, preds in models.items()}
    draws: dict[str, list[float]] = {name: [] for name in models}
    for idx in M.bootstrap_indices(len(image), n_boot_fd, boot_seed):
        r = M.FrechetReference(image[idx])
        for name, preds in models.items():
            draws[name].append(float(np.mean([r.distance(p[idx]) for p in preds])))
    for name in models:
        summaries[name]["frechet"] = _set_summary(point[name], draws[name], len(image), level)
    return summaries, rows


def _set_summary(seed_values: list[float], draws: list[float], n: int, level: float) -> dict:
    """A set statistic's summary: the seed mean and a bootstrap interval (percentile from >= 100
    draws, else normal with the bootstrap standard error, since few draws give crude quantiles)."""
    value = float(np.mean(seed_values))
    d = np.asarray([x for x in draws if np.isfinite(x)])
    if len(d) >= 100:
        a = (1 - level) / 2
        ci, method = (float(np.quantile(d, a)), float(np.quantile(d, 1 - a))), "percentile"
    elif len(d) >= 2:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(0.5 + level / 2)
        ci, method = (value - z * float(d.std(ddof=1)), value + z * float(d.std(ddof=1))), "normal"
    else:
        ci, method = (float("nan"), float("nan")), "none"
    out = M.Summary(value, ci, n, [float(v) for v in seed_values] if len(seed_values) > 1 else []).to_dict()
    out |= {"statistic": "set", "bootstrap_draws": len(d), "ci_method": method}
    return out


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


def _word_labels(captions: Sequence[str], words: Sequence[str]) -> np.ndarray:
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
    y_train = _word_labels(stats.probe_captions, vocab)
    y_held = _word_labels(held.captions, vocab)
    keep = [i for i in range(len(vocab))
            if min_pos <= y_train[:, i].sum() <= len(y_train) - min_pos and 2 <= y_held[:, i].sum() <= len(y_held) - 2]
    if not keep:
        return {"skipped": f"no attribute word ({len(vocab)} color/shape/texture words) occurs in at least "
                           f"{min_pos} training captions and 2 held-out captions (and is absent from as many)"}
    words = [vocab[i] for i in keep]
    probe = M.fit_probe(stats.probe_images, y_train[:, keep], words, seed=boot_seed)
    labels = y_held[:, keep]
    n_draws = min(n_boot, 200)
    idx_draws = M.bootstrap_indices(len(labels), n_draws, boot_seed)
    out_models = {}
    for name, preds in {"real images (ceiling)": held.image[None], **models}.items():
        scores = [probe.scores(p) for p in preds]
        point = [M.mean_auc(s, labels) for s in scores]
        draws = [float(np.mean([M.mean_auc(s[idx], labels[idx]) for s in scores])) for idx in idx_draws]
        out_models[name] = _set_summary(point, draws, len(labels), level)
    return {"words": words, "train_rows": int(len(y_train)), "positives_heldout": labels.sum(0).tolist(),
            "models": out_models}


# -- images of rows ----------------------------------------------------------------------------------------

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ImageSource:
    """Finds the image of a store row by key: in a folder of webdataset tars (img2dataset's layout:
    KEY.jpg inside shards, the key the encode stage stores), in a folder of files named KEY.<ext>,
    or at the row's url when that is a local path or a file:// url."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"image source {self.root}: no such folder")
        self._index: dict[str, tuple[Path, str | None]] | None = None

    def _build_index(self) -> dict[str, tuple[Path, str | None]]:
        index: dict[str, tuple[Path, str | None]] = {}
        if self.root is None:
            return index
        for path in sorted(self.root.rglob("*")):
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for member in tar:
                        key, _, ext = member.name.rpartition("/")[2].partition(".")
                        if member.isfile() and ext.lower() in IMAGE_EXTS:
                            index.setdefault(key, (path, member.name))
            elif path.suffix.lstrip(".").lower() in IMAGE_EXTS:
                index.setdefault(path.stem, (path, None))
        return index

    def get(self, key: str, url: str | None = None) -> Image.Image | None:
        if self._index is None:
            self._index = self._build_index()
        hit = self._index.get(str(key))
        try:
            if hit is not None:
                path, member = hit
                if member is None:
                    return Image.open(path).convert("RGB")
                with tarfile.open(path) as tar:
                    f = tar.extractfile(member)
                    return Image.open(io.BytesIO(f.read())).convert("RGB") if f is not None else None
            if url:
                local = Path(url.removeprefix("file://"))
                if (url.startswith("file://") or url.startswith("/")) and local.is_file():
                    return Image.open(local).convert("RGB")
        except OSError:  # an unreadable image is shown as missing, not fatal to the report
            return None
        return None


# -- training curves ---------------------------------------------------------------------------------------


def read_training_log(path: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """RUN/logs/train.jsonl -> {"train": {"step": [...], "loss": [...], ...}, "eval": {...}}; None where a
    record lacks a key (JSON has no NaN)."""
    records: dict[str, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # empty, or a line cut by a killed run
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.setdefault(str(rec.get("type", "train")), []).append(rec)
    series: dict[str, dict[str, list[float]]] = {}
    for kind, recs in records.items():
        keys = dict.fromkeys(k for r in recs for k, v in r.items()
                             if k != "type" and isinstance(v, (int, float)) and not isinstance(v, bool))
        series[kind] = {k: [float(r[k]) if k in r else None for r in recs] for k in keys}
    return series


# -- the whole evaluation -------------------------------------------------------------------------------------


def _unique_names(handles: list[PriorHandle]) -> None:
    seen: dict[str, int] = {}
    for h in handles:
        base = h.name if h.name not in BASELINES else f"{h.name} (prior)"
        n = seen.get(base, 0)
        seen[base] = n + 1
        h.name = base if n == 0 else f"{base} #{n + 1}"


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def evaluate(
    priors: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    out: str | os.PathLike,
    heldout_fraction: float | None = None,
    seeds: int = 3,
    *,
    heldout_seed: int | None = None,
    max_rows: int = 2000,
    max_train_rows: int = 200_000,
    probe_rows: int = 20_000,
    batch_size: int = 256,
    n_boot: int = 1000,
    n_boot_fd: int | None = None,
    ci: float = 0.95,
    boot_seed: int = 0,
    encoder: str | os.PathLike | None = None,
    prompt_suite: bool = True,
    prompt_categories: Sequence[str] = CATEGORIES,
    max_prompts: int | None = None,
    probe: bool = True,
    image_source: str | os.PathLike | None = None,
    n_examples: int = 6,
    neighbours: int = 3,
    decoder: str | None = None,
    decoder_path: str | os.PathLike | None = None,
    n_generate: int = 4,
    generate_seeds: int = 1,
    generate_from: str = "heldout",
    decoder_steps: int | None = None,
    decoder_size: int | None = None,
    clip_model: str | os.PathLike | None = None,
    pickscore_model: str | os.PathLike | None = None,
    pickscore_processor: str | os.PathLike | None = None,
    fid: bool = False,
    device: str | None = None,
    local_files_only: bool = True,
    train_shards: Sequence[str] | None = None,
    heldout_shards: Sequence[str] | None = None,
) -> dict:
    """Evaluate `priors` (prior folders, run folders or checkpoints) on `store`; write
    out/metrics.json and out/report.html (+ out/images/). Returns the metrics dict.

    heldout_fraction/heldout_seed: default the split the runs trained with (run config).
    seeds: noise seeds per prior (>= 3). max_rows: about this many held-out rows are evaluated (also the
    retrieval gallery), a key-hash subsample of the split when it is larger; max_train_rows: likewise, the
    training rows for the baselines; probe_rows: likewise, the training rows the probe is fitted on.
    n_boot_fd: bootstrap draws for the Fréchet distance (each factorises a D x D covariance; default 200
    for D <= 256, else 20).
    encoder: the store's text encoder for the prompt suites (default: the store's preset).
    decoder/decoder_path: also render images (kandinsky22 | karlo) for `n_generate` prompts taken
    from the held-out captions or a T2I-CompBench category (`generate_from`), `generate_seeds` seeds
    each, the same prompts and seeds for every prior; clip_model /
    pickscore_model: local CLIP / PickScore weights for CLIPScore and PickScore win rates.
    Decoder and scorer weights are never downloaded unless local_files_only=False.
    train_shards: shards the priors trained on (default: from the run configs; baselines fit there).
    heldout_shards: evaluate every row of these shards instead (a composition hold-out; the priors must
    not have trained on them).
    """
    t_start = time.time()
    if seeds < 3:
        raise ValueError("seeds must be >= 3: every figure is averaged over at least 3 noise seeds of each prior")
    if not priors:
        raise ValueError("no priors to evaluate")
    if generate_from != "heldout" and generate_from not in CATEGORIES:
        raise ValueError(f"generate_from must be 'heldout' or one of {list(CATEGORIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    st = EmbeddingStore(store)
    handles = [open_prior(p, dev) for p in priors]
    _unique_names(handles)
    for h in handles:
        check_store_dims(st.encoder, h.embedding_dim, f"prior {h.name}")
        if h.encoder_info and EncoderInfo.from_dict(h.encoder_info) != st.encoder:
            raise ValueError(
                f"prior {h.name} was trained on embeddings of encoder {h.encoder_info.get('preset')!r} "
                f"({h.encoder_info.get('image_model')}); {st.dir} holds {st.encoder.preset!r} "
                f"({st.encoder.image_model}): its predictions would be meaningless there")
    if len({h.text_length for h in handles}) > 1:  # one padded read of the store feeds every prior
        raise ValueError(f"the priors take different text lengths {[(h.name, h.text_length) for h in handles]}")
    # Explicitly requested weights load first: a missing one fails before the long part.
    dec = Decoder.load(decoder, decoder_path, dev, local_files_only=local_files_only) if decoder else None
    if dec is not None:
        for h in handles:
            dec.check_prior(h)
    scorers = {}
    if clip_model is not None:
        scorers["clipscore"] = ClipImageScorer.load("clipscore", clip_model, device=dev,
                                                    local_files_only=local_files_only)
    if pickscore_model is not None:
        scorers["pickscore"] = ClipImageScorer.load("pickscore", pickscore_model, pickscore_processor, device=dev,
                                                    local_files_only=local_files_only)
    split = resolve_split(handles, heldout_fraction, heldout_seed, train_shards, heldout_shards, st)
    level = float(ci)
    d = st.encoder.image_dim
    n_boot_fd = n_boot_fd if n_boot_fd is not None else (min(n_boot, 200) if d <= 256 else 20)

    _log(f"{st.dir}: {st.num_rows} rows; held-out split fraction={split.fraction} seed={split.seed} ({split.source})")
    n_held, n_train = split.count(st)
    train_keep = min(1.0, max_train_rows / max(n_train, 1))
    probe_keep = min(1.0, probe_rows / max(min(n_train, max_train_rows), 1)) if probe else 0.0
    stats = scan_training_split(st, split, train_keep, probe_keep)
    base = Baselines.fit(stats)
    _log(f"baselines fitted on {stats.rows} of {n_train} training rows (ridge alpha {base.ridge.alpha:g})")
    held = predict_heldout(st, split, handles, seeds, min(1.0, max_rows / max(n_held, 1)), batch_size)
    _log(f"{len(held.keys)} held-out rows predicted by {len(handles)} priors x {seeds} seeds")
    prior_names = [h.name for h in handles]
    models: dict[str, np.ndarray] = dict(held.preds)
    models |= {k: v[None] for k, v in base.predict(held.text).items()}

    summaries, rows = embedding_metrics(models, held.image, held.text, n_boot, level, boot_seed, n_boot_fd)
    result: dict = {
        "schema": METRICS_SCHEMA,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "store": {"path": str(st.dir), "rows": st.num_rows, "encoder": st.encoder.to_dict()},
        "split": {"heldout_fraction": split.fraction, "heldout_seed": split.seed, "source": split.source,
                  "train_shards": split.train_shards, "heldout_shards": split.heldout_shards,
                  "heldout_rows_in_store": n_held, "heldout_rows": len(held.keys), "gallery_size": len(held.keys),
                  "train_rows_in_store": n_train, "train_rows_used": stats.rows},
        "settings": {"seeds": seeds, "n_boot": n_boot, "n_boot_fd": n_boot_fd, "ci": level,
                     "bootstrap_seed": boot_seed, "max_rows": max_rows, "device": str(dev)},
        "metric_info": {k: {"what": w, "better": b} for k, (w, b) in METRIC_INFO.items()},
        "dataset": {"cos_text_image": M.summarize(M.rowwise_cosine(held.text, held.image), n_boot, level,
                                                  boot_seed).to_dict()},
        "models": {},
    }
    for h in handles:
        result["models"][h.name] = {
            "kind": "prior", "path": str(h.source), "weights": str(h.prior_dir), "objective": h.objective_name,
            "seeds": seeds, "parameters": int(sum(p.numel() for p in h.model.parameters())),
            "metrics": summaries[h.name],
        }
    for name, what in BASELINES.items():
        info = {"kind": "baseline", "description": what, "seeds": 1, "metrics": summaries[name]}
        if name == "ridge":
            info["alpha"] = base.ridge.alpha
            info["validation_mse"] = {str(k): v for k, v in base.ridge.validation_mse.items()}
        result["models"][name] = info
    result["comparisons"] = comparisons(rows, prior_names, n_boot, level, boot_seed)
    if probe:
        result["probe"] = caption_probe(stats, held, models, n_boot, level, boot_seed)
        _log("attribute probe: " + (result["probe"].get("skipped") or f"{len(result['probe']['words'])} words"))

    # Training curves of priors given as run folders.
    result["training"] = {h.name: ({"log": str(h.log_path), "curves": read_training_log(h.log_path)}
                                   if h.log_path else {"log": None}) | {"config": h.train_config}
                          for h in handles}

    # The store's text encoder: prompt suites and decoding need it.
    enc, enc_error = None, None
    enc_name = os.fspath(encoder) if encoder is not None else st.encoder.preset
    if prompt_suite or dec is not None:
        try:
            from pipeline.encoders import get_encoder

            enc = get_encoder(enc_name, device=dev)
            if (enc.info.text_dim, enc.info.hidden_dim) != (st.encoder.text_dim, st.encoder.hidden_dim):
                raise ValueError(f"encoder {enc_name!r} has text dim {enc.info.text_dim}/hidden {enc.info.hidden_dim}, "
                                 f"the store {st.encoder.text_dim}/{st.encoder.hidden_dim}")
        except Exception as e:  # recorded: the embedding metrics above stand without it
            enc, enc_error = None, f"text encoder {enc_name!r} unavailable: {e}"
            _log(enc_error)

    if prompt_suite:
        if enc is None:
            result["prompts"] = {"skipped": enc_error}
        else:
            result["prompts"] = _prompt_suite(enc, handles, base, held, seeds, prompt_categories, max_prompts, n_boot,
                                              level, boot_seed, batch_size)
            result["prompts"]["encoder"] = enc_name
            _log(f"prompt suites: {', '.join(prompt_categories)}")

    images: dict[str, Image.Image] = {}
    src = ImageSource(image_source) if image_source is not None else ImageSource(None)
    result["examples"] = _examples(held, models, prior_names, n_examples, neighbours, src, images)

    if dec is not None:
        if enc is None:
            result["generation"] = {"skipped": enc_error}
        else:
            result["generation"] = _generate_images(dec, enc, handles, held, generate_from, n_generate, generate_seeds,
                                                    decoder_steps, decoder_size, scorers, fid, src, images, n_boot,
                                                    level, boot_seed)
    elif scorers or fid:
        result["generation"] = {"skipped": "image metrics need generated images: pass a decoder"}

    result["elapsed_s"] = round(time.time() - t_start, 2)
    img_dir = out / "images"
    if images:
        img_dir.mkdir(exist_ok=True)
        for name, im in images.items():
            im.save(img_dir / f"{name}.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False, default=_json_default))
    from evaluation.report import write_report

    write_report(result, out / "report.html", images)
    _log(f"wrote {out / 'metrics.json'} and {out / 'report.html'} in {result['elapsed_s']:.0f} s")
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _prompt_suite(enc, handles, base: Baselines, held: Heldout, seeds: int, categories, max_prompts, n_boot, level,
                  boot_seed, batch_size) -> dict:
    def prior_fn(h: PriorHandle):
        return lambda e, seed: h.predict_numpy(e.text_embed, e.text_hidden, e.text_mask, seed, batch_size)

    def base_fn(name: str):
        return lambda e, seed: base.predict(e.text_embed)[name]

    models = {h.name: (prior_fn(h), seeds) for h in handles}
    models |= {name: (base_fn(name), 1) for name in BASELINES}
    return run_prompt_suite(enc, models, held.image, categories, max_prompts, handles[0].text_length, n_boot, level,
                            boot_seed)


def _examples(held: Heldout, models: dict[str, np.ndarray], prior_names: list[str], n: int, k: int,
              src: ImageSource, images: dict[str, Image.Image]) -> list[dict]:
    """For n held-out rows: each model's k nearest real rows (held-out gallery) to its prediction (seed 0)."""
    if n <= 0:
        return []
    rows = np.unique(np.linspace(0, len(held.keys) - 1, num=min(n, len(held.keys))).astype(int))
    shown = [*prior_names, "TextEmb", "text-shift", "ridge"]

    def image_id(i: int) -> str | None:
        im_id = f"row-{i}"
        if im_id not in images:
            im = src.get(held.keys[i], held.urls[i])
            if im is None:
                return None
            images[im_id] = im
        return im_id

    out = []
    for i in rows:
        ex = {"row": int(i), "key": held.keys[i], "caption": held.captions[i], "image": image_id(int(i)),
              "models": {}}
        for name in shown:
            pred = models[name][0][i : i + 1]
            idx, cos = M.nearest_neighbours(pred, held.image, k)
            rank = int(M.retrieval_ranks(pred, held.image, np.array([i]))[0])
            ex["models"][name] = {
                "true_rank": rank, "cos_true": float(M.rowwise_cosine(pred, held.image[i : i + 1])[0]),
                "neighbours": [{"row": int(j), "key": held.keys[j], "caption": held.captions[j], "cos": float(c),
                                "image": image_id(int(j)), "is_true": bool(j == i)}
                               for j, c in zip(idx[0], cos[0], strict=True)],
            }
        out.append(ex)
    return out


def _generate_images(dec: Decoder, enc, handles, held: Heldout, generate_from: str, n: int, seeds: int, steps,
                     size, scorers: dict, fid: bool, src: ImageSource, images: dict, n_boot, level,
                     boot_seed) -> dict:
    """n prompts x every prior x the same seeds through the decoder; image metrics when weights are here."""
    if generate_from == "heldout":
        rows = np.unique(np.linspace(0, len(held.keys) - 1, num=min(n, len(held.keys))).astype(int)).tolist()
        prompts = [held.captions[i] for i in rows]
    else:
        rows = []
        prompts = load_prompts(generate_from)[:n]
    gen_seeds = list(range(max(1, seeds)))
    items = []
    per_prior: dict[str, list[Image.Image]] = {h.name: [] for h in handles}
    # Kandinsky's negative (the zero-image embedding) is the same for every prompt and prior: compute it once.
    negative = negative_embeddings(dec, handles[0], enc, 1, None, 0)
    flat_prompts: list[str] = []
    for pi, prompt in enumerate(prompts):
        for seed in gen_seeds:
            flat_prompts.append(prompt)
            entry = {"prompt": prompt, "seed": seed, "images": {}}
            for h in handles:
                emb = prompt_embeddings(h, enc, [prompt], seed)
                im = dec.decode(emb, [prompt], negative, seed=seed, steps=steps, height=size, width=size)[0]
                im_id = f"gen-{pi}-s{seed}-{len(per_prior[h.name])}-{re.sub(r'[^A-Za-z0-9]+', '_', h.name)}"
                images[im_id] = im
                per_prior[h.name].append(im)
                entry["images"][h.name] = im_id
            items.append(entry)
    result: dict = {"decoder": dec.kind, "decoder_path": dec.source, "from": generate_from, "seeds": gen_seeds,
                    "items": items, "metrics": {}}
    for kind, scorer in scorers.items():
        scores = {name: scorer.score(ims, flat_prompts) for name, ims in per_prior.items()}
        block = {"model": scorer.source, "per_prior": {name: M.summarize(s, n_boot, level, boot_seed).to_dict()
                                                        for name, s in scores.items()}}
        if kind == "pickscore" and len(handles) > 1:
            ref = handles[0].name
            block["win_rate_vs"] = ref
            block["win_rates"] = {}
            for h in handles[1:]:
                pref = pickscore_preference(scores[h.name], scores[ref])
                block["win_rates"][h.name] = {k: M.summarize(v, n_boot, level, boot_seed).to_dict()
                                              for k, v in pref.items()}
        result["metrics"][kind] = block
    if fid:
        real = [src.get(held.keys[i], held.urls[i]) for i in rows]
        if not rows or any(r is None for r in real):
            result["metrics"]["fid"] = {"unavailable": "FID needs the real images of the prompts: generate from the "
                                                       "held-out captions and pass an image source holding them"}
        else:
            try:
                result["metrics"]["fid"] = {name: fid_between(real * len(gen_seeds), ims)
                                            for name, ims in per_prior.items()}
            except (ImageMetricUnavailable, WeightsMissingError) as e:
                result["metrics"]["fid"] = {"unavailable": str(e)}
    return result


# -- the CLI entry ---------------------------------------------------------------------------------------------


def format_summary(result: dict, keys: Sequence[str] = ("cos_image", "r1", "frechet", "norm_ratio")) -> str:
    """A plain-text table of the main figures (value [CI])."""
    lines = [f"{'model':<28}" + "".join(f"{k:>26}" for k in keys)]
    for name, m in result["models"].items():
        cells = []
        for k in keys:
            s = m["metrics"].get(k)
            cells.append(f"{_fmt(s['value'])} [{_fmt(s['ci'][0])}, {_fmt(s['ci'][1])}]" if s else "-")
        lines.append(f"{name[:27]:<28}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.4g}"


def evaluate_main(
    prior: Sequence[str],
    store: str,
    out: str,
    heldout_fraction: float | None = None,
    heldout_seed: int | None = None,
    seeds: int = 3,
    max_rows: int = 2000,
    encoder: str | None = None,
    no_prompts: bool = False,
    max_prompts: int | None = None,
    image_source: str | None = None,
    decoder: str | None = None,
    decoder_path: str | None = None,
    n_generate: int = 4,
    generate_from: str = "heldout",
    clip_model: str | None = None,
    pickscore_model: str | None = None,
    pickscore_processor: str | None = None,
    fid: bool = False,
    device: str | None = None,
) -> int:
    """`eclipse-prior evaluate --prior RUN [--prior RUN2 ...] --store STORE --out DIR`."""
    result = evaluate(
        list(prior), store, out, heldout_fraction, seeds, heldout_seed=heldout_seed, max_rows=max_rows,
        encoder=encoder, prompt_suite=not no_prompts, max_prompts=max_prompts, image_source=image_source,
        decoder=decoder, decoder_path=decoder_path, n_generate=n_generate, generate_from=generate_from,
        clip_model=clip_model, pickscore_model=pickscore_model, pickscore_processor=pickscore_processor, fid=fid,
        device=device,
    )
    print(format_summary(result))
    for section in ("prompts", "probe", "generation"):
        if isinstance(result.get(section), dict) and "skipped" in result[section]:
            print(f"{section}: skipped: {result[section]['skipped']}")
    print(Path(out) / "report.html")
    return 0


def evaluate_cli(args) -> int:
    """evaluate_main(...) from an argparse Namespace built with add_evaluate_arguments; other attributes of
    the namespace (e.g. the CLI's `command`/`func`) are ignored, so `set_defaults(func=evaluate_cli)` wires it."""
    import inspect

    names = inspect.signature(evaluate_main).parameters
    return evaluate_main(**{k: v for k, v in vars(args).items() if k in names})
