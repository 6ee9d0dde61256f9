"""Atomic writes, the one way every stage writes a file or folder that others may read.

Write to a hidden temp name beside the destination, fsync, rename over the destination, fsync the
folder. A killed process leaves at most a `.tmp-PID-NAME` entry, never a half-written file under
the real name: readers see the old version or the new one.
"""

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # leading ".": hidden from globs such as *.parquet


def temp_path(dest: Path) -> Path:
    """The temp name of `dest` for this process: `.tmp-PID-NAME` in the same folder (same filesystem)."""
    return dest.with_name(f"{TEMP_PREFIX}{os.getpid()}-{dest.name}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file() or p.is_dir():
            fsync_path(p)


@contextmanager
def atomic_path(dest: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temp path to write `dest` through; on success it replaces `dest`, on error it is removed.

    For a file, the temp path does not exist yet (open it or hand it to a writer such as
    `pq.write_table`). With `directory=True` it is an empty folder, and an existing `dest` folder is
    swapped out, then removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        # os.mkdir, not tempfile.mkdtemp: mkdtemp makes 0700 folders, which the rename would hand on (an exported
        # prior readable by its owner only); mkdir applies the umask like any folder the user makes
        tmp = dest.with_name(f"{TEMP_PREFIX}{os.getpid()}-{dest.name}.{secrets.token_hex(4)}")
        tmp.mkdir()
    else:
        tmp = temp_path(dest)
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and dest.exists():
            old = temp_path(dest.with_name(dest.name + ".old"))
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_path(dest.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
