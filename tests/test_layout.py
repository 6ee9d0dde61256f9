"""The package layering: each package imports only packages below it, and the modules of one package form no
import circle (function-level imports count in both)."""

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


def module_imports(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, wherever the import sits (module, function, branch).

    `from pkg import x` names module pkg/x.py when there is one (else pkg/__init__.py); `from pkg.a import y`
    names pkg/a.py; relative imports are resolved against the package.
    """
    package = package_dir.name
    modules = {".".join(p.relative_to(package_dir.parent).with_suffix("").parts): p
               for p in sorted(package_dir.rglob("*.py"))}
    modules = {name.removesuffix(".__init__"): p for name, p in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # pkg.mod.func -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] == package:
                    found.add(target)
                    break
        graph[name] = found
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of the graph, once each (as a path a -> b -> ... -> a, starting at its smallest module)."""
    cycles: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                cycles.add(tuple(path))
            elif nxt > start and nxt not in path:  # each circle is found from its smallest module only
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [[*c, c[0]] for c in sorted(cycles)]


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_circle_between_modules_of_a_package(package):
    cycles = import_cycles(module_imports(ROOT / package))
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_circle_check_sees_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from .sub.e import h\nfrom pkg import a\n")
    (pkg / "sub" / "e.py").write_text("def h():\n    from ..d import x\n")
    graph = module_imports(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.sub.e"] == {"pkg.d"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.sub.e", "pkg.d"]]
    (pkg / "c.py").write_text("def g():\n    import os\n")
    (pkg / "sub" / "e.py").write_text("")
    assert import_cycles(module_imports(pkg)) == []


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


def objective_name_branches(path: Path, names: tuple[str, ...]) -> list[str]:
    """Comparisons of something with an objective's name (`x == "eclipse"`, `x in ("diffusion", ...)`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            consts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path}:{node.lineno}")
    return found


def test_no_branch_on_an_objective_name_outside_the_objectives_module(tmp_path):
    from training.objectives import OBJECTIVES

    owner = ROOT / "training" / "objectives.py"
    branches = [b for package in LAYERS for path in sorted((ROOT / package).rglob("*.py")) if path != owner
                for b in objective_name_branches(path, OBJECTIVES)]
    assert branches == [], "what differs about an objective belongs on its class in training/objectives.py"
    probe = tmp_path / "probe.py"
    probe.write_text('if cfg.objective == "eclipse" or name in ("diffusion",):\n    pass\n')
    assert len(objective_name_branches(probe, OBJECTIVES)) == 2  # the check sees both forms


def family_name_literals(path: Path, names: tuple[str, ...]) -> list[str]:
    """A decoder family's name used as code: compared with, a dict key, a Literal's value, a default argument."""
    tree = ast.parse(path.read_text(), filename=str(path))
    spots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            spots += [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            spots += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
            spots.append(node.slice)
        elif isinstance(node, ast.arguments):
            spots += [d for d in (*node.defaults, *node.kw_defaults) if d is not None]
    found = []
    for spot in spots:
        consts = spot.elts if isinstance(spot, ast.Tuple | ast.List | ast.Set) else [spot]
        found += [f"{path}:{c.lineno}: {c.value}" for c in consts if isinstance(c, ast.Constant) and c.value in names]
    return found


def test_a_decoder_family_is_named_in_code_only_by_its_record(tmp_path):
    from pipeline.families import FAMILIES

    owner = ROOT / "pipeline" / "families.py"
    found = [f for package in LAYERS for path in sorted((ROOT / package).rglob("*.py")) if path != owner
             for f in family_name_literals(path, tuple(FAMILIES))]
    assert found == [], "a decoder family's facts belong in its record in pipeline/families.py"
    probe = tmp_path / "probe.py"
    probe.write_text('X = {"karlo": 1}\nY = Literal["kandinsky22"]\ndef f(d="karlo"):\n    return d == "karlo"\n')
    assert len(family_name_literals(probe, tuple(FAMILIES))) == 4
