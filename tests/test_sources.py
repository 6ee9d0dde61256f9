"""Sources: presets, local url lists with various column names, filters, sampling, offline behaviour."""

import json
import time

import pandas as pd
import pytest

from pipeline.hub import materialize_webdataset
from pipeline.sources import (
    OFFLINE_ENV_VARS,
    PRESETS,
    Source,
    SourceError,
    SourceUnavailableError,
    check_reachable,
    list_presets,
    prepare_url_list,
    read_url_list_report,
    resolve_source,
)


def _no_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in OFFLINE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_csv_upper_case_columns_dedup_and_empty_captions(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text(
        "URL,TEXT,width,score\n"
        "http://h/1.jpg,a cat,10,0.5\n"
        "http://h/1.jpg,a cat again,10,0.5\n"  # duplicate url
        "http://h/2.jpg,,3,1\n"  # empty caption
        "http://h/3.jpg,  a dog ,4,2\n"
        "http://h/4.jpg,   ,4,2\n"  # blank caption
        ",no url,1,1\n"
    )
    out = prepare_url_list(resolve_source(src), tmp_path / "out")
    df = pd.read_parquet(out)
    assert list(df.columns) == ["url", "caption", "src_width", "score"]  # `width` is reserved by img2dataset
    assert df["url"].tolist() == ["http://h/1.jpg", "http://h/3.jpg"]
    assert df["caption"].tolist() == ["a cat", "a dog"]  # first caption wins, whitespace stripped
    rep = read_url_list_report(out)
    assert rep is not None
    assert (rep["rows_read"], rep["duplicates_dropped"], rep["empty_captions_dropped"]) == (6, 1, 2)
    assert rep["filtered_out"] == {"empty url": 1}
    assert (rep["url_col"], rep["caption_col"], rep["rows_written"]) == ("URL", "TEXT", 2)


def test_jsonl_with_image_url_and_text(tmp_path):
    rows = [{"image_url": f"http://h/{i}.png", "text": f"caption {i}", "meta": {"i": i}} for i in range(5)]
    rows.append(rows[0])
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    df = pd.read_parquet(prepare_url_list(resolve_source(p), tmp_path))
    assert df["url"].tolist() == [f"http://h/{i}.png" for i in range(5)]
    assert df["caption"].tolist() == [f"caption {i}" for i in range(5)]
    assert "meta" in df.columns


def test_tsv_and_parquet_folder(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text('url\tcaption\nhttp://h/1.jpg\tsays "hi" with quotes\nhttp://h/2.jpg\tplain\n')
    df = pd.read_parquet(prepare_url_list(resolve_source(tsv), tmp_path / "o1"))
    assert df["caption"].tolist() == ['says "hi" with quotes', "plain"]

    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"url": ["http://h/1", "http://h/2"], "caption": ["a", "b"], "key": [1, 2]}).to_parquet(
        folder / "part-0.parquet")
    pd.DataFrame({"url": ["http://h/2", "http://h/3"], "caption": ["b2", "c"], "key": [3, 4]}).to_parquet(
        folder / "part-1.parquet")
    src = resolve_source(folder)
    assert src.file_format == "parquet" and len(src.files) == 2
    out = prepare_url_list(src, tmp_path / "o2")
    df = pd.read_parquet(out)
    assert df["url"].tolist() == ["http://h/1", "http://h/2", "http://h/3"]
    assert df["src_key"].tolist() == [1, 2, 4]  # typed extras survive; reserved name prefixed
    assert read_url_list_report(out)["duplicates_dropped"] == 1


def test_explicit_columns_and_clear_errors(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("link_to_img,words\nhttp://h/1.jpg,hello\n")
    with pytest.raises(SourceError, match="url column"):
        prepare_url_list(resolve_source(p), tmp_path)
    src = resolve_source(p, url_col="link_to_img", caption_col="words")
    assert pd.read_parquet(prepare_url_list(src, tmp_path))["caption"].tolist() == ["hello"]
    with pytest.raises(SourceError, match="neither a preset"):
        resolve_source(tmp_path / "nope.csv")
    with pytest.raises(SourceError, match="unknown source option"):
        resolve_source(p, colour="red")


def test_collect_alt_captions(tmp_path):
    p = tmp_path / "coco.csv"
    p.write_text("URL,TEXT\nhttp://h/1.jpg,one\nhttp://h/1.jpg,uno\nhttp://h/2.jpg,two\nhttp://h/1.jpg,one\n")
    df = pd.read_parquet(prepare_url_list(resolve_source(p, collect_alt_captions=True), tmp_path))
    assert df["caption"].tolist() == ["one", "two"]
    assert [list(x) for x in df["alt_captions"]] == [["uno"], []]


def test_presets_are_documented():
    assert set(list_presets()) == {"laion-highres-5m", "mscoco", "cc3m", "cc12m"}
    laion = resolve_source("laion-highres-5m")
    assert (laion.url_col, laion.caption_col, laion.sample_size) == ("URL", "TEXT", 5_000_000)
    # Listed on the hub and matched by a glob: the parts were renamed when the repo was restored.
    assert (laion.hub_repo, laion.hub_pattern, laion.files) == ("laion/laion-high-resolution", "*.parquet", ())
    assert laion.filters.languages == ("en",) and laion.filters.min_width == 1024
    assert resolve_source("mscoco").collect_alt_captions
    for name, repo in (("cc3m", "pixparse/cc3m-wds"), ("cc12m", "pixparse/cc12m-wds")):
        src = resolve_source(name)  # Google's TSVs answer 403: the hub's webdataset copies instead
        assert (src.kind, src.hub_repo, src.hub_pattern) == ("webdataset", repo, f"{name}-train-*.tar")
        with pytest.raises(SourceError, match="webdataset"):
            prepare_url_list(src, "unused")
    assert resolve_source("laion-highres-5m", sample_size=10, seed=3).sample_size == 10


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "ECLIPSE_OFFLINE"])
def test_internet_preset_fails_fast_when_offline(tmp_path, monkeypatch, name, flag):
    _no_offline_env(monkeypatch)
    monkeypatch.setenv(flag, "1")  # refused before any network call
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    src = resolve_source(name, metadata_dir=str(tmp_path / "empty"))
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match=f"{flag} is set.*--metadata-dir"):
        if src.kind == "webdataset":
            materialize_webdataset(src, tmp_path / "out")
        else:
            prepare_url_list(src, tmp_path / "out")
    assert time.monotonic() - t0 < 2.0
    assert not (tmp_path / "out").exists()


def test_unreachable_host_fails_fast(tmp_path, monkeypatch):
    _no_offline_env(monkeypatch)
    port = _closed_port()  # loopback, nothing listening: a real probe, no internet involved
    src = Source(name="remote", files=(f"http://127.0.0.1:{port}/meta.parquet",), file_format="parquet",
                 metadata_dir=str(tmp_path / "cache"))
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="needs the internet"):
        prepare_url_list(src, tmp_path)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(SourceUnavailableError):
        check_reachable(f"http://127.0.0.1:{port}/", timeout=1.0)


def _laion_like(n: int, offset: int, seed: int) -> pd.DataFrame:
    """Rows in LAION-HighRes's column layout; every 5th row violates one filter."""
    import numpy as np

    rng = np.random.default_rng(seed)
    i = np.arange(offset, offset + n)
    df = pd.DataFrame({
        "URL": [f"http://laion/{k}.jpg" for k in i],
        "TEXT": [f"picture number {k}" for k in i],
        "WIDTH": rng.integers(1024, 4000, n).astype(float),
        "HEIGHT": rng.integers(1024, 4000, n).astype(float),
        "similarity": rng.random(n),
        "hash": rng.integers(-(2**62), 2**62, n),
        "punsafe": rng.random(n) * 0.3,
        "pwatermark": rng.random(n) * 0.5,
        "LANGUAGE": ["en"] * n,
    })
    bad = i % 5 == 0
    kinds = (i // 5) % 5
    df.loc[bad & (kinds == 0), "LANGUAGE"] = "de"
    df.loc[bad & (kinds == 1), "punsafe"] = 0.9
    df.loc[bad & (kinds == 2), "pwatermark"] = 0.95
    df.loc[bad & (kinds == 3), "WIDTH"] = 512.0
    df.loc[bad & (kinds == 4), "TEXT"] = "hi"  # shorter than min_caption_chars=5
    return df


def test_laion_preset_filters_and_seeded_nested_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # metadata is local: no network needed or allowed
    meta = tmp_path / "meta"
    meta.mkdir()
    a, b = _laion_like(200, 0, 1), _laion_like(200, 200, 2)
    b = pd.concat([b, a.iloc[[1, 2, 3]]], ignore_index=True)  # cross-file duplicates
    a.to_parquet(meta / "part-00000.parquet")
    b.to_parquet(meta / "part-00001.parquet")

    def sample(n: int, seed: int = 0, folder=meta) -> pd.DataFrame:
        src = resolve_source("laion-highres-5m", metadata_dir=str(folder), sample_size=n, seed=seed)
        return pd.read_parquet(prepare_url_list(src, tmp_path / f"out-{n}-{seed}-{folder.name}"))

    s50 = sample(50)
    assert len(s50) == 50 and s50["url"].is_unique
    assert (s50["LANGUAGE"] == "en").all() and (s50["punsafe"] < 0.5).all() and (s50["pwatermark"] < 0.8).all()
    assert (s50["WIDTH"] >= 1024).all() and (s50["caption"].str.len() >= 5).all()
    assert list(s50.columns[:2]) == ["url", "caption"]
    assert s50.equals(sample(50))  # deterministic
    assert s50.head(20).equals(sample(20))  # nested, and written in sampling order
    assert set(sample(50, seed=1)["url"]) != set(s50["url"])
    # Independent of file order / names.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    a.to_parquet(swapped / "part-00001.parquet")
    b.to_parquet(swapped / "part-00000.parquet")
    assert set(sample(50, folder=swapped)["url"]) == set(s50["url"])

    rep = read_url_list_report(tmp_path / "out-50-0-meta" / "laion-highres-5m.urls.parquet")
    assert rep["rows_read"] == 403 and rep["rows_written"] == 50
    assert set(rep["filtered_out"]) == {"language not in ['en']", "punsafe>=0.5", "pwatermark>=0.8", "width<1024"}
    assert rep["empty_captions_dropped"] == 16  # the "hi" captions
    assert rep["duplicates_dropped"] >= 0 and rep["sampled_out"] > 0


def test_prepare_is_deterministic_and_atomic(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("url,caption\n" + "".join(f"http://h/{i % 7}.jpg,c{i}\n" for i in range(20)))
    first = prepare_url_list(resolve_source(p), tmp_path / "o")
    bytes_1 = pd.read_parquet(first)
    second = prepare_url_list(resolve_source(p), tmp_path / "o")
    assert first == second and bytes_1.equals(pd.read_parquet(second))
    assert [f.name for f in (tmp_path / "o").iterdir()] == ["x.urls.parquet"]  # no temp files left
