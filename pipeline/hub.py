"""Dataset files on the Hugging Face hub, through huggingface_hub: listing, the HF cache, clear errors;
and the checks every remote fetch makes first (an offline switch, a bounded reachability probe).

* :func:`fetch_files` - a preset's metadata (LAION-HighRes's Parquet parts, MS-COCO's
  url/caption table): the repo's tree is listed and every file matching a glob is fetched
  into the Hugging Face cache (``snapshot_download``), so part names are never hard-coded,
  a second run downloads nothing, and an offline machine reuses what the cache holds.
* :func:`list_files` - the tree listing alone, for the webdataset copies (cc3m / cc12m) whose
  tars :mod:`pipeline.webdataset` downloads one by one into the image folder.
* :func:`offline_flag`, :func:`check_reachable` - also used for plain http(s) metadata
  (:mod:`pipeline.sources`): an offline machine gets a clear error in seconds, never a hang.

Settings are read when a call is made, not at import (huggingface_hub reads its own at
import): ``HF_ENDPOINT`` (a mirror), ``HF_HOME`` / ``HF_HUB_CACHE`` (the cache) and the
token (``HF_TOKEN``, else the one saved by ``huggingface-cli login``, which huggingface_hub
finds by itself). ``HF_HUB_OFFLINE=1`` / ``ECLIPSE_OFFLINE=1`` mean: the cache only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SourceAccessError, SourceError, SourceUnavailableError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Offline switches honoured before any network call (HF's own, and ours for non-hub hosts).
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ECLIPSE_OFFLINE")


def offline_flag() -> str | None:
    """The offline switch that is set (HF's own, or ours), or None."""
    for var in OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """Raise SourceUnavailableError unless a TCP connection to url's host opens within timeout.

    The probe runs in a daemon thread joined with the timeout because getaddrinfo (DNS)
    has no timeout of its own: a machine with a dead resolver would otherwise hang here.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - reported to the caller below
            result.append(err)

    t = threading.Thread(target=probe, daemon=True, name=f"probe-{host}")
    t.start()
    t.join(timeout)
    if not result:
        raise SourceUnavailableError(f"{host}:{port} did not answer within {timeout:g}s (no network?)")
    if result[0] is not None:
        raise SourceUnavailableError(f"cannot reach {host}:{port}: {result[0]}")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def manual_hint(repo: str, pattern: str) -> str:
    return (f"to work without the hub, download the files on a connected machine (`huggingface-cli download {repo} "
            f"--repo-type dataset --include '{pattern}' --local-dir DIR`) and pass --metadata-dir DIR "
            "(metadata_dir=DIR in Python)")


@contextlib.contextmanager
def hub_errors(repo: str, pattern: str) -> Iterator[None]:
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
            + manual_hint(repo, pattern)
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceAccessError(
            f"dataset {repo} was not found at {endpoint()} (or it is private): check the name; if it is private, "
            "run `huggingface-cli login` or set HF_TOKEN; " + manual_hint(repo, pattern)
        ) from e
    except RevisionNotFoundError as e:
        raise SourceAccessError(f"dataset {repo}: no such revision ({e})") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, http.ConnectError, http.TimeoutException) as e:
        raise SourceUnavailableError(
            f"dataset {repo}: the hub at {endpoint()} cannot be reached (offline?) and the files matching "
            f"{pattern!r} are not in the Hugging Face cache {cache_dir()}: {type(e).__name__}; "
            + manual_hint(repo, pattern)
        ) from e
    except EntryNotFoundError as e:
        raise SourceAccessError(f"dataset {repo}: a listed file is missing ({e})") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        cls = SourceAccessError if status in (401, 403, 404) else SourceUnavailableError
        raise cls(f"dataset {repo}: the hub answered HTTP {status}: {str(e).splitlines()[0]}") from e


def offline_reason() -> str | None:
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
    reason = offline_reason()
    if reason is None:
        log.info("%s: resolving %r at %s (cache %s)", repo, pattern, endpoint(), cache_dir())
        with hub_errors(repo, pattern):
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
            f"Hugging Face cache {cache_dir()}; run once with network, or " + manual_hint(repo, pattern)
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

    reason = offline_reason()
    if reason is not None:
        raise SourceUnavailableError(f"dataset {repo}: listing its files needs the hub but {reason} (offline?); "
                                     + manual_hint(repo, pattern))
    api = HfApi(endpoint=endpoint())
    with hub_errors(repo, pattern):
        commit = api.dataset_info(repo, revision=revision).sha
        files = [HubFile(e.path, int(e.size)) for e in api.list_repo_tree(repo, recursive=True, revision=commit,
                                                                          repo_type="dataset")
                 if isinstance(e, RepoFile) and fnmatch.fnmatch(e.path, pattern)]
    if not files:
        raise SourceError(f"dataset {repo} has no file matching {pattern!r} at revision {revision}")
    return str(commit), sorted(files, key=lambda f: f.path)
