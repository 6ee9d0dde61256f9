"""How the flows fail: no retries for errors a retry cannot fix, and a missing store that names its precompute.

Prefect retries a failed task after a pause; `retry_unless_permanent` (a task's
`retry_condition_fn`) stops that for :func:`pipeline.errors.is_permanent` errors, so an
offline machine or a refused metadata request fails in seconds and the flow run's final
state message is the error itself. `prefect deployment run ... --watch` prints the run's
state events and, when the server streams logs (docs/orchestration.md: PREFECT_SERVER_LOGS_*), its logs:
the "not retrying" line and Prefect's "Finished in state Failed(...)" carry the error.
"""

from pathlib import Path

from prefect import Task, get_run_logger
from prefect.client.schemas.objects import State, TaskRun
from prefect.exceptions import MissingContextError

from flows.params import DATASET_DEPLOYMENTS
from pipeline.errors import is_permanent


def retry_unless_permanent(task: Task, task_run: TaskRun, state: State) -> bool:
    """False (fail now) when the task's exception is permanent; True lets the task's retry policy run."""
    exc = state.result(raise_on_failure=False)  # the exception itself, without re-raising it (tracebacks stay short)
    if not isinstance(exc, BaseException) or not is_permanent(exc):
        return True
    try:
        get_run_logger().error("%s: not retrying, a retry cannot fix this: %s: %s", task.name, type(exc).__name__, exc)
    except MissingContextError:
        pass
    return False


def store_exists(store: str | Path) -> bool:
    """A store exists once its manifest does (written with the first finished shard)."""
    return (Path(store) / "_manifest.json").is_file()


def missing_store_message(store: str | Path) -> str:
    """Says that `store` does not exist yet and which precompute writes it."""
    folder = Path(store).parent
    if Path(store).name == "store" and folder.name in DATASET_DEPLOYMENTS:
        how = f"`prefect deployment run precompute/{folder.name}`"
    else:
        how = f"`eclipse-prior precompute --urls URLS --encoder ENCODER --out {folder}` (or the precompute flow)"
    return f"no embedding store at {store} yet: run {how} first"


def require_store(store: str | Path) -> None:
    """Raise a (permanent) StoreError naming the precompute to run when `store` does not exist yet."""
    from storage_schema.writer import StoreError

    if not store_exists(store):
        raise StoreError(missing_store_message(store))
