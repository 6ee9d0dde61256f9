"""The evaluate flow called directly: artifacts' source figures, and a no-op rerun."""

import pytest
from storefixtures import write_synthetic_store

from flows.evaluate import evaluate
from training.config import TrainConfig
from training.trainer import train


@pytest.mark.slow
def test_evaluate_flow_writes_metrics_and_skips_a_repeat(prefect_harness, tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, rows=256, dim=32, shards=2, seed=1)
    prior = train(TrainConfig(store=str(store), out=str(tmp_path / "run"), preset="tiny", objective="eclipse",
                              embedding_dim=32, steps=20, batch_size=32, heldout_fraction=0.2, num_threads=1,
                              progress=False, eval_every=0))
    kwargs = dict(priors=[str(prior)], store=str(store), out=str(tmp_path / "eval"), seeds=3, max_rows=100,
                  prompt_suite=False, device="cpu")
    result = evaluate(**kwargs)
    assert set(result["models"]) == {"run", "TextEmb", "text-shift", "mean-image", "ridge"}
    assert (tmp_path / "eval" / "report.html").exists()
    mtime = (tmp_path / "eval" / "metrics.json").stat().st_mtime_ns
    again = evaluate(**kwargs)
    assert again == result
    assert (tmp_path / "eval" / "metrics.json").stat().st_mtime_ns == mtime
    # other probe families are other settings: evaluated again, with them
    families = {"hue": ["red", "blue"]}
    other = evaluate(**kwargs, probe_families=families)
    assert (tmp_path / "eval" / "metrics.json").stat().st_mtime_ns != mtime
    assert other["settings"]["probe_families"] == families and list(other["probe"]["families"]) == ["hue"]
