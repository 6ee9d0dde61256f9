"""Atomic shard writer. A shard exists for readers only once the manifest lists it.

Order of a write: Parquet to a hidden temp file -> fsync -> rename to NAME.parquet ->
manifest updated (under a file lock, itself written temp + rename). A crash at any
point leaves either no shard, or an unlisted file that the next write replaces.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage_schema.atomic import TEMP_PREFIX, atomic_write_bytes, fsync_path, temp_path
from storage_schema.schema import (
    MANIFEST_NAME,
    MAX_ABS,
    SCHEMA_VERSION,
    EncoderInfo,
    arrow_schema,
    code_version,
    embedding_type,
    version_problem,
)

ROW_GROUP_ROWS = 512
_LOCK_NAME = "_manifest.lock"


class StoreError(Exception):
    """A store, shard or manifest that cannot be used as it is; the message names it."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_manifest(store_dir: Path) -> dict | None:
    """The store's manifest, checked for the shape every reader relies on; None when the file is absent."""
    path = Path(store_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: manifest is not valid JSON ({e})") from e
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: object) -> None:
    """Refuse a manifest of the wrong shape (null, a list, a missing field) with the field named."""
    fix = ("the file was damaged or written by another tool: restore it, or encode into a new store folder "
           "(shards listed nowhere are rewritten on resume)")
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: the manifest is {type(manifest).__name__ if manifest is not None else 'null'}, "
                         f"not a JSON object; {fix}")
    for key, kind in (("encoder", dict), ("shards", dict)):  # schema_version: the readers name its problem
        if key not in manifest:
            raise StoreError(f"{path}: the manifest has no {key!r} field; {fix}")
        if not isinstance(manifest[key], kind):
            raise StoreError(f"{path}: the manifest's {key!r} is {type(manifest[key]).__name__}, expected "
                             f"{kind.__name__}; {fix}")
    for name, entry in manifest["shards"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("rows"), int):
            raise StoreError(f"{path}: the manifest's entry for shard {name!r} has no integer 'rows'; {fix}")


@contextmanager
def manifest_lock(store_dir: Path):
    with open(store_dir / _LOCK_NAME, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Dask workers on one host write shards concurrently
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fixed_list(values: np.ndarray, dim: int, name: str, keys: Sequence[str]) -> pa.Array:
    values = np.ascontiguousarray(values, dtype=np.float16)
    if values.ndim != 2 or values.shape[1] != dim:
        raise ValueError(f"{name}: expected shape (rows, {dim}), got {values.shape}")
    _refuse_non_finite(values, name, keys)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type=embedding_type(dim))


def _refuse_non_finite(values: np.ndarray, name: str, keys: Sequence[str]) -> None:
    """NaN or Inf (in fp16: also any value beyond +-65504) would reach every reader and train a NaN prior; a
    value beyond MAX_ABS is refused by every reader, so it is refused here, before it is stored."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (np.abs(values) <= MAX_ABS)
    bad = ~ok.all(axis=tuple(range(1, values.ndim)))  # per row; a shard may have no rows
    if bad.any():
        rows = [keys[i] for i in np.flatnonzero(bad)[:5]]
        raise ValueError(f"{name}: {int(bad.sum())} row(s) hold NaN, Inf or values beyond +-{MAX_ABS:g} after the "
                         f"cast to float16 (e.g. keys {rows}): the encoder produced values no CLIP tower gives")


def build_table(
    info: EncoderInfo,
    keys: Sequence[str],
    captions: Sequence[str],
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_hidden: Sequence[np.ndarray],
    truncated: Sequence[bool],
    urls: Sequence[str | None] | None = None,
) -> pa.Table:
    """Validate one shard's rows and turn them into an Arrow table of the store schema.

    text_hidden: one [text_len, hidden_dim] array per row (real tokens only).
    """
    n = len(keys)
    lengths = {"captions": len(captions), "image_embeds": len(image_embeds), "text_embeds": len(text_embeds),
               "text_hidden": len(text_hidden), "truncated": len(truncated)}
    if urls is not None:
        lengths["urls"] = len(urls)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"row counts disagree: {n} keys but {bad}")
    if len(set(keys)) != n:
        seen: set[str] = set()
        twice = sorted({k for k in keys if k in seen or seen.add(k)})
        raise ValueError(f"duplicate keys within one shard: {', '.join(map(repr, twice[:5]))}"
                         + (f" and {len(twice) - 5} more" if len(twice) > 5 else ""))
    hidden_bytes, text_len = [], np.empty(n, dtype=np.int16)
    for i, h in enumerate(text_hidden):
        h = np.ascontiguousarray(h, dtype=np.float16)
        if h.ndim != 2 or h.shape[1] != info.hidden_dim or not 1 <= h.shape[0] <= info.context_length:
            raise ValueError(
                f"text_hidden of row {keys[i]!r}: expected (1..{info.context_length}, {info.hidden_dim}), got {h.shape}"
            )
        _refuse_non_finite(h[None], "text_hidden", [keys[i]])
        hidden_bytes.append(h.tobytes())
        text_len[i] = h.shape[0]
    schema = arrow_schema(info)
    columns = [
        pa.array(list(keys), pa.string()),
        pa.array(list(captions), pa.string()),
        pa.array(list(urls) if urls is not None else [None] * n, pa.string()),
        _fixed_list(image_embeds, info.image_dim, "image_embeds", keys),
        _fixed_list(text_embeds, info.text_dim, "text_embeds", keys),
        pa.array(hidden_bytes, pa.large_binary()),
        pa.array(text_len, pa.int16()),
        pa.array(np.asarray(truncated, dtype=bool), pa.bool_()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one shard's table as the store lays it out (embeddings uncompressed, strings zstd), fsynced."""
    pq.write_table(
        table,
        path,
        row_group_size=ROW_GROUP_ROWS,
        compression={"key": "zstd", "caption": "zstd", "url": "zstd", "image_embed": "none",
                     "text_embed": "none", "text_hidden": "none", "text_len": "zstd", "truncated": "zstd"},
        use_dictionary=False,
        write_statistics=["key"],  # min/max of 50 kB binary cells would bloat the footer
        data_page_version="1.0",  # the layout storage_schema.pages reads text_hidden from without a copy
    )
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class StoreWriter:
    """Writes shards of one store. Safe to use from several processes on one host."""

    def __init__(self, store_dir: str | os.PathLike, info: EncoderInfo):
        self.dir = Path(store_dir)
        self.info = info
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_encoder(read_manifest(self.dir))

        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        # Temp files of a killed writer: invisible to readers, but they waste disk.
        for p in self.dir.glob(f"{TEMP_PREFIX}*"):
            pid = p.name.split("-")[1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                p.unlink(missing_ok=True)

    def _check_encoder(self, manifest: dict | None) -> None:
        if manifest is None:
            return
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.dir}: refusing to add shards: {version_problem(manifest.get('schema_version'))}")
        existing = EncoderInfo.from_dict(manifest["encoder"])
        if existing != self.info:
            raise StoreError(
                f"{self.dir}: store was made by encoder {existing.preset!r} "
                f"({existing.image_model}, D={existing.image_dim}); refusing to add shards from "
                f"{self.info.preset!r} ({self.info.image_model}, D={self.info.image_dim}). Use a new store directory."
            )

    def completed_shards(self) -> set[str]:
        manifest = read_manifest(self.dir)
        return set(manifest["shards"]) if manifest else set()

    def is_complete(self, name: str) -> bool:
        return f"{name}.parquet" in self.completed_shards()

    def write_shard(self, name: str, table: pa.Table, extra: dict | None = None) -> dict:
        """Write `table` as shard NAME.parquet, atomically; return its manifest entry.

        `extra` is JSON-able detail recorded in the manifest entry (e.g. skipped samples).
        """
        if table.schema.remove_metadata() != arrow_schema(self.info).remove_metadata():
            raise StoreError(f"shard {name}: table schema does not match the store schema")
        table = table.replace_schema_metadata(arrow_schema(self.info).metadata)
        file_name = f"{name}.parquet"
        tmp = temp_path(self.dir / file_name)  # hidden from readers; moved into place under the lock
        write_parquet(table, tmp)
        entry = {"rows": table.num_rows, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp), **(extra or {})}
        try:
            self._record(file_name, entry, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return entry

    def _record(self, file_name: str, entry: dict, tmp: Path | None = None) -> None:
        """Under the lock: re-check the encoder (another writer may have started the store since),
        move the finished file into place, then list it in the manifest."""
        with manifest_lock(self.dir):
            manifest = read_manifest(self.dir)
            self._check_encoder(manifest)
            if tmp is not None:
                os.replace(tmp, self.dir / file_name)
                fsync_path(self.dir)
            manifest = manifest or {
                "schema_version": SCHEMA_VERSION,
                "encoder": self.info.to_dict(),
                "shards": {},
            }
            manifest["code_version"] = code_version()
            manifest["shards"][file_name] = entry
            manifest["shards"] = dict(sorted(manifest["shards"].items()))
            atomic_write_bytes(self.dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
