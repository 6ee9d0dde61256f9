"""Webdataset tars in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), written by the tests."""

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def render(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict], finished: bool = True) -> Path:
    """samples: dicts with key, and optionally jpg (bytes), txt (str), url, alt_captions (list of str).

    `finished` writes NNNNN_stats.json beside the tar, as img2dataset does once a shard is done.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            files = {}
            if s.get("jpg") is not None:
                files["jpg"] = s["jpg"]
            if s.get("txt") is not None:
                files["txt"] = s["txt"].encode()
            meta = {"key": s["key"], "url": s.get("url")}
            if s.get("alt_captions"):  # img2dataset saves the url list's extra columns in KEY.json
                meta["alt_captions"] = s["alt_captions"]
            files["json"] = json.dumps(meta).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if finished:
        _finish(path, len(samples))
    return path


def _finish(path: Path, count: int) -> None:
    stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
    stats.write_text(json.dumps({"count": count, "successes": count, "failed_to_download": 0}))


def write_members(path: Path, members: list[tuple[str, bytes | int]], count: int) -> Path:
    r"""A finished shard of exactly these members, in order: (name, data), or (name, declared size) for a sparse one.

    Names may repeat or hold directories; a name with surrogate escapes ("caf\udce9.jpg") is stored as those
    raw bytes (b"caf\xe9.jpg", not UTF-8). A sparse member (GNU sparse 0.1, in PAX headers) holds 16 bytes in
    the tar and declares the given size: what tarfile hands out, zero-filled, when it is read. `count`: samples,
    for the stats file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for name, content in members:
            data = b"sparse member 16" if isinstance(content, int) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if isinstance(content, int):
                info.pax_headers = {"GNU.sparse.size": str(content), "GNU.sparse.numblocks": "1",
                                    "GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.name": name}
            tar.addfile(info, io.BytesIO(data))
    _finish(path, count)
    return path


def good_shard(path: Path, shard: int, n: int) -> Path:
    return write_tar(path, [
        {"key": f"{shard:05d}{i:04d}", "jpg": render(shard * 1000 + i), "txt": f"picture {i} of shard {shard}",
         "url": f"http://127.0.0.1/img/{shard}-{i}.jpg"}
        for i in range(n)
    ])


# Runs argv[3:] as its child and writes "peak_rss_kib exit_status" to argv[1]; argv[2]: RLIMIT_DATA for the child.
# A small go-between because a child's ru_maxrss counts the memory of the process it was forked (or vforked) from
# until its exec: spawned by the test process (torch loaded), every child would start at the test process's peak.
_MEASURE = """
import os, resource, sys
report, limit, *cmd = sys.argv[1:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
    os.execv(cmd[0], cmd)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(code: str, *args: str, data_limit: int = 3 << 30) -> tuple[str, int]:
    """(stdout, peak RSS in bytes) of a child `python -c code args` run in the repo, as the kernel counts it for
    that child alone (wait4 in a small go-between, see _MEASURE).

    `data_limit` (RLIMIT_DATA) turns a regression into the child's MemoryError instead of a machine out of memory.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report"
        out = subprocess.run([sys.executable, "-I", "-S", "-c", _MEASURE, str(report), str(data_limit),
                              sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0 and report.exists(), out.stderr.decode(errors="replace")[-3000:]  # the go-between
        kib, status = map(int, report.read_text().split())
    err = out.stderr.decode(errors="replace")[-3000:]
    assert status == 0, f"exit status {status}, peak RSS {kib >> 10} MiB: {err}"
    return out.stdout.decode(), kib * 1024  # Linux reports KiB
