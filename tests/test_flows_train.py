"""The train flow called directly: trains, exports, and is a no-op when rerun."""

import pytest
from storefixtures import write_synthetic_store

from flows.params import TrainParams
from flows.train import train
from training.prior import load_prior


@pytest.mark.slow
def test_train_flow_exports_and_reruns_as_a_no_op(prefect_harness, tmp_path):
    write_synthetic_store(tmp_path / "store", rows=128, dim=32, shards=2, seed=0)
    params = TrainParams(batch_size=16, lr=1e-3, embedding_dim=32, heldout_fraction=0.1, ckpt_every=5,
                         eval_every=0, num_threads=1)
    kwargs = dict(store=str(tmp_path / "store"), out=str(tmp_path / "run"), objective="eclipse", preset="tiny",
                  steps=10, params=params)
    prior = train(**kwargs)
    assert load_prior(prior).config.embedding_dim == 32
    mtime = (tmp_path / "run" / "prior" / "config.json").stat().st_mtime_ns
    assert train(**kwargs) == prior
    assert (tmp_path / "run" / "prior" / "config.json").stat().st_mtime_ns == mtime
