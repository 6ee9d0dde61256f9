"""What a download left in its image-shard folder: per-shard and total counts, failure reasons, a table.

:func:`summarize` reads every complete shard's ``_stats.json`` and ``.parquet`` (img2dataset's,
or those :mod:`pipeline.webdataset` writes) into a :class:`DownloadSummary`;
:func:`failure_category` folds img2dataset's free-text error messages into a few stable
reasons, which :func:`pipeline.download.retry_failed` can select by; :func:`format_summary`
is the table the CLI and the flow print.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.shards import completed_shard_ids, load_state, partial_shard_ids, shard_name


@dataclass
class ShardSummary:
    shard_id: int
    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    duration_s: float
    failure_reasons: dict[str, int]
    tar: str | None


@dataclass
class DownloadSummary:
    """Machine-readable result of the url list(s) downloaded into one out_dir so far."""

    out_dir: str
    shards: list[ShardSummary]
    count: int  # url attempts over all complete shards (a retried url counts twice)
    successes: int
    failed_to_download: int
    failed_to_resize: int
    error_rate: float  # failed attempts / attempts, over all complete shards
    unique_urls: int
    unresolved_failures: int  # urls that failed and never succeeded (what retry_failed re-feeds)
    effective_error_rate: float  # unresolved_failures / unique_urls: the fraction of the dataset missing
    failure_reasons: dict[str, int]  # category (http_404, timeout, decode_error, ...) -> failed attempts
    unresolved_reasons: dict[str, int]  # category of the latest failure of each url still missing
    error_messages: dict[str, int]  # most common raw messages (addresses stripped)
    incomplete_shards: list[int]  # shard files without a _stats.json (killed mid-shard)
    missing_shards: list[int]  # shards of the url list not written at all yet
    new_shards: list[int] = field(default_factory=list)  # completed by the last run
    # The last run's shards when none of its urls succeeded: their files were removed instead of
    # being marked complete with 0 rows, so rerunning the same download fetches them again.
    unmarked_shards: list[int] = field(default_factory=list)
    run_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


_ADDR = re.compile(r"0x[0-9a-fA-F]+")
_HTTP = re.compile(r"HTTP Error (\d{3})")


def failure_category(status: str | None, message: str | None) -> str:
    """Fold img2dataset's free-text error messages into a few stable categories."""
    msg = (message or "").lower()
    if status == "failed_to_resize":
        if "decoding" in msg or "cannot identify" in msg:
            return "decode_error"
        if "too small" in msg or "too large" in msg:
            return "filtered_size"
        return "resize_error"
    if m := _HTTP.search(message or ""):
        code = int(m.group(1))
        return f"http_{code}" if code < 500 else "http_5xx"
    if "timed out" in msg or "timeout" in msg:
        return "timeout"
    if msg.startswith("body over"):  # pipeline.download's max_image_bytes
        return "too_large"
    if "x-robots-tag" in msg:
        return "disallowed_by_robots"
    if "hash mismatch" in msg:
        return "hash_mismatch"
    if "name or service not known" in msg or "nodename nor servname" in msg or "getaddrinfo" in msg:
        return "dns_error"
    if "ssl" in msg or "certificate" in msg:
        return "ssl_error"
    if "refused" in msg or "reset" in msg or "unreachable" in msg or "remote end closed" in msg:
        return "connection_error"
    return "other"


def summarize(out_dir: str | os.PathLike[str], *, expected_shards: int | None = None,
              error_rate_warning: float = 0.2) -> DownloadSummary:
    """Read every complete shard's ``_stats.json`` and ``.parquet`` into a :class:`DownloadSummary`."""
    out = Path(out_dir)
    if expected_shards is None and (state := load_state(out)) is not None:
        expected_shards = state.get("primary_shards")
    done = completed_shard_ids(out)
    shards: list[ShardSummary] = []
    reasons: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    ok_urls: set[str] = set()
    last_failure: dict[str, str] = {}  # url -> category of its latest failure (shards in id order)
    warnings: list[str] = []
    for sid in done:
        name = shard_name(sid)
        stats = json.loads((out / f"{name}_stats.json").read_text())
        shard_reasons: Counter[str] = Counter()
        pq_path = out / f"{name}.parquet"
        if pq_path.exists():
            df = pd.read_parquet(pq_path, columns=["url", "status", "error_message"])
            ok = df["status"] == "success"
            ok_urls.update(df.loc[ok, "url"])
            bad = df[~ok]
            for url, status, msg in zip(bad["url"], bad["status"], bad["error_message"], strict=True):
                cat = failure_category(status, msg)
                last_failure[url] = cat
                shard_reasons[cat] += 1
                messages[_ADDR.sub("0x…", str(msg))] += 1
            if len(df) != stats["count"]:
                warnings.append(f"shard {name}: parquet has {len(df)} rows, stats say {stats['count']}")
        else:
            warnings.append(f"shard {name}: stats without parquet; failure reasons unknown")
        reasons.update(shard_reasons)
        tar = out / f"{name}.tar"
        shards.append(ShardSummary(
            shard_id=sid, count=int(stats["count"]), successes=int(stats["successes"]),
            failed_to_download=int(stats["failed_to_download"]), failed_to_resize=int(stats["failed_to_resize"]),
            duration_s=round(float(stats.get("duration", 0.0)), 3), failure_reasons=dict(shard_reasons),
            tar=tar.name if tar.exists() else None,
        ))
    count = sum(s.count for s in shards)
    failed = sum(s.failed_to_download + s.failed_to_resize for s in shards)
    unique = ok_urls | last_failure.keys()
    unresolved = last_failure.keys() - ok_urls
    unresolved_reasons = Counter(last_failure[u] for u in unresolved)
    done_set = set(done)
    incomplete = partial_shard_ids(out, done_set) if out.is_dir() else []
    missing = [i for i in range(expected_shards or 0) if i not in done_set and i not in incomplete]
    summary = DownloadSummary(
        out_dir=str(out), shards=shards, count=count, successes=sum(s.successes for s in shards),
        failed_to_download=sum(s.failed_to_download for s in shards),
        failed_to_resize=sum(s.failed_to_resize for s in shards),
        error_rate=round(failed / count, 6) if count else 0.0,
        unique_urls=len(unique), unresolved_failures=len(unresolved),
        effective_error_rate=round(len(unresolved) / len(unique), 6) if unique else 0.0,
        failure_reasons=dict(reasons.most_common()), unresolved_reasons=dict(unresolved_reasons.most_common()),
        error_messages=dict(messages.most_common(20)),
        incomplete_shards=incomplete, missing_shards=missing, warnings=warnings,
    )
    if summary.effective_error_rate > error_rate_warning:
        summary.warnings.append(
            f"error rate {summary.effective_error_rate:.1%} of {summary.unique_urls} urls is above "
            f"{error_rate_warning:.0%} (top reasons: {dict(unresolved_reasons.most_common(3))})"
        )
    if incomplete or missing:
        summary.warnings.append(
            f"{len(incomplete) + len(missing)} shard(s) not complete (incomplete: {incomplete[:10]}, missing: "
            f"{missing[:10]}); rerun the same download to resume"
        )
    return summary


def format_summary(summary: DownloadSummary, max_rows: int = 20) -> str:
    """A human table: the last run's shards (or all), totals, and failure reasons."""
    last = set(summary.new_shards) | set(summary.unmarked_shards)
    rows = [s for s in summary.shards if s.shard_id in last] or summary.shards
    lines = [f"download summary for {summary.out_dir}",
             f"{'shard':>7} {'urls':>7} {'ok':>7} {'failed_dl':>9} {'failed_rs':>9}  top reason"]
    for s in rows[:max_rows]:
        top = max(s.failure_reasons.items(), key=lambda kv: kv[1])[0] if s.failure_reasons else "-"
        lines.append(f"{shard_name(s.shard_id):>7} {s.count:>7} {s.successes:>7} {s.failed_to_download:>9} "
                     f"{s.failed_to_resize:>9}  {top}")
    if len(rows) > max_rows:
        lines.append(f"    ... {len(rows) - max_rows} more shard(s)")
    lines.append(f"{'total':>7} {summary.count:>7} {summary.successes:>7} {summary.failed_to_download:>9} "
                 f"{summary.failed_to_resize:>9}  ({len(summary.shards)} complete shards)")
    lines.append(f"error rate {summary.error_rate:.1%} of attempts; {summary.unresolved_failures} of "
                 f"{summary.unique_urls} urls still missing ({summary.effective_error_rate:.1%})")
    if summary.failure_reasons:
        lines.append("failure reasons (attempts): "
                     + ", ".join(f"{k}={v}" for k, v in summary.failure_reasons.items()))
    if summary.unresolved_reasons:
        lines.append("still missing by reason: "
                     + ", ".join(f"{k}={v}" for k, v in summary.unresolved_reasons.items()))
    lines.extend(f"WARNING: {w}" for w in summary.warnings)
    return "\n".join(lines)
