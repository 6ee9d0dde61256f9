"""Prefect flow `precompute`: download (img2dataset) -> encode, one task per shard on Dask.

No `from __future__ import annotations` here: Prefect builds the deployment's parameter
schema from the real annotations, and string annotations break the pydantic models.
"""

import dataclasses
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff

from flows.params import ClusterParams, DownloadParams, EncodeParams
from pipeline.cluster import ClusterConfig, dask_task_runner
from pipeline.download import DownloadConfig, download_main, format_summary
from pipeline.encode import EncodeConfig, encode_shard, image_shards
from pipeline.precompute import output_dirs
from storage_schema.writer import read_manifest


@task(name="download", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10))
def download_task(urls: str, images: str, params: DownloadParams) -> dict:
    cfg = DownloadConfig(**params.model_dump(exclude={"retry_failed", "processes_count", "overwrite", "metadata_dir"}),
                         incremental_mode="overwrite" if params.overwrite else "incremental",
                         **({"processes_count": params.processes_count} if params.processes_count else {}))
    summary = download_main(urls, images, retry=params.retry_failed,
                            source_options={"metadata_dir": params.metadata_dir} if params.metadata_dir else None,
                            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    get_run_logger().info("download summary\n%s", format_summary(summary))
    return {"successes": summary.successes, "shards": len(summary.shards), "error_rate": summary.error_rate,
            "failure_reasons": summary.failure_reasons}


@task(name="encode-shard", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      task_run_name="encode-{tar_name}")
def encode_shard_task(tar: str, tar_name: str, store: str, cfg: EncodeConfig) -> dict:
    result = encode_shard(tar, store, cfg)  # the encoder is cached per Dask worker process
    return dataclasses.asdict(result)


@flow(name="encode-shards")
def encode_shards_flow(images: str, store: str, cfg: EncodeConfig) -> list[dict]:
    """One task per image shard not yet in the store; progress and per-shard table as artifacts."""
    manifest = read_manifest(Path(store))
    done = set(manifest["shards"]) if manifest else set()
    tars = [t for t in image_shards(images) if f"{t.name.removesuffix('.tar')}.parquet" not in done]
    logger = get_run_logger()
    logger.info("%d shards to encode (%d already in the store)", len(tars), len(done))
    if not tars:
        return []
    progress = create_progress_artifact(0.0, key="encode-progress", description="image shards encoded")
    futures = [encode_shard_task.submit(str(t), t.name, store, cfg) for t in tars]
    results, failures = [], []
    for n, fut in enumerate(as_completed(futures), start=1):
        try:
            results.append(fut.result())
        except Exception as e:  # keep going: the other shards are independent
            failures.append(f"{type(e).__name__}: {e}")
        update_progress_artifact(progress, 100.0 * n / len(futures))
    rows = [{"shard": r["shard"], "status": r["status"], "rows": r["rows"], "skipped": len(r["skipped"]),
             "first_reason": r["skipped"][0]["reason"] if r["skipped"] else ""} for r in results]
    rows += [{"shard": "?", "status": "FAILED", "rows": 0, "skipped": 0, "first_reason": f} for f in failures]
    create_table_artifact(rows, key="encode-shards", description="per-shard status and skip reasons")
    if failures:
        raise RuntimeError(f"{len(failures)} shard(s) failed after retries; rerun the flow to retry them")
    return results


@flow(name="precompute", log_prints=True)
def precompute(
    urls: str,
    encoder: str = "tiny-clip",
    out: str = "runs/precompute",
    download: DownloadParams = DownloadParams(),
    encode: EncodeParams = EncodeParams(),
    cluster: ClusterParams = ClusterParams(),
) -> dict:
    """Download `urls` (a url list or dataset preset) and encode every pair once with `encoder`.

    Writes OUT/images and OUT/store; rerunning skips finished shards of both stages.
    """
    images, store = output_dirs(out)
    dl = download_task(urls, str(images), download)
    cfg = EncodeConfig(encoder=encoder, **encode.model_dump())
    runner = dask_task_runner(ClusterConfig(**cluster.model_dump()))
    results = encode_shards_flow.with_options(task_runner=runner)(str(images), str(store), cfg)
    manifest = read_manifest(store) or {"shards": {}}
    return {"images": str(images), "store": str(store), "download": dl,
            "shards_encoded_now": len(results), "store_rows": sum(s["rows"] for s in manifest["shards"].values())}
