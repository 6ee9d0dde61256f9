"""pipeline.webdataset: image-text tars from the hub (or laid out by hand) as image shards, then encoded."""

import pandas as pd
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
