"""docker/ and prefect.yaml, checked statically (no Docker engine runs on these machines)."""

import importlib
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_parses_and_names_real_commands():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"prefect-server", "dask-scheduler", "dask-cuda-worker", "serve"} <= set(services)
    build = compose["x-project"]["build"]
    assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve() == ROOT / "docker" / "Dockerfile"
    serve = services["serve"]["command"]
    assert serve[0] == "eclipse-prior"
    build_parser().parse_args(serve[1:])  # every flag exists in our CLI
    assert services["dask-cuda-worker"]["command"][:3] == ["dask", "cuda", "worker"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_dockerfile_copies_existing_paths_and_runs_as_a_user():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert "\nUSER eclipse" in text and "VOLUME" in text and "'.[gpu]'" in text
    copied = {line.split()[-1].removeprefix("./") for line in text.splitlines() if line.startswith("COPY")}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= copied, f"the image lacks packages {sorted(packages - copied)}"


def test_prefect_yaml_entrypoints_are_flows():
    from prefect import Flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in spec["deployments"]:
        path, _, attr = dep["entrypoint"].partition(":")
        # a module path: a flow loaded from a file path would pickle its tasks by a module name that
        # the Dask workers cannot import
        assert "/" not in path and not path.endswith(".py"), dep["entrypoint"]
        module = importlib.import_module(path)
        flow = getattr(module, attr)
        assert isinstance(flow, Flow)
        names.add(f"{flow.name}/{dep['name']}")
    assert {"precompute/laion-highres-5m", "precompute/local", "train/kandinsky22", "retrain/kandinsky22"} <= names


def _normalized(flow, parameters: dict) -> dict:
    """`parameters` as the flow will see them: a pydantic-model parameter given as a partial dict gets its
    defaults, so prefect.yaml may name only what differs from them."""
    hints = typing.get_type_hints(flow.fn)
    out = {}
    for name, value in parameters.items():
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            value = hint.model_validate(value).model_dump(mode="json")
        out[name] = value
    return out


def test_prefect_yaml_declares_the_deployments_serve_runs():
    """`prefect deploy --all` (many machines) and `eclipse-prior serve --data /data` (one machine) offer the same
    deployments, with the same parameters and schedules: the yaml's Dask address template stands in for serve's
    --dask-address."""
    from flows.deployments import build_deployments

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    address = spec["definitions"]["cluster"]["address"]
    served = {f"{d.flow_name}/{d.name}": d for d in build_deployments("/data", address)}
    declared = {}
    for dep in spec["deployments"]:
        module, _, attr = dep["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module), attr)
        name = f"{flow.name}/{dep['name']}"
        assert name not in declared, f"prefect.yaml declares {name} twice"
        declared[name] = (flow, dep)
    assert sorted(declared) == sorted(served), (
        f"only in prefect.yaml: {sorted(set(declared) - set(served))}; "
        f"only in serve (flows/deployments.py): {sorted(set(served) - set(declared))}")
    for name, (flow, dep) in declared.items():
        runner = served[name]
        assert runner.entrypoint == dep["entrypoint"].replace(":", "."), name
        assert _normalized(flow, dep.get("parameters", {})) == _normalized(flow, runner.parameters), name
        crons = [s.schedule.cron for s in runner.schedules or []]
        assert [s["cron"] for s in dep.get("schedules", [])] == crons, name
