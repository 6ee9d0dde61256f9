"""Sources: presets, local url lists with various column names, filters, sampling, offline behaviour."""

import json
import time

import pandas as pd
import pytest
from hubfixtures import (  # noqa: F401 - fake_hub and hf_env are fixtures, used by name
    TOKEN,
    downloads,
    fake_hub,
    hf_env,
    laion_like,
    no_offline_env,
    tar_bytes,
)

from pipeline.errors import SourceAccessError, SourceError, SourceUnavailableError
from pipeline.hub import check_reachable
from pipeline.sources import (
    SOURCE_PRESETS,
    Source,
    list_presets,
    prepare_url_list,
    read_url_list_report,
    resolve_source,
)
from pipeline.webdataset import materialize_webdataset


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


def _sample_by_full_sort(frames: list[pd.DataFrame], k: int, seed: int) -> pd.DataFrame:
    """The sampled path as it was before it filtered by a threshold: every file merged into the kept rows,
    de-duplicated and sorted again. The oracle the linear one must equal, row for row."""
    from pipeline.sources import _score

    kept = None
    for df in frames:
        merged = df if kept is None else pd.concat([kept, df], ignore_index=True)
        deduped = merged.drop_duplicates("url", keep="first")
        deduped = deduped.assign(_score=_score(deduped["url"], seed))
        kept = deduped.sort_values("_score", kind="stable").head(k).drop(columns="_score")
    return kept.reset_index(drop=True)


def _synthetic_metadata(files: int, rows: int, distinct: int, seed: int = 0) -> list[pd.DataFrame]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for f in range(files):
        ids = rng.integers(0, distinct, rows)  # urls repeat within and across files
        out.append(pd.DataFrame({"url": [f"http://h/{i}.jpg" for i in ids],
                                 "caption": [f"file {f} row {r}" for r in range(rows)]}))
    return out


@pytest.mark.parametrize(("files", "rows", "distinct", "ks"), [
    (8, 5_000, 30_000, (100, 1_000, 7_000, 50_000)),  # a sample larger than the distinct urls too
    pytest.param(20, 100_000, 1_500_000, (20_000, 200_000), marks=pytest.mark.slow),  # 2M rows
])
def test_the_linear_sample_is_the_full_sort_sample_and_nested(files, rows, distinct, ks):
    from pipeline.sources import UrlListReport, _seeded_sample

    frames = _synthetic_metadata(files, rows, distinct)
    samples = []
    for k in ks:
        report = UrlListReport(source="s", sample_size=k, seed=3, source_spec="x")
        got, passed = _seeded_sample(iter(frames), k, 3, report)
        assert passed == files * rows
        got = got.reset_index(drop=True)
        pd.testing.assert_frame_equal(got, _sample_by_full_sort(frames, k, 3))
        samples.append(got)
    for small, big in zip(samples[:-1], samples[1:], strict=True):  # nested: a smaller sample is a head
        pd.testing.assert_frame_equal(small, big.head(len(small)))


def test_missing_value_markers_are_not_captions(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text("url,caption\nhttp://h/1.jpg,NaN\nhttp://h/2.jpg,None\nhttp://h/3.jpg,null\n"
                   "http://h/4.jpg,nan bread on a table\nhttp://h/5.jpg,a cat\n")
    out = prepare_url_list(resolve_source(src), tmp_path / "out")
    assert pd.read_parquet(out)["caption"].tolist() == ["nan bread on a table", "a cat"]
    assert read_url_list_report(out)["filtered_out"] == {"caption is a missing-value marker (nan, None, null)": 3}


def test_an_extra_column_of_mixed_types_is_kept_as_text_and_named(tmp_path, caplog):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jsonl").write_text('{"url": "http://h/1.jpg", "caption": "a", "size": 1}\n'
                                 '{"url": "http://h/2.jpg", "caption": "b", "size": "big"}\n')
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        out = prepare_url_list(resolve_source(one / "a.jsonl"), tmp_path / "out1")
    assert pd.read_parquet(out)["size"].tolist() == ["1", "big"]
    assert f"{one / 'a.jsonl'}: extra column 'size' mixes value types (int, str)" in caplog.text
    # one type in each file, another type in each: numbers here, text there
    two = tmp_path / "two"
    two.mkdir()
    pd.DataFrame({"url": ["http://h/1.jpg"], "caption": ["a"], "size": [1]}).to_parquet(two / "a.parquet")
    pd.DataFrame({"url": ["http://h/2.jpg"], "caption": ["b"], "size": ["big"]}).to_parquet(two / "b.parquet")
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        out = prepare_url_list(resolve_source(two), tmp_path / "out2")
    assert sorted(pd.read_parquet(out)["size"].tolist()) == ["1", "big"]
    assert "extra column(s) ['size'] hold numbers in some files and text in others; kept as text" in caplog.text


def test_rows_whose_url_is_not_http_are_dropped_and_named_unless_allowed(tmp_path):
    src = tmp_path / "pairs.csv"
    secret = tmp_path / "secret.png"
    src.write_text(
        "url,caption\n"
        "http://h/1.jpg,a cat\n"
        f"file://{secret},my secret\n"  # would be read into the shards by img2dataset
        "FILE:///dev/zero,endless\n"
        f"{secret},a bare path\n"
        "ftp://h/2.jpg,another scheme\n"
        "HTTPS://h/3.jpg,upper-case scheme is fine\n"
    )
    out = prepare_url_list(resolve_source(src), tmp_path / "out")
    assert pd.read_parquet(out)["url"].tolist() == ["http://h/1.jpg", "HTTPS://h/3.jpg"]
    rep = read_url_list_report(out)
    assert rep["filtered_out"] == {"not an http(s) url": 4} and rep["rows_written"] == 2
    assert rep["refused_urls"] == [f"file://{secret}", "FILE:///dev/zero", str(secret), "ftp://h/2.jpg"]
    mine = prepare_url_list(resolve_source(src, allow_local_files=True), tmp_path / "mine")  # the user's own list
    assert len(pd.read_parquet(mine)) == 6 and read_url_list_report(mine)["filtered_out"] == {}


def test_the_command_line_names_the_url_and_caption_columns_and_the_guess_is_logged(tmp_path, caplog):
    import logging

    from cli.main import _source_options, build_parser

    src = tmp_path / "pairs.csv"
    src.write_text("link,words\nhttp://h/1.jpg,a cat\n")
    with pytest.raises(SourceError, match="--caption-col"):
        prepare_url_list(resolve_source(src), tmp_path / "guessed")
    for command in (["download", str(src), "--out", "o"], ["precompute", "--urls", str(src), "--out", "o",
                                                           "--encoder", "tiny-clip", "--retry-failed"]):
        args = build_parser().parse_args([*command, "--url-col", "link", "--caption-col", "words"])
        assert _source_options(args) == {"url_col": "link", "caption_col": "words"}
    assert args.retry_failed is True  # precompute takes --retry-failed, as the download error suggests
    with caplog.at_level(logging.INFO, logger="pipeline.sources"):
        out = prepare_url_list(resolve_source(src, **_source_options(args)), tmp_path / "named")
    assert pd.read_parquet(out)[["url", "caption"]].values.tolist() == [["http://h/1.jpg", "a cat"]]
    assert "url column 'link', caption column 'words'" in caplog.text
    with caplog.at_level(logging.INFO, logger="pipeline.sources"):
        prepare_url_list(resolve_source(tmp_path / "named" / "pairs.urls.parquet"), tmp_path / "again")
    assert "url column 'url', caption column 'caption' (guessed" in caplog.text


def test_jsonl_with_image_url_and_text(tmp_path):
    rows = [{"image_url": f"http://h/{i}.png", "text": f"caption {i}", "meta": {"i": i}} for i in range(5)]
    rows.append(rows[0])
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    df = pd.read_parquet(prepare_url_list(resolve_source(p), tmp_path))
    assert df["url"].tolist() == [f"http://h/{i}.png" for i in range(5)]
    assert df["caption"].tolist() == [f"caption {i}" for i in range(5)]
    assert df["meta"].tolist()[:2] == [{"i": 0}, {"i": 1}]  # extra columns travel with the pairs


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


@pytest.mark.parametrize("name", sorted(SOURCE_PRESETS))
@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "ECLIPSE_OFFLINE"])
def test_internet_preset_fails_fast_when_offline(tmp_path, monkeypatch, name, flag):
    no_offline_env(monkeypatch)
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
    no_offline_env(monkeypatch)
    port = _closed_port()  # loopback, nothing listening: a real probe, no internet involved
    src = Source(name="remote", files=(f"http://127.0.0.1:{port}/meta.parquet",), file_format="parquet",
                 metadata_dir=str(tmp_path / "cache"))
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="needs the internet"):
        prepare_url_list(src, tmp_path)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(SourceUnavailableError):
        check_reachable(f"http://127.0.0.1:{port}/", timeout=1.0)


def test_laion_preset_filters_and_seeded_nested_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # metadata is local: no network needed or allowed
    meta = tmp_path / "meta"
    meta.mkdir()
    a, b = laion_like(200, 0, 1), laion_like(200, 200, 2)
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
    assert rep["sampled_out"] > 0
    # Every row read is accounted for exactly once.
    assert rep["rows_read"] == (sum(rep["filtered_out"].values()) + rep["empty_captions_dropped"]
                                + rep["duplicates_dropped"] + rep["sampled_out"] + rep["rows_written"])


def test_prepare_is_deterministic_and_atomic(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("url,caption\n" + "".join(f"http://h/{i % 7}.jpg,c{i}\n" for i in range(20)))
    first = prepare_url_list(resolve_source(p), tmp_path / "o")
    bytes_1 = pd.read_parquet(first)
    second = prepare_url_list(resolve_source(p), tmp_path / "o")
    assert first == second and bytes_1.equals(pd.read_parquet(second))
    assert [f.name for f in (tmp_path / "o").iterdir()] == ["x.urls.parquet"]  # no temp files left


# ---------------------------------------------------------------------------- the hub, with the real client


def test_gated_repo_refused_without_token_then_login_or_hf_token(fake_hub, hf_env, tmp_path, monkeypatch):  # noqa: F811 - fixtures by name
    src = resolve_source("laion-highres-5m", sample_size=30)
    with pytest.raises(SourceAccessError, match=r"gated.*HTTP 401.*terms.*huggingface-cli login.*HF_TOKEN"):
        prepare_url_list(src, tmp_path / "o")
    assert any(r.startswith("HEAD /datasets/laion/") and r.endswith(" -") for r in fake_hub.requests())
    monkeypatch.setenv("HF_TOKEN", "hf_not_on_the_list")
    with pytest.raises(SourceAccessError, match="HTTP 403.*terms"):
        prepare_url_list(src, tmp_path / "o")
    monkeypatch.delenv("HF_TOKEN")
    hf_env.parent.mkdir(parents=True, exist_ok=True)
    hf_env.write_text(TOKEN)  # a login saved by `huggingface-cli login`
    assert len(pd.read_parquet(prepare_url_list(src, tmp_path / "o"))) == 30
    hf_env.unlink()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "another-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.clear_log()
    assert len(pd.read_parquet(prepare_url_list(src, tmp_path / "o2"))) == 30
    # The CDN redirect leaves the hub's host, so the token is not sent there (the real hub's rule).
    assert all(r.endswith(" -") for r in fake_hub.requests() if r.startswith("GET /cdn/"))
    assert any(r.endswith(" auth") for r in fake_hub.requests() if "/resolve/" in r)


def test_hub_preset_lists_renamed_parts_keeps_filters_and_reuses_cache(fake_hub, hf_env, tmp_path, monkeypatch):  # noqa: F811 - fixtures by name
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    src = resolve_source("laion-highres-5m", sample_size=1000)  # more than there are: every row that passes
    df = pd.read_parquet(prepare_url_list(src, tmp_path / "o1"))
    rep = read_url_list_report(tmp_path / "o1" / "laion-highres-5m.urls.parquet")
    assert rep["files"] == 3 and rep["rows_read"] == 120  # all three parts, found by listing two pages
    assert {"language not in ['en']", "punsafe>=0.5", "pwatermark>=0.8", "width<1024"} <= set(rep["filtered_out"])
    assert (df["LANGUAGE"] == "en").all() and (df["WIDTH"] >= 1024).all() and len(df) == rep["rows_written"] < 120
    tree_pages = [r for r in fake_hub.requests() if "/tree/" in r]
    assert len(tree_pages) == 2  # 4 files, 2 a page: the listing followed the Link header
    assert len([r for r in downloads(fake_hub) if r.startswith("GET /cdn/")]) == 3  # README not fetched

    fake_hub.clear_log()
    again = pd.read_parquet(prepare_url_list(src, tmp_path / "o2"))
    assert again.equals(df)
    assert downloads(fake_hub) == []  # second run: the cache, not one file request

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cached snapshot, no request at all
    fake_hub.clear_log()
    assert pd.read_parquet(prepare_url_list(src, tmp_path / "o3")).equals(df)
    assert fake_hub.requests() == []


def test_unreachable_hub_says_so_and_suggests_metadata_dir(tmp_path, monkeypatch):
    no_offline_env(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="cannot reach.*--metadata-dir"):
        prepare_url_list(resolve_source("mscoco"), tmp_path / "o")
    assert time.monotonic() - t0 < 5.0


def test_metadata_dir_files_are_recognised_by_pattern(tmp_path, monkeypatch):
    monkeypatch.setenv("ECLIPSE_OFFLINE", "1")  # hand-placed files need no network
    meta = tmp_path / "meta"
    (meta / "sub").mkdir(parents=True)
    (meta / ".cache" / "huggingface").mkdir(parents=True)  # what `huggingface-cli download --local-dir` leaves
    laion_like(20, 0, 1).to_parquet(meta / "whatever-name-1.parquet")
    laion_like(20, 20, 2).to_parquet(meta / "sub" / "part-x.snappy.parquet")
    laion_like(20, 40, 3).to_parquet(meta / ".cache" / "huggingface" / "stale.parquet")
    (meta / "notes.txt").write_text("not metadata")
    out = prepare_url_list(resolve_source("laion-highres-5m", metadata_dir=str(meta), sample_size=100), tmp_path)
    assert read_url_list_report(out)["rows_read"] == 40


def test_cli_and_deployment_take_metadata_dir():
    from cli.main import build_parser
    from flows.params import DownloadParams

    for cmd in (["download", "cc3m", "--out", "o"], ["precompute", "--urls", "cc3m", "--out", "o", "--encoder", "x"]):
        assert build_parser().parse_args([*cmd, "--metadata-dir", "/data/cc3m"]).metadata_dir == "/data/cc3m"
    assert DownloadParams(metadata_dir="/data/laion").metadata_dir == "/data/laion"


def test_mscoco_every_caption_becomes_a_pair(tmp_path):
    """img2dataset saves the url list's alt_captions in KEY.json; encode makes each caption its own pair."""
    import json

    from wdsfixtures import render

    from pipeline.encode import EncodeConfig, encode_shard
    from storage_schema import EmbeddingStore

    p = tmp_path / "coco.csv"
    p.write_text("URL,TEXT\n" + "".join(f"http://h/{i}.jpg,caption {c} of {i}\n" for i in range(2) for c in range(5)))
    urls = pd.read_parquet(prepare_url_list(resolve_source(p, collect_alt_captions=True), tmp_path))
    members = {}
    for i, row in urls.iterrows():  # what img2dataset writes for these rows
        key = f"{i:09d}"
        members[f"{key}.jpg"] = render(i)
        members[f"{key}.txt"] = row["caption"].encode()
        members[f"{key}.json"] = json.dumps({"url": row["url"], "alt_captions": list(row["alt_captions"])}).encode()
    tar = tmp_path / "img" / "00000.tar"
    tar.parent.mkdir()
    tar.write_bytes(tar_bytes(members))
    cfg = EncodeConfig(encoder="tiny-clip", batch_size=4)
    assert encode_shard(tar, tmp_path / "all", cfg).rows == 10  # 2 images x 5 captions
    caps = {}
    for b in EmbeddingStore(tmp_path / "all").iter_batches(64, pad_to=None):
        caps.update(zip(b["key"], b["caption"], strict=True))
    assert caps["000000000"] == "caption 0 of 0" and caps["000000000#4"] == "caption 4 of 0"
    assert sorted(caps.values()) == sorted(f"caption {c} of {i}" for i in range(2) for c in range(5))
    assert encode_shard(tar, tmp_path / "first", EncodeConfig(encoder="tiny-clip", alt_captions=False)).rows == 2
