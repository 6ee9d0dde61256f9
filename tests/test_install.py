"""The install itself: stdlib dataclasses wins, Prefect's local server starts, the CLI is on PATH."""

import dataclasses
import shutil
import subprocess
import sys
import sysconfig

import pytest
from prefectserver import prefect_server


def test_stdlib_dataclasses_is_not_shadowed():
    # img2dataset depends on the `dataclasses` backport; the Makefile removes it after install.
    assert dataclasses.__file__.startswith(sysconfig.get_paths()["stdlib"]), dataclasses.__file__


def test_console_script_is_installed():
    exe = shutil.which("eclipse-prior", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "eclipse-prior not installed next to this python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "store" in out and "embedding store" in out


@pytest.mark.slow
def test_prefect_local_server_starts(tmp_path):
    import urllib.request

    with prefect_server(tmp_path / "prefect") as api:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
            assert r.status == 200
