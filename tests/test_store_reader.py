import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from storefixtures import random_rows, tiny_info, write_store

from storage_schema import EmbeddingStore, StoreError, StoreWriter, build_table


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(StoreError, match="no such store directory"):
        EmbeddingStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no _manifest.json"):
        EmbeddingStore(tmp_path / "empty")


def test_truncated_shard_is_named(tmp_path):
    write_store(tmp_path / "s")
    path = tmp_path / "s" / "00001.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"shard 00001.parquet: .* bytes on disk, manifest says"):
        EmbeddingStore(tmp_path / "s")


def test_missing_shard_is_named(tmp_path):
    write_store(tmp_path / "s")
    (tmp_path / "s" / "00002.parquet").unlink()
    with pytest.raises(StoreError, match="shard 00002.parquet: listed in the manifest but missing"):
        EmbeddingStore(tmp_path / "s")


@pytest.mark.parametrize("foreign, field", [(dict(preset="other-enc"), "preset"), (dict(dim=32), "image_dim")])
def test_shard_from_another_encoder_is_refused(tmp_path, foreign, field):
    write_store(tmp_path / "s", shards=2)
    write_store(tmp_path / "other", shards=1, info=tiny_info(**foreign))
    # Someone copies a foreign shard over ours and patches the manifest's size and rows.
    shutil.copy(tmp_path / "other" / "00000.parquet", tmp_path / "s" / "00001.parquet")
    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    manifest["shards"]["00001.parquet"]["bytes"] = (tmp_path / "s" / "00001.parquet").stat().st_size
    (tmp_path / "s" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"shard 00001.parquet: made by a different encoder.*{field}"):
        EmbeddingStore(tmp_path / "s")


def test_checksum_mismatch_found_with_verify(tmp_path):
    write_store(tmp_path / "s", shards=1)
    path = tmp_path / "s" / "00000.parquet"
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # same size, different bytes inside the data pages
    path.write_bytes(bytes(data))
    EmbeddingStore(tmp_path / "s")  # cheap open: size and footer still agree
    with pytest.raises(StoreError, match="shard 00000.parquet: checksum mismatch"):
        EmbeddingStore(tmp_path / "s", verify=True)


def test_row_count_mismatch_is_named(tmp_path):
    write_store(tmp_path / "s", shards=1, rows=10)
    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    manifest["shards"]["00000.parquet"]["rows"] = 11
    (tmp_path / "s" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="shard 00000.parquet: 10 rows, manifest says 11"):
        EmbeddingStore(tmp_path / "s")


def test_column_selection_and_dtypes_stay_fp16(tmp_path):
    info, _ = write_store(tmp_path / "s")
    batch = next(EmbeddingStore(tmp_path / "s").iter_batches(8, columns=["image_embed", "text_embed"]))
    assert set(batch) == {"image_embed", "text_embed"}
    assert batch["image_embed"].dtype == np.float16 and batch["image_embed"].shape == (8, info.image_dim)
    batch = next(EmbeddingStore(tmp_path / "s").iter_batches(8, columns=["text_hidden"], pad_to=77))
    assert batch["text_hidden"].shape == (8, 77, info.hidden_dim) and batch["text_hidden"].dtype == np.float16
    assert batch["text_mask"].shape == (8, 77) and (batch["text_mask"].sum(1) == batch["text_len"]).all()
    with pytest.raises(ValueError, match="unknown columns"):
        next(EmbeddingStore(tmp_path / "s").iter_batches(8, columns=["image_embeds"]))


def test_one_pass_yields_every_row_once(tmp_path):
    write_store(tmp_path / "s", shards=3, rows=50)
    keys = _keys(EmbeddingStore(tmp_path / "s").iter_batches(32, columns=["key"]))
    assert len(keys) == 150 and len(set(keys)) == 150
    keys = _keys(EmbeddingStore(tmp_path / "s").iter_batches(32, columns=["key"], drop_last=True))
    assert len(keys) == 128


def test_seeded_shuffle_is_reproducible_and_mixes_shards(tmp_path):
    write_store(tmp_path / "s", shards=3, rows=50)
    store = EmbeddingStore(tmp_path / "s")
    a = _keys(store.iter_batches(16, columns=["key"], shuffle=True, seed=7, buffer_size=100))
    b = _keys(store.iter_batches(16, columns=["key"], shuffle=True, seed=7, buffer_size=100))
    c = _keys(store.iter_batches(16, columns=["key"], shuffle=True, seed=7, epoch=1, buffer_size=100))
    plain = _keys(store.iter_batches(16, columns=["key"]))
    assert a == b and a != c and a != plain
    assert sorted(a) == sorted(plain)
    first = {k.split("-")[0] for k in a[:16]}
    assert len(first) >= 2  # the buffer spans shard boundaries


def test_ranks_read_disjoint_shards_that_cover_the_store(tmp_path):
    write_store(tmp_path / "s", shards=4, rows=20)
    store = EmbeddingStore(tmp_path / "s")
    parts = [set(_keys(store.iter_batches(8, columns=["key"], rank=r, world_size=2, shuffle=True, seed=3)))
             for r in range(2)]
    assert not parts[0] & parts[1]
    assert len(parts[0] | parts[1]) == 80
    with pytest.raises(StoreError, match="cannot be split over 8 ranks"):
        next(store.iter_batches(8, rank=0, world_size=8))


def test_row_filter_keeps_a_subset(tmp_path):
    write_store(tmp_path / "s", shards=2, rows=30)
    store = EmbeddingStore(tmp_path / "s")
    keys = _keys(store.iter_batches(8, columns=["key", "image_embed"],
                                    row_filter=lambda ks: np.array([k.endswith("0") for k in ks])))
    assert keys and all(k.endswith("0") for k in keys) and len(keys) == 6


def test_shards_are_written_in_row_groups_and_read_across_them(tmp_path):
    info = tiny_info()
    w = StoreWriter(tmp_path / "s", info)
    w.write_shard("00000", build_table(info, **random_rows(1500, info)))
    assert pq.ParquetFile(tmp_path / "s" / "00000.parquet").num_row_groups == 3
    store = EmbeddingStore(tmp_path / "s")
    sizes = [len(b["key"]) for b in store.iter_batches(100, columns=["key"])]
    assert sum(sizes) == 1500


def test_hidden_states_reads_h_from_the_store_and_refuses_a_wrong_one(tmp_path):
    import pandas as pd

    from storage_schema import hidden_states

    info, rows = write_store(tmp_path / "s", shards=1, rows=6, info=tiny_info(hidden=16))
    df = pd.read_parquet(tmp_path / "s" / "00000.parquet")
    h = EmbeddingStore(tmp_path / "s").encoder.hidden_dim  # the README's way: H from the store's metadata
    assert h == 16
    for i in range(len(df)):
        got = hidden_states(df.text_hidden[i], h, df.text_len[i])
        assert got.shape == (int(df.text_len[i]), 16) and np.array_equal(got, rows[0]["text_hidden"][i])
    cell, n = df.text_hidden[0], int(df.text_len[0])
    # H = 8 divides the cell's length: a plain reshape would give a [2n, 8] array without complaint.
    with pytest.raises(ValueError, match=rf"{n} x 8 = {n * 8} values; this cell fits H = 16"):
        hidden_states(cell, 8, n)
    with pytest.raises(ValueError, match="store's H"):
        hidden_states(cell, 32, n)
    with pytest.raises(ValueError, match=rf"not text_len x H = {n + 1} x 16"):
        hidden_states(cell, 16, n + 1)


def test_the_range_check_agrees_with_isfinite_and_the_bound_on_every_fp16_value():
    from storage_schema.reader import MAX_ABS, _bad_values, _outside_range

    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        want = ~(np.isfinite(every) & (np.abs(every.astype(np.float32)) <= MAX_ABS))
    assert np.array_equal(_bad_values(every), want)
    assert not _outside_range(every[~want]) and not _outside_range(every[:0])
    assert all(_outside_range(every[[i]]) for i in np.flatnonzero(want))


def _overwrite_row_values(path, row_values: np.ndarray, new: list[float]) -> None:
    """Overwrite, in place, the first values of one row's fp16 payload (found by its raw bytes): the file keeps
    its size and parses, as after a disk or copy error inside a data page."""
    data = bytearray(path.read_bytes())
    old = np.ascontiguousarray(row_values, dtype=np.float16).tobytes()
    at = data.find(old)
    assert at > 0 and data.find(old, at + 1) < 0
    patch = np.array(new, dtype=np.float16).tobytes()
    data[at : at + len(patch)] = patch
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("column, new", [("image_embeds", [np.nan]), ("text_embeds", [1.0, -2.8e4])])
def test_damaged_embedding_bytes_are_refused_with_the_shard_and_row_named(tmp_path, column, new):
    _, rows = write_store(tmp_path / "s", shards=3, rows=50)
    path = tmp_path / "s" / "00001.parquet"
    _overwrite_row_values(path, rows[1][column][7], new)
    store = EmbeddingStore(tmp_path / "s")  # size and footer still agree: the cheap open passes
    name = column.removesuffix("s")
    got = _column_rows(path, name)[7]
    assert not np.isfinite(got).all() or np.abs(got).max() > 1e4  # what a reader without the check returns
    for kw in ({}, {"shuffle": True, "seed": 1}):
        with pytest.raises(StoreError) as e:
            list(store.iter_batches(16, columns=["key", name], **kw))
        msg = str(e.value)
        assert "is corrupt: shard 00001.parquet, row(s) 7 (keys ['s1-000007'])" in msg
        assert f"store inspect {tmp_path / 's'}" in msg and "re-encode 00001.parquet" in msg
        assert "_manifest.json" in msg and "eclipse-prior encode" in msg
    # the other columns of the shard still read
    assert len(_keys(store.iter_batches(16, columns=["key", "text_hidden"]))) == 150


def _column_rows(path, column: str) -> np.ndarray:
    return np.stack(pq.read_table(path, columns=[column]).column(column).to_numpy(zero_copy_only=False))


def test_a_damaged_page_header_is_named_with_the_shard_and_its_rows(tmp_path):
    write_store(tmp_path / "s", shards=2, rows=600)
    path = tmp_path / "s" / "00001.parquet"
    key_chunk = pq.read_metadata(path).row_group(1).column(0)
    data = bytearray(path.read_bytes())
    data[key_chunk.data_page_offset : key_chunk.data_page_offset + 4] = b"\xff" * 4
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"is corrupt: shard 00001.parquet, rows 512-599 \(row group 1\) cannot be "
                                         r"decoded \(.*\).*re-encode 00001.parquet"):
        list(EmbeddingStore(tmp_path / "s").iter_batches(64, columns=["key"]))
