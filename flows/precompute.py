"""Prefect flow `precompute`: download (img2dataset) -> encode, one task per shard on Dask.

No `from __future__ import annotations` here: Prefect builds the deployment's parameter
schema from the real annotations, and string annotations break the pydantic models.
"""

import dataclasses
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from flows.failures import retry_unless_permanent
from flows.params import ClusterParams, DownloadParams, EncodeParams
from pipeline.cluster import ClusterConfig, dask_task_runner
from pipeline.download import DownloadConfig, DownloadFailed, download_main
from pipeline.download_summary import format_summary
from pipeline.encode import (
    EncodeConfig,
    EncodeSummary,
    ShardResult,
    check_store_encoder,
    collect_shards,
    encode_shard_retrying,
    shards_to_encode,
)
from pipeline.precompute import output_dirs, prepare_store
from pipeline.sources import SOURCE_PRESETS
from storage_schema.writer import read_manifest


def _summary_artifact(text: str) -> None:
    create_markdown_artifact(f"```\n{text}\n```", key="download-summary",
                             description="download: shards, failures by reason")


# Retries are for what may pass (a host that timed out, a killed worker); no network, a refused
# metadata request or a bad url list fail at once with their own message (flows.failures).
@task(name="download", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_condition_fn=retry_unless_permanent)
def download_task(urls: str, images: str, params: DownloadParams) -> dict:
    cfg = DownloadConfig(**params.model_dump(exclude={"retry_failed", "processes_count", "overwrite", "metadata_dir"}),
                         incremental_mode="overwrite" if params.overwrite else "incremental",
                         **({"processes_count": params.processes_count} if params.processes_count else {}))
    try:
        summary = download_main(urls, images, retry=params.retry_failed,
                                source_options={"metadata_dir": params.metadata_dir} if params.metadata_dir else None,
                                **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    except DownloadFailed as e:
        _summary_artifact(format_summary(e.summary))
        raise
    get_run_logger().info("download summary\n%s", format_summary(summary))
    _summary_artifact(format_summary(summary))
    return {"successes": summary.successes, "shards": len(summary.shards), "error_rate": summary.error_rate,
            "failure_reasons": summary.failure_reasons}


@task(name="encode-shard", task_run_name="encode-{tar_name}")
def encode_shard_task(tar: str, tar_name: str, store: str, cfg: EncodeConfig) -> ShardResult:
    # Transient failures are retried inside, permanent ones are not: the CLI's rule (pipeline.encode).
    return encode_shard_retrying(tar, store, cfg)  # the encoder is cached per Dask worker process


@flow(name="encode-shards")
def encode_shards_flow(images: str, store: str, cfg: EncodeConfig) -> list[dict]:
    """One task per image shard not yet in the store; progress and per-shard table as artifacts.

    Failures are handled as in the CLI (`pipeline.encode.collect_shards`); the run fails with
    EncodeFailed when a retry cannot help, RuntimeError otherwise.
    """
    check_store_encoder(store, cfg.encoder)
    todo, already = shards_to_encode(images, store)
    get_run_logger().info("%d shards to encode (%d already in the store)", len(todo), len(already))
    if not todo:
        return []
    progress = create_progress_artifact(0.0, key="encode-progress", description="image shards encoded")
    futures = {encode_shard_task.submit(str(t), t.name, store, cfg): t.name.removesuffix(".tar") for t in todo}
    summary = EncodeSummary(store)
    try:  # Prefect futures cannot be cancelled: after a permanent failure the other shards still run
        collect_shards(futures, as_completed, summary, cancel=False,
                       on_done=lambda n: update_progress_artifact(progress, 100.0 * n / len(futures)))
    finally:
        create_table_artifact(summary.rows(), key="encode-shards", description="per-shard status and skip reasons")
    return [dataclasses.asdict(r) for r in summary.written]


def _resolve(base_dir: str | None, path: str) -> str:
    """`path` under `base_dir` when it is relative (a served deployment's cwd is not the user's)."""
    return str(Path(base_dir, path)) if base_dir and not Path(path).expanduser().is_absolute() else path


@flow(name="precompute", log_prints=True)
def precompute(
    urls: str,
    encoder: str = "tiny-clip",
    out: str = "runs/precompute",
    download: DownloadParams = DownloadParams(),
    encode: EncodeParams = EncodeParams(),
    cluster: ClusterParams = ClusterParams(),
    base_dir: str | None = None,
) -> dict:
    """Download `urls` (a url list or dataset preset) and encode every pair once with `encoder`.

    Writes OUT/images and OUT/store; rerunning skips finished shards of both stages.
    base_dir: relative paths (`urls` unless a preset name, `out`, `download.metadata_dir`) are
    taken under it; `eclipse-prior serve --data DIR` sets it to DIR for precompute/local.
    """
    if urls not in SOURCE_PRESETS:
        urls = _resolve(base_dir, urls)
    out = str(Path(_resolve(base_dir, out)).absolute())
    if download.metadata_dir:
        download = download.model_copy(update={"metadata_dir": _resolve(base_dir, download.metadata_dir)})
    images, store = output_dirs(out)
    get_run_logger().info("precompute %s -> %s (images in %s, store in %s)", urls, out, images, store)
    prepare_store(store, encoder, start_over=download.overwrite)  # before the download, which may take hours
    t0 = time.perf_counter()
    dl = download_task(urls, str(images), download)
    t1 = time.perf_counter()
    cfg = EncodeConfig(encoder=encoder, **encode.model_dump())
    runner = dask_task_runner(ClusterConfig(**cluster.model_dump()))
    results = encode_shards_flow.with_options(task_runner=runner)(str(images), str(store), cfg)
    seconds = {"download": round(t1 - t0, 1), "encode": round(time.perf_counter() - t1, 1)}
    manifest = read_manifest(store) or {"shards": {}}
    rows = sum(s["rows"] for s in manifest["shards"].values())
    get_run_logger().info("wrote %s: store %s (%d rows in %d shards), images %s", out, store, rows,
                          len(manifest["shards"]), images)
    create_markdown_artifact(
        f"# precompute output\n\n| | |\n|---|---|\n| url list | `{urls}` |\n| encoder | `{encoder}` |\n"
        f"| store | `{store}` |\n| images | `{images}` |\n| store rows | {rows} |\n"
        f"| store shards | {len(manifest['shards'])} ({len(results)} encoded by this run) |",
        key="precompute-output", description="where this run wrote",
    )
    return {"images": str(images), "store": str(store), "download": dl,
            "shards_encoded_now": len(results), "store_rows": rows,
            "seconds": seconds}  # wall time of each stage in this run (a resumed stage: its check only)
