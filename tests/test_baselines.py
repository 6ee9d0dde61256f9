"""The baselines, fitted in one streamed pass over the training side of the split."""

import numpy as np
import pytest
from storefixtures import write_synthetic_store

from evaluation import metrics as M
from evaluation.baselines import BASELINES, Baselines, scan_training_split
from evaluation.split import SAMPLE_SALT_PROBE, SAMPLE_SALT_TRAIN, Split
from storage_schema import IMAGE_EMBED, KEY, TEXT_EMBED, EmbeddingStore
from training.data import is_heldout


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines") / "store"
    write_synthetic_store(root, rows=400, dim=8, shards=2)
    return EmbeddingStore(root)


def _training_rows(store: EmbeddingStore, split: Split) -> tuple[np.ndarray, np.ndarray]:
    batch = next(store.iter_batches(10_000, [KEY, IMAGE_EMBED, TEXT_EMBED]))
    train = ~split.heldout(batch[KEY])
    return batch[TEXT_EMBED][train].astype(np.float64), batch[IMAGE_EMBED][train].astype(np.float64)


def test_baselines_equal_their_definitions_on_the_training_rows(store):
    split = Split(0.2, 0, "argument")
    stats = scan_training_split(store, split, keep_fraction=1.0, probe_fraction=0.0)
    text, image = _training_rows(store, split)
    assert stats.rows == len(text) and len(stats.probe_captions) == 0
    base = Baselines.fit(stats)
    new = np.random.default_rng(0).standard_normal((5, 8))
    pred = base.predict(new)
    assert list(pred) == list(BASELINES)
    assert np.allclose(pred["TextEmb"], new)
    assert np.allclose(pred["mean-image"], image.mean(0))
    assert np.allclose(pred["text-shift"], new - text.mean(0) + image.mean(0))
    # ridge: the closed form on the centred training rows, at the penalty picked by validation
    xc, yc = text - text.mean(0), image - image.mean(0)
    lam = base.ridge.alpha * np.trace(xc.T @ xc) / 8
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(8), xc.T @ yc)
    assert np.allclose(pred["ridge"], (new - text.mean(0)) @ w + image.mean(0), atol=1e-8)
    assert base.ridge.alpha == min(base.ridge.validation_mse, key=base.ridge.validation_mse.get)
    assert M.rowwise_cosine(base.predict(text)["ridge"], image).mean() > 0.99  # the store's map is linear


def test_subsampling_and_the_probe_sample_follow_key_hashes(store):
    split = Split(0.2, 0, "argument")
    stats = scan_training_split(store, split, keep_fraction=0.5, probe_fraction=0.3)
    keys = np.array([k for _, ks in store.keys() for k in ks])
    train = ~split.heldout(keys) & is_heldout(keys, 0.5, split.seed + SAMPLE_SALT_TRAIN)
    assert stats.rows == train.sum()
    probe = train & is_heldout(keys, 0.3, split.seed + SAMPLE_SALT_PROBE)
    assert stats.probe_captions == [f"caption {k}" for k in keys[probe]]
    assert stats.probe_images.shape == (probe.sum(), 8)
    with pytest.raises(ValueError, match="training rows"):
        scan_training_split(store, split, keep_fraction=1e-9, probe_fraction=0.0)
