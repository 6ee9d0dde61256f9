"""Download stage: a url list -> webdataset image shards, with img2dataset.

Layout of ``out_dir`` (img2dataset's, plus one folder of ours)::

    00000.tar            webdataset shard: KEY.jpg, KEY.txt (caption), KEY.json (metadata)
    00000.parquet        one row per url of the shard: url, caption, extras, key, status,
                         error_message, width, height, ... (failed urls included)
    00000_stats.json     written LAST by img2dataset, after the tar and parquet are closed:
                         its presence is what marks the shard complete
    _tmp/                img2dataset's scratch (sharded input); removed at the end of a run
    _pipeline/           ours: url_list.parquet, download_state.json,
                         download_summary.json, retry-NNN.parquet

How resume works (img2dataset 1.47, ``main.download``): with
``incremental_mode="incremental"`` it globs ``out_dir/*.json``, parses the shard id
from each name (``int(name.split("_")[0])``) and skips those shard ids; shard ``i``
is always rows ``[i*N, (i+1)*N)`` of the url list (``N = number_sample_per_shard``).
So a rerun with the same url list and ``N`` downloads only shards without a
``_stats.json``; a shard killed half-way has no stats file and is redone from
scratch (its tar/parquet are overwritten). Two consequences:

* nothing of ours may be a ``*.json`` directly in ``out_dir`` (img2dataset would
  crash parsing ``int("download")``), hence the ``_pipeline/`` folder and
  :data:`SUMMARY_PATH` instead of ``out_dir/download_summary.json``;
* the url list and ``N`` must not change between runs: we record a fingerprint of
  the list in ``_pipeline/download_state.json`` and refuse a mismatch.

Retries (:func:`retry_failed`) use img2dataset's ``"extend"`` mode: it starts the
new shard ids at ``max(existing stats ids) + 1``, so retry shards never collide
with the original ones, and keys stay unique because the key is
``shard_id * 10**ceil(log10(N)) + row`` with the same ``N``.

img2dataset runs in a child process of ours (:func:`_run_img2dataset`), which spawns its
worker pool with the ``spawn`` start method: a script that calls :func:`download` needs the
usual ``if __name__ == "__main__":`` guard. That child leads a new session, so a terminal's
Ctrl-C reaches only the caller (one ``KeyboardInterrupt``, not one traceback per worker); the
caller then stops the child, which stops its whole process group, and the child does the same
when the caller dies (SIGKILL included): no worker outlives the download.

Hostile servers: img2dataset's timeout is per socket read and it reads a body whole, so a
server trickling a byte every few seconds, or sending an endless body, would hold a worker
forever. In the workers, each url's fetch is replaced (:class:`_LimitedDownloader`) by one
that stops at ``max_image_bytes`` and after ``max_download_seconds`` in all; the url fails
with the reason (``body over 32 MiB``, ``download took over 30 s``) and the shard goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import importlib
import io
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pipeline.download_summary import DownloadSummary, failure_category, format_summary, summarize
from pipeline.errors import DownloadError
from pipeline.shards import (
    META_DIR,
    OOM_SHARD_COUNT,
    STATE_PATH,
    completed_shard_ids,
    load_state,
    partial_shard_ids,
    save_state,
    shard_name,
)
from pipeline.sources import WEB_URL, prepare_url_list, read_url_list_report, resolve_source, source_spec
from pipeline.webdataset import MAX_MEMBER_BYTES, materialize_webdataset
from storage_schema.atomic import atomic_path, atomic_write_text

# albumentations (imported by img2dataset) checks PyPI for updates at import time: a
# network call on every worker start, slow or hanging offline. Set before the import;
# img2dataset's spawned workers inherit os.environ.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)

SUMMARY_PATH = f"{META_DIR}/download_summary.json"
URL_LIST_PATH = f"{META_DIR}/url_list.parquet"


class DownloadFailed(DownloadError):
    """The download ran but failed as a whole: no url succeeded, or more failed than allowed.

    ``summary`` is the run's :class:`DownloadSummary` (per-reason failure counts included).
    """

    def __init__(self, message: str, summary: DownloadSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class DownloadConfig:
    """img2dataset settings that matter for this pipeline (``extra`` passes any other one through)."""

    image_size: int = 256
    # center_crop stores image_size x image_size squares: the same geometry as CLIP's own
    # preprocessing (shortest side resize + center crop), so encoding at 224 px sees what
    # CLIP would have seen on the original; "border" would add black bars CLIP never saw.
    resize_mode: str = "center_crop"
    resize_only_if_bigger: bool = False
    processes_count: int = field(default_factory=lambda: max(1, min(16, os.cpu_count() or 1)))
    thread_count: int = 64
    number_sample_per_shard: int = 10_000
    incremental_mode: str = "incremental"  # or "overwrite" (wipes out_dir first)
    timeout: int = 10  # seconds per socket read (urllib's timeout): a url that trickles bytes never hits it
    # One url's whole fetch (connect, headers, body) is cut after this many seconds; None: 3 x timeout.
    max_download_seconds: float | None = None
    # A body over this fails its url ("body over 32 MiB") without being read further: the same
    # ceiling as an image member of a tar (pipeline.webdataset).
    max_image_bytes: int = MAX_MEMBER_BYTES["image"]
    retries: int = 0  # immediate per-url retries inside img2dataset
    max_shard_retry: int = 1  # img2dataset's retry of whole shards that raised
    encode_format: str = "jpg"
    encode_quality: int = 95
    output_format: str = "webdataset"
    min_image_size: int = 0
    extract_exif: bool = False  # EXIF is large and unused downstream
    compute_hash: str | None = "sha256"
    error_rate_warning: float = 0.2  # logging.warning when the error rate exceeds this
    # The stage fails (DownloadFailed) when more than this fraction of the unique urls is still
    # missing after the run: LAION-sized lists lose 10-30 % to dead links, so 0.5 means
    # "something is wrong with the network or the list", not "the web rotted".
    max_error_rate: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)  # other img2dataset.download kwargs
    # img2dataset opens any scheme urllib does (file://, ftp://, data:): only http(s) rows are downloaded unless
    # this is set, for a url list you wrote yourself (pipeline.sources.Source.allow_local_files)
    allow_local_files: bool = False

    def __post_init__(self) -> None:
        if self.incremental_mode not in ("incremental", "overwrite"):
            raise ValueError(f"incremental_mode must be 'incremental' or 'overwrite', not {self.incremental_mode!r}")
        if self.image_size <= 0 or self.number_sample_per_shard <= 0:
            raise ValueError("image_size and number_sample_per_shard must be positive")
        if not 0.0 <= self.error_rate_warning <= 1.0 or not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("error_rate_warning and max_error_rate are fractions in [0, 1]")
        if self.timeout <= 0 or self.max_image_bytes <= 0 or (
            self.max_download_seconds is not None and self.max_download_seconds <= 0
        ):
            raise ValueError("timeout, max_download_seconds and max_image_bytes must be positive")

    @property
    def download_seconds(self) -> float:
        """The cap on one url's whole fetch."""
        return self.max_download_seconds if self.max_download_seconds is not None else 3.0 * self.timeout


# ---------------------------------------------------------------------------- helpers


def _wipe(path: Path, keep: Path) -> None:
    """Delete everything under path except the file keep (and the folders leading to it)."""
    for p in path.iterdir():
        if p == keep:
            continue
        if p.is_dir() and not p.is_symlink():
            if keep.is_relative_to(p):
                _wipe(p, keep)
            else:
                shutil.rmtree(p)
        else:
            p.unlink()


def _check_schemes(url_list: Path, allow_local_files: bool) -> None:
    """Refuse a url list with rows that are not http(s) (a list prepared elsewhere: `prepare_url_list` drops them)."""
    if allow_local_files:
        return
    import pyarrow.compute as pc

    refused, examples = 0, []
    for batch in pq.ParquetFile(url_list).iter_batches(columns=["url"], batch_size=65536):
        urls = batch.column(0)
        bad = pc.invert(pc.fill_null(pc.match_substring_regex(urls, WEB_URL), False))
        refused += pc.sum(bad).as_py() or 0
        examples += urls.filter(bad).to_pylist()[: 3 - len(examples)]
    if refused:
        raise DownloadError(f"{url_list}: {refused} url(s) are not http(s) (e.g. {examples}); a url list can name "
                            "local files (file://), which would be read into the shards. Drop those rows, or pass "
                            "--allow-local-files (DownloadConfig(allow_local_files=True)) for a list you wrote")


def _fingerprint(url_list: Path) -> tuple[str, int]:
    """sha256 over the url column in order (what shard ids are derived from) and the row count."""
    h = hashlib.sha256()
    rows = 0
    pf = pq.ParquetFile(url_list)
    for batch in pf.iter_batches(columns=["url"], batch_size=65536):
        urls = batch.column(0).to_pylist()
        rows += len(urls)
        h.update("\n".join(urls).encode())
        h.update(b"\n")
    return h.hexdigest(), rows


def _url_list_columns(url_list: Path) -> tuple[str, str, list[str]]:
    names = pq.read_schema(url_list).names
    if "url" not in names:
        raise DownloadError(
            f"{url_list}: no 'url' column (columns: {names}); build the list with "
            "pipeline.sources.prepare_url_list or call download_main"
        )
    caption = "caption" if "caption" in names else None
    if caption is None:
        raise DownloadError(f"{url_list}: no 'caption' column (columns: {names})")
    extras = [c for c in names if c not in ("url", "caption") and not c.startswith("__index_level_")]
    return "url", caption, extras


# ---------------------------------------------------------------------------- running img2dataset


# DownloadConfig fields that are img2dataset.download keywords of the same name and meaning.
_PASSED_THROUGH = ("image_size", "resize_mode", "resize_only_if_bigger", "processes_count", "thread_count",
                   "number_sample_per_shard", "timeout", "retries", "max_shard_retry", "encode_format",
                   "encode_quality", "output_format", "min_image_size", "extract_exif", "compute_hash")


def _img2dataset_kwargs(url_list: Path, out: Path, config: DownloadConfig, extras: list[str],
                        incremental_mode: str) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        url_list=str(url_list),
        output_folder=str(out),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=list(extras) or None,
        incremental_mode=incremental_mode,
        oom_shard_count=OOM_SHARD_COUNT,
        enable_wandb=False,
        distributor="multiprocessing",
        **{name: getattr(config, name) for name in _PASSED_THROUGH},
    )
    kw.update(config.extra)
    return kw


# ---------------------------------------------------------------------------- bounded fetches (img2dataset's workers)

_CHUNK = 1 << 16
# img2dataset's own user agent (downloader.download_image): servers see the same client as before.
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def _size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class _Deadline:
    """One url's connections, shut down by a timer when its time is up.

    urllib's timeout bounds each socket read, not the fetch. Shutting a socket down makes a read
    blocked on it return at once, wherever it is (headers, body, a redirect). Each socket is held
    through a duplicate of its descriptor (TLS wraps and detaches the original), closed when the
    fetch ends: a descriptor number the system has since reused is never shut.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def connect(self, *args: Any, **kwargs: Any) -> socket.socket:
        """``socket.create_connection``, for http.client's connections of this fetch."""
        sock = socket.create_connection(*args, **kwargs)
        with self._lock:
            self._socks.append(sock.dup())
            if self.expired:
                self._shut()
        return sock

    def _shut(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the server

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


class _DeadlineHandler:
    """An HTTP(S) handler whose connections open their sockets through ``deadline.connect``."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        def connection(*args: Any, **conn_kwargs: Any) -> http.client.HTTPConnection:
            conn = http_class(*args, **conn_kwargs)
            conn._create_connection = self.deadline.connect  # the one hook http.client has for its socket
            return conn

        return super().do_open(connection, req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


def _fetch(row: tuple[int, str], timeout: float, user_agent_token: str | None,
           disallowed_header_directives: set[str] | None, *, max_bytes: int,
           max_seconds: float) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's ``downloader.download_image`` (same arguments and result), with its bytes and time bounded."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    too_big = f"body over {_size_text(max_bytes)} (max_image_bytes)"
    deadline = _Deadline(max_seconds)
    # build_opener keeps its other default handlers (proxies from the environment, file:, redirects): as urlopen
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
    try:
        request = urllib.request.Request(url, headers={"User-Agent": agent})  # raises on a url it cannot parse
        with deadline, opener.open(request, timeout=timeout) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            declared = r.headers.get("Content-Length", "").strip()
            if declared.isdigit() and int(declared) > max_bytes:
                return key, None, too_big
            body = io.BytesIO()
            while chunk := r.read(_CHUNK):
                body.write(chunk)
                if body.tell() > max_bytes:
                    return key, None, too_big
            if deadline.expired:  # the cut socket ended a body of unknown length early
                raise TimeoutError
        body.seek(0)
        return key, body, None
    except Exception as err:  # img2dataset records any error as the url's failure
        if deadline.expired:
            return key, None, f"download took over {max_seconds:g} s (max_download_seconds): timed out"
        return key, None, str(err)


PROGRESS_EVERY_S = 30.0  # a shard of 10,000 urls takes minutes: say how far it got, this often


class ShardProgress:
    """A line on stderr at most every `interval` seconds while a shard downloads: its urls fetched so far."""

    def __init__(self, shard_id: int, interval: float = PROGRESS_EVERY_S) -> None:
        self.shard, self.interval = shard_name(shard_id), interval
        self.done = self.ok = 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()  # img2dataset fetches a shard's urls in threads

    def tick(self, ok: bool) -> None:
        with self.lock:
            self.done += 1
            self.ok += ok
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
            line = (f"download shard {self.shard}: {self.done:,} urls fetched ({self.ok:,} ok) in "
                    f"{now - self.t0:.0f} s")
        print(line, file=sys.stderr, flush=True)


def _fetch_counted(row: tuple[int, str], *args: Any, progress: ShardProgress, **kw: Any
                   ) -> tuple[int, io.BytesIO | None, str | None]:
    result = _fetch(row, *args, **kw)
    progress.tick(result[2] is None)
    return result


class _LimitedDownloader:
    """img2dataset's ``Downloader`` (one call per shard) whose url fetches are :func:`_fetch`.

    Built in our img2dataset child in place of ``Downloader`` and pickled to each pool worker
    (spawned: nothing patched in the parent reaches them), so the fetch is replaced in the
    process that runs the shard, whichever that is.
    """

    def __init__(self, max_bytes: int, max_seconds: float, **kwargs: Any) -> None:
        from img2dataset.downloader import Downloader

        self.downloader = Downloader(**kwargs)
        self.max_bytes, self.max_seconds = max_bytes, max_seconds

    def __call__(self, row: Any) -> Any:
        # The shard's ThreadPool takes its locks from the default context, spawn here: named semaphores,
        # which a worker stopped by SIGTERM would leave to the resource tracker (and its "leaked semaphore"
        # warning). Threads need no names; "fork" locks are unlinked as soon as they are made.
        multiprocessing.set_start_method("fork", force=True)
        module = importlib.import_module("img2dataset.downloader")
        module.download_image = functools.partial(_fetch_counted, progress=ShardProgress(row[0]),
                                                  max_bytes=self.max_bytes, max_seconds=self.max_seconds)
        return self.downloader(row)


# ---------------------------------------------------------------------------- the img2dataset child


_STOP_GRACE_S = 20.0  # after SIGTERM, how long the child may take to stop before it is killed outright


def _stop(signum: int, frame: object) -> None:
    """SIGTERM in the child: kill img2dataset's pool and logger, then exit through Python's shutdown.

    Exiting normally (not by SIGKILL) releases the pool's named semaphores: killed, they would be left
    to the resource tracker, which cleans them up with a "leaked semaphore" warning on the terminal.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)  # the whole group but this process, which now ignores it
    raise SystemExit(128 + signum)


def _die_with(parent: int) -> None:
    """Stop this process group (this process and img2dataset's pool) once ``parent`` is gone, SIGKILL included."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_STOP_GRACE_S)
    os.killpg(0, signal.SIGKILL)


def _child_download(kwargs: dict[str, Any], max_bytes: int, max_seconds: float, parent: int) -> None:
    # A session of its own: a terminal's Ctrl-C goes to the caller alone (one KeyboardInterrupt, not one
    # traceback per worker), and the group reaches img2dataset's pool and logger process, which inherit it.
    os.setsid()
    signal.signal(signal.SIGTERM, _stop)
    threading.Thread(target=_die_with, args=(parent,), name="die-with-parent", daemon=True).start()
    main = importlib.import_module("img2dataset.main")  # the package's `main` attribute is a function
    main.Downloader = functools.partial(_LimitedDownloader, max_bytes, max_seconds)
    main.download(**kwargs)


def _run_img2dataset(kwargs: dict[str, Any], config: DownloadConfig) -> None:
    """img2dataset.download(**kwargs) in a child process that takes its workers with it when stopped.

    Always a child: img2dataset's SIGINT handler exits with status 0 (an interrupted download
    would look finished), Prefect / Dask call from worker threads where signal.signal() fails,
    and the child's process group is what lets an interrupt stop every worker.
    """
    proc = multiprocessing.get_context("spawn").Process(
        target=_child_download, name="img2dataset",
        args=(kwargs, config.max_image_bytes, config.download_seconds, os.getpid()),
    )
    proc.start()
    try:
        proc.join()
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or any other way out: no worker may go on
        proc.terminate()
        proc.join(_STOP_GRACE_S)
        if proc.exitcode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # no group yet: the child has not started anything
                proc.kill()
            proc.join()
        shutil.rmtree(Path(kwargs["output_folder"]) / "_tmp", ignore_errors=True)  # as img2dataset's own handler
        raise
    if proc.exitcode != 0:
        # Not a DownloadError: a killed child (OOM, signal) may well succeed when run again.
        raise RuntimeError(f"img2dataset child process exited with status {proc.exitcode}; rerun to resume")


def _reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in reasons.items()) or "none recorded"


def _unmark_failed_run(out: Path, summary: DownloadSummary) -> None:
    """When no url of the last run succeeded, remove its shards instead of keeping them as complete.

    img2dataset writes a ``_stats.json`` (the completion mark) even when every url of a shard
    failed; kept, a run without network would make every rerun skip those rows for good. A run
    that fetched anything keeps its shards (a shard of dead links is complete; its urls stay
    in the summary for :func:`retry_failed`). The failures stay counted in this run's summary.
    """
    new = [s for s in summary.shards if s.shard_id in set(summary.new_shards)]
    if not new or sum(s.count for s in new) == 0 or any(s.successes for s in new):
        return
    for s in new:
        name = shard_name(s.shard_id)
        (out / f"{name}_stats.json").unlink(missing_ok=True)  # the mark first: a crash here leaves a partial shard
        for ext in (".tar", ".parquet"):
            (out / f"{name}{ext}").unlink(missing_ok=True)
    summary.unmarked_shards, summary.new_shards = summary.new_shards, []
    summary.warnings.append(f"no url of this run succeeded: its {len(new)} shard(s) were not marked complete, "
                            "so rerunning the same download retries them")


def check_summary(summary: DownloadSummary, config: DownloadConfig) -> None:
    """Raise :class:`DownloadFailed` when no url of the last run succeeded or too many urls are missing."""
    where = f"download into {summary.out_dir}"
    reasons = f"failed by reason: {_reasons_text(summary.failure_reasons)}"
    if summary.unmarked_shards:
        attempts = sum(s.count for s in summary.shards if s.shard_id in set(summary.unmarked_shards))
        raise DownloadFailed(
            f"{where}: all {attempts} url(s) of this run failed ({reasons}). No shard was marked complete, so "
            f"rerunning the same download retries them. dns_error/connection_error/timeout everywhere usually "
            f"means no network (or the image host is down); http_403/http_404 means the links are dead.",
            summary,
        )
    if summary.effective_error_rate > config.max_error_rate:
        raise DownloadFailed(
            f"{where}: {summary.unresolved_failures} of {summary.unique_urls} urls "
            f"({summary.effective_error_rate:.1%}) failed, above the maximum error rate "
            f"{config.max_error_rate:.0%} (still missing by reason: {_reasons_text(summary.unresolved_reasons)}). "
            f"Details in {Path(summary.out_dir) / SUMMARY_PATH}. Retry the failed urls (`--retry-failed` of "
            f"`eclipse-prior download` or `precompute`, flow parameter download.retry_failed), or accept these "
            f"losses with a higher --max-error-rate (flow parameter download.max_error_rate).",
            summary,
        )


def _finish(out: Path, before: set[int], t0: float, config: DownloadConfig, check: bool,
            retry: bool = False) -> DownloadSummary:
    summary = summarize(out, error_rate_warning=config.error_rate_warning)
    summary.new_shards = [s.shard_id for s in summary.shards if s.shard_id not in before]
    if not retry:  # a retry of dead links failing again is expected; the error-rate check judges it
        _unmark_failed_run(out, summary)
    summary.run_seconds = round(time.monotonic() - t0, 3)
    atomic_write_text(out / SUMMARY_PATH, summary.to_json())
    print(format_summary(summary))
    for w in summary.warnings:
        log.warning("%s: %s", out, w)
    if check:
        check_summary(summary, config)
    return summary


# ---------------------------------------------------------------------------- entry points


def download(url_list: str | os.PathLike[str], out_dir: str | os.PathLike[str],
             config: DownloadConfig | None = None, *, check: bool = True) -> DownloadSummary:
    """Download a prepared url list (Parquet: url, caption, extras) into webdataset shards.

    Resumable: rerunning with the same list skips complete shards. Refuses to mix a
    different url list or shard size into an existing out_dir (shard ids would no
    longer mean the same rows) unless ``incremental_mode="overwrite"``. A shard in which
    no url succeeded is not kept as complete (a rerun fetches it again). With ``check``,
    raises :class:`DownloadFailed` (after writing the summary) when no url of this run
    succeeded or more than ``config.max_error_rate`` of the urls are missing.
    """
    config = config or DownloadConfig()
    t0 = time.monotonic()
    url_list, out = Path(url_list).resolve(), Path(out_dir).resolve()
    if not url_list.is_file():
        raise DownloadError(f"url list {url_list} does not exist")
    _, _, extras = _url_list_columns(url_list)
    _check_schemes(url_list, config.allow_local_files)
    fingerprint, rows = _fingerprint(url_list)
    if rows == 0:
        raise DownloadError(f"{url_list}: empty url list")
    if config.incremental_mode == "overwrite" and out.exists():
        # img2dataset's own "overwrite" would delete our _pipeline/ too, mid-run; wipe first, then
        # run incrementally into the empty folder (equivalent, and the state is written before).
        _wipe(out, keep=url_list)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    n = config.number_sample_per_shard
    if state is not None:
        if state["url_list_fingerprint"] != fingerprint or state["number_sample_per_shard"] != n:
            raise DownloadError(
                f"{out} holds a download of a different url list or shard size "
                f"({state['url_list']}, {state['rows']} rows, {state['number_sample_per_shard']}/shard); "
                "resuming would mix rows under the same shard ids. Use a new out_dir or "
                "incremental_mode='overwrite'."
            )
    else:
        if completed_shard_ids(out):
            raise DownloadError(f"{out} already holds shards from an unknown url list; use a new out_dir "
                                "or incremental_mode='overwrite'")
        state = {
            "url_list": str(url_list), "url_list_fingerprint": fingerprint, "rows": rows,
            "number_sample_per_shard": n, "primary_shards": math.ceil(rows / n),
            "oom_shard_count": OOM_SHARD_COUNT, "extra_columns": extras,
            "url_list_report": read_url_list_report(url_list), "retries": [],
        }
        save_state(out, state)
    before = set(completed_shard_ids(out))
    todo = [i for i in range(state["primary_shards"]) if i not in before]
    log.info("download %s -> %s: %d rows, %d shards, %d to do", url_list, out, rows, state["primary_shards"],
             len(todo))
    _run_img2dataset(_img2dataset_kwargs(url_list, out, config, extras, "incremental"), config)
    return _finish(out, before, t0, config, check)


def retry_failed(out_dir: str | os.PathLike[str], config: DownloadConfig | None = None, *,
                 reasons: set[str] | None = None, check: bool = True) -> DownloadSummary:
    """Download again the urls that failed (and never succeeded) in out_dir, as new shards.

    The failed rows are read back from the per-shard parquets (url, caption and the
    extra columns are all there), written to ``_pipeline/retry-NNN.parquet`` and
    downloaded with img2dataset's ``"extend"`` mode: new shard ids start after the
    largest complete one, so nothing is overwritten. ``reasons`` limits the retry to
    some failure categories (e.g. ``{"timeout", "http_5xx", "connection_error"}``;
    see :func:`failure_category`). Running it again after an interrupted retry
    re-feeds whatever is still failed. Requires the main download to be complete,
    because an extend run would otherwise take shard ids the main list still needs.
    ``check`` as in :func:`download`.
    """
    config = config or DownloadConfig()
    t0 = time.monotonic()
    out = Path(out_dir).resolve()
    state = load_state(out)
    if state is None:
        raise DownloadError(f"{out}: no {STATE_PATH}; retry_failed works on folders written by download()")
    before = set(completed_shard_ids(out))
    missing = [i for i in range(state["primary_shards"]) if i not in before]
    if missing:
        raise DownloadError(f"{out}: {len(missing)} shard(s) of the url list are not complete yet "
                            f"(e.g. {missing[:5]}); rerun download() first, then retry_failed()")
    # Same shard size as the main run: keys are shard_id * 10**ceil(log10(N)) + row, so a
    # different N could give two samples the same key.
    config = dataclasses.replace(config, number_sample_per_shard=state["number_sample_per_shard"],
                                 incremental_mode="incremental")
    extras = list(state.get("extra_columns", []))
    frames, succeeded = [], set()
    for sid in sorted(before):
        p = out / f"{shard_name(sid)}.parquet"
        if not p.exists():
            continue
        cols = [c for c in ["url", "caption", *extras, "status", "error_message"] if c in pq.read_schema(p).names]
        df = pd.read_parquet(p, columns=cols)
        succeeded.update(df.loc[df["status"] == "success", "url"])
        frames.append(df[df["status"] != "success"])
    failed = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["url", "caption"])
    failed = failed[~failed["url"].isin(succeeded)].drop_duplicates("url", keep="last")
    if reasons is not None:
        cats = [failure_category(s, m) for s, m in zip(failed["status"], failed["error_message"], strict=True)]
        failed = failed[[c in reasons for c in cats]]
    if failed.empty:
        log.info("%s: no failed urls to retry", out)
        return _finish(out, before, t0, config, check, retry=True)
    # Half-written shards (no stats) can only come from a killed earlier retry here, since the
    # main list is complete; delete them so they are not mistaken for data.
    for sid in partial_shard_ids(out, before):
        for ext in (".tar", ".parquet"):
            (out / f"{shard_name(sid)}{ext}").unlink(missing_ok=True)
    attempt = len(state.get("retries", [])) + 1
    retry_list = out / META_DIR / f"retry-{attempt:03d}.parquet"
    failed = failed.drop(columns=[c for c in ("status", "error_message") if c in failed]).reset_index(drop=True)
    with atomic_path(retry_list) as tmp:
        failed.to_parquet(tmp, index=False)
    first_id = max(before) + 1 if before else 0
    log.info("%s: retrying %d failed url(s) as shards from %s", out, len(failed), shard_name(first_id))
    state.setdefault("retries", []).append({
        "attempt": attempt, "url_list": str(retry_list), "rows": len(failed), "first_shard": first_id,
        "shards": math.ceil(len(failed) / config.number_sample_per_shard), "time": time.time(),
    })
    save_state(out, state)
    kwargs = _img2dataset_kwargs(retry_list, out, config, [c for c in extras if c in failed.columns], "extend")
    _run_img2dataset(kwargs, config)
    return _finish(out, before, t0, config, check, retry=True)


def _download_webdataset(source: Any, out: Path, cfg: DownloadConfig) -> DownloadSummary:
    """Image-text tars (pipeline.webdataset): they become the shards as they are, then the usual summary and checks."""
    t0 = time.monotonic()
    before = set() if cfg.incremental_mode == "overwrite" else set(completed_shard_ids(out))
    materialize_webdataset(source, out, cfg.incremental_mode)
    return _finish(out.resolve(), before, t0, cfg, check=True)


def download_main(url_list_or_source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  source_options: dict[str, Any] | None = None, retry: bool = False,
                  **config: Any) -> DownloadSummary:
    """CLI-shaped entry: a preset name or url file/folder -> prepared list -> shards in out_dir.

    ``config`` are :class:`DownloadConfig` fields (``image_size=256, processes_count=8, ...``);
    ``source_options`` go to :func:`pipeline.sources.resolve_source` (``sample_size``, ``seed``,
    ``metadata_dir``, ``url_col``, ...). The prepared list lives in ``out_dir/_pipeline/url_list.parquet``
    and is reused on a rerun when the source (and its files' size/mtime) did not change, so resuming
    a LAION-sized job does not re-scan its metadata. ``retry=True`` runs :func:`retry_failed` after.
    Raises :class:`DownloadFailed` as :func:`download` does (``max_error_rate``).
    """
    valid = {f.name for f in dataclasses.fields(DownloadConfig)}
    unknown = set(config) - valid
    if unknown:
        raise TypeError(f"unknown download option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    cfg = DownloadConfig(**config)
    out = Path(out_dir)
    options = {"allow_local_files": cfg.allow_local_files, **(source_options or {})}
    source = resolve_source(url_list_or_source, **options)
    if source.kind == "webdataset":
        return _download_webdataset(source, out, cfg)
    prepared = out / URL_LIST_PATH
    old = read_url_list_report(prepared) if prepared.exists() else None
    if old is not None and old.get("source_spec") == source_spec(source):
        log.info("reusing prepared url list %s (same source)", prepared)
    else:
        # Prepare beside the current list and swap only if this folder may take it: a refused
        # call must not clobber the list that the existing shards were cut from.
        candidate = prepare_url_list(source, out / META_DIR, filename=f".candidate-{prepared.name}")
        state = load_state(out.resolve())
        if state is not None and cfg.incremental_mode != "overwrite" and (
            _fingerprint(candidate)[0] != state["url_list_fingerprint"]
        ):
            candidate.unlink()
            raise DownloadError(
                f"{out} holds a download of a different url list ({state['rows']} rows from "
                f"{(state.get('url_list_report') or {}).get('source', '?')}); use a new out_dir or "
                "incremental_mode='overwrite'"
            )
        os.replace(candidate, prepared)
    # With retry, the error-rate check waits for the retry: it judges what is still missing after it.
    summary = download(prepared, out, cfg, check=not retry)
    if retry and summary.unresolved_failures and not summary.unmarked_shards:
        return retry_failed(out, cfg)
    if retry:
        check_summary(summary, cfg)
    return summary
