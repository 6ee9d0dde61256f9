"""Cluster choice and the empty-cluster guard, against real Dask schedulers."""

import pytest

from pipeline.cluster import ClusterConfig, ClusterError, dask_client, dask_task_runner, local_cluster_spec


def test_cpu_machine_gets_a_local_cluster_that_splits_the_cores():
    cls, kwargs = local_cluster_spec(ClusterConfig(n_workers=2))
    assert cls == "pipeline.cluster.local_cpu_cluster"
    assert kwargs["n_workers"] == 2 and kwargs["threads_per_worker"] == 1 and kwargs["processes"] is True
    assert int(kwargs["env"]["OMP_NUM_THREADS"]) >= 1


def test_omp_num_threads_caps_each_local_workers_share(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert local_cluster_spec(ClusterConfig(n_workers=2))[1]["env"]["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = local_cluster_spec(ClusterConfig(n_workers=2))[1]["env"]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_a_scheduler_without_workers_fails_fast_instead_of_hanging():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        cfg = ClusterConfig(address=empty.scheduler_address, wait_timeout=2)
        with pytest.raises(ClusterError, match=r"no Dask workers after 2s at scheduler .*dask worker"):
            with dask_client(cfg):
                pass
        with pytest.raises(ClusterError, match="no Dask workers"):
            dask_task_runner(cfg)


@pytest.mark.slow
def test_a_local_cluster_runs_tasks():
    with dask_client(ClusterConfig(n_workers=1, wait_timeout=60)) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6


@pytest.mark.slow
def test_local_workers_keep_glibcs_malloc_trimming_unless_asked(monkeypatch):
    """Dask's MALLOC_TRIM_THRESHOLD_=65536 made torch priors ~1.8x slower in its workers (BENCHMARKS.md)."""
    import os

    from distributed import Client

    from pipeline.cluster import local_cpu_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    kwargs = dict(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with local_cpu_cluster(**kwargs) as cluster, Client(cluster) as client:
        assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # a user's own setting reaches the workers
    with local_cpu_cluster(**kwargs) as cluster, Client(cluster) as client:
        assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {"1048576"}
