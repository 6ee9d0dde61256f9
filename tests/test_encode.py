import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from storefixtures import tiny_info
from wdsfixtures import good_shard, render, run_measured, write_members, write_tar

from pipeline.encode import (
    EncodeConfig,
    EncodeFailed,
    EncodeSummary,
    ShardResult,
    collect_shards,
    encode,
    encode_shard,
    encode_shard_retrying,
    iter_webdataset,
    shards_to_encode,
)
from pipeline.encoders import load_encoder
from storage_schema import EmbeddingStore, StoreError, StoreWriter
from storage_schema.writer import read_manifest

ROOT = Path(__file__).resolve().parents[1]
CFG = EncodeConfig(encoder="tiny-clip", batch_size=4)


def _mixed_shard(path: Path) -> Path:
    samples = [{"key": f"k{i}", "jpg": render(i), "txt": f"caption {i}", "url": f"http://h/{i}"} for i in range(9)]
    samples[2]["jpg"] = b"\xff\xd8 not really a jpeg"
    samples[5]["txt"] = "   "
    samples[7]["txt"] = None
    return write_tar(path, samples)


def _rows(store_dir: Path) -> dict[str, dict]:
    out = {}
    for b in EmbeddingStore(store_dir).iter_batches(64, pad_to=None):
        for i, k in enumerate(b["key"]):
            out[k] = {"img": b["image_embed"][i], "txt": b["text_embed"][i], "caption": b["caption"][i],
                      "hid": b["text_hidden"][i][: b["text_len"][i]]}
    return out


def test_iter_webdataset_groups_files_by_key(tmp_path):
    samples = list(iter_webdataset(_mixed_shard(tmp_path / "00000.tar")))
    assert [s.key for s in samples] == [f"k{i}" for i in range(9)]
    assert samples[0].caption == "caption 0" and samples[0].url == "http://h/0" and samples[0].image
    assert samples[7].caption is None


def test_bad_samples_are_recorded_and_skipped_good_rows_match_the_encoder(tmp_path):
    tar = _mixed_shard(tmp_path / "img" / "00000.tar")
    result = encode_shard(tar, tmp_path / "store", CFG)
    assert result.status == "written" and result.rows == 6
    reasons = {s["key"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"k2", "k5", "k7"}
    assert reasons["k2"].startswith("corrupt image") and "caption" in reasons["k5"] and "caption" in reasons["k7"]
    manifest = read_manifest(tmp_path / "store")
    assert manifest["shards"]["00000.parquet"]["skipped"] == result.skipped

    rows = _rows(tmp_path / "store")
    enc = load_encoder("tiny-clip")
    with torch.inference_mode():
        img = enc.encode_images(enc.preprocess([Image.open(io.BytesIO(render(3))).convert("RGB")]))
        txt = enc.encode_texts(["caption 3"])
    np.testing.assert_allclose(rows["k3"]["img"].astype(np.float32), img[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(rows["k3"]["txt"].astype(np.float32), txt.text_embeds[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(rows["k3"]["hid"].astype(np.float32), txt.hidden[0], rtol=2e-3, atol=2e-3)
    assert rows["k3"]["caption"] == "caption 3"


def test_finished_shard_is_not_redone(tmp_path):
    tar = good_shard(tmp_path / "img" / "00000.tar", 0, 5)
    first = encode_shard(tar, tmp_path / "store", CFG)
    mtime = (tmp_path / "store" / "00000.parquet").stat().st_mtime_ns
    again = encode_shard(tar, tmp_path / "store", CFG)
    assert first.status == "written" and again.status == "already-done" and again.rows == 5
    assert (tmp_path / "store" / "00000.parquet").stat().st_mtime_ns == mtime


def test_store_made_by_another_encoder_is_refused(tmp_path):
    StoreWriter(tmp_path / "store", tiny_info(preset="someone-else"))._record(
        "x.parquet", {"rows": 0, "bytes": 0, "sha256": ""})
    tar = good_shard(tmp_path / "img" / "00000.tar", 0, 3)
    with pytest.raises(StoreError, match="made by encoder 'someone-else'"):
        encode_shard(tar, tmp_path / "store", CFG)


def test_empty_image_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished image shards"):
        encode(tmp_path, tmp_path / "store", CFG)


def test_a_shard_still_downloading_is_not_encoded(tmp_path):
    from pipeline.encode import image_shards

    good_shard(tmp_path / "img" / "00000.tar", 0, 3)
    write_tar(tmp_path / "img" / "00001.tar", [{"key": "000010000", "jpg": render(1), "txt": "x"}], finished=False)
    assert [p.name for p in image_shards(tmp_path / "img")] == ["00000.tar"]


def test_shards_to_encode_leaves_out_what_the_store_lists(tmp_path):
    for s in range(3):
        good_shard(tmp_path / "img" / f"{s:05d}.tar", s, 2)
    encode_shard(tmp_path / "img" / "00001.tar", tmp_path / "store", CFG)
    todo, already = shards_to_encode(tmp_path / "img", tmp_path / "store")
    assert [t.name for t in todo] == ["00000.tar", "00002.tar"] and already == ["00001"]


def test_a_store_of_image_shards_downloaded_again_is_refused(tmp_path):
    good_shard(tmp_path / "img" / "00000.tar", 0, 2)
    encode_shard(tmp_path / "img" / "00000.tar", tmp_path / "store", CFG)
    assert shards_to_encode(tmp_path / "img", tmp_path / "store") == ([], ["00000"])
    good_shard(tmp_path / "img" / "00000.tar", 7, 3)  # the same shard name, other images
    with pytest.raises(StoreError, match=r"1 shard\(s\) \(00000\) were encoded from image shards .* downloaded "
                                         r"again"):
        shards_to_encode(tmp_path / "img", tmp_path / "store")


def test_a_finished_store_of_another_encoder_is_refused_before_any_work(tmp_path):
    good_shard(tmp_path / "img" / "00000.tar", 0, 2)
    encode_shard(tmp_path / "img" / "00000.tar", tmp_path / "store", CFG)
    before = (tmp_path / "store" / "_manifest.json").read_bytes()
    other = EncodeConfig(encoder="open_clip:ViT-B-32", batch_size=4)
    with pytest.raises(StoreError, match="made by encoder 'tiny-clip', not 'open_clip:ViT-B-32'"):
        encode(tmp_path / "img", tmp_path / "store", other)  # every shard is done: once, this exited 0
    assert (tmp_path / "store" / "_manifest.json").read_bytes() == before


def _failing_encode_shard(monkeypatch, errors: list[Exception]) -> list[str]:
    """encode_shard raises `errors` in turn, then succeeds; returns the list of calls."""
    calls: list[str] = []

    def fake(tar, store, cfg):
        calls.append(str(tar))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return ShardResult("00000", "written", 3)

    monkeypatch.setattr("pipeline.encode.encode_shard", fake)
    return calls


def test_a_transient_shard_failure_is_retried(monkeypatch):
    calls = _failing_encode_shard(monkeypatch, [ConnectionError("worker died"), TimeoutError("slow disk")])
    result = encode_shard_retrying("00000.tar", "store", CFG, attempts=3, delay_s=0)
    assert result.rows == 3 and len(calls) == 3
    calls = _failing_encode_shard(monkeypatch, [ConnectionError("a"), ConnectionError("b"), ConnectionError("c")])
    with pytest.raises(ConnectionError, match="c"):
        encode_shard_retrying("00000.tar", "store", CFG, attempts=3, delay_s=0)
    assert len(calls) == 3


def test_a_permanent_shard_failure_is_not_retried(monkeypatch):
    calls = _failing_encode_shard(monkeypatch, [StoreError("made by encoder 'other'")])
    with pytest.raises(StoreError):
        encode_shard_retrying("00000.tar", "store", CFG, attempts=3, delay_s=0)
    assert len(calls) == 1


class _Future:
    """A finished shard for collect_shards: its result or exception; cancel() marks it cancelled."""

    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def done(self) -> bool:
        return False

    def cancel(self) -> None:
        self.cancelled = True

    def result(self):
        if self.cancelled:
            raise CancelledError()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def test_a_permanent_failure_cancels_the_other_shards_and_names_its_cause():
    futures = {_Future(StoreError("made by encoder 'other'")): "00000",
               _Future(ShardResult("00001", "written", 4)): "00001", _Future(OSError("x")): "00002"}
    summary = EncodeSummary("store")
    with pytest.raises(EncodeFailed, match=r"1 of 3 shard\(s\) failed \(not retried: StoreError: made by encoder"):
        collect_shards(futures, list, summary)
    assert summary.cancelled == ["00001", "00002"] and summary.written == [] and list(summary.failed) == ["00000"]


def test_a_transient_failure_is_reported_for_its_shard_and_the_others_finish():
    written = ShardResult("00001", "written", 4, [{"key": "k", "reason": "corrupt image"}])
    futures = {_Future(OSError("disk full")): "00000", _Future(written): "00001",
               _Future(ShardResult("00002", "already-done", 2)): "00002"}
    summary = EncodeSummary("store")
    with pytest.raises(RuntimeError, match=r"1 of 3 shard\(s\) failed \(OSError: disk full\)") as err:
        collect_shards(futures, list, summary)
    assert not isinstance(err.value, EncodeFailed)
    assert summary.written == [written] and summary.already_done == ["00002"] and summary.cancelled == []
    assert [(r["shard"], r["status"], r["first_reason"]) for r in summary.rows()] == [
        ("00001", "written", "corrupt image"), ("00002", "already done", ""), ("00000", "FAILED", "OSError: disk full")]


@pytest.mark.slow
def test_encode_on_a_real_local_dask_cluster(tmp_path):
    from distributed import Client, LocalCluster

    for s in range(3):
        good_shard(tmp_path / "img" / f"{s:05d}.tar", s, 6)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        summary = encode(tmp_path / "img", tmp_path / "store", CFG, client=client, progress=False)
        assert summary.rows_written == 18 and not summary.failed and len(summary.written) == 3
        again = encode(tmp_path / "img", tmp_path / "store", CFG, client=client, progress=False)
    assert again.written == [] and sorted(again.already_done) == ["00000", "00001", "00002"]
    assert EmbeddingStore(tmp_path / "store", verify=True).num_rows == 18


@pytest.mark.slow
def test_sigkill_mid_encode_then_rerun_gives_the_same_rows(tmp_path):
    n_shards = 8
    for s in range(n_shards):
        good_shard(tmp_path / "img" / f"{s:05d}.tar", s, 24)
    cmd = [sys.executable, "-m", "cli.main", "encode", str(tmp_path / "img"), "--encoder", CFG.encoder,
           "--store", str(tmp_path / "store"), "--batch-size", str(CFG.batch_size), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            m = read_manifest(tmp_path / "store")
            if m and len(m["shards"]) >= 1:
                break
            assert proc.poll() is None, "encode finished or died before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask worker processes
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = len(read_manifest(tmp_path / "store")["shards"])
    assert 1 <= partial < n_shards, "kill landed after the run finished; the test proved nothing"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    resumed = _rows(tmp_path / "store")
    # The uninterrupted encode, in this process: the CLI's config (CFG) shard by shard, no second Dask start.
    for s in range(n_shards):
        encode_shard(tmp_path / "img" / f"{s:05d}.tar", tmp_path / "clean", CFG)
    clean = _rows(tmp_path / "clean")
    assert len(resumed) == n_shards * 24 and resumed.keys() == clean.keys()
    for k in clean:
        assert np.array_equal(resumed[k]["img"], clean[k]["img"]) and np.array_equal(resumed[k]["txt"], clean[k]["txt"])


def _shared_image_shard(path: Path) -> Path:
    """MS-COCO-like rows: each image with alt captions, a broken image with two, one image under a second key."""
    samples = [{"key": f"img{i}", "jpg": render(100 + i), "txt": f"caption {i}", "url": f"http://h/{i}",
                "alt_captions": [f"caption {i} again", f"caption {i} once more"]} for i in range(6)]
    broken = {"key": "broken", "jpg": b"\xff\xd8 not really a jpeg", "txt": "lost", "alt_captions": ["lost too"]}
    samples.insert(3, broken)
    samples.append({"key": "copy", "jpg": samples[0]["jpg"], "txt": "the first image under another key"})
    return write_tar(path, samples)


def _count_image_rows(monkeypatch, encoder) -> list[int]:
    seen: list[int] = []
    real_encode, real_pre = encoder.encode_images, encoder.preprocess
    monkeypatch.setattr(encoder, "encode_images", lambda px: seen.append(len(px)) or real_encode(px))
    monkeypatch.setattr(encoder, "preprocess", lambda ims: (seen.append(-len(ims)), real_pre(ims))[1])
    return seen


def test_the_image_tower_runs_once_per_distinct_image(tmp_path, monkeypatch):
    from pipeline.encoders import get_encoder

    tar = _shared_image_shard(tmp_path / "00000.tar")
    calls = _count_image_rows(monkeypatch, get_encoder(CFG.encoder))
    res = encode_shard(tar, tmp_path / "store", CFG)
    assert res.rows == 6 * 3 + 1 and res.images == 6
    assert sum(n for n in calls if n > 0) == 6  # image-tower rows: one per distinct decodable image
    assert -sum(n for n in calls if n < 0) == 6  # preprocess: the same images, once each
    assert all(n <= CFG.batch_size for n in calls if n > 0)
    assert read_manifest(tmp_path / "store")["shards"]["00000.parquet"]["images"] == 6
    assert sorted(s["key"] for s in res.skipped) == ["broken", "broken#1"]
    assert {s["reason"] for s in res.skipped} == {next(s["reason"] for s in res.skipped)}
    assert next(s["reason"] for s in res.skipped).startswith("corrupt image")


def test_rows_sharing_an_image_are_the_rows_encoding_each_row_apart_gives(tmp_path):
    """The reference is the old path: every row's image through the image tower, in row batches.

    Image embeddings must match bit for bit. The text tower's batches now start at other rows (a producer
    item holds whole images' rows), and a batch padded to another longest caption may move the last fp16
    bit of a value, as it always could between two batchings: text is compared to within 1e-3.
    """
    tar = _shared_image_shard(tmp_path / "00000.tar")
    encode_shard(tar, tmp_path / "store", CFG)
    got = _rows(tmp_path / "store")
    enc = load_encoder(CFG.encoder)
    samples = [s for s in iter_webdataset(tar, alt_captions=True) if not s.key.startswith("broken")]
    assert list(got) == [s.key for s in samples]  # the rows, in the tar's order
    with torch.inference_mode():
        for start in range(0, len(samples), CFG.batch_size):
            part = samples[start : start + CFG.batch_size]
            px = enc.preprocess([Image.open(io.BytesIO(s.image)).convert("RGB") for s in part])
            img = enc.encode_images(px).to(torch.float16).numpy()
            txt = enc.encode_texts([s.caption for s in part])
            for i, s in enumerate(part):
                np.testing.assert_array_equal(got[s.key]["img"], img[i])
                np.testing.assert_allclose(got[s.key]["txt"], txt.text_embeds[i].to(torch.float16).numpy(), atol=1e-3)
                np.testing.assert_allclose(got[s.key]["hid"], txt.hidden[i].astype(np.float16), atol=1e-3)
                assert got[s.key]["caption"] == s.caption


def test_many_rows_of_one_image_are_encoded_in_bounded_items(tmp_path, monkeypatch):
    from pipeline.encoders import get_encoder

    captions = [f"caption {i}" for i in range(40)]  # more than ROWS_PER_ITEM batches of rows
    tar = write_tar(tmp_path / "00000.tar", [{"key": "one", "jpg": render(7), "txt": captions[0],
                                              "alt_captions": captions[1:]}])
    calls = _count_image_rows(monkeypatch, get_encoder(CFG.encoder))
    res = encode_shard(tar, tmp_path / "store", CFG)
    assert (res.rows, res.images, [n for n in calls if n > 0]) == (40, 1, [1])
    assert [c for c in next(EmbeddingStore(tmp_path / "store").iter_batches(64, pad_to=None))["caption"]] == captions


# -- what a hostile tar may cost -------------------------------------------------------------------------


def _png_bomb(side: int) -> bytes:
    """A real PNG of side x side black RGB pixels (0.5 GB decoded at 13,000, ~0.5 MB on disk), written row by
    row through zlib so that making it costs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(6)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="GIF")
    return buf.getvalue()


def test_oversized_images_and_members_and_other_formats_are_skipped_with_the_reason(tmp_path):
    from pipeline.encode import MAX_IMAGE_PIXELS
    from pipeline.webdataset import MAX_MEMBER_BYTES

    samples = [{"key": "good", "jpg": render(0), "txt": "a good row"},
               {"key": "bomb", "jpg": _png_bomb(13_000), "txt": "13,000 x 13,000 pixels in a small file"},
               {"key": "long", "jpg": render(1), "txt": "x" * (MAX_MEMBER_BYTES["txt"] + 1)},
               {"key": "gif", "jpg": _gif(), "txt": "a GIF named .jpg"}]
    tar = write_tar(tmp_path / "img" / "00000.tar", samples)
    assert tar.stat().st_size < 2 << 20 and 13_000**2 > MAX_IMAGE_PIXELS
    result = encode_shard(tar, tmp_path / "store", CFG)
    assert result.rows == 1 and list(_rows(tmp_path / "store")) == ["good"]
    why = {s["key"]: s["reason"] for s in result.skipped}
    assert why["bomb"] == f"image too large: 13000x13000 pixels (limit {MAX_IMAGE_PIXELS:,})"
    assert why["long"].startswith(f"member too large: long.txt is {MAX_MEMBER_BYTES['txt'] + 1:,} bytes")
    assert why["gif"].startswith("corrupt image:")  # only JPEG, PNG and WebP decoders are tried
    assert read_manifest(tmp_path / "store")["shards"]["00000.parquet"]["skipped"] == result.skipped


@pytest.mark.slow
def test_a_tar_of_image_bombs_costs_no_more_memory_than_a_clean_one(tmp_path):
    """Peak memory of an encode process (ru_maxrss, read by the process itself) on 4 images of 13,000^2 pixels
    (4 x 0.5 GB decoded, two decode threads) against the same process on 4 small images."""
    bombs = write_tar(tmp_path / "bombs" / "00000.tar",
                      [{"key": f"b{i}", "jpg": _png_bomb(13_000), "txt": "bomb"} for i in range(4)])
    clean = write_tar(tmp_path / "clean" / "00000.tar",
                      [{"key": f"c{i}", "jpg": render(i), "txt": "clean"} for i in range(4)])
    code = ("import resource, sys; from pathlib import Path; from pipeline.encode import EncodeConfig, encode_shard; "
            "r = encode_shard(Path(sys.argv[1]), Path(sys.argv[2]), EncodeConfig(encoder='tiny-clip', batch_size=4)); "
            "print(r.rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = {}
    for name, tar in (("clean", clean), ("bombs", bombs)):
        out = subprocess.run([sys.executable, "-c", code, str(tar), str(tmp_path / f"store-{name}")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        rows, kib = out.stdout.split()[-2:]
        peak[name] = (int(kib) * 1024, int(rows))
    assert peak["bombs"][0] < peak["clean"][0] + (200 << 20), peak  # one decoded bomb alone would be 507 MB
    assert (peak["clean"][1], peak["bombs"][1]) == (4, 0)



# -- keys a hostile (or careless) tar may hold -------------------------------------------------------------


def _skips(result: ShardResult) -> list[tuple[str, str]]:
    return [(s["key"], s["reason"]) for s in result.skipped]


def test_a_key_used_twice_is_skipped_and_the_rest_of_the_shard_written(tmp_path):
    samples = [{"key": "x", "jpg": render(0), "txt": "the first x"}, {"key": "a", "jpg": render(1), "txt": "a"},
               {"key": "x", "jpg": render(2), "txt": "x again, later"},  # not adjacent to the first
               {"key": "x", "jpg": render(3), "txt": "x again, right after"},  # adjacent to the second
               {"key": "m", "jpg": render(4), "txt": "m", "alt_captions": ["m's second caption"]},
               {"key": "m#1", "jpg": render(5), "txt": "a sample named like m's alt caption row"}]
    tar = write_tar(tmp_path / "img" / "00000.tar", samples)
    result = encode_shard(tar, tmp_path / "store", CFG)
    rows = _rows(tmp_path / "store")
    assert list(rows) == ["x", "a", "m", "m#1"] and result.rows == 4
    assert rows["x"]["caption"] == "the first x" and rows["m#1"]["caption"] == "m's second caption"
    assert _skips(result)[:2] == [("x", "duplicate key: x (kept the first)")] * 2
    assert _skips(result)[2][0] == "m#1" and _skips(result)[2][1].startswith("key m#1 contains '#', which the store ")
    assert len(result.skipped) == 3 and read_manifest(tmp_path / "store")["shards"]["00000.parquet"]["skipped"] == \
        result.skipped


def test_samples_in_two_directories_under_one_base_name_are_not_merged(tmp_path):
    members = [("dirA/x.jpg", render(0)), ("dirA/x.txt", b"x in dirA"), ("dirB/x.jpg", render(1)),
               ("dirB/x.txt", b"x in dirB"), ("y.jpg", render(2)), ("y.txt", b"y at the top level")]
    tar = write_members(tmp_path / "img" / "00000.tar", members, count=3)
    result = encode_shard(tar, tmp_path / "store", CFG)
    rows = _rows(tmp_path / "store")
    assert list(rows) == ["x", "y"] and rows["x"]["caption"] == "x in dirA"
    assert _skips(result) == [("x", "ambiguous key: x names samples in dirA/ and in dirB/ (members in subdirectories; "
                                    "kept the first)")]
    # A tar whose samples all sit in one directory (some webdatasets' layout) keeps the base names as keys.
    one_dir = write_members(tmp_path / "img2" / "00000.tar", [(f"./shard/{m}", d) for m, d in members[4:]], count=1)
    assert [(s.key, s.caption, s.problem) for s in iter_webdataset(one_dir)] == [("y", "y at the top level", None)]


def test_a_member_name_that_is_not_utf8_is_skipped_with_the_reason(tmp_path):
    members = [("caf\udce9.jpg", render(0)), ("caf\udce9.txt", b"named in latin-1"),
               ("ok.jpg", render(1)), ("ok.txt", b"a good row")]
    tar = write_members(tmp_path / "img" / "00000.tar", members, count=2)
    assert b"caf\xe9.jpg" in tar.read_bytes()
    result = encode_shard(tar, tmp_path / "store", CFG)
    assert list(_rows(tmp_path / "store")) == ["ok"]
    assert _skips(result) == [("caf\\xe9", "member name is not UTF-8: caf\\xe9.jpg")]
    assert read_manifest(tmp_path / "store")["shards"]["00000.parquet"]["skipped"] == result.skipped


# What a child process that encodes `argv[1]` into the store `argv[2]` prints: its rows and its skipped list.
_ENCODE_CHILD = ("import json, sys; from pipeline.encode import EncodeConfig, encode_shard; "
                 "r = encode_shard(sys.argv[1], sys.argv[2], EncodeConfig(encoder='tiny-clip', batch_size=4)); "
                 "print(json.dumps({'rows': r.rows, 'skipped': r.skipped}))")


@pytest.mark.slow
def test_a_sparse_member_declaring_gigabytes_is_skipped_without_reading_it(tmp_path):
    """A 10 KB tar whose GNU sparse members declare a 2 GiB image and a 1 GiB caption: read, they would cost
    their declared size (and more). The encoding child's peak memory is held against the same child's on a
    clean tar of the same samples (importing torch alone takes most of a gigabyte on some builds)."""
    import json

    members = [("good.jpg", render(0)), ("good.txt", b"a good row"),
               ("huge.jpg", 2 << 30), ("huge.txt", b"an image of 2 GiB"),
               ("long.jpg", render(1)), ("long.txt", 1 << 30)]
    tar = write_members(tmp_path / "img" / "00000.tar", members, count=3)
    assert tar.stat().st_size < 64 << 10
    clean = write_members(tmp_path / "clean" / "00000.tar", [(n, d if isinstance(d, bytes) else b"small")
                                                             for n, d in members], count=3)
    _, clean_peak = run_measured(_ENCODE_CHILD, str(clean), str(tmp_path / "store-clean"))
    stdout, peak = run_measured(_ENCODE_CHILD, str(tar), str(tmp_path / "store"))
    assert peak < clean_peak + (300 << 20), f"peak RSS {peak / 2**20:.0f} MiB, clean {clean_peak / 2**20:.0f} MiB"
    result = json.loads(stdout)
    assert result["rows"] == 1 and list(_rows(tmp_path / "store")) == ["good"]
    assert result["skipped"] == [
        {"key": "huge", "reason": "member too large: huge.jpg is 2,147,483,648 bytes (limit 33,554,432)"},
        {"key": "long", "reason": "member too large: long.txt is 1,073,741,824 bytes (limit 65,536)"}]
