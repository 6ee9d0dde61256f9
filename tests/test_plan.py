"""training.plan: the cost plan's arithmetic on a hand-computed case, token sampling of a local url list, the
store-size model against a real store, the paper grid's printout, and `eclipse-prior plan`."""

import json

import numpy as np
import pandas as pd
import pytest
from storefixtures import tiny_info

import training.plan as plan
from cli.main import main
from pipeline.sources import SOURCE_PRESETS
from storage_schema import StoreWriter, build_table
from storage_schema.writer import read_manifest
from training.objectives import OBJECTIVES

TOY_VISION = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, patch_size=2, image_size=4, projection_dim=3)
TOY_TEXT = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, projection_dim=3, max_position_embeddings=3)


def url_list(path, captions, urls):
    pd.DataFrame({"url": urls, "caption": captions}).to_parquet(path)
    return str(path)


def test_tokens_per_caption_counts_bos_and_eos_and_caps_at_the_context():
    # CLIP BPE: "a red cat" = 3 tokens, "two dogs" = 2, "a photo of a cat" = 5; + BOS + EOS each
    assert plan.tokens_per_caption(["a red cat", "two dogs", "a photo of a cat"]) == pytest.approx(16 / 3)
    assert plan.tokens_per_caption(["cat " * 200]) == 77


def test_a_local_url_list_is_read_for_rows_images_and_a_caption_sample(tmp_path):
    path = url_list(tmp_path / "u.parquet", ["a red cat", "two dogs", "a photo of a cat", "again"],
                    ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg", "http://x/1.jpg"])
    stats = plan.read_url_list(path, sample=2)
    assert (stats.pairs, stats.images, len(stats.captions)) == (3, 3, 2)  # the duplicate url is dropped


def test_the_arithmetic_on_a_hand_computed_case(tmp_path, monkeypatch):
    # A toy pair of towers (image 2088 FLOPs, text 936: tests/test_cost.py computes them by hand) and a prior of
    # 1,000 training FLOPs per sample, on an a100 (312 TFLOP/s) at MFU 0.5 for both.
    monkeypatch.setitem(plan.VISION_TOWERS, "karlo", TOY_VISION)
    monkeypatch.setitem(plan.TEXT_TOWERS, "karlo", TOY_TEXT)
    monkeypatch.setattr(plan, "objective_train_flops_per_sample", lambda decoder, objective: 1000.0)
    path = url_list(tmp_path / "u.parquet", ["a red cat", "two dogs", "a photo of a cat"],
                    ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"])
    cfg = plan.PlanConfig(datasets=(path,), decoders=("karlo",), objectives=("eclipse", "projection"), seeds=2,
                          steps=10, batch_size=4, device="a100", prior_mfu=0.5, encoder_mfu=0.5)
    p = plan.make_plan(cfg)
    rate = 312e12 * 0.5 * 3600  # FLOP per GPU-hour
    (pre,) = p.precompute
    assert (pre.pairs, pre.images, pre.dim, pre.hidden) == (3, 3, 3, 4)
    assert pre.tokens_per_caption == pytest.approx(16 / 3)
    # 2 x D x 2 bytes of pooled embeddings + 16/3 tokens x H x 2 bytes + the row overhead
    assert pre.bytes_per_row == pytest.approx(12 + 16 / 3 * 8 + plan.ROW_OVERHEAD_BYTES)
    assert pre.store_gb == pytest.approx(3 * pre.bytes_per_row / 1e9)
    assert pre.image_gpu_hours == pytest.approx(3 * 2088 / rate) and pre.text_gpu_hours == pytest.approx(3 * 936 / rate)
    assert len(p.train) == 4 and {(t.objective, t.seed) for t in p.train} == {
        ("eclipse", 0), ("eclipse", 1), ("projection", 0), ("projection", 1)}
    cell = p.train[0]
    assert cell.samples == 40 and cell.train_gpu_hours == pytest.approx(40 * 1000 / rate)
    assert cell.on_the_fly_gpu_hours == pytest.approx(40 * (2088 + 936 + 1000) / rate)
    t = p.totals
    assert t["preprocessed_gpu_hours"] == pytest.approx((3 * 2088 + 3 * 936 + 4 * 40_000) / rate)
    assert t["on_the_fly_gpu_hours"] == pytest.approx(4 * 40 * 4024 / rate)
    assert t["cache_speedup"] == pytest.approx(643_840 / 169_072)
    (one,) = p.per_model()
    assert one["encode_once_plus_train_gpu_hours"] == pytest.approx((9072 + 40_000) / rate)
    assert pd.isna(pre.download_gb)  # a url list does not say how large its images are
    assert "sampled" in pre.tokens_source and json.loads(json.dumps(plan.plan_dict(cfg)))["totals"]["cells"] == 4


def test_the_row_size_model_matches_a_real_store(tmp_path):
    # 600 rows, D = H = 128, 20 tokens each, captions and urls of web length, written by the store's own writer
    info = tiny_info(dim=128, hidden=128)
    rng = np.random.default_rng(0)
    writer = StoreWriter(tmp_path / "store", info)
    words = ["a", "photo", "of", "red", "cat", "sitting", "on", "the", "wooden", "table", "near", "window"]
    for s in range(2):
        n = 300
        keys = [f"{s:05d}{i:04d}" for i in range(n)]
        captions = [" ".join(rng.choice(words, size=10)) for _ in range(n)]
        urls = [f"https://images.example.com/photos/{rng.integers(1e9)}/large.jpg" for _ in range(n)]
        writer.write_shard(f"{s:05d}", build_table(
            info, keys, captions, rng.standard_normal((n, 128)).astype(np.float16),
            rng.standard_normal((n, 128)).astype(np.float16),
            [rng.standard_normal((20, 128)).astype(np.float16) for _ in range(n)], [False] * n, urls))
    shards = read_manifest(tmp_path / "store")["shards"].values()
    measured = sum(e["bytes"] for e in shards) / sum(e["rows"] for e in shards)
    assert plan.store_bytes_per_row(128, 128, 20) == pytest.approx(measured, rel=0.01)


def test_every_preset_has_a_size_and_the_paper_grid_prints_every_cell(capsys):
    assert set(plan.DATASET_SIZES) == set(SOURCE_PRESETS)
    assert plan.DATASET_SIZES["mscoco"].pairs == 5 * plan.DATASET_SIZES["mscoco"].images + 318  # 5 captions/image
    assert main(["plan", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "4 x a6000" in out and "60,000 steps x batch 1,024" in out and "cache speed-up" in out
    lines = out.splitlines()
    for dataset, decoder in plan.PAPER_PAIRS:
        for objective in OBJECTIVES:
            assert any(line.split()[:3] == [dataset, decoder, objective] for line in lines), (dataset, decoder)


def test_plan_json_and_overrides(capsys):
    assert main(["plan", "--paper", "--device", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"]["kind"] == "h100" and len(data["train"]) == len(plan.PAPER_PAIRS) * len(OBJECTIVES)
    assert data["totals"]["on_the_fly_gpu_hours"] > data["totals"]["preprocessed_gpu_hours"]
    assert main(["plan", "--datasets", "mscoco,cc3m", "--decoders", "karlo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["dataset"] for p in data["precompute"]] == ["mscoco", "cc3m"] and data["config"]["batch_size"] == 256


def test_plan_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "on the fly" in out and "--paper" in out
