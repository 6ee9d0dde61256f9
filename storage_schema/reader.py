"""Validating, streaming reader of an embedding store.

Never loads the store into memory and never up-casts it: batches are fp16 numpy arrays
(or torch tensors sharing their memory), read one row group at a time.
"""

import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage_schema import pages
from storage_schema.schema import (
    CAPTION,
    COLUMNS,
    IMAGE_EMBED,
    KEY,
    MANIFEST_NAME,
    MAX_ABS,
    SCHEMA_VERSION,
    TEXT_EMBED,
    TEXT_HIDDEN,
    TEXT_LEN,
    TRUNCATED,
    URL,
    EncoderInfo,
    arrow_schema,
    read_file_metadata,
    version_problem,
)
from storage_schema.writer import StoreError, file_sha256, read_manifest

TEXT_MASK = "text_mask"  # derived batch entry: True on real tokens
_ORIGIN = "_origin"  # internal chunk entry: shard index << 32 | row within the shard, to name a bad row

_MAX_BITS = int(np.array(MAX_ABS, dtype=np.float16).view(np.uint16))


def hidden_states(cell: bytes, hidden_dim: int, text_len: int) -> np.ndarray:
    """One `text_hidden` cell (as pandas shows it) -> float16 array [text_len, hidden_dim].

    `text_len` is the same row's `text_len` column; `hidden_dim` is the store's H, recorded in its
    metadata (`EmbeddingStore(dir).encoder.hidden_dim`). The cell must hold exactly
    text_len x hidden_dim fp16 values: a wrong H would otherwise reshape into a wrong array silently.
    """
    n_bytes, h, n = len(cell), int(hidden_dim), int(text_len)
    if h <= 0 or n < 0:
        raise ValueError(f"hidden_states: hidden_dim must be positive and text_len non-negative (got {h}, {n})")
    if n_bytes != n * h * 2:
        own = f"; this cell fits H = {n_bytes // 2 // n}" if n and n_bytes % (2 * n) == 0 else ""
        raise ValueError(
            f"hidden_states: the cell holds {n_bytes} bytes ({n_bytes / 2:g} fp16 values), not text_len x H = "
            f"{n} x {h} = {n * h} values{own}. Pass the row's own text_len and the store's H "
            f"(EmbeddingStore(store_dir).encoder.hidden_dim)."
        )
    return np.frombuffer(cell, dtype=np.float16).reshape(n, h)


def validate_shard(store_dir: Path, name: str, entry: dict, encoder: EncoderInfo, verify: bool = False) -> int:
    """Check one shard against its manifest entry and the store's encoder; return its rows.

    `verify=True` also re-hashes the file against the manifest's sha256: it reads the whole shard from disk."""
    return _validated_metadata(store_dir, name, entry, encoder, verify).num_rows


def _validated_metadata(store_dir: Path, name: str, entry: dict, encoder: EncoderInfo,
                        verify: bool) -> pq.FileMetaData:
    path = store_dir / name
    if not path.exists():
        raise StoreError(f"shard {name}: listed in the manifest but missing from {store_dir}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise StoreError(f"shard {name}: {size} bytes on disk, manifest says {entry['bytes']} (truncated or replaced)")
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"shard {name}: not a readable Parquet file ({e})") from e
    if meta.num_rows != entry["rows"]:
        raise StoreError(f"shard {name}: {meta.num_rows} rows, manifest says {entry['rows']}")
    try:
        shard_meta = read_file_metadata(meta.metadata)
    except ValueError as e:
        raise StoreError(f"shard {name}: {e}") from e
    other = EncoderInfo.from_dict(shard_meta["encoder"])
    if other != encoder:
        diff = {k: (v, getattr(other, k)) for k, v in encoder.to_dict().items() if getattr(other, k) != v}
        raise StoreError(f"shard {name}: made by a different encoder than the store (store vs shard: {diff})")
    if meta.schema.to_arrow_schema().remove_metadata() != arrow_schema(encoder).remove_metadata():
        raise StoreError(f"shard {name}: column types differ from the store schema (wrong dims?)")
    if verify and file_sha256(path) != entry["sha256"]:
        raise StoreError(f"shard {name}: checksum mismatch (file changed after it was written); "
                         f"{_reencode_hint(store_dir, name)}")
    return meta


def _boundary_keys(meta: pq.FileMetaData) -> list[str]:
    """The first and last key of each row group, as the footer's statistics for `key` record them."""
    schema = meta.schema
    column = next((i for i in range(len(schema)) if schema.column(i).path == KEY), None)
    keys: list[str] = []
    for rg in range(meta.num_row_groups if column is not None else 0):
        stats = meta.row_group(rg).column(column).statistics
        if stats is not None and stats.has_min_max:
            keys += [stats.min, stats.max]
    return keys


def _outside_range(values: np.ndarray) -> bool:
    """True when an fp16 array holds NaN, Inf or a value beyond +-MAX_ABS.

    An fp16 value's magnitude orders like its low 15 bits (Inf and NaN above every finite value), so two
    integer max-reductions over the same bits decide it without a temporary array: as int16 the largest
    positive values, as uint16 the largest negative ones. numpy's isfinite on fp16 is far slower.
    """
    if values.size == 0:
        return False
    return int(values.view(np.int16).max()) > _MAX_BITS or int(values.view(np.uint16).max()) > 0x8000 + _MAX_BITS


def _bad_values(values: np.ndarray) -> np.ndarray:
    """Bool mask of the values `_outside_range` objects to (the slow path, once a batch failed)."""
    return (values.view(np.uint16) & 0x7FFF) > _MAX_BITS


def _repair_hint(store_dir: Path, shard: str) -> str:
    return (f"`eclipse-prior store inspect {store_dir}` tells which (it re-hashes every shard against the "
            f"manifest's checksums and lists each damaged one). Either way, {_reencode_hint(store_dir, shard)}")


def _reencode_hint(store_dir: Path, shard: str) -> str:
    return (f"re-encode {shard}: delete it and its entry in {store_dir / MANIFEST_NAME}, and rerun the "
            f"`eclipse-prior encode` command that wrote the store (it encodes only the shards the manifest does not "
            f"list; the image shard {shard.removesuffix('.parquet')}.tar must still be in its images folder).")


class EmbeddingStore:
    """An opened, validated store directory.

    Opening checks every listed shard against the manifest (exists, size, row count)
    and against each other (same encoder metadata, same schema). `verify=True` also
    re-hashes every file (slow: reads the whole store once).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise StoreError(f"{self.dir}: no such store directory")
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise StoreError(f"{self.dir}: no _manifest.json; not an embedding store (or no shard finished yet)")
        try:
            self.encoder = EncoderInfo.from_dict(manifest["encoder"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.dir}: manifest has no valid encoder description ({e})") from e
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.dir}: {version_problem(manifest.get('schema_version'))}")
        self.manifest = manifest
        self.schema = arrow_schema(self.encoder)
        self.shards: list[str] = sorted(manifest["shards"])
        self.shard_rows: dict[str, int] = {}
        self._boundary_keys: dict[str, list[str]] = {}
        for name in self.shards:
            meta = _validated_metadata(self.dir, name, manifest["shards"][name], self.encoder, verify)
            self.shard_rows[name] = meta.num_rows
            self._boundary_keys[name] = _boundary_keys(meta)

    @property
    def num_rows(self) -> int:
        return sum(self.shard_rows.values())

    @property
    def dim(self) -> int:
        return self.encoder.image_dim

    def __len__(self) -> int:
        return self.num_rows

    # -- reading ---------------------------------------------------------------------

    def read_shard(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.dir / name, columns=list(columns) if columns else None, use_threads=False)

    def boundary_duplicates(self) -> dict[str, list[str]]:
        """Keys held by more than one shard, among each row group's first and last key -> the shards holding them.

        Reads nothing: the footers opened to validate the store record these keys. So it finds a shard
        stored twice (or copied under a second name) for free, but not a duplicate inside a row group;
        `storage_schema.inspect_store` reads every key.
        """
        where: dict[str, list[str]] = {}
        for name in self.shards:
            for key in dict.fromkeys(self._boundary_keys[name]):
                where.setdefault(key, []).append(name)
        return {k: shards for k, shards in where.items() if len(shards) > 1}

    def keys(self) -> Iterator[tuple[str, list[str]]]:
        """(shard, keys) for every shard; reads only the key column."""
        for name in self.shards:
            yield name, self.read_shard(name, [KEY]).column(KEY).to_pylist()

    def iter_batches(
        self,
        batch_size: int,
        columns: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        buffer_size: int = 8192,
        pad_to: int | None = None,
        drop_last: bool = False,
        shards: Sequence[str] | None = None,
        row_filter=None,
        packed: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this rank's part of the store, as dicts of numpy arrays.

        Ranks take disjoint shards (shard order is shuffled with seed+epoch, the same on
        every rank). Shuffling mixes rows within a buffer of `buffer_size` rows.
        `text_hidden` comes back padded to `pad_to` (default: the longest row of the
        batch) as [B, L, H] fp16 with `text_mask` [B, L]; with `packed=True` it is the
        batch's real tokens one row after another, [sum(text_len), H] fp16, with `text_len`
        [B] and no mask or padding (one copy of the payload; `pad_to` only bounds text_len).
        `row_filter(keys) -> bool mask` keeps a subset of rows (e.g. a held-out split).
        Every batch's image_embed, text_embed and text_hidden are checked for NaN, Inf and values beyond
        +-MAX_ABS (damaged bytes): StoreError names the shard and rows and how to repair it.
        """
        cols = list(columns) if columns else list(COLUMNS)
        unknown = set(cols) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}; the store has {list(COLUMNS)}")
        extra = ([TEXT_LEN] if TEXT_HIDDEN in cols else []) + ([KEY] if row_filter else [])
        read_cols = list(dict.fromkeys(cols + extra))
        order = list(shards) if shards is not None else list(self.shards)
        if unknown := sorted(set(order) - set(self.shards)):
            raise StoreError(f"{self.dir}: no shards {unknown} in this store")
        rng = np.random.default_rng([seed, epoch])
        if shuffle:
            order = [order[i] for i in rng.permutation(len(order))]
        if world_size > 1:
            if len(order) < world_size:
                raise StoreError(
                    f"{len(order)} shards cannot be split over {world_size} ranks; write more, smaller shards"
                )
            order = order[rank::world_size]
        # The buffer holds references (chunk, row) to rows of the chunks read so far; a batch gathers
        # its rows straight from the chunks (one copy per batch, none when its rows are one slice).
        chunks: dict[int, dict[str, np.ndarray]] = {}
        ref_chunk, ref_row = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        target = max(buffer_size, batch_size) if shuffle else batch_size

        def emit(start: int, stop: int) -> dict[str, np.ndarray]:
            part = _gather(chunks, ref_chunk[start:stop], ref_row[start:stop])
            return self._finish(part, cols, pad_to, packed)

        for n_chunk, chunk in enumerate(self._iter_chunks(order, read_cols, row_filter)):
            rows = len(chunk[read_cols[0]])
            chunks[n_chunk] = chunk
            ref_chunk = np.concatenate([ref_chunk, np.full(rows, n_chunk, dtype=np.int64)])
            ref_row = np.concatenate([ref_row, np.arange(rows, dtype=np.int64)])
            if len(ref_row) < target:
                continue
            if shuffle:
                perm = rng.permutation(len(ref_row))
                ref_chunk, ref_row = ref_chunk[perm], ref_row[perm]
            n_full = (len(ref_row) // batch_size) * batch_size
            for start in range(0, n_full, batch_size):
                yield emit(start, start + batch_size)
            ref_chunk, ref_row = ref_chunk[n_full:], ref_row[n_full:]
            chunks = {c: chunks[c] for c in np.unique(ref_chunk).tolist()}  # release fully used chunks
        if len(ref_row):
            if shuffle:
                perm = rng.permutation(len(ref_row))
                ref_chunk, ref_row = ref_chunk[perm], ref_row[perm]
            for start in range(0, len(ref_row), batch_size):
                stop = min(start + batch_size, len(ref_row))
                if drop_last and stop - start < batch_size:
                    break
                yield emit(start, stop)

    def _iter_chunks(self, order, read_cols, row_filter) -> Iterator[dict[str, np.ndarray]]:
        arrow_cols = [c for c in read_cols if c != TEXT_HIDDEN]
        shard_index = {name: i for i, name in enumerate(self.shards)}
        for name in order:
            # Memory-mapped: uncompressed pages decode straight from the page cache (faster than read()).
            pf = pq.ParquetFile(self.dir / name, memory_map=True)
            hidden = _HiddenPages(self.dir / name, pf) if TEXT_HIDDEN in read_cols else None
            first_row, shard_bits = 0, shard_index[name] << 32
            for rg in range(pf.num_row_groups):
                rows = pf.metadata.row_group(rg).num_rows
                try:
                    table = pf.read_row_group(rg, columns=arrow_cols, use_threads=False)
                    chunk = {c: _to_numpy(table.column(c), c, self.encoder) for c in arrow_cols}
                    if hidden is not None:
                        chunk[TEXT_HIDDEN] = hidden.cells(rg, chunk[TEXT_LEN], self.encoder)
                except (OSError, pa.ArrowException) as e:  # a damaged page header or length
                    raise StoreError(
                        f"store {self.dir} is corrupt: shard {name}, rows {first_row}-{first_row + rows - 1} (row "
                        f"group {rg}) cannot be decoded ({' '.join(str(e).split())}): its bytes changed after it "
                        f"was written (a disk or copy error), or another tool wrote it. {_repair_hint(self.dir, name)}"
                    ) from e
                chunk[_ORIGIN] = shard_bits + first_row + np.arange(rows, dtype=np.int64)
                first_row += rows
                if row_filter is not None:
                    keep = np.asarray(row_filter(chunk[KEY]), dtype=bool)
                    if not keep.all():
                        chunk = _take(chunk, np.flatnonzero(keep))
                    if not keep.any():
                        continue
                yield chunk

    def _finish(self, part: dict, cols: list[str], pad_to: int | None, packed: bool) -> dict[str, np.ndarray]:
        for c in (IMAGE_EMBED, TEXT_EMBED):
            if c in cols and _outside_range(part[c]):
                self._refuse(part, c, _bad_values(part[c]).any(axis=1), part[c])
        out = {c: part[c] for c in cols if c != TEXT_HIDDEN}
        if TEXT_HIDDEN in cols:
            lengths = part[TEXT_LEN]
            if packed:
                longest = int(lengths.max()) if len(lengths) else 0
                if pad_to is not None and longest > pad_to:
                    raise StoreError(f"a caption has {longest} tokens, more than pad_to={pad_to}")
                out[TEXT_HIDDEN] = _pack_hidden(part[TEXT_HIDDEN], self.encoder.hidden_dim)
                # Checked once gathered: the batch is one aligned array (the pages' cells may sit at odd offsets).
                if _outside_range(out[TEXT_HIDDEN]):
                    token_row = np.repeat(np.arange(len(lengths)), lengths.astype(np.int64))
                    rows = np.zeros(len(lengths), dtype=bool)
                    rows[token_row[_bad_values(out[TEXT_HIDDEN]).any(axis=1)]] = True
                    self._refuse(part, TEXT_HIDDEN, rows, out[TEXT_HIDDEN])
            else:
                out[TEXT_HIDDEN], out[TEXT_MASK], bad = _pad_hidden(part[TEXT_HIDDEN], lengths,
                                                                    self.encoder.hidden_dim, pad_to)
                if bad.any():
                    self._refuse(part, TEXT_HIDDEN, bad, out[TEXT_HIDDEN][bad])
            out.setdefault(TEXT_LEN, lengths)
        return out

    def _refuse(self, part: dict, column: str, bad_rows: np.ndarray, values: np.ndarray) -> None:
        """Raise StoreError for a batch holding damaged values: the shard, its rows, a value, the repair."""
        origin = part[_ORIGIN][bad_rows]
        shard = self.shards[int(origin[0]) >> 32]
        rows = sorted(int(o) & 0xFFFFFFFF for o in origin if int(o) >> 32 == int(origin[0]) >> 32)
        shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        keys = f" (keys {list(part[KEY][bad_rows][:3])})" if KEY in part else ""
        others = len({int(o) >> 32 for o in origin}) - 1
        value = float(values.reshape(-1)[np.argmax(_bad_values(values).reshape(-1))])
        raise StoreError(
            f"store {self.dir} is corrupt: shard {shard}, row(s) {shown}{keys} hold {column} values that are NaN, "
            f"Inf or beyond +-{MAX_ABS:g} (e.g. {value:g}), which no CLIP encoder gives: the shard's bytes changed "
            f"after it was written (a disk or copy error), or a writer older than its NaN/Inf check stored them"
            + (f"; this batch has such rows from {others} other shard(s) too" if others else "")
            + f". {_repair_hint(self.dir, shard)}"
        )


class _HiddenPages:
    """A shard's text_hidden cells as views into its mapped pages (storage_schema.pages), one row group at
    a time; a row group laid out otherwise is read through pyarrow. Either way: one fp16 view per row."""

    def __init__(self, path: Path, pf: pq.ParquetFile):
        self.pf = pf
        schema = pf.metadata.schema
        leaf = [i for i in range(len(schema)) if schema.column(i).path == TEXT_HIDDEN]
        self.column = leaf[0] if len(leaf) == 1 and schema.column(leaf[0]).max_definition_level == 0 \
            and schema.column(leaf[0]).max_repetition_level == 0 else None
        self.bytes = None
        if self.column is not None:
            with open(path, "rb") as f:  # the mapping outlives the file object; the views keep it alive
                self.bytes = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)

    def cells(self, rg: int, lengths: np.ndarray, info: EncoderInfo) -> np.ndarray:
        if self.bytes is not None:
            cell_bytes = lengths.astype(np.int64) * (info.hidden_dim * 2)
            cells = pages.hidden_cells(self.bytes, self.pf.metadata.row_group(rg), self.column, cell_bytes)
            if cells is not None:
                return cells
        table = self.pf.read_row_group(rg, columns=[TEXT_HIDDEN], use_threads=False)
        return _to_numpy(table.column(TEXT_HIDDEN), TEXT_HIDDEN, info)


def _to_numpy(col: pa.ChunkedArray, name: str, info: EncoderInfo) -> np.ndarray:
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if name in (IMAGE_EMBED, TEXT_EMBED):
        dim = info.image_dim if name == IMAGE_EMBED else info.text_dim
        # flatten() honours the slice offset; to_numpy is zero-copy for fp16 without nulls
        return arr.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim)
    if name == TEXT_HIDDEN:
        # Keep as a list of zero-copy fp16 views into the Arrow buffer; padding copies once.
        _, off_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(off_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8)
        flat = data[offsets[0] : offsets[-1]].view(np.float16)
        out = np.empty(len(arr), dtype=object)
        base = offsets[0] // 2
        for i in range(len(arr)):
            out[i] = flat[offsets[i] // 2 - base : offsets[i + 1] // 2 - base]
        return out
    if name in (KEY, CAPTION, URL):
        return np.asarray(arr.to_pylist(), dtype=object)
    if name == TRUNCATED:
        return arr.to_numpy(zero_copy_only=False)
    return arr.to_numpy(zero_copy_only=True)


def _pad_hidden(cells: np.ndarray, lengths: np.ndarray, hidden_dim: int, pad_to: int | None):
    """Cells -> zero-padded [n, width, H], mask [n, width], and which rows hold values `_outside_range`."""
    longest = int(lengths.max()) if len(lengths) else 0
    width = pad_to or longest
    if longest > width:
        raise StoreError(f"a caption has {longest} tokens, more than pad_to={width}")
    # The batch comes from Arrow's memory pool, which reuses freed pages: numpy's zeros of a
    # batch this big are fresh mmap pages every time, and their page faults cost more than the copy.
    n = len(cells)
    out = np.frombuffer(pa.allocate_buffer(n * width * hidden_dim * 2), dtype=np.float16).reshape(n, width * hidden_dim)
    bad = np.zeros(n, dtype=bool)
    for i, (cell, k) in enumerate(zip(cells, lengths.tolist(), strict=True)):
        out[i, : k * hidden_dim] = cell
        out[i, k * hidden_dim :] = 0
        bad[i] = _outside_range(out[i, : k * hidden_dim])  # each row while it is in cache, not the padding
    out = out.reshape(n, width, hidden_dim)
    mask = np.arange(width)[None, :] < lengths[:, None].astype(np.int64)
    return out, mask, bad


def _pack_hidden(cells: np.ndarray, hidden_dim: int) -> np.ndarray:
    """The rows' real tokens one after another: [sum(text_len), H] fp16, one copy of the payload."""
    return np.concatenate(list(cells)).reshape(-1, hidden_dim)


def _gather(chunks: dict[int, dict[str, np.ndarray]], ref_chunk: np.ndarray, ref_row: np.ndarray) -> dict:
    """Rows (chunk, row) of the buffered chunks as one part: a view if they are one slice of one chunk."""
    first = int(ref_chunk[0])
    if (ref_chunk == first).all() and (np.diff(ref_row) == 1).all():
        return _slice(chunks[first], int(ref_row[0]), int(ref_row[-1]) + 1)
    used = np.unique(ref_chunk)
    if len(used) == 1:
        return _take(chunks[first], ref_row)
    out = {}
    for k, v in chunks[first].items():
        out[k] = np.empty((len(ref_row), *v.shape[1:]), dtype=v.dtype)
    for c in used.tolist():
        sel = np.flatnonzero(ref_chunk == c)
        rows = ref_row[sel]
        for k, v in chunks[c].items():
            out[k][sel] = v[rows]
    return out


def _take(chunk: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in chunk.items()}


def _slice(chunk: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in chunk.items()}
