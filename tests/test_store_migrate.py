"""Schema version 2: a version-1 store is refused with the fix named, and `storage_schema.migrate` fixes it."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storefixtures import downgrade_to_v1, write_store

import storage_schema.migrate as migrate
from storage_schema import SCHEMA_VERSION, EmbeddingStore, StoreError, StoreWriter, build_table, migrate_store
from storage_schema.inspect import inspect_store
from storage_schema.schema import METADATA_KEY
from storage_schema.writer import read_manifest


@pytest.fixture
def v1_store(tmp_path):
    path = tmp_path / "s"
    info, rows = write_store(path, shards=3, rows=20)
    manifest = read_manifest(path)
    manifest["shards"]["00001.parquet"]["skipped"] = [{"key": "x", "reason": "corrupt image"}]
    (path / "_manifest.json").write_text(json.dumps(manifest))
    downgrade_to_v1(path)
    return path, info, rows


def test_version_2_embedding_items_are_non_nullable(tmp_path):
    write_store(tmp_path / "s", shards=1, rows=5)
    schema = pq.read_schema(tmp_path / "s" / "00000.parquet")
    assert SCHEMA_VERSION == 2
    for name in ("image_embed", "text_embed"):
        assert schema.field(name).type == pa.list_(pa.field("item", pa.float16(), nullable=False), 16)
    assert [f.name for f in schema if f.nullable] == ["url"]
    meta = json.loads(pq.read_metadata(tmp_path / "s" / "00000.parquet").metadata[METADATA_KEY])
    assert meta["schema_version"] == read_manifest(tmp_path / "s")["schema_version"] == 2


def test_a_version_1_store_is_refused_with_the_fix_named(v1_store):
    path, info, rows = v1_store
    fix = r"schema version 1.*python -m storage_schema\.migrate"
    with pytest.raises(StoreError, match=fix):
        EmbeddingStore(path)
    with pytest.raises(StoreError, match="refusing to add shards: store " + fix):
        StoreWriter(path, info)
    problems = inspect_store(path)["problems"]
    assert problems and all("schema version 1" in p and "storage_schema.migrate" in p for p in problems)


def test_a_version_1_shard_in_a_version_2_store_is_refused(tmp_path, v1_store):
    path, info, rows = v1_store
    write_store(tmp_path / "new", shards=1, rows=5)
    (tmp_path / "new" / "00000.parquet").unlink()
    (path / "00000.parquet").rename(tmp_path / "new" / "00000.parquet")  # a v1 file listed in a v2 manifest
    manifest = read_manifest(tmp_path / "new")
    manifest["shards"]["00000.parquet"].update(bytes=(tmp_path / "new" / "00000.parquet").stat().st_size, rows=20)
    (tmp_path / "new" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"shard 00000\.parquet: store schema version 1.*storage_schema\.migrate"):
        EmbeddingStore(tmp_path / "new")


def test_migration_keeps_every_value_and_the_manifest_details(v1_store, capsys):
    path, info, rows = v1_store
    before = {n: pq.read_table(path / n).to_pylist() for n in sorted(read_manifest(path)["shards"])}
    assert migrate.main([str(path)]) == 0
    assert "3 shards migrated now" in capsys.readouterr().out
    store = EmbeddingStore(path, verify=True)  # sizes and checksums in the manifest match the new files
    assert store.manifest["schema_version"] == 2
    assert store.manifest["shards"]["00001.parquet"]["skipped"] == [{"key": "x", "reason": "corrupt image"}]
    for name, old in before.items():
        assert pq.read_table(path / name).to_pylist() == old
        assert json.loads(pq.read_metadata(path / name).metadata[METADATA_KEY])["schema_version"] == 2
    batch = next(store.iter_batches(20, ["key", "image_embed"], shards=["00000.parquet"]))
    assert np.array_equal(batch["image_embed"], rows[0]["image_embeds"])
    StoreWriter(path, info).write_shard("00003", build_table(info, **{**rows[0], "keys": [f"n{i}" for i in range(20)]}))
    assert migrate_store(path) == {"migrated": [], "current": ["00000.parquet", "00001.parquet", "00002.parquet",
                                                               "00003.parquet"]}
    assert not list(path.glob(".tmp-*"))


def test_a_killed_migration_leaves_old_or_new_shards_and_a_rerun_finishes(v1_store, monkeypatch):
    path, info, rows = v1_store
    real, calls = migrate._record, []

    def dies_on_the_second_shard(store_dir, name, size, sha256, tmp=None):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed before the file is renamed into place
        real(store_dir, name, size, sha256, tmp)

    monkeypatch.setattr(migrate, "_record", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        migrate_store(path)
    monkeypatch.undo()
    assert not list(path.glob(".tmp-*"))
    with pytest.raises(StoreError, match="schema version 1"):
        EmbeddingStore(path)  # half done: still refused
    assert migrate_store(path) == {"migrated": ["00001.parquet", "00002.parquet"], "current": ["00000.parquet"]}
    EmbeddingStore(path, verify=True)


def test_migration_refuses_what_it_cannot_migrate(tmp_path, v1_store):
    path, info, rows = v1_store
    with pytest.raises(StoreError, match="no _manifest.json"):
        migrate_store(tmp_path)
    with open(path / "00002.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(StoreError, match=r"shard 00002\.parquet: does not match its manifest entry"):
        migrate_store(path)
    manifest = read_manifest(path)
    manifest["schema_version"] = 7
    (path / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 7 is not supported.*newer eclipse-prior"):
        migrate_store(path)
    assert migrate.main([str(tmp_path)]) == 1


def test_a_migration_killed_between_rename_and_manifest_entry_is_finished_by_a_rerun(v1_store, monkeypatch):
    path, info, rows = v1_store

    def killed(*a, **k):
        raise KeyboardInterrupt  # the new file is in place, its manifest entry still the old one

    monkeypatch.setattr(migrate, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        migrate_store(path)
    monkeypatch.undo()
    assert migrate_store(path)["current"] == ["00000.parquet"]
    EmbeddingStore(path, verify=True)
