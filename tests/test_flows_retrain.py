"""The retrain flow: promotes an improved prior, refuses a worse one, records both decisions."""

import json

import pytest
from storefixtures import write_synthetic_store

from evaluation.gate import DECISIONS, PROMOTED, read_promoted
from flows.params import GateParams, TrainParams
from flows.retrain import retrain
from flows.train import train

PARAMS = dict(batch_size=32, embedding_dim=32, heldout_fraction=0.2, ckpt_every=50, eval_every=0, num_threads=1)


def _promote(reg, prior: str, run: str, store: str, shards: list[str]) -> None:
    reg.mkdir(parents=True, exist_ok=True)
    (reg / PROMOTED).write_text(json.dumps({"prior": prior, "run": run, "store": store, "trained_shards": shards}))


@pytest.mark.slow
def test_retrain_promotes_a_better_prior_and_refuses_a_worse_one(prefect_harness, tmp_path):
    store = str(tmp_path / "store")
    write_synthetic_store(store, rows=512, dim=32, shards=4, seed=0)
    gate = GateParams(metrics=["cos_image", "r1"], tolerance=0.005)
    common = dict(store=store, objective="projection", preset="tiny", gate=gate, eval_seeds=3, eval_max_rows=200)

    # 1. A barely trained prior is live, trained on the first two shards; two shards arrived since.
    weak = train(store=store, out=str(tmp_path / "weak"), objective="projection", preset="tiny", steps=5,
                 params=TrainParams(lr=1e-3, **PARAMS), shards=["shard-00000.parquet", "shard-00001.parquet"])
    reg = tmp_path / "registry"
    _promote(reg, weak, str(tmp_path / "weak"), store, ["shard-00000.parquet", "shard-00001.parquet"])
    better = retrain(registry=str(reg), steps=300, params=TrainParams(lr=2e-3, **PARAMS), **common)
    assert better["promote"], better
    assert all(c["ok"] and c["regression"] < 0 for c in better["checks"])  # it really improved
    live = read_promoted(reg)
    assert live["prior"] == better["candidate"] != weak
    assert len(live["trained_shards"]) == 4

    # 2. Nothing new: nothing to do.
    assert retrain(registry=str(reg), steps=300, params=TrainParams(lr=2e-3, **PARAMS), **common)["reason"] \
        == "no new shards"

    # 3. The good prior is live but claims only two shards; a destructive retrain (huge lr) is refused.
    _promote(reg, live["prior"], live["run"], store, ["shard-00000.parquet", "shard-00001.parquet"])
    worse = retrain(registry=str(reg), steps=30, params=TrainParams(lr=5.0, **PARAMS), **common)
    assert not worse["promote"] and "regressed" in worse["reason"]
    assert read_promoted(reg)["prior"] == live["prior"]
    decisions = [json.loads(line) for line in (reg / DECISIONS).read_text().splitlines()]
    assert [d["promote"] for d in decisions] == [True, False]
