"""A loopback stand-in for the Hugging Face Hub, for tests that drive the real huggingface_hub client.

It runs in its own process (``python tests/fakehub.py --root DIR``), started and stopped by
``demo.server.ServerProcess`` like ``imageserver.py``,
and serves dataset repos laid out on disk as ``DIR/datasets/<org>/<name>/<files...>``,
with ``DIR/hub.json`` saying which repos are gated and which tokens may read them::

    {"gated": {"org/name": ["hf_goodtoken"]}}

Point the client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT``. The routes are the ones
huggingface_hub calls (checked against its source), with the real hub's quirks:

===============================================  ==========================================================
``GET /api/datasets/<repo>/revision/<rev>``      repo info: ``id``, ``sha`` (the commit), ``gated``,
                                                 ``siblings`` (what ``dataset_info`` / ``snapshot_download``
                                                 read); open to everyone, gated or not
``GET /api/datasets/<repo>/tree/<rev>[/<path>]`` the file listing (``type``, ``path``, ``size``, ``oid``,
                                                 ``lfs``), paginated with a ``Link: <...>; rel="next"``
                                                 header (``--page-size`` entries a page); open to everyone
``HEAD|GET /datasets/<repo>/resolve/<rev>/<f>``  small files: 200 with ``ETag`` (git blob sha),
                                                 ``X-Repo-Commit``, ``Content-Length``. LFS files (``.parquet``,
                                                 ``.tar``, or larger than 10 kB): 302 to a signed url on
                                                 another host (``localhost`` instead of ``127.0.0.1``, as the
                                                 real hub sends its CDN) with ``X-Linked-Etag`` (sha256),
                                                 ``X-Linked-Size`` and ``X-Repo-Commit``; the client drops
                                                 its Authorization header there. A gated repo answers 401
                                                 (``X-Error-Code: GatedRepo``) without an Authorization
                                                 header and 403 with a token not on its list; a missing
                                                 repo 401 ``RepoNotFound``, a missing file 404
                                                 ``EntryNotFound``, another revision 404 ``RevisionNotFound``
``GET /cdn/<sha256>?sig=...``                    the bytes (honours ``Range: bytes=N-`` with 206)
``/healthz``                                     200 ``ok``
===============================================  ==========================================================

Every request is appended to ``DIR/requests.log`` as ``METHOD PATH auth|-`` so tests can
check what the client asked for (for example that a second run downloads nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import urllib.parse
from pathlib import Path

from demo.server import LoopbackHandler, LoopbackHTTPServer, ServerProcess, serve_until_terminated

LFS_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".zip", ".jpg")
LFS_MIN_SIZE = 10_000
DEFAULT_PAGE_SIZE = 1000  # the real hub's page size for a non-expanded tree


def _is_lfs(path: Path) -> bool:
    return path.name.endswith(LFS_SUFFIXES) or path.stat().st_size > LFS_MIN_SIZE


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Hub:
    def __init__(self, root: Path, page_size: int) -> None:
        self.root = root
        self.page_size = page_size
        self.lock = threading.Lock()
        self._digests: dict[tuple[str, int, int], str] = {}

    def config(self) -> dict:
        p = self.root / "hub.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def repo_dir(self, repo: str) -> Path | None:
        d = self.root / "datasets" / repo
        return d if repo.count("/") == 1 and d.is_dir() else None

    def files(self, repo_dir: Path) -> list[Path]:
        return sorted(p for p in repo_dir.rglob("*") if p.is_file())

    def sha256(self, path: Path) -> str:
        st = path.stat()
        k = (str(path), st.st_size, st.st_mtime_ns)
        with self.lock:
            if k not in self._digests:
                self._digests[k] = hashlib.sha256(path.read_bytes()).hexdigest()
            return self._digests[k]

    def commit(self, repo_dir: Path) -> str:
        """A 40-hex commit id that changes whenever a file of the repo changes."""
        h = hashlib.sha1()
        for p in self.files(repo_dir):
            h.update(f"{p.relative_to(repo_dir)}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n".encode())
        return h.hexdigest()

    def entry(self, repo_dir: Path, p: Path) -> dict:
        data_size = p.stat().st_size
        rel = p.relative_to(repo_dir).as_posix()
        if _is_lfs(p):
            sha = self.sha256(p)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {data_size}\n".encode()
            return {"type": "file", "oid": _git_blob_sha(pointer), "size": data_size, "path": rel,
                    "lfs": {"oid": sha, "size": data_size, "pointerSize": len(pointer)}}
        return {"type": "file", "oid": _git_blob_sha(p.read_bytes()), "size": data_size, "path": rel}


class _Handler(LoopbackHandler):
    hub: _Hub  # set on the class by serve()

    def _log(self) -> None:
        auth = "auth" if self.headers.get("Authorization") else "-"
        with self.hub.lock, open(self.hub.root / "requests.log", "a") as f:
            f.write(f"{self.command} {urllib.parse.urlsplit(self.path).path} {auth}\n")

    def _error(self, code: int, error_code: str, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Code": error_code, "X-Error-Message": message, **(extra or {})}
        self.send(code, json.dumps({"error": message}).encode(), "application/json", headers)

    def _json(self, obj: object, headers: dict[str, str] | None = None) -> None:
        self.send(200, json.dumps(obj).encode(), "application/json", headers)

    def route(self) -> None:
        self._log()
        parts = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parts.path)
        query = urllib.parse.parse_qs(parts.query)
        seg = path.strip("/").split("/")
        if seg[:2] == ["api", "datasets"] and len(seg) >= 6 and seg[4] == "revision":
            self._info("/".join(seg[2:4]), "/".join(seg[5:]))
        elif seg[:2] == ["api", "datasets"] and len(seg) >= 6 and seg[4] == "tree":
            self._tree("/".join(seg[2:4]), seg[5], "/".join(seg[6:]), query)
        elif seg[:1] == ["datasets"] and len(seg) >= 6 and seg[3] == "resolve":
            self._resolve("/".join(seg[1:3]), seg[4], "/".join(seg[5:]))
        elif seg[:1] == ["cdn"] and len(seg) == 2:
            self._cdn(seg[1])
        else:
            self.send(404, b"not found")

    def _repo_or_error(self, repo: str, revision: str) -> Path | None:
        d = self.hub.repo_dir(repo)
        if d is None:
            # The real hub answers 401 for a repo it cannot show you (missing or private).
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", self.hub.commit(d)):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return d

    def _info(self, repo: str, revision: str) -> None:
        d = self._repo_or_error(repo, revision)
        if d is None:
            return
        gated = "manual" if repo in self.hub.config().get("gated", {}) else False
        siblings = [{"rfilename": p.relative_to(d).as_posix()} for p in self.hub.files(d)]
        self._json({"_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "author": repo.split("/")[0],
                    "sha": self.hub.commit(d), "private": False, "gated": gated, "disabled": False,
                    "lastModified": "2024-01-01T00:00:00.000Z", "tags": [], "siblings": siblings})

    def _tree(self, repo: str, revision: str, sub: str, query: dict[str, list[str]]) -> None:
        d = self._repo_or_error(repo, revision)
        if d is None:
            return
        base = d / sub if sub else d
        if not base.is_dir():
            self._error(404, "EntryNotFound", f"{sub} does not exist on \"{revision}\"")
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        if recursive:
            items = [self.hub.entry(d, p) for p in self.hub.files(base)]
        else:
            items = [self.hub.entry(d, p) if p.is_file() else
                     {"type": "directory", "oid": hashlib.sha1(str(p).encode()).hexdigest(),
                      "size": 0, "path": p.relative_to(d).as_posix()}
                     for p in sorted(base.iterdir())]
        start = int(query.get("cursor", ["0"])[0])
        page = items[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(items):
            nxt = dict(query)
            nxt["cursor"] = [str(start + self.hub.page_size)]
            url = f"http://{self.headers['Host']}{urllib.parse.urlsplit(self.path).path}?" \
                  f"{urllib.parse.urlencode(nxt, doseq=True)}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(page, headers)

    def _authorized(self, repo: str) -> bool:
        allowed = self.hub.config().get("gated", {}).get(repo)
        if allowed is None:
            return True
        auth = self.headers.get("Authorization", "")
        if not auth:
            self._error(401, "GatedRepo", f"Access to dataset {repo} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.")
            return False
        if auth.removeprefix("Bearer ") not in allowed:
            self._error(403, "GatedRepo", f"Access to dataset {repo} is restricted and you are not in the "
                        "authorized list. Visit the dataset page to ask for access.")
            return False
        return True

    def _resolve(self, repo: str, revision: str, filename: str) -> None:
        d = self._repo_or_error(repo, revision)
        if d is None or not self._authorized(repo):
            return
        commit = self.hub.commit(d)
        p = d / filename
        if not p.is_file():
            self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"",
                        {"X-Repo-Commit": commit})
            return
        if _is_lfs(p):
            sha = self.hub.sha256(p)
            entry = self.hub.entry(d, p)
            port = self.server.server_address[1]
            # The real hub sends LFS files to a CDN host with a signed url; so does this one, on loopback.
            location = f"http://localhost:{port}/cdn/{sha}?sig={hashlib.md5(sha.encode()).hexdigest()}"
            self.send(302, b"", "application/json", {
                "Location": location, "X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"', "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(p.stat().st_size), "Accept-Ranges": "bytes"})
            return
        data = p.read_bytes()
        self.send(200, data, "application/octet-stream", {"ETag": f'"{_git_blob_sha(data)}"', "X-Repo-Commit": commit,
                                                           "Accept-Ranges": "bytes"})

    def _cdn(self, sha: str) -> None:
        for d in (self.hub.root / "datasets").glob("*/*"):
            for p in self.hub.files(d):
                if _is_lfs(p) and self.hub.sha256(p) == sha:
                    data = p.read_bytes()
                    rng = self.headers.get("Range", "")
                    if rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
                        start = int(rng[6:].split("-")[0])
                        self.send(206, data[start:], "application/octet-stream",
                                  {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "ETag": f'"{sha}"'})
                    else:
                        self.send(200, data, "application/octet-stream", {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"})
                    return
        self.send(404, b"no such blob")


def serve(root: Path, host: str = "127.0.0.1", port: int = 0, page_size: int = DEFAULT_PAGE_SIZE) -> None:
    _Handler.hub = _Hub(root, page_size)
    serve_until_terminated(LoopbackHTTPServer((host, port), _Handler))


class FakeHub(ServerProcess):
    """Runs this file (the hub) on a free port in a child process and stops it by pid."""

    name = "fake hub"

    def __init__(self, root: Path, page_size: int = DEFAULT_PAGE_SIZE, start_timeout: float = 20.0) -> None:
        super().__init__("127.0.0.1", 0, start_timeout)
        self.root = Path(root)
        self.page_size = page_size

    def command(self) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--root", str(self.root), "--page-size", str(self.page_size),
                "--host", self.host, "--port", str(self.port)]

    @property
    def endpoint(self) -> str:
        return self.base_url

    def add_file(self, repo: str, path: str, data: bytes) -> Path:
        p = self.root / "datasets" / repo / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def gate(self, repo: str, tokens: list[str]) -> None:
        cfg_path = self.root / "hub.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        cfg.setdefault("gated", {})[repo] = tokens
        cfg_path.write_text(json.dumps(cfg))

    def requests(self) -> list[str]:
        log = self.root / "requests.log"
        return log.read_text().splitlines() if log.exists() else []

    def clear_log(self) -> None:
        (self.root / "requests.log").unlink(missing_ok=True)

    def start(self) -> FakeHub:
        self.root.mkdir(parents=True, exist_ok=True)
        super().start()
        self.clear_log()
        return self


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    a = ap.parse_args()
    serve(Path(a.root), a.host, a.port, a.page_size)
