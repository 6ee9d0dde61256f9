"""Dataset files on the Hugging Face hub, through huggingface_hub: listing, the HF cache, clear errors.

Two uses:

* :func:`fetch_files` - a preset's metadata (LAION-HighRes's Parquet parts, MS-COCO's
  url/caption table): the repo's tree is listed and every file matching a glob is fetched
  into the Hugging Face cache (``snapshot_download``), so part names are never hard-coded,
  a second run downloads nothing, and an offline machine reuses what the cache holds.
* :func:`materialize_webdataset` - image-text webdatasets already on the hub (the cc3m /
  cc12m copies): each tar is downloaded once (``hf_hub_download``) straight into the image
  folder under the shard name the encode stage reads (``NNNNN.tar``), with the per-shard
  ``NNNNN.parquet`` and, last, ``NNNNN_stats.json`` that img2dataset would have written.
  No url list, no second download through img2dataset, no dead links.

Settings are read when a call is made, not at import (huggingface_hub reads its own at
import): ``HF_ENDPOINT`` (a mirror), ``HF_HOME`` / ``HF_HUB_CACHE`` (the cache) and the
token (``HF_TOKEN``, else the one saved by ``huggingface-cli login``, which huggingface_hub
finds by itself). ``HF_HUB_OFFLINE=1`` / ``ECLIPSE_OFFLINE=1`` mean: the cache only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import (
    Source,
    SourceAccessError,
    SourceError,
    SourceUnavailableError,
    check_reachable,
    local_matches,
    offline_flag,
    source_spec,
)
from storage_schema.atomic import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the encode stage decodes
HUB_STAGING = "_pipeline/hub"  # hf_hub_download's local_dir for tars in flight (resumable .incomplete files)
STATE_PATH = "_pipeline/download_state.json"  # same file the img2dataset path keeps its state in


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _manual_hint(repo: str, pattern: str) -> str:
    return (f"to work without the hub, download the files on a connected machine (`huggingface-cli download {repo} "
            f"--repo-type dataset --include '{pattern}' --local-dir DIR`) and pass --metadata-dir DIR "
            "(metadata_dir=DIR in Python)")


@contextlib.contextmanager
def _hub_errors(repo: str, pattern: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> SourceError subclasses whose message says what to do."""
    try:  # the HTTP client under huggingface_hub: httpx2 in 2.x, httpx before
        import httpx2 as http
    except ImportError:
        import httpx as http
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint()}/datasets/{repo}"
    try:
        yield
    except GatedRepoError as e:
        status = e.response.status_code if e.response is not None else "?"
        why = ("no Hugging Face token was sent" if status == 401 else
               "the token was refused (this account has not been granted access)")
        raise SourceAccessError(
            f"dataset {repo} is gated and {why} (HTTP {status}). Accept the dataset's terms at {page} while logged "
            "in, then run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN=<a read token>; "
            + _manual_hint(repo, pattern)
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceAccessError(
            f"dataset {repo} was not found at {endpoint()} (or it is private): check the name; if it is private, "
            "run `huggingface-cli login` or set HF_TOKEN; " + _manual_hint(repo, pattern)
        ) from e
    except RevisionNotFoundError as e:
        raise SourceAccessError(f"dataset {repo}: no such revision ({e})") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, http.ConnectError, http.TimeoutException) as e:
        raise SourceUnavailableError(
            f"dataset {repo}: the hub at {endpoint()} cannot be reached (offline?) and the files matching "
            f"{pattern!r} are not in the Hugging Face cache {cache_dir()}: {type(e).__name__}; "
            + _manual_hint(repo, pattern)
        ) from e
    except EntryNotFoundError as e:
        raise SourceAccessError(f"dataset {repo}: a listed file is missing ({e})") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        cls = SourceAccessError if status in (401, 403, 404) else SourceUnavailableError
        raise cls(f"dataset {repo}: the hub answered HTTP {status}: {str(e).splitlines()[0]}") from e


def _offline_reason() -> str | None:
    """Why the hub must not be asked (an offline switch, or no answer from the endpoint), or None."""
    if flag := offline_flag():
        return f"{flag} is set"
    try:
        check_reachable(endpoint())  # bounded, so a dead network fails in seconds, not after retries
    except SourceUnavailableError as e:
        return str(e)
    return None


def _matching(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(),
                                                                                pattern))


def fetch_files(repo: str, pattern: str, revision: str = "main") -> list[Path]:
    """The files of dataset ``repo`` whose repo path matches the glob ``pattern``, in the HF cache.

    Online: the repo's tree is listed at the revision's commit and missing files are
    downloaded (a second call finds them in the cache and downloads nothing). Offline or
    unreachable: the cached snapshot of that revision, if it holds the files.
    """
    from huggingface_hub import snapshot_download

    kw: dict[str, Any] = dict(repo_id=repo, repo_type="dataset", revision=revision, allow_patterns=[pattern],
                              cache_dir=str(cache_dir()), endpoint=endpoint())
    reason = _offline_reason()
    if reason is None:
        log.info("%s: resolving %r at %s (cache %s)", repo, pattern, endpoint(), cache_dir())
        with _hub_errors(repo, pattern):
            files = _matching(Path(snapshot_download(**kw)), pattern)
        if not files:
            raise SourceError(f"dataset {repo} has no file matching {pattern!r} at revision {revision}")
        return files
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        files = _matching(Path(snapshot_download(**kw, local_files_only=True)), pattern)
    except LocalEntryNotFoundError:
        files = []
    if not files:
        raise SourceUnavailableError(
            f"dataset {repo} needs the hub but {reason}, and the files matching {pattern!r} are not in the "
            f"Hugging Face cache {cache_dir()}; run once with network, or " + _manual_hint(repo, pattern)
        )
    log.info("%s: offline (%s); using %d cached file(s)", repo, reason, len(files))
    return files


@dataclass(frozen=True)
class HubFile:
    path: str  # path in the repo
    size: int


def list_files(repo: str, pattern: str, revision: str = "main") -> tuple[str, list[HubFile]]:
    """(commit, files matching ``pattern``) of dataset ``repo``, sorted by path: the tree listing, no download."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    reason = _offline_reason()
    if reason is not None:
        raise SourceUnavailableError(f"dataset {repo}: listing its files needs the hub but {reason} (offline?); "
                                     + _manual_hint(repo, pattern))
    api = HfApi(endpoint=endpoint())
    with _hub_errors(repo, pattern):
        commit = api.dataset_info(repo, revision=revision).sha
        files = [HubFile(e.path, int(e.size)) for e in api.list_repo_tree(repo, recursive=True, revision=commit,
                                                                          repo_type="dataset")
                 if isinstance(e, RepoFile) and fnmatch.fnmatch(e.path, pattern)]
    if not files:
        raise SourceError(f"dataset {repo} has no file matching {pattern!r} at revision {revision}")
    return str(commit), sorted(files, key=lambda f: f.path)


# ---------------------------------------------------------------------------- webdataset sources


def _shard_name(shard_id: int) -> str:
    from pipeline.download import OOM_SHARD_COUNT

    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def index_tar(tar_path: Path, origin: str) -> tuple[pa.Table, dict[str, Any]]:
    """One row per sample of a webdataset tar (key, url, caption, status, error_message) and its stats.

    Reads only the small members (captions, json); image members are skipped by seeking.
    A sample without an image or a caption counts as failed, the way img2dataset counts a
    url it could not fetch, so the download summary shows it.
    """
    t0 = time.monotonic()
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            s = samples.setdefault(key, {"image": False, "caption": None, "url": None})
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                s["image"] = True
            elif ext in ("txt", "json"):
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if ext == "txt":
                    s["caption"] = data.decode("utf-8", errors="replace")
                else:
                    with contextlib.suppress(ValueError, AttributeError):
                        s["url"] = json.loads(data).get("url")
    rows: dict[str, list[Any]] = {"key": [], "url": [], "caption": [], "status": [], "error_message": []}
    failed = 0
    for key, s in samples.items():
        problem = ("no image member" if not s["image"] else
                   "no caption" if not (s["caption"] or "").strip() else None)
        failed += problem is not None
        rows["key"].append(key)
        rows["url"].append(s["url"] or f"{origin}#{key}")  # hub copies drop the source url; name the sample
        rows["caption"].append(s["caption"])
        rows["status"].append("success" if problem is None else "failed_to_download")
        rows["error_message"].append(problem)
    stats = {"count": len(samples), "successes": len(samples) - failed, "failed_to_download": failed,
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
    from pipeline.download import DownloadError, completed_shard_ids

    spec = source_spec(src)
    state_file = out / STATE_PATH
    if state_file.exists():
        state = json.loads(state_file.read_text())
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
    state_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state_file, json.dumps(state, indent=2).encode())
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

    from pipeline.download import completed_shard_ids

    if src.kind != "webdataset":
        raise SourceError(f"source {src.name!r} is a url list, not a webdataset; use the download stage")
    out = Path(out_dir).resolve()
    state = _wds_state(src, out, incremental_mode)
    done = set(completed_shard_ids(out))
    todo = [i for i in range(state["primary_shards"]) if i not in done]
    log.info("%s -> %s: %d tar(s), %d to fetch", state["url_list"], out, state["primary_shards"], len(todo))
    for n, i in enumerate(todo, start=1):
        f = state["files"][i]
        name = _shard_name(i)
        dest = out / f"{name}.tar"
        if not (dest.exists() and dest.stat().st_size == f["size"]):  # a tar placed before a kill is kept
            if f["local"]:
                _place(Path(f["path"]), dest, move=False)
            else:
                log.info("%s: tar %d/%d %s", src.hub_repo, n, len(todo), f["path"])
                pattern = src.hub_pattern or "*.tar"
                if (reason := _offline_reason()) is not None:
                    raise SourceUnavailableError(f"dataset {src.hub_repo}: {len(todo) - n + 1} tar(s) still to "
                                                 f"download but {reason}; " + _manual_hint(src.hub_repo, pattern))
                with _hub_errors(src.hub_repo, pattern):  # type: ignore[arg-type]
                    staged = hf_hub_download(src.hub_repo, f["path"], repo_type="dataset", revision=state["commit"],
                                             local_dir=out / HUB_STAGING, endpoint=endpoint())
                _place(Path(staged), dest, move=True)
        table, stats = index_tar(dest, f"{state['url_list']}/{Path(f['path']).name}")
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(out / f"{name}.parquet", buf.getvalue())
        atomic_write_bytes(out / f"{name}_stats.json", json.dumps(stats, indent=2).encode())
