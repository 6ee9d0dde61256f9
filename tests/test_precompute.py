"""The first stage end to end: loopback HTTP server -> img2dataset -> tiny-clip on a real Dask LocalCluster."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name

from storage_schema import EmbeddingStore
from storage_schema.inspect import inspect_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_precompute_cli_writes_exactly_the_good_rows_and_reruns_as_a_no_op(image_server: ImageServer, tmp_path):  # noqa: F811
    good = {image_server.url(f"/img/{i}.jpg"): f"a picture with seed {i}" for i in range(7)}
    bad = [image_server.url("/missing/1.jpg"), image_server.url("/corrupt/2.jpg"),
           image_server.url("/slow/5/3.jpg")]
    rows = list(good.items()) + [(u, "a bad one") for u in bad] + [(next(iter(good)), "a duplicate url")]
    pd.DataFrame({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}).to_parquet(tmp_path / "urls.parquet")
    cmd = [sys.executable, "-m", "cli.main", "precompute", "--urls", str(tmp_path / "urls.parquet"),
           "--encoder", "tiny-clip", "--out", str(tmp_path / "out"), "--image-size", "32", "--processes", "1",
           "--threads", "4", "--shard-size", "4", "--timeout", "2", "--batch-size", "3", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]

    store = EmbeddingStore(tmp_path / "out" / "store", verify=True)
    df = pd.read_parquet(tmp_path / "out" / "store")
    assert store.num_rows == len(good) == len(df)
    assert set(df["url"]) == set(good)
    assert dict(zip(df["url"], df["caption"], strict=True)) == good
    assert inspect_store(tmp_path / "out" / "store")["problems"] == []

    snapshot = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "store").iterdir()}
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 rows written now" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "store").iterdir()} == snapshot


def _precompute_cmd(urls: Path, out: Path, encoder: str = "tiny-clip", *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "precompute", "--urls", str(urls), "--encoder", encoder,
            "--out", str(out), "--image-size", "32", "--processes", "1", "--threads", "2", "--shard-size", "4",
            "--timeout", "5", "--batch-size", "4", "--workers", "1", *extra]


def _url_list(server: ImageServer, seeds: range, path: Path) -> Path:
    pd.DataFrame({"url": [server.url(f"/img/{i}.jpg") for i in seeds],
                  "caption": [f"picture {i}" for i in seeds]}).to_parquet(path)
    return path


@pytest.mark.slow
def test_another_encoder_is_refused_before_the_download_and_overwrite_starts_both_folders_over(
        image_server: ImageServer, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    list_a = _url_list(image_server, range(5), tmp_path / "a.parquet")
    out, store = tmp_path / "out", tmp_path / "out" / "store"
    first = subprocess.run(_precompute_cmd(list_a, out), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    snapshot = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}

    # open_clip's ViT-B-32 with no tag: a valid name, random weights, nothing to fetch. The download
    # folder is removed so that a download starting would show (it would lay out shards again).
    shutil.rmtree(out / "images")
    other = subprocess.run(_precompute_cmd(list_a, out, "open_clip:ViT-B-32"), env=env, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 1
    assert "made by encoder 'tiny-clip', not 'open_clip:ViT-B-32'" in other.stderr
    assert "--encoder tiny-clip" in other.stderr
    assert not (out / "images").exists()
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == snapshot
    typo = subprocess.run(_precompute_cmd(list_a, tmp_path / "fresh", "open_clip:ViT-B-32/no-such-tag"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode == 1 and "no pretrained tag 'no-such-tag'" in typo.stderr
    assert not (tmp_path / "fresh" / "images").exists()

    # --overwrite with another url list: the store is of the new list, not "already done" with the old one.
    list_b = _url_list(image_server, range(10, 17), tmp_path / "b.parquet")
    again = subprocess.run(_precompute_cmd(list_b, out, "tiny-clip", "--overwrite"), env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    df = pd.read_parquet(store)
    assert sorted(df["caption"]) == sorted(f"picture {i}" for i in range(10, 17))
    assert inspect_store(store)["problems"] == []
