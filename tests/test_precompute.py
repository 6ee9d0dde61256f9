"""The first stage end to end: loopback HTTP server -> img2dataset -> tiny-clip on a real Dask LocalCluster."""

import os
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
