import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from storefixtures import random_rows, tiny_info, write_store

from storage_schema import EmbeddingStore, StoreError, StoreWriter, build_table, hidden_states
from storage_schema.schema import METADATA_KEY

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_is_bit_exact_fp16(tmp_path):
    info, rows = write_store(tmp_path / "s", shards=2, rows=40)
    store = EmbeddingStore(tmp_path / "s", verify=True)
    got = {}
    for batch in store.iter_batches(16, pad_to=None):
        for i, k in enumerate(batch["key"]):
            got[k] = (batch["image_embed"][i], batch["text_embed"][i],
                      batch["text_hidden"][i][: batch["text_len"][i]], batch["text_mask"][i])
    assert len(got) == 80
    for r in rows:
        for i, k in enumerate(r["keys"]):
            img, txt, hid, mask = got[k]
            assert img.dtype == np.float16 and img.tobytes() == r["image_embeds"][i].tobytes()
            assert txt.tobytes() == r["text_embeds"][i].tobytes()
            assert hid.tobytes() == r["text_hidden"][i].tobytes()
            assert mask.sum() == len(r["text_hidden"][i])


def test_file_metadata_describes_the_encoder(tmp_path):
    info, _ = write_store(tmp_path / "s", shards=1)
    meta = json.loads(pq.read_metadata(tmp_path / "s" / "00000.parquet").metadata[METADATA_KEY])
    assert meta["schema_version"] == 2
    assert meta["encoder"]["image_dim"] == info.image_dim
    assert meta["encoder"]["tokenizer"] == info.tokenizer
    assert "not L2-normalised" in meta["encoder"]["columns"]["image_embed"]
    assert meta["code_version"]


def test_pandas_reads_one_shard_and_the_whole_store(tmp_path):
    info, rows = write_store(tmp_path / "s", shards=2, rows=10)
    df = pd.read_parquet(tmp_path / "s" / "00000.parquet")
    assert len(df) == 10
    cell = df["image_embed"].iloc[3]
    assert isinstance(cell, np.ndarray) and cell.dtype == np.float16 and cell.shape == (info.image_dim,)
    assert np.array_equal(cell, rows[0]["image_embeds"][3])
    h = hidden_states(df["text_hidden"].iloc[3], info.hidden_dim, df["text_len"].iloc[3])
    assert np.array_equal(h, rows[0]["text_hidden"][3])
    assert len(pd.read_parquet(tmp_path / "s")) == 20  # _manifest.json is skipped by the dataset reader


def test_manifest_records_rows_and_checksum(tmp_path):
    write_store(tmp_path / "s", shards=2, rows=7)
    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    assert set(manifest["shards"]) == {"00000.parquet", "00001.parquet"}
    entry = manifest["shards"]["00001.parquet"]
    assert entry["rows"] == 7 and len(entry["sha256"]) == 64
    assert entry["bytes"] == (tmp_path / "s" / "00001.parquet").stat().st_size


def test_bad_rows_are_refused_before_anything_is_written(tmp_path):
    info = tiny_info()
    r = random_rows(5, info)
    with pytest.raises(ValueError, match="expected shape"):
        build_table(info, **{**r, "image_embeds": r["image_embeds"][:, :8]})
    with pytest.raises(ValueError, match="row counts disagree"):
        build_table(info, **{**r, "captions": r["captions"][:4]})
    with pytest.raises(ValueError, match="duplicate keys within one shard: 'a'$"):
        build_table(info, **{**r, "keys": ["a"] * 5})
    with pytest.raises(ValueError, match="text_hidden of row"):
        build_table(info, **{**r, "text_hidden": [np.zeros((3, 4), np.float16)] * 5})
    assert not (tmp_path / "s").exists()


def test_non_finite_embeddings_are_refused_naming_the_rows():
    """NaN, Inf, values beyond float16's range (they become Inf in the store) and values beyond the readers'
    bound (schema.MAX_ABS) never reach a reader."""
    info = tiny_info()
    r = random_rows(5, info)
    for column, bad in (("image_embeds", np.nan), ("text_embeds", np.inf), ("image_embeds", 1e5),
                        ("text_embeds", -2e4)):
        values = np.array(r[column], dtype=np.float32)
        values[3, 2] = bad
        with pytest.raises(ValueError, match=rf"{column}: 1 row\(s\) hold NaN, Inf or values beyond.*'{r['keys'][3]}'"):
            build_table(info, **{**r, column: values})
    hidden = list(r["text_hidden"])
    hidden[1] = hidden[1].copy()
    hidden[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=rf"text_hidden: 1 row\(s\) hold NaN, Inf or values beyond.*'{r['keys'][1]}'"):
        build_table(info, **{**r, "text_hidden": hidden})
    assert build_table(info, **r).num_rows == 5  # finite rows pass
    none = random_rows(0, info)  # a shard whose every row was skipped
    assert build_table(info, **{**none, "image_embeds": np.zeros((0, info.image_dim)),
                                "text_embeds": np.zeros((0, info.text_dim))}).num_rows == 0


def test_writer_refuses_a_different_encoder(tmp_path):
    write_store(tmp_path / "s", shards=1)
    with pytest.raises(StoreError, match="made by encoder 'test-enc'.*refusing"):
        StoreWriter(tmp_path / "s", tiny_info(dim=32, preset="other"))


_KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from storefixtures import random_rows, tiny_info
from storage_schema import StoreWriter, build_table
info = tiny_info(dim=512, hidden=512)
w = StoreWriter(sys.argv[1], info)
w.write_shard("00000", build_table(info, **random_rows(20, info)))
print("first done", flush=True)
big = build_table(info, **random_rows(6000, info, seed=1, prefix="b"))
print("writing big", flush=True)
w.write_shard("00001", big)
print("big done", flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_shard_leaves_a_valid_store_without_that_shard(tmp_path):
    store_dir = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(tests=str(ROOT / "tests")), str(store_dir)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "first done"
        assert proc.stdout.readline().strip() == "writing big"
        deadline = time.monotonic() + 60
        while not list(store_dir.glob(".tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert list(store_dir.glob(".tmp-*")), "writer never started the temp file"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = EmbeddingStore(store_dir, verify=True)
    assert store.shards == ["00000.parquet"] and store.num_rows == 20
    assert len(pd.read_parquet(store_dir)) == 20  # the half-written temp file is invisible
    # The next writer cleans the dead writer's temp file and can redo the shard.
    info = tiny_info(dim=512, hidden=512)
    w = StoreWriter(store_dir, info)
    assert not list(store_dir.glob(".tmp-*"))
    w.write_shard("00001", build_table(info, **random_rows(30, info, seed=1, prefix="b")))
    assert EmbeddingStore(store_dir, verify=True).num_rows == 50


def test_two_writers_of_different_encoders_racing_for_a_new_store(tmp_path):
    """Both open the empty store; the second to finish a shard is refused and leaves nothing behind."""
    a_info, b_info = tiny_info(preset="enc-a"), tiny_info(preset="enc-b")
    a, b = StoreWriter(tmp_path / "s", a_info), StoreWriter(tmp_path / "s", b_info)
    a.write_shard("00000", build_table(a_info, **random_rows(5, a_info)))
    with pytest.raises(StoreError, match="made by encoder 'enc-a'"):
        b.write_shard("00001", build_table(b_info, **random_rows(5, b_info, prefix="b")))
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith("_")) == ["00000.parquet"]
    assert EmbeddingStore(tmp_path / "s", verify=True).num_rows == 5
