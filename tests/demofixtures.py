"""The quick demo, run once per session, and its teacher for the tests that need the same one.

`eclipse-prior demo --quick` trains the teacher CLIP of the demo world (seed 0, 250 steps) before anything
else; `reproduce --quick` trains the same teacher for its `world:N` rows (flows.demo.teacher_task: its output
depends only on the world, the steps and the seed) and skips it when OUT/world/teacher holds one. So when one
process has run the demo test first (one xdist group: one worker, the demo first, tests/conftest.py), the grid
starts from a copy of the demo's teacher instead of training it again; else it trains its own (never a second
demo just for its teacher).
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoRun:
    out: Path
    cmd: list[str]
    env: dict[str, str]
    first: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def demo_quick_run(tmp_path_factory) -> DemoRun:
    """The first `eclipse-prior demo --quick` in a fresh folder, as the README's first command runs it."""
    out = tmp_path_factory.mktemp("demo-quick") / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_HOME", None)  # the demo keeps its own Prefect state under OUT/.prefect
    cmd = [sys.executable, "-m", "cli.main", "demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    _RUNS.append(DemoRun(out, cmd, env, first))
    return _RUNS[-1]


_RUNS: list[DemoRun] = []  # the demo run of this process, once made


@pytest.fixture(scope="session")
def quick_teacher() -> Path | None:
    """The quick demo's teacher folder, if this process has run the demo and it trained one; else None."""
    from flows.demo import DemoParams
    from flows.reproduce import ReproduceParams

    demo, world = DemoParams.quick(), ReproduceParams.quick().world
    if (demo.teacher_steps, demo.seed) != (world.teacher_steps, world.seed):
        return None  # not the same teacher
    if not _RUNS:  # this process has not run the demo (yet): reproduce trains its teacher itself
        return None
    folder = _RUNS[-1].out / "teacher"
    return folder if (folder / "teacher_report.json").exists() else None
