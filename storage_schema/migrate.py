"""Migrate a store of schema version 1 to the current version, in place.

    python -m storage_schema.migrate STORE_DIR

Version 2 changed only the Arrow types of `image_embed` and `text_embed`: their list items are
non-nullable (`fixed_size_list<float16 not null>[D]`), which Parquet decodes faster. The
values are the same. Each shard is read, re-typed, written to a hidden temp file, fsynced and
renamed over the old one, and its manifest entry (bytes, sha256; rows and any recorded skipped
samples kept) updated under the manifest lock; the manifest's schema version changes only after
the last shard. A killed migration leaves every shard either old or new; run it again to finish.
Readers and writers refuse the store until it is done.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq

from storage_schema.atomic import atomic_write_bytes, fsync_path, temp_path
from storage_schema.schema import (
    MANIFEST_NAME,
    METADATA_KEY,
    SCHEMA_VERSION,
    EncoderInfo,
    arrow_schema,
    code_version,
    version_problem,
)
from storage_schema.writer import StoreError, file_sha256, manifest_lock, read_manifest, write_parquet

MIGRATES_FROM = (1,)


def _shard_version(path: Path) -> int | None:
    meta = pq.read_metadata(path).metadata or {}
    return json.loads(meta[METADATA_KEY]).get("schema_version") if METADATA_KEY in meta else None


def migrate_store(path: str | os.PathLike) -> dict:
    """Rewrite every shard of a version-1 store at the current schema version.

    Returns {"migrated": [shards rewritten now], "current": [shards already at the current version]}.
    Raises StoreError for a directory that is no store, a version it cannot migrate from, or a shard
    that does not match its manifest entry (it is not rewritten: a checksum mismatch is a damaged file).
    """
    store_dir = Path(path)
    manifest = read_manifest(store_dir)
    if manifest is None:
        raise StoreError(f"{store_dir}: no {MANIFEST_NAME}; not an embedding store")
    done: dict[str, list[str]] = {"migrated": [], "current": []}
    version = manifest.get("schema_version")
    if version == SCHEMA_VERSION:
        done["current"] = sorted(manifest["shards"])
        return done
    if version not in MIGRATES_FROM:
        raise StoreError(f"{store_dir}: {version_problem(version)}")
    info = EncoderInfo.from_dict(manifest["encoder"])
    schema = arrow_schema(info)
    for name, entry in sorted(manifest["shards"].items()):
        shard = store_dir / name
        if not shard.exists():
            raise StoreError(f"shard {name}: listed in the manifest but missing from {store_dir}")
        if _shard_version(shard) == SCHEMA_VERSION:  # renamed into place by a migration killed before its entry
            if pq.read_metadata(shard).num_rows != entry["rows"]:
                raise StoreError(f"shard {name}: already migrated but holds a different row count than listed")
            if shard.stat().st_size != entry["bytes"]:
                _record(store_dir, name, shard.stat().st_size, file_sha256(shard))
            done["current"].append(name)
            continue
        if shard.stat().st_size != entry["bytes"] or file_sha256(shard) != entry["sha256"]:
            raise StoreError(f"shard {name}: does not match its manifest entry (damaged?); not migrated")
        table = pq.read_table(shard, use_threads=False).cast(schema).replace_schema_metadata(schema.metadata)
        tmp = temp_path(shard)
        try:
            write_parquet(table, tmp)
            _record(store_dir, name, tmp.stat().st_size, file_sha256(tmp), tmp)
        finally:
            tmp.unlink(missing_ok=True)
        done["migrated"].append(name)
    with manifest_lock(store_dir):
        manifest = read_manifest(store_dir)
        manifest["schema_version"] = SCHEMA_VERSION
        manifest["code_version"] = code_version()
        atomic_write_bytes(store_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return done


def _record(store_dir: Path, name: str, size: int, sha256: str, tmp: Path | None = None) -> None:
    with manifest_lock(store_dir):
        if tmp is not None:
            os.replace(tmp, store_dir / name)
            fsync_path(store_dir)
        manifest = read_manifest(store_dir)
        manifest["shards"][name] = {**manifest["shards"][name], "bytes": size, "sha256": sha256}
        atomic_write_bytes(store_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage_schema.migrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="store directory (holds _manifest.json and *.parquet shards)")
    args = ap.parse_args(argv)
    try:
        done = migrate_store(args.store)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.store}: schema version {SCHEMA_VERSION}; {len(done['migrated'])} shards migrated now, "
          f"{len(done['current'])} already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
