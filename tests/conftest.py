"""Test-wide setup. `import prefect` writes to ~/.prefect unless PREFECT_HOME is set first."""

import os
import tempfile

# The PREFECT_HOME made here, not the caller's. Under pytest-xdist every worker is a process started from the
# controller, with its environment: a worker that finds the controller's folder makes its own.
_OWN_HOME = "ECLIPSE_TESTS_PREFECT_HOME"
if "PREFECT_HOME" not in os.environ or (
        os.environ.get("PYTEST_XDIST_WORKER") and os.environ["PREFECT_HOME"] == os.environ.get(_OWN_HOME)):
    os.environ["PREFECT_HOME"] = os.environ[_OWN_HOME] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The CLI tests' commands start Prefect's temporary server (20 s to come up by default): with two xdist workers
# busy, give it the 120 s the harness below has.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402

# Under `make test` (pytest-xdist, `--dist loadgroup --no-loadscope-reorder`) a worker takes one group at a
# time, in collection order. Every test module is one group (its module-scoped fixtures are made once), unless a
# test names its own with @pytest.mark.xdist_group; and the longest groups come first, so that the short ones
# fill in at the end and both workers finish together (durations: BENCHMARKS.md, "The test suite").
LONGEST_FIRST = [
    "demo-world",  # tests/test_demo.py's quick demo, then tests/test_reproduce.py's grid on the demo's teacher
    "test_atomic",  # short: the unit a worker queues behind demo-world (a worker takes a second unit at once)
    "test_multinode", "test_flows_server", "test_encode", "test_download", "test_trainer", "test_teacher",
    "test_evaluate", "test_precompute", "test_flows_evaluate", "test_encoders", "test_report",
    "test_flows_precompute", "test_flows_retrain", "test_install",
]


def _group(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) if mark else item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("dist", "no") != "loadgroup":
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(_group(it), len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models do microseconds of work per op: a second OpenMP thread only adds barrier waits, which on
    a shared 2-core machine made tests ~10x slower. Restored after each module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (its own SQLite database) for tests that call flows directly."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
