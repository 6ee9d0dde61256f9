"""The Dask cluster the encode stage runs on.

GPUs present -> `dask_cuda.LocalCUDACluster` (one worker per GPU); no GPU -> a CPU
`distributed.LocalCluster`; `address` -> an existing scheduler (many machines). Workers
are waited for with a timeout, so an empty cluster fails instead of hanging.
"""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


@dataclass
class ClusterConfig:
    address: str | None = None  # tcp://host:8786 of a running scheduler; None: start one here
    n_workers: int | None = None  # local CPU cluster size (default 1: the model uses every core)
    threads_per_worker: int = 1  # one task at a time per worker: the model owns the device
    wait_timeout: float = 120.0  # seconds to wait for at least `min_workers`
    min_workers: int = 1
    memory_limit: str = "auto"


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


@contextmanager
def dask_client(cfg: ClusterConfig | None = None) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client, LocalCluster

    cfg = cfg or ClusterConfig()
    cluster = None
    if cfg.address:
        client = Client(cfg.address, timeout=cfg.wait_timeout)
    elif _gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as e:
            raise ClusterError(
                "GPUs found but dask-cuda is not installed: `pip install -e '.[gpu]'` "
                "(or pass an existing scheduler address)"
            ) from e
        cluster = LocalCUDACluster(threads_per_worker=cfg.threads_per_worker, dashboard_address=None)
        client = Client(cluster)
    else:
        n = cfg.n_workers or 1
        # Split the cores between workers so their torch thread pools do not fight.
        threads = max(1, (os.cpu_count() or 1) // n)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=cfg.threads_per_worker, processes=True, dashboard_address=None,
            memory_limit=cfg.memory_limit,
            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )
        client = Client(cluster)
    try:
        try:
            client.wait_for_workers(cfg.min_workers, timeout=cfg.wait_timeout)
        except TimeoutError as e:
            raise ClusterError(
                f"no Dask workers after {cfg.wait_timeout:.0f}s"
                + (f" at scheduler {cfg.address}; start some with `dask worker {cfg.address}`" if cfg.address else "")
            ) from e
        log.info("dask cluster: %d workers (%s)", len(client.scheduler_info()["workers"]), client.dashboard_link)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
