"""Loopback HTTP servers in a child process: the world's image server, and the lifecycle it
shares with the tests' stand-in servers (image server, fake hub).

The lifecycle, written once: the child binds 127.0.0.1 (port 0: the kernel picks a free one),
prints `PORT <n>` and serves until SIGTERM (`serve_until_terminated`); the parent
(`ServerProcess`) starts it, reads the port, waits until `/healthz` answers and stops it by pid.
A child process has its own GIL, so img2dataset's many connections never compete with the caller.

The world's server (`python -m demo.server serve --port P`) renders `/world/<seed>/<index>.png`
as `World.spec_at(seed, index)`, so the demo goes through the real img2dataset download stage:
`demo.world.write_url_list` writes a Parquet url list whose urls point at it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from demo.render import contact_sheet, render
from demo.world import SceneSpec, World, caption, world_url, write_url_list

LOOPBACK = "127.0.0.1"
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_SERVED_SIZE = 1024


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    """`image` encoded as a server sends it (`fmt`: a key of CONTENT_TYPES)."""
    buf = io.BytesIO()
    image.save(buf, format=_PIL_FORMATS[fmt])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The lifecycle (child side, then parent side)


class LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow handler must not keep the process alive on shutdown
    request_queue_size = 128  # img2dataset opens many connections at once


class LoopbackHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, no access log, `/healthz` answered here; subclasses implement `route()` (GET and HEAD)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # img2dataset sends thousands of requests; access logs would drown real output

    def send(self, code: int, body: bytes = b"", content_type: str = "text/plain",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def route(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        try:
            if urllib.parse.urlsplit(self.path).path == "/healthz":
                self.send(200, b"ok")
            else:
                self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. its timeout fired): not our error

    do_HEAD = do_GET


def serve_until_terminated(httpd: ThreadingHTTPServer) -> None:
    """Serve `httpd` in this process until SIGTERM; first print `PORT <n>` (the parent waits for it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop by pid -> clean exit
    print(f"PORT {httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.server_close()


def free_port(host: str = LOOPBACK) -> int:
    """A loopback port with nothing listening (bind port 0, read the port, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Loopback must never go through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_until_ok(url: str, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.05) -> None:
    """Poll `url` until it answers 200. Raises TimeoutError after `timeout` seconds, and
    RuntimeError as soon as `proc` (the server, if given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with _DIRECT.open(url, timeout=5) as r:
                if r.status == 200:
                    return
                last = f"status {r.status}"
        except OSError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.1f} s (last: {last})")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, group: bool = False) -> None:
    """SIGTERM `proc` (with `group`, its whole process group), SIGKILL after `timeout` s; reaps it."""
    if proc.poll() is not None and not group:
        return
    kill = os.killpg if group else os.kill
    try:
        kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # already gone
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


class ServerProcess:
    """A server child process (its command ends in `serve_until_terminated`), stopped by pid.
    Subclasses say what to run (`command`).

        with ImageServer() as srv:
            urlopen(srv.base_url + "/healthz")
    """

    name = "server"

    def __init__(self, host: str = LOOPBACK, port: int = 0, start_timeout: float = 30.0) -> None:
        self.host, self.port = host, port  # port 0: a free one, known after start()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        # The child must import this project whether or not it is installed: put its root on the path.
        root = str(Path(__file__).resolve().parents[1])
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} not started")
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, text=True, env=self.env())
        assert self.proc.stdout is not None
        t0 = time.monotonic()
        # Bounded wait for "PORT <n>": a wedged child fails the caller instead of hanging it.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.name} failed to start (got {line!r})")
        self.port = int(line.split()[1])
        try:  # the socket is bound before the line is printed; a probe confirms it serves
            wait_until_ok(f"{self.base_url}/healthz", self.start_timeout - (time.monotonic() - t0), self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# The world's image server


class _WorldHandler(LoopbackHandler):
    server_version = "eclipse-world/1"
    world: World  # set on the subclass serve_world builds

    def _spec(self, parts: list[str], query: dict[str, list[str]]) -> tuple[SceneSpec, str] | str:
        """The spec and extension a /world/<seed>/<index>.<ext> path names, or an error message."""
        stem, _, ext = parts[2].rpartition(".")
        if not (parts[1].isdigit() and stem.isdigit() and ext.lower() in CONTENT_TYPES):
            return "expected /world/<seed>/<index>.<png|jpg|webp>"
        want = query.get("w", [None])[0]
        if want is not None and want != self.world.fingerprint:
            return f"this server renders world {self.world.fingerprint}, the url asks for world {want}"
        return self.world.spec_at(int(parts[1]), int(stem)), ext.lower()

    def route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = urllib.parse.parse_qs(url.query)
        if parts == ["world"]:
            self.send(200, json.dumps({**self.world.to_dict(), "fingerprint": self.world.fingerprint}).encode(),
                      "application/json")
            return
        if not (len(parts) == 3 and parts[0] in ("world", "caption")):
            self.send(404, b"not found")
            return
        found = self._spec(parts, query)
        if isinstance(found, str):
            self.send(404, found.encode())
        elif parts[0] == "caption":
            self.send(200, caption(found[0]).encode(), "text/plain; charset=utf-8")
        else:
            size = int(query.get("size", [self.world.image_size])[0])
            if not 8 <= size <= MAX_SERVED_SIZE:
                self.send(400, f"size must be in [8, {MAX_SERVED_SIZE}]".encode())
                return
            spec, ext = found
            self.send(200, image_bytes(render(spec, size), ext), CONTENT_TYPES[ext])


def serve_world(world: World, host: str = LOOPBACK, port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for `world`: `/world/<seed>/<index>.png` renders
    `world.spec_at(seed, index)` (`?size=N`, `?w=<fingerprint>` checked), `/caption/<seed>/<index>.png`
    its caption, `/world` the config, `/healthz` ok. Call `serve_forever()` on it (any thread)."""
    handler = type("WorldHandler", (_WorldHandler,), {"world": world})
    return LoopbackHTTPServer((host, port), handler)


class WorldServer(ServerProcess):
    """Runs `python -m demo.server serve` for `world` in a child process and stops it by pid.

        with WorldServer(world) as srv:
            write_url_list(world.sample_specs(100), srv.base_url, "urls.parquet")
    """

    name = "world server"

    def __init__(self, world: World | None = None, host: str = LOOPBACK, port: int = 0,
                 start_timeout: float = 30.0) -> None:
        super().__init__(host, port, start_timeout)
        self.world = world or World()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "demo.server", "serve", "--host", self.host, "--port", str(self.port),
                "--world", json.dumps(self.world.to_dict())]

    def url(self, spec: SceneSpec, size: int | None = None, fmt: str = "png") -> str:
        return world_url(self.base_url, spec, size, fmt)


# ----------------------------------------------------------------------------------------------
# Command line


def _world_from_args(args: argparse.Namespace) -> World:
    if args.world:
        return World.from_dict(json.loads(args.world))
    return World(seed=args.seed, image_size=args.image_size, two_object_fraction=args.two_object_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.server", description="Serve, list or look at a synthetic world.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the loopback image server; prints `PORT <n>` when bound")
    p_serve.add_argument("--host", default=LOOPBACK)
    p_serve.add_argument("--port", type=int, default=0, help="0: a free ephemeral port")
    p_urls = sub.add_parser("urls", help="write a Parquet url list pointing at a world server")
    p_urls.add_argument("--n", type=int, required=True)
    p_urls.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8765")
    p_urls.add_argument("--out", required=True)
    p_sheet = sub.add_parser("sheet", help="write a contact sheet PNG of the first specs")
    p_sheet.add_argument("--n", type=int, default=64)
    p_sheet.add_argument("--size", type=int, default=64)
    p_sheet.add_argument("--out", required=True)
    for p in (p_serve, p_urls, p_sheet):
        p.add_argument("--world", default=None, help="World config as JSON (overrides the flags below)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--image-size", type=int, default=32)
        p.add_argument("--two-object-fraction", type=float, default=0.0)
    args = ap.parse_args(argv)
    world = _world_from_args(args)
    if args.cmd == "serve":
        serve_until_terminated(serve_world(world, args.host, args.port))
    elif args.cmd == "urls":
        out = write_url_list(world.sample_specs(args.n), args.base_url, args.out)
        print(f"{args.n} urls -> {out}")
    else:
        contact_sheet(world.sample_specs(args.n), args.size).save(args.out)
        print(f"{args.n} renders -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
