"""text_hidden read from the mapped Parquet pages equals pyarrow's read, and anything else falls back to pyarrow."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from storefixtures import write_store

from storage_schema import EmbeddingStore, pages
from storage_schema.reader import _HiddenPages, _to_numpy


def _pyarrow_cells(pf, rg, info):
    return _to_numpy(pf.read_row_group(rg, columns=["text_hidden"]).column(0), "text_hidden", info)


def _page_cells(path, pf, rg, info, file_bytes=None):
    hp = _HiddenPages(path, pf)
    lengths = pf.read_row_group(rg, columns=["text_len"]).column(0).to_numpy().astype(np.int64)
    data = hp.bytes if file_bytes is None else file_bytes
    return pages.hidden_cells(data, pf.metadata.row_group(rg), hp.column, lengths * info.hidden_dim * 2)


def test_cells_from_the_pages_equal_pyarrows(tmp_path):
    info, _ = write_store(tmp_path / "s", shards=2, rows=700)  # two row groups per shard, several pages each
    for name in EmbeddingStore(tmp_path / "s").shards:
        pf = pq.ParquetFile(tmp_path / "s" / name)
        assert pf.num_row_groups == 2
        for rg in range(2):
            got, want = _page_cells(tmp_path / "s" / name, pf, rg, info), _pyarrow_cells(pf, rg, info)
            assert got is not None and len(got) == len(want)
            assert all(a.dtype == np.float16 and np.array_equal(a, b) for a, b in zip(got, want, strict=True))
            assert not got[0].flags.writeable  # views of the mapped file, never written


@pytest.mark.parametrize("layout", [{"compression": "zstd"}, {"use_dictionary": True}, {"data_page_version": "2.0"}])
def test_another_layout_is_read_through_pyarrow(tmp_path, layout):
    info, rows = write_store(tmp_path / "s", shards=1, rows=40)
    path = tmp_path / "s" / "00000.parquet"
    table = pq.read_table(path)
    kw = {"compression": "none", "use_dictionary": False, "data_page_version": "1.0"} | layout
    pq.write_table(table, tmp_path / "other.parquet", **kw)
    pf = pq.ParquetFile(tmp_path / "other.parquet")
    assert _page_cells(tmp_path / "other.parquet", pf, 0, info) is None
    # and the reader, handed such a shard, still returns the right batches
    path.unlink()
    (tmp_path / "other.parquet").rename(path)
    import json

    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    manifest["shards"]["00000.parquet"]["bytes"] = path.stat().st_size
    (tmp_path / "s" / "_manifest.json").write_text(json.dumps(manifest))
    batch = next(EmbeddingStore(tmp_path / "s").iter_batches(40, ["text_hidden"], packed=True))
    assert np.array_equal(batch["text_hidden"], np.concatenate(rows[0]["text_hidden"]))


def test_a_length_prefix_that_disagrees_with_text_len_is_not_trusted(tmp_path):
    info, _ = write_store(tmp_path / "s", shards=1, rows=30)
    path = tmp_path / "s" / "00000.parquet"
    pf = pq.ParquetFile(path)
    data = np.fromfile(path, dtype=np.uint8)
    assert _page_cells(path, pf, 0, info, data) is not None
    start = pf.metadata.row_group(0).column(pf.schema_arrow.get_field_index("text_hidden")).data_page_offset
    cell = _pyarrow_cells(pf, 0, info)[0].tobytes()
    at = data.tobytes().index(cell, start)
    data[at - 4] ^= 0x02  # the first cell's length prefix
    assert _page_cells(path, pf, 0, info, data) is None
    assert pages.hidden_cells(data[: start + 10], pf.metadata.row_group(0), 5, np.zeros(30, dtype=np.int64)) is None


@pytest.mark.parametrize("packed", [False, True])
def test_damaged_hidden_state_bytes_in_a_page_are_refused_with_the_shard_and_row_named(tmp_path, packed):
    from storage_schema import StoreError

    _, rows = write_store(tmp_path / "s", shards=2, rows=600)  # row 530 sits in the second row group
    path = tmp_path / "s" / "00000.parquet"
    data = bytearray(path.read_bytes())
    cell = rows[0]["text_hidden"][530]
    at = bytes(data).index(cell.tobytes())
    data[at + 2 * cell.size - 2 : at + 2 * cell.size] = np.array([np.inf], dtype=np.float16).tobytes()  # its last value
    path.write_bytes(bytes(data))
    store = EmbeddingStore(tmp_path / "s")
    pf = pq.ParquetFile(path)
    assert _page_cells(path, pf, 1, store.encoder) is not None  # the pages still parse: the fast path reads them
    with pytest.raises(StoreError, match=r"is corrupt: shard 00000.parquet, row\(s\) 530 .*text_hidden .*e\.g\. inf"):
        list(store.iter_batches(64, columns=["key", "text_hidden"], packed=packed))
