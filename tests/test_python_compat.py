"""Every Python file of the repository (package, tests, benchmarks, setup.py) stays valid on the oldest
Python that pyproject.toml's requires-python admits: collection of the whole suite failed on 3.9 once
because tests/conftest.py wrote ``str | None`` without ``from __future__ import annotations``.

Checked statically so that the test runs on whatever Python runs the suite: the grammar of the oldest
version (ast.parse(feature_version=...)) and the PEP 604 unions that the oldest version would
evaluate at run time (annotations of modules without the __future__ import, isinstance/issubclass).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _oldest_python() -> tuple[int, int]:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # tomllib is 3.11+: a regex is enough here
        m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', f.read(), re.M)
    assert m, "pyproject.toml has no requires-python = \">=X.Y\""
    return int(m.group(1)), int(m.group(2))


def _python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [f for f in out if os.path.exists(os.path.join(ROOT, f))]
    assert any(f == "tests/conftest.py" for f in files) and len(files) > 20, files  # the listing works
    return files


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)


def _runtime_unions(tree: ast.Module) -> list[str]:
    """Each ``X | Y`` that Python < 3.10 would evaluate (and fail on) at import time."""
    def has_union(node):
        return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(node))

    found = []
    lazy = _has_future_annotations(tree)
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            annotations += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
                            if x is not None and x.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        if not lazy:
            found += [f"line {a.lineno}: {ast.unparse(a)}" for a in annotations if has_union(a)]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                and has_union(node.args[1])):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_detector_sees_a_runtime_union():
    # the check below is only as good as this detector
    assert _runtime_unions(ast.parse("def f(x: str | None = None): pass"))
    assert _runtime_unions(ast.parse("from __future__ import annotations\nisinstance(1, int | str)"))
    assert not _runtime_unions(ast.parse("from __future__ import annotations\ndef f(x: str | None): pass"))


@pytest.mark.parametrize("path", _python_files())
def test_file_runs_on_the_oldest_supported_python(path):
    oldest = _oldest_python()
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, path, feature_version=oldest)  # SyntaxError for newer grammar
    unions = _runtime_unions(tree)
    assert not unions, (f"{path} evaluates PEP 604 unions, which Python {oldest[0]}.{oldest[1]} rejects; "
                        f"add `from __future__ import annotations` or use Optional/Union: {unions}")
