"""Cluster choice and the empty-cluster guard, against real Dask schedulers."""

import pytest

from pipeline.cluster import ClusterConfig, ClusterError, dask_client, dask_task_runner, local_cluster_spec


def test_cpu_machine_gets_a_local_cluster_that_splits_the_cores():
    cls, kwargs = local_cluster_spec(ClusterConfig(n_workers=2))
    assert cls == "distributed.LocalCluster"
    assert kwargs["n_workers"] == 2 and kwargs["threads_per_worker"] == 1 and kwargs["processes"] is True
    assert int(kwargs["env"]["OMP_NUM_THREADS"]) >= 1


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
