"""The loopback servers: the shared lifecycle (start, wait until it answers, stop by pid), the
world's routes in-process, and the world server as a real subprocess feeding img2dataset."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from demo.render import render
from demo.server import ServerProcess, WorldServer, free_port, serve_world, stop_process, wait_until_ok
from demo.world import World, caption, demo_world, world_url, write_url_list

MIXED = demo_world(seed=3)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture()
def inprocess_server() -> Iterator[str]:
    httpd = serve_world(MIXED)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_routes(inprocess_server: str) -> None:
    base = inprocess_server
    spec = MIXED.spec_at(2, 17)
    code, body = _fetch(world_url(base, spec))
    assert code == 200
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(render(spec, 32)))
    code, body = _fetch(world_url(base, spec, size=64, fmt="jpg"))
    assert code == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
    assert _fetch(f"{base}/caption/2/17.png")[1].decode() == caption(spec)
    assert _fetch(f"{base}/world/2/17.png?w=0123456789ab")[0] == 404  # another world's url
    assert _fetch(f"{base}/world/2/x.png")[0] == 404
    assert _fetch(f"{base}/world/2/1.png?size=4")[0] == 400
    assert _fetch(f"{base}/nothing")[0] == 404
    assert _fetch(f"{base}/healthz") == (200, b"ok")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow  # a real subprocess (the project's marker for servers/subprocesses); ~1 s
def test_world_server_subprocess(tmp_path) -> None:
    world = World(seed=1, two_object_fraction=0.3)
    specs = world.sample_specs(6, seed=5)
    with WorldServer(world) as srv:
        pid, port = srv.pid, srv.port
        assert port and _port_open(port)
        urls = pd.read_parquet(write_url_list(specs, srv.base_url, tmp_path / "u.parquet")).url
        for spec, url in zip(specs, urls, strict=True):
            code, body = _fetch(url)
            assert code == 200
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(render(spec, 32)))
    # Stopped by pid: the process is gone (reaped) and the port no longer accepts connections.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(port)


@pytest.mark.slow  # img2dataset with a worker process; ~7 s
def test_url_list_downloads_through_img2dataset(tmp_path) -> None:
    """The demo's path: world server -> url list -> the real download stage -> webdataset tars whose
    images are the exact renders (png) and whose json carries the attribute columns."""
    import json
    import tarfile

    from pipeline.download import DownloadConfig, download

    world = World(seed=2, two_object_fraction=0.3)
    specs = world.sample_specs(40, seed=6)
    with WorldServer(world) as srv:
        urls = write_url_list(specs, srv.base_url, tmp_path / "urls.parquet")
        summary = download(urls, tmp_path / "images", DownloadConfig(
            image_size=32, encode_format="png", encode_quality=6, processes_count=1, thread_count=4,
            number_sample_per_shard=20))
    assert summary.successes == 40
    seen = 0
    for tar in sorted((tmp_path / "images").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if not member.name.endswith(".png"):
                    continue
                meta = json.loads(tf.extractfile(member.name[:-4] + ".json").read())
                spec = specs[meta["world_index"]]
                assert meta["caption"] == caption(spec) and meta["shape"] == spec.attributes["shape"]
                pixels = np.asarray(Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB"))
                np.testing.assert_array_equal(pixels, np.asarray(render(spec, 32)))
                seen += 1
    assert seen == 40


# ----------------------------------------------------------------------------------------------
# The lifecycle


class _Silent(ServerProcess):
    """A child that never prints its port."""

    name = "silent server"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_child_that_never_reports_its_port_fails_fast_and_is_stopped() -> None:
    srv = _Silent(start_timeout=0.5)
    with pytest.raises(RuntimeError, match="silent server failed to start"):
        srv.start()
    assert srv.proc is not None and srv.proc.returncode is not None  # stopped and reaped, not left running


def test_wait_until_ok_times_out_on_a_closed_port_and_fails_at_once_for_a_dead_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    with pytest.raises(TimeoutError, match="did not answer 200"):
        wait_until_ok(url, timeout=0.3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with 0"):
        wait_until_ok(url, timeout=30, proc=dead)


def test_stop_process_kills_a_child_that_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"  # the handler is installed
    stop_process(proc, timeout=0.5)
    assert proc.returncode == -9  # SIGKILL after the SIGTERM timeout
    proc.stdout.close()
