"""Beyond one machine, with docs/orchestration.md's commands, on loopback: a `dask scheduler` with two
`dask worker`s under `precompute --scheduler`, `torchrun --nnodes 2` with two launchers and c10d
rendezvous, and a Prefect process work pool whose `prefect worker` runs a deployment from
prefect.yaml. Every process is started here and stopped by its pid (its own process group)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name
from prefectserver import prefect_env, prefect_server
from storefixtures import write_synthetic_store

from demo.server import free_port
from storage_schema import EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's console scripts: dask, torchrun, prefect, eclipse-prior
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: several processes share 2 cores here.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of a process we started (it may have children), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _url_list(server: ImageServer, path: Path, n_good: int) -> dict[str, str]:
    """n_good served images plus a 404 and a corrupt image; returns url -> caption of the good ones."""
    good = {server.url(f"/img/{i}.jpg"): f"a served picture number {i}" for i in range(n_good)}
    rows = [*good.items(), (server.url("/missing/1.jpg"), "gone"), (server.url("/corrupt/2.jpg"), "broken")]
    pd.DataFrame({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}).to_parquet(path)
    return good


def _assert_store_has_exactly(store_dir: Path, good: dict[str, str]) -> None:
    store = EmbeddingStore(store_dir, verify=True)
    df = pd.read_parquet(store_dir)
    assert store.num_rows == len(df) == len(good)
    assert dict(zip(df["url"], df["caption"], strict=True)) == good


class DaskCluster:
    """`dask scheduler` and two `dask worker`s on 127.0.0.1, as separate processes."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self) -> "DaskCluster":
        from distributed import Client

        self._spawn("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--no-dashboard"])
        for i in range(2):
            self._spawn(f"worker{i}", [str(BIN / "dask"), "worker", self.address, "--host", "127.0.0.1",
                                       "--nthreads", "1", "--name", f"worker{i}", "--no-dashboard",
                                       "--local-directory", str(self.tmp / f"worker{i}")])
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(self.address, timeout=10) as client:
                    client.wait_for_workers(2, timeout=max(1.0, deadline - time.monotonic()))
                    client.get_task_stream()  # starts the scheduler's task-stream record before any work
                return self
            except (OSError, TimeoutError) as e:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"dask cluster did not come up ({e}):\n{self.tail()}") from e
                time.sleep(1)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        self.procs.append(_start(cmd, log, _env()))

    def tasks_per_worker(self) -> dict[str, set[str]]:
        """worker name -> keys of the tasks it ran, from the scheduler's task stream."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
            records = client.get_task_stream()
        ran: dict[str, set[str]] = {}
        for r in records:
            ran.setdefault(str(names.get(r["worker"], r["worker"])), set()).add(str(r["key"]))
        return ran

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[DaskCluster]:
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_precompute_on_a_dask_scheduler_with_two_workers(image_server, dask_cluster, tmp_path):  # noqa: F811
    """`dask scheduler`, two `dask worker`s, then `eclipse-prior precompute --scheduler`: both workers
    encode shards and the store holds exactly the good rows."""
    good = _url_list(image_server, tmp_path / "urls.parquet", 8)
    before = dask_cluster.tasks_per_worker()
    cmd = [str(BIN / "eclipse-prior"), "precompute", "--urls", str(tmp_path / "urls.parquet"), "--encoder",
           "tiny-clip", "--out", str(tmp_path / "out"), "--scheduler", dask_cluster.address,
           "--image-size", "32", "--processes", "1", "--threads", "4", "--shard-size", "2", "--timeout", "3",
           "--batch-size", "2"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:] + dask_cluster.tail()
    _assert_store_has_exactly(tmp_path / "out" / "store", good)
    after = dask_cluster.tasks_per_worker()
    new = {w: keys - before.get(w, set()) for w, keys in after.items()}
    shards = {f"encode-{p.name}" for p in (tmp_path / "out" / "images").glob("*.tar")}
    assert len(shards) >= 4
    assert set().union(*new.values()) == shards, new  # one task per image shard, all on the cluster
    assert all(new.get(w) for w in ("worker0", "worker1")), f"a worker did no encoding: {new}"


def test_torchrun_two_nodes_with_c10d_rendezvous_train_on_disjoint_shards(tmp_path):
    """Two `torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d` launchers (node ranks 0 and 1) on
    127.0.0.1: one run of world size 2 whose ranks read disjoint store shards."""
    store = tmp_path / "store"
    write_synthetic_store(store, rows=192, dim=32, shards=4, seed=0)
    run = tmp_path / "run"
    port = free_port()
    procs = []
    try:
        for node in range(2):
            cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                   "-m", "cli.main", "train", "--store", str(store), "--out", str(run), "--preset", "tiny",
                   "--objective", "eclipse", "--steps", "6", "--batch-size", "16", "--ckpt-every", "3",
                   "--set", "record_keys=true", "--set", "num_threads=1", "--set", "progress=false"]
            procs.append(_start(cmd, tmp_path / f"node{node}.log", _env()))
        deadline = time.monotonic() + 300
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))
        assert [p.returncode for p in procs] == [0, 0], logs
    finally:
        for proc in procs:
            _stop(proc)
    # Each epoch deals the reshuffled shard list out to the ranks: disjoint within an epoch.
    shard_of = {k: name for name, keys in EmbeddingStore(store).keys() for k in keys}
    per_rank: list[dict[int, set[str]]] = []
    for rank in range(2):
        lines = (run / "logs" / f"keys-rank{rank}.tsv").read_text().splitlines()
        assert len(lines) == 6 * 16
        epochs: dict[int, set[str]] = {}
        for line in lines:
            epoch, key = line.split("\t")
            epochs.setdefault(int(epoch), set()).add(shard_of[key])
        per_rank.append(epochs)
    assert 0 in per_rank[0] and 0 in per_rank[1]
    for epoch in set(per_rank[0]) & set(per_rank[1]):
        assert per_rank[0][epoch].isdisjoint(per_rank[1][epoch]), (epoch, per_rank)
    state = json.loads(next((run / "checkpoints").glob("*/state.json")).read_text())
    assert state["world_size"] == 2
    assert (run / "prior" / "diffusion_pytorch_model.safetensors").exists()


def test_prefect_process_work_pool_runs_a_deployment_from_prefect_yaml(image_server, dask_cluster, tmp_path):  # noqa: F811
    """docs/orchestration.md's work-pool recipe: `prefect work-pool create gpu --type process`, `prefect deploy --all`
    from the repository root, `prefect worker start --pool gpu`; a run of precompute/local then goes to the
    worker, whose flow sends its shard tasks to the Dask scheduler named at deploy time."""
    good = _url_list(image_server, tmp_path / "urls.parquet", 4)
    before = set().union(*dask_cluster.tasks_per_worker().values())
    home = tmp_path / "prefect"
    with prefect_server(home) as api:
        env = _env(**prefect_env(home, api), ECLIPSE_PRIOR_HOME=str(ROOT), ECLIPSE_DASK_ADDRESS=dask_cluster.address,
                   PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_LOGGING_LEVEL="INFO")
        prefect = str(BIN / "prefect")

        def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            done = subprocess.run([prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            return done

        cli("work-pool", "create", "gpu", "--type", "process")
        cli("deploy", "--all", "--no-prompt")
        worker = _start([prefect, "worker", "start", "--pool", "gpu"], tmp_path / "worker.log", env)
        try:
            params = {"urls": str(tmp_path / "urls.parquet"), "encoder": "tiny-clip", "out": str(tmp_path / "out"),
                      "download": {"image_size": 32, "processes_count": 1, "thread_count": 4,
                                   "number_sample_per_shard": 2, "timeout": 3},
                      "encode": {"batch_size": 2}}
            run = subprocess.run([prefect, "deployment", "run", "precompute/local", "--params", json.dumps(params),
                                  "--watch", "--watch-timeout", "400"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
            worker_log = (tmp_path / "worker.log").read_text()
            assert run.returncode == 0 and "Completed" in run.stdout + run.stderr, (
                run.stdout[-2000:] + run.stderr[-2000:] + worker_log[-4000:])
        finally:
            _stop(worker)
    _assert_store_has_exactly(tmp_path / "out" / "store", good)
    # the flow's shard tasks (Prefect task runs, one per image shard) ran on the Dask cluster
    ran = set().union(*dask_cluster.tasks_per_worker().values()) - before
    n_shards = len(list((tmp_path / "out" / "images").glob("*.tar")))
    assert n_shards >= 2 and len(ran) >= n_shards, ran
