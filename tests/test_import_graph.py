"""medssl imports flow one way: no import cycle, counting imports inside functions, and medssl.dist is a leaf.

The graph is read from the source (``ast``), not from ``sys.modules``: a function-level (lazy) import that closes a
cycle only fails when that function runs, so it counts like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str = "medssl") -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an ``import`` / ``from ... import`` anywhere in ``tree`` may refer to (relative resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            # ``from pkg import sub`` imports the submodule ``pkg.sub``
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, package: str = "medssl") -> dict[str, set[str]]:
    """Module → the modules of ``package`` it imports (top-level and inside functions), from the source files."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            while name and name not in modules:  # pkg.mod.attribute → pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when the graph is acyclic (iterative DFS)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            node = next(stack[-1], None)
            if node is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif node in on_path:
                return path[path.index(node) :] + [node]
            elif node not in done:
                path.append(node)
                on_path.add(node)
                stack.append(iter(sorted(graph.get(node, ()))))
    return None


def test_find_cycle_on_constructed_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_graph_counts_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo.sub.b import helper\n")
    (pkg / "sub" / "b.py").write_text("def helper():\n    from ..a import thing\n    return thing\n")
    (pkg / "sub" / "c.py").write_text("from . import b\nimport torch\n")
    graph = import_graph(tmp_path, "demo")
    assert graph["demo.a"] == {"demo.sub.b"}
    assert graph["demo.sub.b"] == {"demo.a"}  # the lazy import inside helper() counts
    assert graph["demo.sub.c"] == {"demo.sub", "demo.sub.b"}
    assert find_cycle(graph) == ["demo.a", "demo.sub.b", "demo.a"]


def test_medssl_has_no_import_cycle():
    graph = import_graph(REPO)
    assert "medssl.handlers.checkpoint" in graph and "medssl.dist" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in medssl: " + " -> ".join(cycle)


def test_dist_imports_no_other_medssl_module():
    assert import_graph(REPO)["medssl.dist"] <= {"medssl.errors"}
