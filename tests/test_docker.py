"""docker/ and prefect.yaml, checked statically (no Docker engine runs on these machines)."""

import importlib
from pathlib import Path

import yaml

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
