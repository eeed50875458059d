"""The package's shape: dependencies point one way, every part ships, only the CLI talks Typer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "finetune"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The project modules `path` imports anywhere in the file (function-local imports too)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    me = module_name(path, root)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {m for m in map(resolve, names) if m and m != me}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: own_imports(p, set(files)) for m, p in files.items()}


def test_no_import_cycles_among_the_package_modules():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        seen[m] = 1
        for d in sorted(graph[m]):
            if seen.get(d) == 1:
                return path + [m, d]
            if d not in seen and (cycle := visit(d, path + [m])):
                return cycle
        seen[m] = 2
        return None

    for m in sorted(graph):
        if m not in seen:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_the_import_graph_sees_function_local_imports(tmp_path):
    """The check above can fail: two modules that import each other inside functions form a cycle."""
    pkg = tmp_path / "finetune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from finetune.b import g\n")
    (pkg / "b.py").write_text("from finetune import a\n")
    files = {module_name(p, tmp_path): p for p in pkg.rglob("*.py")}
    graph = {m: own_imports(p, set(files), tmp_path) for m, p in files.items()}
    assert graph["finetune.a"] == {"finetune.b"} and "finetune.a" in graph["finetune.b"]


def test_layers_point_one_way():
    """io/errors/recipes <- data <- models <- features <- probe, train <- app <- cli."""
    rank = {
        "finetune.errors": 0,
        "finetune.io": 0,
        "finetune.console": 0,
        "finetune.recipes": 0,
        "finetune.metrics": 0,
        "finetune.runtime": 1,
        "finetune.data": 2,
        "finetune.models": 3,
        "finetune.features": 4,
        "finetune.method": 5,
        "finetune.runconfig": 6,  # a run's options from a file or keywords: RunOptions and recipes
        "finetune.probe": 6,
        "finetune.train": 7,  # LP-FT: the fine-tuning loop starts from a probe's head
        "finetune.app": 8,
        "finetune.cli": 9,
        "finetune.__main__": 10,
        "finetune": 10,
    }

    def layer(m: str) -> int:
        while m not in rank:
            m = m.rpartition(".")[0]
        return rank[m]

    upward = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if layer(d) > layer(m) or (layer(d) == layer(m) and m.split(".")[:2] != d.split(".")[:2] and layer(m))
    ]
    assert not upward, upward


def test_only_the_cli_imports_typer():
    users = [module_name(p) for p in PKG.rglob("*.py") if "typer" in {m.split(".")[0] for m in imported(p)}]
    assert users == ["finetune.cli"]


def imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
    return out


def test_every_subpackage_ships_in_the_wheel():
    """pyproject lists packages by hand (the recipes are mapped in from the top-level folder)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {module_name(p.parent) for p in PKG.rglob("__init__.py")}
    assert set(conf["packages"]) == on_disk | {"finetune.recipe_files"}
    assert conf["package-dir"]["finetune.recipe_files"] == "recipes"
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.toml")) == [
        "full-finetune.toml",
        "linear-probe.toml",
        "partial-finetune.toml",
        "stage-probe.toml",
    ]
