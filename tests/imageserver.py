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
``/trickle/<seconds>/<name>``               200 and no length, then one body byte every
                                            ``seconds``, forever (until the client goes away)
``/trickle-headers/<seconds>/<name>``       a status line, then one byte of a header line
                                            every ``seconds``, forever
``/endless/<name>``                         200 and no length, then a body as fast as the
                                            client reads it, forever
``/big/<bytes>/<name>``                     200, ``Content-Length: <bytes>`` and that many bytes
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
import os
import random
import sys
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from demo.server import (
    CONTENT_TYPES,
    LoopbackHandler,
    LoopbackHTTPServer,
    ServerProcess,
    image_bytes,
    serve_until_terminated,
)

DEFAULT_SIZE = (64, 48)
ENDLESS_PIECE = 1 << 16  # bytes per write of /endless
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
    return image_bytes(render_image(seed, width, height), fmt)


class _Handler(LoopbackHandler):
    server_version = "eclipse-test-imageserver/1"

    def _image(self, name: str, query: dict[str, list[str]]) -> None:
        stem, _, ext = name.rpartition(".")
        ext = ext.lower()
        if ext not in CONTENT_TYPES or not stem.lstrip("-").isdigit():
            self.send(404, b"unknown image")
            return
        width = int(query.get("w", [DEFAULT_SIZE[0]])[0])
        height = int(query.get("h", [DEFAULT_SIZE[1]])[0])
        self.send(200, encode_image(int(stem), ext, width, height), CONTENT_TYPES[ext])

    def _forever(self, first: bytes, piece: bytes, every: float) -> None:
        """Write ``first``, then ``piece`` every ``every`` seconds until the client goes away (a write fails)."""
        self.close_connection = True
        self.wfile.write(first)
        while True:
            if every:
                time.sleep(every)
            self.wfile.write(piece)

    def _endless_headers(self) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n"
                + CORRUPT_BYTES[:4])

    def route(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        parts = [p for p in parsed.path.split("/") if p]
        query = urllib.parse.parse_qs(parsed.query)
        if len(parts) == 2 and parts[0] == "img":
            self._image(parts[1], query)
        elif len(parts) == 3 and parts[0] == "slow":
            time.sleep(float(parts[1]))
            self._image(parts[2], query)
        elif len(parts) == 2 and parts[0] == "corrupt":
            self.send(200, CORRUPT_BYTES, "image/jpeg")
        elif len(parts) == 3 and parts[0] == "trickle":
            self._forever(self._endless_headers(), b"\x00", float(parts[1]))
        elif len(parts) == 3 and parts[0] == "trickle-headers":
            self._forever(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a", float(parts[1]))
        elif len(parts) == 2 and parts[0] == "endless":
            self._forever(self._endless_headers(), bytes(ENDLESS_PIECE), 0)
        elif len(parts) == 3 and parts[0] == "big" and parts[1].isdigit():
            self.send(200, CORRUPT_BYTES[:4] + bytes(int(parts[1]) - 4), "image/jpeg")
        elif len(parts) >= 2 and parts[0] == "status" and parts[1].isdigit():
            self.send(int(parts[1]))
        else:
            self.send(404, b"not found")


class ImageServer(ServerProcess):
    """Runs this file (the server) in a child process and stops it by pid."""

    name = "image server"

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = 20.0, port: int = 0) -> None:
        super().__init__(host, port, start_timeout)

    def command(self) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--host", self.host, "--port", str(self.port)]

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")


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
    serve_until_terminated(LoopbackHTTPServer((a.host, a.port), _Handler))
