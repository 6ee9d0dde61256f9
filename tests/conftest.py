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
# One OpenMP thread per process, for the CLI commands the tests start too (the demo, reproduce, precompute): two
# xdist workers already fill the 2 cores, and beside one busy process 40 teacher steps took 24.6 s on two threads
# against 10.1 s on one (BENCHMARKS.md). The fixture below does the same for this process's torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402

# Under `make test` (pytest-xdist, `--dist loadgroup --no-loadscope-reorder`) a worker takes one group at a
# time, in collection order. Every test module is one group (its module-scoped fixtures are made once), and the
# tests in SAME_WORKER share one; the longest groups come first, so that the short ones fill in at the end and
# both workers finish together. xdist's own @pytest.mark.xdist_group does nothing under pytest 9 (it renames
# `item._nodeid`, which pytest 9 no longer reads), hence the scheduler below.
SAME_WORKER = {
    # one headless Chromium at a time (one profile)
    "chromium": ["tests/test_report.py::test_the_report_fits_a_1400px_browser_window",
                 "tests/test_report.py::test_the_training_balance_charts_fit_a_1400px_browser_window",
                 "tests/test_grid.py::test_the_grid_page_fits_a_1400px_browser_window"],
}
# The first two go one to each worker (xdist deals units round-robin, two per worker to start with).
LONGEST_FIRST = [
    "tests/test_demo.py",  # the quick demo and its rerun
    "tests/test_reproduce.py",  # reproduce --quick killed and resumed
    "tests/test_atomic.py",  # short: the unit the first worker queues behind the demo
    *(f"tests/{m}.py" for m in ("test_flows_server", "test_multinode", "test_trainer", "test_encode", "test_teacher",
                                "test_readme", "test_families",
                                "test_download", "test_evaluate", "test_precompute", "test_flows_evaluate",
                                "test_encoders", "test_report", "test_flows_precompute", "test_flows_retrain",
                                "test_install", "test_benchmarks")),
]
_GROUP_OF = {nodeid: group for group, ids in SAME_WORKER.items() for nodeid in ids}


def _group(nodeid: str) -> str:
    return _GROUP_OF.get(nodeid, nodeid.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # an xdist worker: its collection order is the scheduler's
        return
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(_group(it.nodeid), len(rank)))  # stable: the rest keep their order


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
