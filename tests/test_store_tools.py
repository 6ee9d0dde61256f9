"""The store is for its users' tools too: pandas, polars, DuckDB and LAION's embedding-reader read the
pooled embeddings of a real shard as numeric arrays, equal to what was written (a binary layout fails here)."""

import numpy as np
import pytest
from storefixtures import write_store

EMBEDDINGS = ("image_embed", "text_embed")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    info, rows = write_store(path, shards=1, rows=30)
    written = {"image_embed": rows[0]["image_embeds"], "text_embed": rows[0]["text_embeds"]}
    return path, path / "00000.parquet", rows[0]["keys"], written


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype.kind == "f", f"read as {got.dtype}, not as numbers"
    assert got.shape == want.shape
    assert np.array_equal(got.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("column", EMBEDDINGS)
def test_pandas_reads_one_float16_array_per_row(shard, column):
    import pandas as pd

    _, file, keys, written = shard
    df = pd.read_parquet(file)
    assert df.key.tolist() == keys
    assert isinstance(df[column][0], np.ndarray) and df[column][0].dtype == np.float16
    _same(np.stack(df[column].to_list()), written[column])


@pytest.mark.parametrize("column", EMBEDDINGS)
def test_polars_reads_a_float16_array_column(shard, column):
    import polars as pl

    _, file, keys, written = shard
    df = pl.read_parquet(file)
    assert df["key"].to_list() == keys
    assert df.schema[column] == pl.Array(pl.Float16, written[column].shape[1])
    _same(df[column].to_numpy(), written[column])


@pytest.mark.parametrize("column", EMBEDDINGS)
def test_duckdb_reads_a_float_list_column(shard, column):
    import duckdb

    _, file, keys, written = shard
    con = duckdb.connect()
    (kind,) = con.execute(f"select typeof({column}) from '{file}' limit 1").fetchone()
    assert kind.startswith("FLOAT["), kind
    got = con.execute(f"select key, {column} from '{file}' order by key").fetchall()
    assert [k for k, _ in got] == sorted(keys)
    order = np.argsort(keys)
    _same(np.array([v for _, v in got], dtype=np.float32), written[column][order])


@pytest.mark.parametrize("column", EMBEDDINGS)
def test_embedding_reader_reads_a_float_matrix(shard, column):
    from embedding_reader import EmbeddingReader

    store, _, keys, written = shard
    reader = EmbeddingReader(str(store), file_format="parquet", embedding_column=column, meta_columns=["key"])
    assert (reader.count, reader.dimension) == written[column].shape
    parts = list(reader(batch_size=1000, start=0, end=reader.count, parallel_pieces=1, show_progress=False))
    emb = np.concatenate([e for e, _ in parts])
    got_keys = [k for _, meta in parts for k in meta.key]
    assert got_keys == keys
    _same(emb, written[column])
