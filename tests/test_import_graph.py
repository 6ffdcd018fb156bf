"""The project's modules import each other without cycles, and only downward through the layers of
docs/DESIGN.md: service / client / bench on telemetry on engine, and inside engine/ the front door on the
step loop's core and its execution, execution on core, and the vocabulary (the seed API, request values,
errors) on nothing of them.

Read from the source with `ast`, not by importing: every `import` counts, at module level or inside a
function, since a cycle through a function-level import is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("engine", "service", "client", "telemetry", "bench")
PROJECT = (*SCANNED, "protos")

# package or module -> the packages it must not import (docs/DESIGN.md, "Layout").
FORBIDDEN = {
    "engine": ("service", "client", "telemetry", "bench", "protos"),
    "telemetry": ("service", "client", "bench"),
    "engine.core": ("engine.frontend", "engine.execution"),
    "engine.execution": ("engine.frontend",),
    "engine.batching": ("engine.frontend", "engine.core", "engine.execution"),
    "engine.request": ("engine.frontend", "engine.core", "engine.execution"),
    "engine.errors": ("engine.frontend", "engine.core", "engine.execution"),
}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in SCANNED
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name `path` imports (`from a import b` gives both a and a.b: b may be a module)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package, `level` steps up
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PROJECT}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is not a module counts as its module)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(name, path):
            while imported and imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_scan_sees_the_project():
    graph = import_graph()
    assert {"engine.execution.model_runner", "engine.execution.attention", "service.server"} <= graph.keys()
    assert "client" in graph
    assert "engine.execution.attention" in graph["engine.execution.model_runner"]


def test_find_cycle_names_the_modules_of_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downward(package):
    modules = project_modules()
    upward = sorted(
        f"{name} imports {imported}"
        for name, path in modules.items()
        if within(name, package)
        for imported in imported_names(name, path)
        if any(within(imported, forbidden) for forbidden in FORBIDDEN[package])
    )
    assert not upward, "\n".join(upward)
