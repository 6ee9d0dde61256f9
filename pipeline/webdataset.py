"""Webdataset sources (image-text tars: the cc3m / cc12m copies on the hub, or local tars) as image shards.

:func:`materialize_webdataset` is how the download stage fetches such a source: each tar is
downloaded once (``hf_hub_download``) straight into the image folder under the shard name the
encode stage reads (``NNNNN.tar``), with the per-shard ``NNNNN.parquet`` and, last,
``NNNNN_stats.json`` that img2dataset would have written (:mod:`pipeline.shards`). No url
list, no second download through img2dataset, no dead links.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DownloadError, SourceError, SourceUnavailableError
from pipeline.hub import endpoint, hub_errors, list_files, manual_hint, offline_reason
from pipeline.shards import completed_shard_ids, load_state, save_state, shard_name
from pipeline.sources import Source, local_matches, source_spec
from storage_schema import CAPTION_SEP
from storage_schema.atomic import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the encode stage decodes
# What one member of a tar may cost, whoever wrote the tar (a 10 KB sparse tar can declare a 2 GiB member):
# bigger ones are not read; the encode stage skips their sample with the reason.
MAX_MEMBER_BYTES = {"image": 32 << 20, "txt": 64 << 10, "json": 1 << 20}
HUB_STAGING = "_pipeline/hub"  # hf_hub_download's local_dir for tars in flight (resumable .incomplete files)


def _printable(name: str) -> str:
    """A member name safe to print and to store: bytes that are not UTF-8 become \\x.. escapes."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that tarfile's surrogateescape did not make
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class TarSample:
    """One sample of a webdataset tar: its members, not read yet, or why it cannot be used."""

    key: str  # printable (see _printable)
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # lower-case extension -> member to read
    problem: str | None = None  # set: the sample is skipped with this reason and none of its members is read


def _runs(tar: tarfile.TarFile) -> Iterator[tuple[str, str, list[tuple[str, tarfile.TarInfo]]]]:
    """(directory, key, [(extension, member)]): consecutive files named DIRECTORY/KEY.EXTENSION.

    A run ends where the directory or the key changes, or where an extension comes again (a second
    sample under the same name).
    """
    ident: tuple[str, str] | None = None
    run: list[tuple[str, tarfile.TarInfo]] = []
    for m in tar:
        if not m.isfile():
            continue
        directory, _, base = posixpath.normpath(m.name).rpartition("/")
        key, _, ext = base.partition(".")
        ext = ext.lower()
        if (directory, key) != ident or any(e == ext for e, _ in run):
            if ident is not None:
                yield *ident, run
            ident, run = (directory, key), []
        run.append((ext, m))
    if ident is not None:
        yield *ident, run


def tar_samples(tar: tarfile.TarFile) -> Iterator[TarSample]:
    """The samples of a webdataset tar in order, as the download index and the encode stage both read them.

    A sample is a run of consecutive members KEY.jpg, KEY.txt, KEY.json, ... (img2dataset's layout); its
    key is the base name up to the first dot, the directory left out. Whoever wrote the tar, every key
    of a shard is unique and the store's alt-caption keys (KEY#1, ...) cannot collide with one: the first
    sample of a key is kept and a later one is refused, as is a key that is not UTF-8 or holds
    CAPTION_SEP, and a sample with a member over MAX_MEMBER_BYTES. Members nothing reads are left out.
    """
    kept_in: dict[str, str] = {}  # key -> the directory of the sample kept under it
    for directory, key, run in _runs(tar):
        shown = _printable(key)
        where = f"{_printable(directory)}/" if directory else "the top level"
        problem = None
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            problem = f"member name is not UTF-8: {_printable(run[0][1].name)}"
        if problem is None and CAPTION_SEP in key:
            problem = (f"key {shown} contains {CAPTION_SEP!r}, which the store keeps for the rows of alt captions "
                       f"(KEY{CAPTION_SEP}1, KEY{CAPTION_SEP}2, ...); rename the sample")
        elif problem is None and key in kept_in:
            first = f"{kept_in[key]}/" if kept_in[key] else "the top level"
            problem = (f"duplicate key: {shown} (kept the first)" if kept_in[key] == directory else
                       f"ambiguous key: {shown} names samples in {first} and in {where} (members in "
                       "subdirectories; kept the first)")
        if problem is not None:
            yield TarSample(shown, problem=problem)
            continue
        kept_in[key] = directory
        members: dict[str, tarfile.TarInfo] = {}
        too_big: list[str] = []
        for ext, m in run:
            limit = MAX_MEMBER_BYTES.get("image" if ext in IMAGE_EXTS else ext)
            if limit is None:
                continue  # a member nothing reads (.npy, .cls, ...)
            if m.size > limit:  # e.g. a sparse member: a few KB in the tar, gigabytes once read
                too_big.append(f"{_printable(m.name)} is {m.size:,} bytes (limit {limit:,})")
            else:
                members[ext] = m
        yield TarSample(shown, members, "member too large: " + "; ".join(too_big) if too_big else None)


def index_tar(tar_path: Path, origin: str) -> tuple[pa.Table, dict[str, Any]]:
    """One row per sample of a webdataset tar (key, url, caption, status, error_message) and its stats.

    Samples are read by `tar_samples`, as the encode stage reads them; only the small members
    (captions, json) are read. A sample without an image or a caption, or one `tar_samples`
    refuses, counts as failed, the way img2dataset counts a url it could not fetch, so the
    download summary shows it.
    """
    t0 = time.monotonic()
    rows: dict[str, list[Any]] = {"key": [], "url": [], "caption": [], "status": [], "error_message": []}
    failed = 0
    with tarfile.open(tar_path) as tar:
        for s in tar_samples(tar):
            caption = url = None
            if "txt" in s.members:
                caption = tar.extractfile(s.members["txt"]).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            if "json" in s.members:
                with contextlib.suppress(ValueError, AttributeError):
                    url = json.loads(tar.extractfile(s.members["json"]).read()).get("url")  # type: ignore[union-attr]
                url = url if isinstance(url, str) else None
            problem = (s.problem or ("no image member" if not any(e in s.members for e in IMAGE_EXTS) else
                                     "no caption" if not (caption or "").strip() else None))
            failed += problem is not None
            rows["key"].append(s.key)
            rows["url"].append(url or f"{origin}#{s.key}")  # hub copies drop the source url; name the sample
            rows["caption"].append(caption)
            rows["status"].append("success" if problem is None else "failed_to_download")
            rows["error_message"].append(problem)
    count = len(rows["key"])
    stats = {"count": count, "successes": count - failed, "failed_to_download": failed,
             "failed_to_resize": 0, "duration": round(time.monotonic() - t0, 3), "source": origin}
    return pa.table(rows, schema=pa.schema([(c, pa.string()) for c in rows])), stats


def _place(src: Path, dest: Path, move: bool) -> None:
    """Put a tar at its shard name: rename (a staged download), else hard link, else copy; atomic."""
    if move:
        os.replace(src, dest)
        return
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(src, tmp)


def _wds_state(src: Source, out: Path, incremental_mode: str) -> dict[str, Any]:
    """The shard list of this folder: read back on a rerun (no network), else listed once and recorded."""
    spec = source_spec(src)
    state = load_state(out)
    if state is not None:
        if state.get("source_spec") == spec and incremental_mode != "overwrite":
            return state
        if incremental_mode != "overwrite":
            raise DownloadError(
                f"{out} holds a download of another source ({state.get('url_list')}); use a new folder or "
                "incremental_mode='overwrite' (--overwrite)"
            )
    if incremental_mode == "overwrite" and out.exists():
        shutil.rmtree(out)
    if completed_shard_ids(out):
        raise DownloadError(f"{out} already holds shards from an unknown source; use a new folder or --overwrite")
    local = local_matches(src)
    if local:
        commit, files = None, [{"path": str(p), "size": p.stat().st_size, "local": True} for p in local]
        origin = str(Path(src.metadata_dir or "").expanduser())
    elif src.hub_repo:
        commit, listed = list_files(src.hub_repo, src.hub_pattern or "*.tar", src.hub_revision)
        files = [{"path": f.path, "size": f.size, "local": False} for f in listed]
        origin = f"hf://datasets/{src.hub_repo}@{commit}"
    else:
        commit, files = None, [{"path": f, "size": Path(f).stat().st_size, "local": True} for f in src.files]
        origin = "local"
    if src.max_files is not None:
        files = files[:src.max_files]
    state = {"kind": "webdataset", "source": src.name, "source_spec": spec, "url_list": origin,
             "url_list_fingerprint": None, "rows": None, "number_sample_per_shard": None,
             "hub_repo": src.hub_repo, "commit": commit, "files": files, "primary_shards": len(files),
             "retries": []}
    save_state(out, state)
    return state


def materialize_webdataset(src: Source, out_dir: str | os.PathLike[str], incremental_mode: str = "incremental") -> None:
    """Lay a webdataset source out as an image-shard folder the encode stage reads.

    Shard ``i`` is the ``i``-th tar of the source (sorted by path, recorded in
    ``_pipeline/download_state.json`` at the first run): ``NNNNN.tar``, then
    ``NNNNN.parquet`` (one row per sample), then ``NNNNN_stats.json``, each written
    atomically; the stats file, written last, marks the shard complete. A rerun skips
    complete shards without asking the hub, and resumes a tar cut off mid-download
    (huggingface_hub keeps the partial file). Hub tars are downloaded straight into the
    folder (not into the HF cache: one copy of a terabyte is enough); hand-placed tars
    (``metadata_dir``) are hard-linked, or copied across filesystems.
    """
    from huggingface_hub import hf_hub_download

    if src.kind != "webdataset":
        raise SourceError(f"source {src.name!r} is a url list, not a webdataset; use the download stage")
    out = Path(out_dir).resolve()
    state = _wds_state(src, out, incremental_mode)
    done = set(completed_shard_ids(out))
    todo = [i for i in range(state["primary_shards"]) if i not in done]
    log.info("%s -> %s: %d tar(s), %d to fetch", state["url_list"], out, state["primary_shards"], len(todo))
    for n, i in enumerate(todo, start=1):
        f = state["files"][i]
        name = shard_name(i)
        dest = out / f"{name}.tar"
        if not (dest.exists() and dest.stat().st_size == f["size"]):  # a tar placed before a kill is kept
            if f["local"]:
                _place(Path(f["path"]), dest, move=False)
            else:
                log.info("%s: tar %d/%d %s", src.hub_repo, n, len(todo), f["path"])
                pattern = src.hub_pattern or "*.tar"
                if (reason := offline_reason()) is not None:
                    raise SourceUnavailableError(f"dataset {src.hub_repo}: {len(todo) - n + 1} tar(s) still to "
                                                 f"download but {reason}; " + manual_hint(src.hub_repo, pattern))
                with hub_errors(src.hub_repo, pattern):  # type: ignore[arg-type]
                    staged = hf_hub_download(src.hub_repo, f["path"], repo_type="dataset", revision=state["commit"],
                                             local_dir=out / HUB_STAGING, endpoint=endpoint())
                _place(Path(staged), dest, move=True)
        table, stats = index_tar(dest, f"{state['url_list']}/{Path(f['path']).name}")
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(out / f"{name}.parquet", buf.getvalue())
        atomic_write_bytes(out / f"{name}_stats.json", json.dumps(stats, indent=2).encode())
