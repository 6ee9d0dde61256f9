"""pipeline.webdataset: image-text tars from the hub (or laid out by hand) as image shards, then encoded."""

import pandas as pd
import pytest
from hubfixtures import fake_hub, hf_env  # noqa: F401 - fixtures by name


def test_webdataset_from_the_hub_encoded_end_to_end(fake_hub, hf_env, tmp_path):  # noqa: F811 - fixtures by name
    from pipeline.download import download_main
    from pipeline.encode import EncodeConfig, encode_shard, image_shards
    from storage_schema import EmbeddingStore

    images = tmp_path / "images"
    summary = download_main("cc3m", images)
    assert [s.count for s in summary.shards] == [3, 3] and summary.successes == 5 and summary.failed_to_download == 1
    assert sorted(p.name for p in images.iterdir() if not p.name.startswith("_")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    assert not any("validation" in r for r in fake_hub.requests())  # the glob picked the train split only
    assert pd.read_parquet(images / "00001.parquet")["status"].tolist() == ["success", "success", "failed_to_download"]
    assert not (images / "_pipeline" / "url_list.parquet").exists()  # no url list, no img2dataset pass

    store = tmp_path / "store"
    for tar in image_shards(images):
        encode_shard(tar, store, EncodeConfig(encoder="tiny-clip", batch_size=4))
    es = EmbeddingStore(store)
    assert es.num_rows == 5
    keys = sorted(k for _, ks in es.keys() for k in ks)
    assert keys == [f"{i:09d}" for i in range(5)]  # 000000005 had no caption

    fake_hub.clear_log()
    again = download_main("cc3m", images)  # complete: read back from the folder, the hub is not asked
    assert again.new_shards == [] and again.successes == 5 and fake_hub.requests() == []


def test_webdataset_resumes_and_takes_hand_placed_tars(fake_hub, hf_env, tmp_path, monkeypatch):  # noqa: F811 - fixtures by name
    from pipeline.download import download_main

    images = tmp_path / "images"
    download_main("cc3m", images, source_options={"max_files": 1})
    assert sorted(p.name for p in images.glob("*.tar")) == ["00000.tar"]

    # Offline, with the tars downloaded by hand under other folders: linked, not fetched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manual = tmp_path / "manual" / "nested"
    manual.mkdir(parents=True)
    for t in range(2):
        (manual / f"cc3m-train-{t:04d}.tar").write_bytes(
            (fake_hub.root / "datasets" / "pixparse" / "cc3m-wds" / f"cc3m-train-{t:04d}.tar").read_bytes())
    fake_hub.clear_log()
    s = download_main("cc3m", tmp_path / "images2", source_options={"metadata_dir": str(tmp_path / "manual")})
    assert s.successes == 5 and fake_hub.requests() == []
    assert (tmp_path / "images2" / "00001.tar").stat().st_ino == (manual / "cc3m-train-0001.tar").stat().st_ino


def _hostile_members() -> list[tuple[str, bytes | int]]:
    from wdsfixtures import render

    return [("good.jpg", render(0)), ("good.txt", b"a good row"),
            ("huge.jpg", 2 << 30), ("huge.txt", b"an image of 2 GiB in a sparse member"),
            ("long.jpg", render(1)), ("long.txt", 1 << 30),
            ("good.jpg", render(2)), ("good.txt", b"good, again"),
            ("other/good.jpg", render(3)), ("other/good.txt", b"good, in another directory"),
            ("a#1.jpg", render(4)), ("a#1.txt", b"named like an alt caption row"),
            ("caf\udce9.jpg", render(5)), ("caf\udce9.txt", b"a name in latin-1")]


def test_index_tar_fails_the_samples_the_encode_stage_skips(tmp_path):
    """The download summary counts as failed what the encode stage will skip, with the same reason."""
    from wdsfixtures import write_members

    from pipeline.encode import iter_webdataset
    from pipeline.webdataset import index_tar

    tar = write_members(tmp_path / "00000.tar", _hostile_members(), count=7)
    table, stats = index_tar(tar, "test")
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["good", "huge", "long", "good", "good", "a#1", "caf\\xe9"]
    assert [r["status"] for r in rows] == ["success"] + ["failed_to_download"] * 6
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (7, 1, 6)
    assert rows[0]["caption"] == "a good row" and rows[0]["url"] == "test#good"
    skipped = [(s.key, s.problem) for s in iter_webdataset(tar)][1:]
    assert [(r["key"], r["error_message"]) for r in rows[1:]] == skipped
    assert rows[1]["error_message"] == "member too large: huge.jpg is 2,147,483,648 bytes (limit 33,554,432)"
    assert rows[2]["error_message"] == "member too large: long.txt is 1,073,741,824 bytes (limit 65,536)"


@pytest.mark.slow
def test_index_tar_of_sparse_members_declaring_gigabytes_stays_small(tmp_path):
    """The download stage indexes a 10 KB tar whose sparse members declare 3 GiB without reading them."""
    import json

    from wdsfixtures import run_measured, write_members

    tar = write_members(tmp_path / "00000.tar", _hostile_members()[:6], count=3)
    code = ("import json, sys; from pathlib import Path; from pipeline.webdataset import index_tar; "
            "t, s = index_tar(Path(sys.argv[1]), 'test'); print(json.dumps(t.to_pylist()))")
    stdout, peak = run_measured(code, str(tar))
    assert peak < 500 << 20, f"peak RSS {peak / 2**20:.0f} MiB"  # importing the download stage: ~130 MB
    assert [(r["key"], r["status"], (r["error_message"] or "")[:18]) for r in json.loads(stdout)] == [
        ("good", "success", ""), ("huge", "failed_to_download", "member too large: "),
        ("long", "failed_to_download", "member too large: ")]
