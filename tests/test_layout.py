"""The package layering: each package imports only packages below it (function-level imports too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A package may import the ones before it, never one after it.
LAYERS = ["storage_schema", "pipeline", "training", "evaluation", "demo", "flows", "cli"]


def imported_packages(path: Path) -> set[str]:
    """First components of every absolute import in a file, wherever it sits (module, function, branch)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def upward_imports(package: str) -> list[str]:
    above = set(LAYERS[LAYERS.index(package) + 1:])
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_packages(path) & (above | {"tests", "benchmarks"})):
            problems.append(f"{path.relative_to(ROOT)} imports {name}")
    return problems


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_one_above_it(package):
    assert upward_imports(package) == []


def test_the_check_sees_function_level_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("import os\n\ndef f():\n    from flows.demo import demo\n    import cli.main\n")
    assert imported_packages(mod) == {"os", "flows", "cli"}


def architecture_paths() -> set[str]:
    """Paths named in ARCHITECTURE.md's folder table: after `pkg/a.py`, a bare `b.py` in the same cell is pkg/b.py
    (unless b.py exists at the root, like `prefect.yaml` beside `docker/`)."""
    named = set()
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for token in line.split("|")[1].split("`")[1::2]:
            if folder and not (ROOT / token).exists():
                named.add(folder + token)  # relative to the cell's first folder, e.g. `templates/`
            else:
                named.add(token)
                folder = folder or token[: token.index("/") + 1] if "/" in token else folder
    return named


def test_architecture_md_names_every_module_and_only_existing_ones():
    named = architecture_paths()
    missing = sorted(p for p in named if not (ROOT / p.split(" ")[0]).exists())
    assert missing == [], f"ARCHITECTURE.md names paths that do not exist: {missing}"
    covered = {p for p in named if p.endswith(".py")} | {p for p in named if p.endswith("/")}
    unnamed = []
    for package in LAYERS:
        for path in sorted((ROOT / package).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            if path.name not in ("__init__.py", "__main__.py") and rel not in covered and f"{package}/" not in covered:
                unnamed.append(rel)
    assert unnamed == [], f"ARCHITECTURE.md does not say what these modules do: {unnamed}"
