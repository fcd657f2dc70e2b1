"""The floors' import rule: pipelines -> detect -> synth, never back up, and no import circle between modules
(read from the source, nothing imported; lazy imports count, ``if TYPE_CHECKING:`` blocks do not)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package -> the project packages it must not import
FORBIDDEN = {"synth": ("detect", "pipelines"), "detect": ("pipelines",)}


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                stack.extend(child.orelse)
            else:
                stack.append(child)


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``; relative imports are resolved)."""
    paths = {}
    for package in ("synth", "detect", "pipelines"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets.update(owner(f"{base}.{alias.name}") for alias in node.names)
        graph[module] = {t for t in targets if t and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 100 and "synth.generators" in graph["synth.generate"]
    assert import_cycles(graph) == []


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):  # nested (lazy) imports too
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package: str) -> None:
    offenders = {str(path.relative_to(REPO)): sorted(imported_packages(path) & set(FORBIDDEN[package]))
                 for path in sorted((REPO / package).rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


# The ground floor (README "Architecture"): synth.core, what synth, detect and pipelines all share. It imports
# only itself.
def test_ground_floor_imports_only_itself():
    graph = module_graph()
    floor = {m for m in graph if m == "synth.core" or m.startswith("synth.core.")}
    assert {"synth.core.errors", "synth.core.io", "synth.core.config", "synth.core.hub"} <= floor
    above = {m: sorted(t for t in graph[m] if t not in floor) for m in floor}
    assert {m: v for m, v in above.items() if v} == {}


def test_the_readme_names_every_ground_floor_module():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Architecture"):text.index("## Development")]
    modules = sorted(p.stem for p in (REPO / "synth" / "core").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 8 and all(f"`synth.core.{m}`" in section for m in modules)
