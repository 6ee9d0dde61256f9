"""The evaluation split: which rows are held out from every prior, checked against what the runs recorded."""

from types import SimpleNamespace

import numpy as np
import pytest
from storefixtures import write_store

from evaluation.split import DEFAULT_HELDOUT_FRACTION, SAMPLE_SALT_HELDOUT, Split, resolve_split
from storage_schema import EmbeddingStore
from training.data import is_heldout


def run(name: str, fraction: float | None = None, seed: int = 0, shards: list[str] | None = None):
    """A stand-in for a PriorHandle: only its name and run config are read."""
    config = {"shards": shards} | ({"heldout_fraction": fraction, "heldout_seed": seed} if fraction else {})
    return SimpleNamespace(name=name, train_config=config)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("split") / "store"
    write_store(root, shards=3, rows=60)
    return EmbeddingStore(root)


def test_the_split_comes_from_the_runs_or_a_default():
    split = resolve_split([run("a", 0.2, seed=3), run("b", 0.1, seed=3)], None, None)
    assert (split.fraction, split.seed, split.source) == (0.1, 3, "run config")  # the smaller split: inside both
    bare = resolve_split([SimpleNamespace(name="bare", train_config=None)], None, None)
    assert (bare.fraction, bare.seed) == (DEFAULT_HELDOUT_FRACTION, 0) and "unknown" in bare.source
    assert resolve_split([run("a", 0.2)], 0.05, None).source == "argument"


def test_a_split_with_rows_a_prior_trained_on_is_refused():
    with pytest.raises(ValueError, match="different held-out seeds"):
        resolve_split([run("a", 0.2, seed=0), run("b", 0.2, seed=1)], None, None)
    with pytest.raises(ValueError, match="not inside prior a's held-out split"):
        resolve_split([run("a", 0.1)], 0.2, None)  # a larger fraction holds rows a trained on
    with pytest.raises(ValueError, match="not inside prior a's held-out split"):
        resolve_split([run("a", 0.1, seed=0)], 0.1, 1)  # another seed: other rows
    with pytest.raises(ValueError, match="every row is a training row"):
        resolve_split([], 0.0, None)


def test_shard_restrictions(store):
    trained = run("a", 0.2, shards=["00000.parquet", "00001.parquet"])
    split = resolve_split([trained], None, None, heldout_shards=["00002.parquet"], store=store)
    assert split.train_shards == ("00000.parquet", "00001.parquet") and split.heldout_shards == ("00002.parquet",)
    with pytest.raises(ValueError, match="trained on every shard"):
        resolve_split([run("all", 0.2)], None, None, heldout_shards=["00002.parquet"])
    with pytest.raises(ValueError, match=r"trained on \['00001.parquet'\]"):
        resolve_split([trained], None, None, heldout_shards=["00001.parquet"])
    with pytest.raises(ValueError, match=r"no shards \['00009.parquet'\]"):
        resolve_split([trained], None, None, train_shards=["00009.parquet"], store=store)


def test_count_and_row_filter_follow_the_key_hash(store):
    split = Split(0.25, 0, "argument")
    keys = np.array([k for _, ks in store.keys() for k in ks])
    held = is_heldout(keys, 0.25, 0)
    assert split.count(store) == (held.sum(), (~held).sum())
    keep = split.row_filter(heldout=True, keep_fraction=0.5)(keys)
    assert np.array_equal(keep, held & is_heldout(keys, 0.5, SAMPLE_SALT_HELDOUT))
    assert np.array_equal(split.row_filter(heldout=False, keep_fraction=1.0)(keys), ~held)
    # a composition hold-out: every row of the held-out shard, the training side from the other shards
    whole = Split(0.25, 0, "argument", heldout_shards=("00002.parquet",))
    shard_rows = dict(store.keys())
    train_keys = shard_rows["00000.parquet"] + shard_rows["00001.parquet"]
    assert whole.count(store) == (len(shard_rows["00002.parquet"]), (~is_heldout(train_keys, 0.25, 0)).sum())
    assert whole.row_filter(heldout=True, keep_fraction=1.0)(keys).all()
