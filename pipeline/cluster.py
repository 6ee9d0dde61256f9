"""The Dask cluster the encode stage runs on.

GPUs present -> `dask_cuda.LocalCUDACluster` (one worker per GPU); no GPU -> a CPU
`distributed.LocalCluster`; `address` -> an existing scheduler (many machines). Workers
are waited for with a timeout, so an empty cluster fails instead of hanging.
"""

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


@dataclass
class ClusterConfig:
    address: str | None = None  # tcp://host:8786 of a running scheduler; None: start one here
    n_workers: int | None = None  # local CPU cluster size (default 1: the model uses every core)
    wait_timeout: float = 120.0  # seconds to wait for at least `min_workers`
    min_workers: int = 1
    memory_limit: str = "auto"


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def local_cluster_spec(cfg: ClusterConfig) -> tuple[str, dict[str, Any]]:
    """(cluster class path, kwargs) of the local cluster to start for `cfg`."""
    if _gpu_count() > 0:
        if importlib.util.find_spec("dask_cuda") is None:
            raise ClusterError(
                "GPUs found but dask-cuda is not installed: `pip install dask-cuda` (this project's `gpu` extra) "
                "(or pass an existing scheduler address)"
            )
        # One worker per GPU, one task at a time each: the model owns the device.
        return "dask_cuda.LocalCUDACluster", {"threads_per_worker": 1, "dashboard_address": None}
    n = cfg.n_workers or 1
    # Split the cores so torch thread pools do not fight; an OMP_NUM_THREADS set here caps each worker's share.
    threads = max(1, (os.cpu_count() or 1) // n)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    return "pipeline.cluster.local_cpu_cluster", {
        "n_workers": n, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        "memory_limit": cfg.memory_limit, "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
    }


def local_cpu_cluster(**kwargs: Any) -> "distributed.LocalCluster":  # noqa: F821
    """`distributed.LocalCluster(**kwargs)` whose worker processes keep glibc's own malloc trimming.

    Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ) to hand memory
    back early; torch on a CPU allocates and frees many small tensors per step, and with that setting two
    500-step demo priors side by side took 27-28 s each instead of 15 s (BENCHMARKS.md). An explicit
    MALLOC_TRIM_THRESHOLD_ in this process's environment still wins (Dask reads it from there)."""
    import dask
    from distributed import LocalCluster

    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    with dask.config.set({key: os.environ.get("MALLOC_TRIM_THRESHOLD_")}):  # None: not set in the workers
        return LocalCluster(**kwargs)


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def wait_for_workers(client, cfg: ClusterConfig) -> None:
    try:
        client.wait_for_workers(cfg.min_workers, timeout=cfg.wait_timeout)
    except TimeoutError as e:
        where = f" at scheduler {cfg.address}; start some with `dask worker {cfg.address}`" if cfg.address else ""
        raise ClusterError(f"no Dask workers after {cfg.wait_timeout:.0f}s{where}") from e


@contextmanager
def dask_client(cfg: ClusterConfig | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client

    cfg = cfg or ClusterConfig()
    cluster = None
    if cfg.address:
        client = Client(cfg.address, timeout=cfg.wait_timeout)
    else:
        cls, kwargs = local_cluster_spec(cfg)
        cluster = _import(cls)(**kwargs)
        client = Client(cluster)
    try:
        wait_for_workers(client, cfg)
        log.info("dask cluster: %d workers", len(client.scheduler_info()["workers"]))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def dask_task_runner(cfg: ClusterConfig | None = None):
    """A prefect-dask task runner for the same cluster choice (Prefect flows use this)."""
    from distributed import Client
    from prefect_dask import DaskTaskRunner

    cfg = cfg or ClusterConfig()
    if cfg.address:
        # Prefect would wait forever on a scheduler without workers: check first.
        with Client(cfg.address, timeout=cfg.wait_timeout) as client:
            wait_for_workers(client, cfg)
        return DaskTaskRunner(address=cfg.address)
    cls, kwargs = local_cluster_spec(cfg)
    if api := _prefect_api_env():
        kwargs["env"] = {**kwargs.get("env", {}), **api}
    return DaskTaskRunner(cluster_class=cls, cluster_kwargs=kwargs)


def _prefect_api_env() -> dict[str, str]:
    """PREFECT_API_URL for local workers. With no server configured, the flow's process runs Prefect's temporary
    server; unless told its URL, every worker process starts a temporary server of its own (~15 s each)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return {}  # a configured server: the workers inherit the same setting
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary server (a singleton); start() is idempotent
    server.start()
    return {"PREFECT_API_URL": server.api_url}
