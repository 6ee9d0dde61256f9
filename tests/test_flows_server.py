"""A real Prefect server on loopback, `eclipse-prior serve`, and `prefect deployment run ... --watch`."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from imageserver import ImageServer, image_server  # noqa: F401 - the fixture is used by name
from prefectserver import prefect_env, prefect_server, wait_for_url

from storage_schema import EmbeddingStore

ROOT = Path(__file__).resolve().parents[1]


def _wait_for_deployment(api: str, name: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    wait_for_url(f"{api}/deployments/name/{name}", proc, log, timeout)


@pytest.mark.slow
def test_served_local_precompute_deployment_runs_to_completion(image_server, tmp_path):  # noqa: F811
    good = {image_server.url(f"/img/{i}.jpg"): f"served picture {i}" for i in range(4)}
    pd.DataFrame({"url": list(good), "caption": list(good.values())}).to_parquet(tmp_path / "urls.parquet")
    home = tmp_path / "prefect"
    with prefect_server(home) as api:
        env = {**prefect_env(home, api), "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}
        log = tmp_path / "serve.log"
        with open(log, "w") as out:
            serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--data", str(tmp_path / "data")],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_deployment(api, "precompute/local", serve, log)
            for name in ("precompute/laion-highres-5m", "train/kandinsky22", "evaluate/karlo"):
                _wait_for_deployment(api, name, serve, log)
            _wait_for_deployment(api, "retrain/kandinsky22", serve, log)
            with urllib.request.urlopen(f"{api}/deployments/name/retrain/kandinsky22", timeout=5) as r:
                schedules = json.loads(r.read())["schedules"]
            assert [s["schedule"]["cron"] for s in schedules] == ["0 3 * * 0"]
            params = {
                "urls": str(tmp_path / "urls.parquet"), "encoder": "tiny-clip", "out": str(tmp_path / "out"),
                "download": {"image_size": 32, "processes_count": 1, "thread_count": 4,
                             "number_sample_per_shard": 2, "timeout": 3},
                "encode": {"batch_size": 2}, "cluster": {"n_workers": 1},
            }
            run = subprocess.run(
                [sys.executable, "-m", "prefect", "deployment", "run", "precompute/local", "--params",
                 json.dumps(params), "--watch", "--watch-timeout", "300"],
                env=env, capture_output=True, text=True, timeout=360,
            )
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + log.read_text()[-4000:]
            assert "Completed" in run.stdout + run.stderr
            store = EmbeddingStore(tmp_path / "out" / "store", verify=True)
            assert store.num_rows == 4 and len(store.shards) == 2

            bad = subprocess.run(
                [sys.executable, "-m", "prefect", "deployment", "run", "precompute/local", "--params",
                 json.dumps({**params, "download": {"image_size": -5}})],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert bad.returncode != 0
            assert "image_size" in bad.stdout + bad.stderr
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
