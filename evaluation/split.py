"""Which store rows are evaluated (held out from every prior) and which rows fit the baselines.

    split = resolve_split(handles, fraction=None, seed=None, store=store)  # the split the runs trained with

Rows are split by key hash (`training.data.is_heldout`), as in training, so the evaluation side is
never a row the priors trained on; a composition hold-out evaluates whole shards the priors never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluation.priors import PriorHandle
from storage_schema import EmbeddingStore
from training.data import is_heldout

DEFAULT_HELDOUT_FRACTION = 0.01  # training.config.TrainConfig's default
# Salts of the key hashes that subsample each side of the split (independent of the split's own hash).
SAMPLE_SALT_HELDOUT, SAMPLE_SALT_TRAIN, SAMPLE_SALT_PROBE = 1_000_003, 2_000_003, 3_000_017


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
