"""Download stage against the real img2dataset and a real loopback image server (separate process)."""

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name
from PIL import Image

from cli.main import main as cli_main
from demo.server import free_port
from pipeline.download import (
    SUMMARY_PATH,
    URL_LIST_PATH,
    DownloadConfig,
    DownloadFailed,
    download,
    download_main,
    retry_failed,
)
from pipeline.download_summary import DownloadSummary, summarize
from pipeline.errors import DownloadError, is_permanent
from pipeline.shards import STATE_PATH, completed_shard_ids, completed_shards
from pipeline.sources import read_url_list_report
from pipeline.webdataset import MAX_MEMBER_BYTES

ROOT = Path(__file__).resolve().parents[1]

SLOW_S = 5  # the /slow url sleeps this long ...
TIMEOUT_S = 2  # ... which is longer than the download timeout of the first run
CFG = dict(processes_count=1, thread_count=8, number_sample_per_shard=4, timeout=TIMEOUT_S, image_size=32)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _read_tars(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def first_run(image_server: ImageServer, tmp_path_factory):  # noqa: F811 - fixture by name
    """One real download of good + duplicate + 404 + corrupt + slow + 500 urls, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("dl")
    good = {image_server.url(f"/img/{i}.{'png' if i % 3 == 0 else 'jpg'}"): f"picture {i}" for i in range(6)}
    bad = {
        image_server.url("/missing/1.jpg"): "http_404",
        image_server.url("/corrupt/2.jpg"): "decode_error",
        image_server.url(f"/slow/{SLOW_S}/3.jpg"): "timeout",
        image_server.url("/status/500/4.jpg"): "http_5xx",
    }
    rows = [(u, c) for u, c in good.items()] + [(u, f"bad {r}") for u, r in bad.items()]
    rows.insert(3, (next(iter(good)), "duplicate of the first url"))
    rows.append((list(good)[4], "another duplicate"))
    csv = tmp / "pairs.csv"
    pd.DataFrame({"URL": [u for u, _ in rows], "TEXT": [c for _, c in rows],
                  "row": range(len(rows))}).to_csv(csv, index=False)
    out = tmp / "shards"
    records = _Records()
    logging.getLogger("pipeline.download").addHandler(records)
    try:
        summary = download_main(csv, out, **CFG)
    finally:
        logging.getLogger("pipeline.download").removeHandler(records)
    return {"out": out, "csv": csv, "good": good, "bad": bad, "summary": summary, "warnings": records.messages,
            "bad_reasons": {r: 1 for r in bad.values()}}


@pytest.mark.slow
def test_shards_hold_exactly_the_good_samples(first_run):
    out, good = first_run["out"], first_run["good"]
    samples = _read_tars(out)
    assert len(samples) == len(good)
    by_url = {json.loads(s["json"])["url"]: s for s in samples.values()}
    assert set(by_url) == set(good)
    for url, s in by_url.items():
        assert s["txt"].decode() == good[url]  # the first caption of a duplicated url is kept
        meta = json.loads(s["json"])
        assert meta["status"] == "success" and "row" in meta  # extra column saved by img2dataset
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (32, 32)  # configurable size, center_crop
    assert len(completed_shards(out)) == 3  # 10 unique urls, 4 per shard


@pytest.mark.slow
def test_duplicates_removed_before_download(first_run):
    out, summary = first_run["out"], first_run["summary"]
    rep = read_url_list_report(out / URL_LIST_PATH)
    assert rep["duplicates_dropped"] == 2 and rep["rows_written"] == 10
    assert summary.count == summary.unique_urls == 10


@pytest.mark.slow
def test_summary_counts_failures_by_reason(first_run):
    out, summary = first_run["out"], first_run["summary"]
    assert summary.successes == 6 and summary.failed_to_download == 3 and summary.failed_to_resize == 1
    assert summary.failure_reasons == {"http_404": 1, "decode_error": 1, "timeout": 1, "http_5xx": 1}
    assert summary.unresolved_reasons == summary.failure_reasons
    assert summary.error_rate == pytest.approx(0.4) and summary.unresolved_failures == 4
    assert summary.new_shards == [0, 1, 2] and not summary.incomplete_shards and not summary.missing_shards
    on_disk = json.loads((out / SUMMARY_PATH).read_text())
    assert on_disk["failure_reasons"] == summary.failure_reasons
    assert sum(s["count"] for s in on_disk["shards"]) == 10
    assert any("error rate 40.0%" in w for w in first_run["warnings"])  # above the 0.2 default
    # Only img2dataset's stats files match its `*.json` completion glob (ours live in _pipeline/).
    assert sorted(p.name for p in out.glob("*.json")) == [f"0000{i}_stats.json" for i in range(3)]


@pytest.mark.slow
def test_rerun_is_a_noop(first_run):
    out = first_run["out"]
    shard_files = {k: v for k, v in _snapshot(out).items() if k[0].isdigit()}
    sigint = signal.getsignal(signal.SIGINT)
    summary = download_main(first_run["csv"], out, **CFG)
    assert signal.getsignal(signal.SIGINT) is sigint  # img2dataset's exit-0 handler was undone
    assert summary.new_shards == []
    assert {k: v for k, v in _snapshot(out).items() if k[0].isdigit()} == shard_files


@pytest.mark.slow
def test_local_files_named_by_a_url_list_stay_out_unless_the_user_allows_them(image_server, tmp_path):  # noqa: F811
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(secret)
    rows = {image_server.url("/img/1.png"): "a picture", f"file://{secret}": "my secret", str(secret): "a bare path"}
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"url": list(rows), "caption": list(rows.values())}).to_csv(csv, index=False)

    summary = download_main(csv, tmp_path / "out", **CFG)
    captions = {v["txt"].decode() for v in _read_tars(tmp_path / "out").values()}
    assert captions == {"a picture"} and summary.successes == 1
    report = read_url_list_report(tmp_path / "out" / URL_LIST_PATH)
    assert report["filtered_out"] == {"not an http(s) url": 2}
    assert report["refused_urls"] == [f"file://{secret}", str(secret)]

    # a list prepared elsewhere goes straight to download(): refused before anything is fetched
    raw = tmp_path / "raw.parquet"
    pd.DataFrame({"url": list(rows), "caption": list(rows.values())}).to_parquet(raw)
    with pytest.raises(DownloadError, match=r"2 url\(s\) are not http\(s\).*--allow-local-files"):
        download(raw, tmp_path / "raw-out", DownloadConfig(**CFG))
    assert not list((tmp_path / "raw-out").glob("*.tar"))

    # the user's own list, opted in: the local file is downloaded like any url
    download_main(csv, tmp_path / "mine", **CFG, allow_local_files=True)
    assert {v["txt"].decode() for v in _read_tars(tmp_path / "mine").values()} == {"a picture", "my secret"}


@pytest.mark.slow
def test_refuses_a_different_url_list_in_the_same_folder(first_run, tmp_path):
    other = tmp_path / "other.parquet"
    pd.DataFrame({"url": ["http://127.0.0.1:1/x.jpg"], "caption": ["x"]}).to_parquet(other)
    with pytest.raises(DownloadError, match="different url list"):
        download(other, first_run["out"], DownloadConfig(**CFG))


@pytest.mark.slow
def test_retry_failed_refeeds_only_the_failed_urls(first_run, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(first_run["out"], out)
    before = {p.name for p in out.glob("*.tar")}
    # A longer timeout than the slow url's sleep: that one succeeds now, the others fail again.
    summary = retry_failed(out, DownloadConfig(**{**CFG, "timeout": SLOW_S + 5}))
    state = json.loads((out / STATE_PATH).read_text())
    retry_list = pd.read_parquet(state["retries"][0]["url_list"])
    assert set(retry_list["url"]) == set(first_run["bad"])
    assert "row" in retry_list.columns  # extras travel with the retried rows
    assert summary.new_shards == [3]  # after the largest existing shard id: no collision
    assert {p.name for p in out.glob("*.tar")} == before | {"00003.tar"}
    keys = pd.concat(pd.read_parquet(p, columns=["key"]) for p in out.glob("*.parquet") if p.name[0].isdigit())
    assert keys["key"].is_unique
    assert summary.unresolved_failures == 3 and "timeout" not in summary.unresolved_reasons
    slow = [s for s in _read_tars(out).values() if json.loads(s["json"])["url"].endswith(f"/slow/{SLOW_S}/3.jpg")]
    assert len(slow) == 1
    # Only 404 / corrupt / 500 are left; a retry limited to timeouts has nothing to do.
    again = retry_failed(out, DownloadConfig(**CFG), reasons={"timeout"})
    assert again.new_shards == [] and len(completed_shards(out)) == 4


@pytest.mark.slow
def test_download_from_a_worker_thread(image_server, tmp_path):  # noqa: F811 - fixture by name
    # Prefect and Dask run tasks off the main thread, where img2dataset's signal.signal() would fail.
    urls = pd.DataFrame({"url": [image_server.url("/img/10.jpg"), image_server.url("/img/11.png")],
                         "caption": ["ten", "eleven"]})
    urls.to_parquet(tmp_path / "urls.parquet")
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["summary"] = download(tmp_path / "urls.parquet", tmp_path / "out", DownloadConfig(**CFG))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = err

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert "error" not in result, result.get("error")
    assert result["summary"].successes == 2


def test_config_defaults_and_validation():
    cfg = DownloadConfig()
    assert (cfg.image_size, cfg.encode_format, cfg.output_format, cfg.incremental_mode) == (
        256, "jpg", "webdataset", "incremental")
    assert cfg.error_rate_warning == 0.2 and cfg.max_error_rate == 0.5
    with pytest.raises(ValueError):
        DownloadConfig(incremental_mode="extend")
    with pytest.raises(ValueError, match="max_error_rate"):
        DownloadConfig(max_error_rate=1.5)
    from cli.main import _download_config, build_parser

    args = build_parser().parse_args(["download", "pairs.csv", "--out", "o", "--max-error-rate", "0.9"])
    assert _download_config(args).max_error_rate == 0.9
    with pytest.raises(TypeError, match="unknown download option"):
        download_main("x.csv", "out", colour="red")


@pytest.mark.slow
def test_a_download_where_every_url_failed_exits_nonzero_and_is_retried(image_server, tmp_path, capsys):  # noqa: F811
    # Nothing listens on the port yet: every url fails like it does on a machine without network.
    port = free_port()
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"url": [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(6)],
                  "caption": [f"offline {i}" for i in range(6)]}).to_csv(csv, index=False)
    out = tmp_path / "shards"
    args = ["download", str(csv), "--out", str(out), "--processes", "1", "--threads", "4", "--shard-size", "4",
            "--timeout", "2", "--image-size", "32"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "all 6 url(s) of this run failed" in err and "connection_error=6" in err, err
    assert completed_shard_ids(out) == []  # img2dataset wrote two stats files; neither is kept as complete
    assert not list(out.glob("*.tar"))
    on_disk = json.loads((out / SUMMARY_PATH).read_text())
    assert on_disk["unmarked_shards"] == [0, 1] and on_disk["failure_reasons"] == {"connection_error": 6}

    with ImageServer(port=port):  # the "network" is back: the same command fetches both shards
        summary = download_main(csv, out, **CFG)
    assert summary.successes == 6 and summary.new_shards == [0, 1] and completed_shard_ids(out) == [0, 1]


@pytest.mark.slow
def test_error_rate_above_the_threshold_fails_with_the_reasons(first_run):
    out = first_run["out"]  # 4 of its 10 urls failed: below the 0.5 default, above 0.3
    with pytest.raises(DownloadFailed, match=r"4 of 10 urls \(40.0%\) failed, above the maximum error rate 30%") as e:
        download_main(first_run["csv"], out, **{**CFG, "max_error_rate": 0.3})
    assert all(f"{reason}=1" in str(e.value) for reason in first_run["bad_reasons"])  # per-reason counts
    assert e.value.summary.unresolved_reasons == first_run["bad_reasons"]
    assert len(completed_shards(out)) == 3  # the shards stay complete: the stage fails, the data is kept


def test_download_failures_are_permanent_and_a_crash_is_not():
    empty: DownloadSummary = summarize("/nonexistent")
    assert is_permanent(DownloadFailed("all failed", empty)) and is_permanent(DownloadError("other list"))
    assert not is_permanent(RuntimeError("img2dataset child process exited with status -9"))


# ---------------------------------------------------------------------------- hostile servers and interrupts


def test_caps_default_to_the_tar_member_limit_and_the_timeout():
    cfg = DownloadConfig(timeout=7)
    assert cfg.max_image_bytes == MAX_MEMBER_BYTES["image"] and cfg.download_seconds == 21
    assert DownloadConfig(timeout=7, max_download_seconds=2.5).download_seconds == 2.5
    with pytest.raises(ValueError, match="max_image_bytes"):
        DownloadConfig(max_image_bytes=0)


# Run in a child process: the test bounds how long it waits, and reads the peak RSS of the
# child's own children (img2dataset's processes, reaped before download() returns).
_CAPPED_RUN = textwrap.dedent("""
    import json, resource, sys
    from pipeline.download import DownloadConfig, download

    if __name__ == "__main__":
        cfg = DownloadConfig(**json.loads(sys.argv[1]))
        peaks = []
        for url_list, out in zip(sys.argv[2::2], sys.argv[3::2]):
            download(url_list, out, cfg, check=False)
            peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        print(json.dumps(peaks))
""")


@pytest.mark.slow
def test_trickling_endless_and_oversized_bodies_fail_alone_and_memory_stays_bounded(image_server, tmp_path):  # noqa: F811
    cap = 1 << 20
    good = [image_server.url(f"/img/{i}.jpg") for i in range(3)]
    bad = {
        image_server.url("/trickle/1/a.jpg"): "download took over 4 s (max_download_seconds): timed out",
        image_server.url("/trickle-headers/1/b.jpg"): "download took over 4 s (max_download_seconds): timed out",
        image_server.url("/endless/c.jpg"): "body over 1 MiB (max_image_bytes)",
        image_server.url(f"/big/{2 * cap}/d.jpg"): "body over 1 MiB (max_image_bytes)",
    }
    lists = []
    for name, urls in (("good", good), ("hostile", [*good[:2], *bad, good[2]])):  # one shard: the bad among good
        pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}).to_parquet(tmp_path / name)
        lists += [str(tmp_path / name), str(tmp_path / f"{name}-out")]
    # Without the time cap the trickles never end (a read timeout never fires: a byte comes every second);
    # without the byte cap the endless body is read for the whole 4 s, gigabytes on loopback.
    cfg = {**CFG, "number_sample_per_shard": 8, "timeout": 3, "max_download_seconds": 4, "max_image_bytes": cap}
    (tmp_path / "run.py").write_text(_CAPPED_RUN)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), json.dumps(cfg), *lists], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the download with trickling and endless urls did not finish within 240 s")
    assert proc.returncode == 0
    baseline, peak = json.loads(stdout.strip().splitlines()[-1])
    # The endless body was dropped at the cap, not buffered: the downloading processes' peak RSS is
    # within a few caps of a download of the good urls alone.
    assert peak - baseline < 64 * cap, (baseline, peak)

    out = tmp_path / "hostile-out"
    summary = summarize(out)
    assert summary.successes == 3 and summary.count == 7
    assert {json.loads(s["json"])["url"] for s in _read_tars(out).values()} == set(good)
    rows = pd.read_parquet(out / "00000.parquet", columns=["url", "status", "error_message"])
    failed = rows[rows["status"] != "success"]
    assert dict(zip(failed["url"], failed["error_message"], strict=True)) == bad
    assert summary.failure_reasons == {"timeout": 2, "too_large": 2}


def _start_cli_download(image_server, tmp_path: Path) -> tuple[subprocess.Popen, Path]:  # noqa: F811
    """`python -m cli download` of 4 urls that each take SLOW_CLI_S, in a session of its own (as from a terminal)."""
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"url": [image_server.url(f"/slow/{SLOW_CLI_S}/{i}.jpg") for i in range(4)],
                  "caption": [f"slow {i}" for i in range(4)]}).to_csv(csv, index=False)
    out = tmp_path / "shards"
    # Output to files, not pipes: a surviving worker would hold a pipe open and hang the reader.
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "download", str(csv), "--out", str(out), "--processes", "1",
             "--threads", "4", "--shard-size", "2", "--timeout", "60", "--image-size", "32"],
            cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True,
            # As from a terminal: pytest-xdist's workers ignore SIGINT, and an ignored SIGINT is inherited (Python
            # then installs no KeyboardInterrupt handler), so under `make test` Ctrl-C would never arrive.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # A worker is fetching once it has opened its shard's tar (and the urls take SLOW_CLI_S to answer).
    deadline = time.monotonic() + 120
    while not (out / "00000.tar").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_all(proc, [])
            pytest.fail(f"the download never started a shard: {(tmp_path / 'stderr').read_text()}")
        time.sleep(0.1)
    return proc, out


def _kill_all(proc: subprocess.Popen, others: list[psutil.Process]) -> None:
    """Clean up after a failed test: the CLI's group and whatever of its processes is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in others:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


SLOW_CLI_S = 8  # longer than the test takes to interrupt a run, shorter than its timeout


@pytest.mark.slow
def test_ctrl_c_stops_the_download_with_status_130_and_one_line(image_server, tmp_path):  # noqa: F811
    proc, out = _start_cli_download(image_server, tmp_path)
    workers = psutil.Process(proc.pid).children(recursive=True)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground group gets SIGINT
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=30)
    finally:
        _kill_all(proc, workers)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 130, err
    # The last line (img2dataset's progress bar redraws with \r) is the CLI's; nothing else but progress.
    assert re.split(r"[\r\n]+", err.strip())[-1] == "interrupted; rerun the same command to resume", err
    assert not re.search("Traceback|KeyboardInterrupt|Warning", err), err
    assert alive == []
    assert completed_shard_ids(out) == []


@pytest.mark.slow
def test_a_killed_download_takes_its_workers_with_it(image_server, tmp_path):  # noqa: F811
    proc, out = _start_cli_download(image_server, tmp_path)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 2  # img2dataset's pool worker(s) and the processes around them
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
        # Past the time the slow urls answer: had a worker lived, it would have finished the shard now.
        time.sleep(SLOW_CLI_S + 2)
        assert not list(out.glob("*_stats.json")) and completed_shard_ids(out) == []
    finally:
        _kill_all(proc, descendants)


def test_a_long_shard_says_how_far_it_got(capsys):
    from pipeline.download import ShardProgress

    quiet = ShardProgress(3, interval=3600)
    for ok in (True, False, True):
        quiet.tick(ok)
    assert capsys.readouterr().err == ""  # at most one line per interval
    loud = ShardProgress(3, interval=0)
    for ok in (True, False, True):
        loud.tick(ok)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("download shard 00003: 3 urls fetched (2 ok) in ") and len(lines) == 3
