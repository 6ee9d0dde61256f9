"""Start a real Prefect server on 127.0.0.1 and a free port for tests; stop it by its pid."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from demo.server import free_port, stop_process, wait_until_ok

__all__ = ["prefect_env", "prefect_server", "wait_for_url"]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def wait_for_url(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early if `proc` (whose output is in `log`) exits."""
    try:
        wait_until_ok(url, timeout, proc, interval=0.5)
    except (RuntimeError, TimeoutError) as e:
        raise type(e)(f"{e}:\n{log.read_text()[-3000:]}") from None


@contextmanager
def prefect_server(home: Path, timeout: float = 120.0):
    """Yields the API url of a running server; stops the server's process group afterwards."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off", "--no-ui"],
            env=prefect_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        api = f"http://127.0.0.1:{port}/api"
        try:
            wait_for_url(f"{api}/health", proc, home / "server.log", timeout)
            yield api
        finally:
            stop_process(proc, timeout=20, group=True)
