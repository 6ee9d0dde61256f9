"""The quick demo, run once per session, and its teacher for the tests that need the same one.

`eclipse-prior demo --quick` trains the teacher CLIP of the demo world (seed 0, 250 steps) before anything
else; `reproduce --quick` trains the same teacher for its `world:N` rows (flows.demo.teacher_task: its output
depends only on the world, the steps and the seed) and skips it when OUT/world/teacher holds one. So when one
session runs both tests (one xdist group: one worker, one after the other), the grid starts from a copy of
the demo's teacher instead of training it again; alone, it trains its own.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = "test_demo.py::test_demo_quick_runs_every_stage_and_resumes"
GROUP = "demo-world"  # the xdist group of the tests that share the run (tests/conftest.py runs it first)


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
    return DemoRun(out, cmd, env, first)


@pytest.fixture(scope="session")
def quick_teacher(request) -> Path | None:
    """The quick demo's teacher folder, if this session runs the demo test and the demo trained it; else None."""
    from flows.demo import DemoParams
    from flows.reproduce import ReproduceParams

    demo, world = DemoParams.quick(), ReproduceParams.quick().world
    if (demo.teacher_steps, demo.seed) != (world.teacher_steps, world.seed):
        return None  # not the same teacher
    if not any(item.nodeid.split("@")[0].endswith(DEMO_TEST) for item in request.session.items):
        return None
    folder = request.getfixturevalue("demo_quick_run").out / "teacher"
    return folder if (folder / "teacher_report.json").exists() else None
