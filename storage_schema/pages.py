"""`text_hidden` cells straight from the memory-mapped Parquet pages, without pyarrow's decode copy.

The writer stores `text_hidden` as a REQUIRED BYTE_ARRAY column, PLAIN-encoded, uncompressed, without
a dictionary, in version-1 data pages: such a page is its Thrift header followed by, for each row, a
4-byte little-endian length and the cell's bytes. Knowing every cell's length from `text_len`, the
reader can point fp16 views into the mapped file instead of copying ~90 % of the store through
pyarrow (BENCHMARKS.md: the batch path's one copy of the payload is then its gather into a batch).

Every assumption is checked: the column chunk's encodings and compression, each page header's type,
sizes, value count and encoding, and each cell's length prefix against text_len x H x 2. Anything
else (another writer's file, a future pyarrow's layout) returns None and the caller reads the
column with pyarrow, so this is a fast path, never a second format.
"""

import numpy as np
import pyarrow.parquet as pq

_DATA_PAGE, _PLAIN = 0, 0
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)


class _Bad(Exception):
    pass


def _varint(buf: np.ndarray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Bad
        b = int(buf[pos])
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(buf: np.ndarray, pos: int, kind: int) -> int:
    if kind in (_TRUE, _FALSE):
        return pos
    if kind == _BYTE:
        return pos + 1
    if kind in (_I16, _I32, _I64):
        return _varint(buf, pos)[1]
    if kind == _DOUBLE:
        return pos + 8
    if kind == _BINARY:
        n, pos = _varint(buf, pos)
        return pos + n
    if kind in (_LIST, _SET):
        head = int(buf[pos])
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        for _ in range(n):
            pos = _skip(buf, pos, elem)
        return pos
    if kind == _STRUCT:
        return _struct(buf, pos, {})[1]
    raise _Bad  # maps do not occur in page headers


def _struct(buf: np.ndarray, pos: int, want: dict) -> tuple[dict, int]:
    """Read one Thrift compact struct; `want` maps field id -> nested `want` (dict) or None (an integer)."""
    got, last = {}, 0
    while True:
        if pos >= len(buf):
            raise _Bad
        head = int(buf[pos])
        pos += 1
        kind = head & 0x0F
        if kind == _STOP:
            return got, pos
        if head >> 4:
            fid = last + (head >> 4)
        else:
            raw, pos = _varint(buf, pos)
            fid = _zigzag(raw)
        last = fid
        if fid in want and kind == _STRUCT and isinstance(want[fid], dict):
            got[fid], pos = _struct(buf, pos, want[fid])
        elif fid in want and kind in (_I32, _I64) and want[fid] is None:
            raw, pos = _varint(buf, pos)
            got[fid] = _zigzag(raw)
        else:
            pos = _skip(buf, pos, kind)


# PageHeader: 1 type, 2 uncompressed_page_size, 3 compressed_page_size, 5 data_page_header
# (DataPageHeader: 1 num_values, 2 encoding).
_PAGE_HEADER = {1: None, 2: None, 3: None, 5: {1: None, 2: None}}


def hidden_cells(file_bytes: np.ndarray, row_group: "pq.RowGroupMetaData", column: int, cell_bytes: np.ndarray):
    """One row group's `text_hidden` cells as fp16 views into `file_bytes` (the mapped file, uint8), or None
    when the column chunk is not laid out as this module expects. `cell_bytes[i]` is text_len[i] x H x 2."""
    try:
        return _cells(file_bytes, row_group, column, cell_bytes)
    except (_Bad, IndexError, ValueError, OverflowError):
        return None


def _cells(file_bytes, row_group, column, cell_bytes):
    meta = row_group.column(column)
    if (meta.compression != "UNCOMPRESSED" or meta.physical_type != "BYTE_ARRAY" or meta.has_dictionary_page
            or set(meta.encodings) - {"PLAIN", "RLE", "BIT_PACKED"}):
        return None
    pos, end = meta.data_page_offset, meta.data_page_offset + meta.total_compressed_size
    if end > len(file_bytes) or len(cell_bytes) != row_group.num_rows:
        return None
    cells = np.empty(len(cell_bytes), dtype=object)
    row = 0
    while row < len(cell_bytes):
        header, pos = _struct(file_bytes, pos, _PAGE_HEADER)
        data = header.get(5, {})
        size = header.get(3)
        if header.get(1) != _DATA_PAGE or size is None or header.get(2) != size or data.get(2) != _PLAIN:
            return None
        n = data.get(1, -1)
        if not 0 < n <= len(cell_bytes) - row or pos + size > end:
            return None
        lengths = cell_bytes[row : row + n].astype(np.int64)
        starts = pos + 4 * np.arange(1, n + 1) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if int(starts[-1] + lengths[-1]) != pos + size:
            return None
        prefix = starts[:, None] - 4 + np.arange(4)
        stored = file_bytes[prefix].astype(np.int64) @ np.array([1, 1 << 8, 1 << 16, 1 << 24], dtype=np.int64)
        if not np.array_equal(stored, lengths):
            return None
        for i, (s, k) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            cells[row + i] = file_bytes[s : s + k].view(np.float16)
        row += n
        pos += size
    return cells
