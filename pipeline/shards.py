"""The image-shard folder that both download paths write and the encode stage reads.

img2dataset's layout (``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``, the stats
file written last) is also what :mod:`pipeline.webdataset` lays a webdataset source out as;
``_pipeline/`` holds our own files, among them the download state (which list or tars the
shard ids were cut from), so a rerun resumes and a different source is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from storage_schema.atomic import atomic_write_text

META_DIR = "_pipeline"
STATE_PATH = f"{META_DIR}/download_state.json"
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5 digits (00000.tar)
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def completed_shard_ids(out_dir: str | os.PathLike[str]) -> list[int]:
    """Shard ids whose ``NNNNN_stats.json`` exists: the only shards safe to read downstream."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _STATS_RE.match(p.name)))


def completed_shards(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Tar paths of complete shards (for the encode stage: a tar without stats may be half-written)."""
    out = Path(out_dir)
    return [t for i in completed_shard_ids(out) if (t := out / f"{shard_name(i)}.tar").exists()]


def shard_fingerprint(tar: Path) -> str:
    """Which download wrote this finished shard: its stats file (img2dataset's carries the run's start
    time) and the tar's size. Cheap, so every rerun can check every shard without reading a tar."""
    import hashlib

    stats = tar.with_name(f"{tar.name.removesuffix('.tar')}_stats.json")
    marker = stats.read_bytes() if stats.exists() else b""  # encode_shard also takes a bare tar
    return f"{hashlib.sha256(marker).hexdigest()[:16]}-{tar.stat().st_size}"


def partial_shard_ids(out: Path, done: set[int]) -> list[int]:
    """Ids of shards with a tar or parquet but no stats file (not in ``done``): killed mid-shard."""
    ids = set()
    for p in out.iterdir():
        stem, _, ext = p.name.partition(".")
        if ext in ("tar", "parquet") and stem.isdigit() and int(stem) not in done:
            ids.add(int(stem))
    return sorted(ids)


def load_state(out: Path) -> dict[str, Any] | None:
    p = out / STATE_PATH
    return json.loads(p.read_text()) if p.exists() else None


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / STATE_PATH, json.dumps(state, indent=2))
