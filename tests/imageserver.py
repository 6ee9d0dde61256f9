"""A loopback HTTP image server for tests (download and encode stages).

It runs in its own process (``python tests/imageserver.py``) so that img2dataset's
worker pool, a slow handler or a crash can never block or share the GIL with the
pytest process, and so that tests stop it the way an operator would: by its pid.

Routes (everything is deterministic in the URL path, so other suites can reuse it
and compare pixels against :func:`render_image`):

==========================================  =================================================
``/img/<seed>.jpg`` / ``.png`` / ``.webp``  200, a ``W``x``H`` image drawn from ``seed``
                                            (``?w=..&h=..``, default 64x48)
``/slow/<seconds>/<seed>.jpg``              the same image after sleeping ``seconds``
``/corrupt/<name>.jpg``                     200, ``Content-Type: image/jpeg``, bytes that are
                                            not an image
``/status/<code>/<anything>``               that HTTP status (e.g. 500, 403), empty body
``/healthz``                                200 ``ok`` (readiness probe)
anything else (e.g. ``/missing/x.jpg``)     404
==========================================  =================================================

Usage from tests::

    from imageserver import image_server  # the pytest fixture (session scope)

    def test_x(image_server):
        url = image_server.url("/img/3.jpg")

or by hand::

    with ImageServer() as srv:
        print(srv.url("/img/1.png"))
"""

from __future__ import annotations

import argparse
import io
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

DEFAULT_SIZE = (64, 48)
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
CORRUPT_BYTES = b"\xff\xd8\xff\xe0 this is not a jpeg, only its first bytes look like one " * 8


def render_image(seed: int, width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1]):
    """The PIL image that ``/img/<seed>.<ext>`` serves: a seeded background and rectangles."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = rng.randrange(x0, width + 1), rng.randrange(y0, height + 1)
        draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def encode_image(seed: int, fmt: str, width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1]) -> bytes:
    """Encoded bytes exactly as served (same PIL version -> same bytes)."""
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    buf = io.BytesIO()
    render_image(seed, width, height).save(buf, format=pil_format)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "eclipse-test-imageserver/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output readable; the tests assert on outcomes, not access logs

    def _send(self, code: int, body: bytes = b"", content_type: str = "application/octet-stream") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _image(self, name: str, query: dict[str, list[str]]) -> None:
        stem, _, ext = name.rpartition(".")
        ext = ext.lower()
        if ext not in CONTENT_TYPES or not stem.lstrip("-").isdigit():
            self._send(404, b"unknown image", "text/plain")
            return
        width = int(query.get("w", [DEFAULT_SIZE[0]])[0])
        height = int(query.get("h", [DEFAULT_SIZE[1]])[0])
        self._send(200, encode_image(int(stem), ext, width, height), CONTENT_TYPES[ext])

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        parsed = urllib.parse.urlsplit(self.path)
        parts = [p for p in parsed.path.split("/") if p]
        query = urllib.parse.parse_qs(parsed.query)
        try:
            if parts == ["healthz"]:
                self._send(200, b"ok", "text/plain")
            elif len(parts) == 2 and parts[0] == "img":
                self._image(parts[1], query)
            elif len(parts) == 3 and parts[0] == "slow":
                time.sleep(float(parts[1]))
                self._image(parts[2], query)
            elif len(parts) == 2 and parts[0] == "corrupt":
                self._send(200, CORRUPT_BYTES, "image/jpeg")
            elif len(parts) >= 2 and parts[0] == "status" and parts[1].isdigit():
                self._send(int(parts[1]), b"", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired on /slow): expected, not an error

    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a sleeping /slow handler must not keep the process alive on shutdown
    request_queue_size = 128  # img2dataset opens many connections at once


def serve(host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the server in this process; print ``PORT <n>`` once it accepts connections."""
    httpd = _Server((host, port), _Handler)
    # SIGTERM -> normal exit so the parent's terminate() is clean and quick.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"PORT {httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.1)
    finally:
        httpd.server_close()


class ImageServer:
    """Starts :func:`serve` in a child process and stops it by pid."""

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = 20.0) -> None:
        self.host = host
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def base_url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def start(self) -> ImageServer:
        # Port 0: the kernel picks a free ephemeral port; the child reports it on stdout.
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--host", self.host, "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        # Bounded wait for the child's "PORT <n>" line: a wedged child must fail the test, not hang it.
        ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"image server failed to start (got {line!r})")
        self.port = int(line.split()[1])
        self._wait_ready(deadline)
        return self

    def _wait_ready(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_is_closed(host: str = "127.0.0.1") -> int:
    """A loopback port with nothing listening (bind, read the port, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """One server process for the whole session (starting it costs ~0.3 s)."""
    # Loopback must never go through a proxy from the environment (img2dataset uses urllib,
    # and its spawned workers inherit os.environ).
    saved = {k: os.environ.get(k) for k in ("NO_PROXY", "no_proxy")}
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
        x for x in ("127.0.0.1", "localhost", saved["NO_PROXY"] or "") if x
    )
    try:
        with ImageServer() as srv:
            yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    serve(a.host, a.port)
