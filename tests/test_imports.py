"""The import order of Hylas's packages (docs/architecture.md, "Packages and the import
order"), read from the source: every import that runs, at module level or inside a
function, is an edge. Imports under ``if TYPE_CHECKING:`` never run and are not edges.

    configs.base  <-  kernels  <-  model  <-  parallel  <-  train
    configs.base  <-  data  <-  train

``configs.base`` imports nothing of Hylas; ``data`` imports only it; only ``train`` imports
``data``. No module reaches itself through imports (no cycles, lazy ones included), and
the benchmarks use public names only.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("configs", "data", "kernels", "model", "parallel", "train")
# Which top-level packages each may import (itself always).
ALLOWED = {
    "configs": set(),
    "kernels": {"configs"},
    "data": {"configs"},
    "model": {"configs", "kernels"},
    "parallel": {"configs", "kernels", "model"},
    "train": {"configs", "kernels", "model", "parallel", "data"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["hylas", *parts])


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the Hylas modules its running imports name (a ``from package import x``
    counts as the module ``package.x`` where that is one)."""
    files = {module_name(p, root): p for top in FOLDERS for p in (root / top).rglob("*.py")}
    packages = {m.rsplit(".", i)[0] for m in files for i in range(1, m.count("."))}
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            edges |= {t for t in targets if t in files or t in packages}
        graph[name] = edges
    return graph


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    def top(m):
        return m.split(".")[1]

    return sorted(
        f"{a} imports {b}"
        for a, targets in graph.items()
        for b in targets
        if top(b) != top(a) and top(b) not in ALLOWED[top(a)]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = itertools.count()

    def visit(v):
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_packages_import_only_downwards():
    assert back_edges(import_graph(ROOT)) == []


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph(ROOT)) == []


def test_the_checks_catch_a_planted_back_edge_and_cycle(tmp_path):
    """The checker itself, on a tree with one back-edge (data -> model) and one lazy cycle."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "model" / "a.py").write_text("from hylas.configs.base import IGNORE_INDEX\n")
    (tmp_path / "data" / "x.py").write_text("def f():\n    from hylas.model.a import g\n")
    (tmp_path / "model" / "b.py").write_text("import hylas.model.c\n")
    (tmp_path / "model" / "c.py").write_text("def f():\n    from hylas.model import b\n")
    (tmp_path / "model" / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hylas.train.t import T\n"
    )
    graph = import_graph(tmp_path)
    assert back_edges(graph) == ["hylas.data.x imports hylas.model.a"]
    assert cycles(graph) == [["hylas.model.b", "hylas.model.c"]]


def test_benchmarks_use_public_names_only():
    private = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hylas"):
                private += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                value = ast.unparse(node.value)
                if value in {"sp", "comm", "mesh", "trainer", "engine"}:
                    private.append(f"{path.name}: {value}.{node.attr}")
    assert private == []
