"""The shape of the package (docs/architecture.md): no import cycle among its modules, counting the
imports inside functions; the installable package never imports pytest; no source file over 600 lines.

Read from the source with ast, so an import that only runs on some path (a CLI branch, a CUDA-only
branch) counts as much as one at the top of a file.
"""
from __future__ import annotations

import ast
import os

from .conftest import ROOT

PACKAGE = os.path.join(ROOT, "gan_fast")
MAX_LINES = 600


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def _imports(module: str, path: str, modules: dict[str, str]) -> tuple[set[str], set[str]]:
    """(the package modules ``module`` imports, the top-level names of everything it imports)."""
    is_package = os.path.basename(path) == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    inside, top = set(), set()

    def add(name: str) -> None:
        # An import of a.b.c runs a, a.b and a.b.c; only the deepest module that is ours is an edge
        # (a package's __init__ is not counted as imported by its own submodules).
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            inside.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top.add(alias.name.split(".")[0])
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            top.add(source.split(".")[0])
            for alias in node.names:  # `from . import x` imports the submodule x when there is one
                full = f"{source}.{alias.name}"
                add(full if full in modules else source)
    return inside, top


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    modules, graph = _graph()
    assert "gan_fast.train" in modules and "gan_fast.backends.triton._conv" in modules, sorted(modules)
    edges = {m: inside for m, (inside, _) in graph.items()}
    assert "gan_fast.config" in edges["gan_fast.train"]  # the finder sees relative imports
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_package_never_imports_pytest():
    _, graph = _graph()
    offenders = sorted(m for m, (_, top) in graph.items() if "pytest" in top or "_pytest" in top)
    assert not offenders, f"these installable modules import pytest (it belongs in tests/ or bench/): {offenders}"


def test_no_source_file_over_600_lines():
    long = {}
    for top in ("gan_fast", "tests", "bench", "tools", "csrc"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".cpp", ".cu", ".h", ".cuh", ".sh")):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        n = sum(1 for _ in f)
                    if n > MAX_LINES:
                        long[os.path.relpath(path, ROOT)] = n
    assert not long, f"split these by concern (at most {MAX_LINES} lines a file): {long}"
