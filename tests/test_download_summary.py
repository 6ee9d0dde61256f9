"""pipeline.download_summary: failure reasons, and the summary of a shard folder."""

import json

import pandas as pd
import pytest

from pipeline.download_summary import failure_category, format_summary, summarize


@pytest.mark.parametrize(("status", "message", "category"), [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_5xx"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "download took over 30 s (max_download_seconds): timed out", "timeout"),
    ("failed_to_download", "body over 32 MiB (max_image_bytes)", "too_large"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("failed_to_resize", "Image decoding error", "decode_error"),
    ("failed_to_resize", "image too small", "filtered_size"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed_by_robots"),
])
def test_failure_categories(status, message, category):
    assert failure_category(status, message) == category


def test_summary_of_a_folder_counts_attempts_reasons_and_missing_shards(tmp_path):
    rows = {"url": ["http://h/1", "http://h/2", "http://h/3"], "status": ["success", "failed_to_download",
            "failed_to_download"], "error_message": [None, "HTTP Error 404: Not Found", "timed out"]}
    pd.DataFrame(rows).to_parquet(tmp_path / "00000.parquet")
    (tmp_path / "00000.tar").write_bytes(b"")
    stats = {"count": 3, "successes": 1, "failed_to_download": 2, "failed_to_resize": 0, "duration": 1.0}
    (tmp_path / "00000_stats.json").write_text(json.dumps(stats))
    (tmp_path / "00001.tar").write_bytes(b"")  # killed mid-shard: no stats
    s = summarize(tmp_path, expected_shards=3, error_rate_warning=0.9)
    assert (s.count, s.successes, s.unique_urls, s.unresolved_failures) == (3, 1, 3, 2)
    assert s.failure_reasons == {"http_404": 1, "timeout": 1} and s.shards[0].tar == "00000.tar"
    assert (s.incomplete_shards, s.missing_shards) == ([1], [2])
    assert any("2 shard(s) not complete" in w for w in s.warnings)
    table = format_summary(s)
    assert "  00000       3       1" in table and "still missing by reason: " in table
    assert s.unresolved_reasons == {"http_404": 1, "timeout": 1}
