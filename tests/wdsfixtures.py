"""Webdataset tars in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), written by the tests."""

import io
import json
import tarfile
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
        stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        stats.write_text(json.dumps({"count": len(samples), "successes": len(samples), "failed_to_download": 0}))
    return path


def good_shard(path: Path, shard: int, n: int) -> Path:
    return write_tar(path, [
        {"key": f"{shard:05d}{i:04d}", "jpg": render(shard * 1000 + i), "txt": f"picture {i} of shard {shard}",
         "url": f"http://127.0.0.1/img/{shard}-{i}.jpg"}
        for i in range(n)
    ])
