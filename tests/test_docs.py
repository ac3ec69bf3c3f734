"""The documentation as users read it: every ```python block of README.md and docs/*.md is executed,
in a fresh interpreter (import order and module-level ``gan_fast.X`` calls exactly as a user's script
has them), and every ``python -m gan_fast.X --flag`` of the bash blocks names a flag that the
module's --help lists. Nothing is skipped silently: a block that is not run is in NOT_RUNNABLE with
the reason, and must not even compile; a CUDA-only block runs on a CPU through the explicit
substitutions of CPU_SUBSTITUTIONS, each of which must apply."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest

from .conftest import DEVICE, ROOT, needs_ext
from .markdown_blocks import DOCS, blocks

PYTHON_BLOCKS = blocks("python")
BLOCK_IDS = {b.id for b in PYTHON_BLOCKS}

# Blocks that are not programs, with the reason (each is checked another way below).
NOT_RUNNABLE = {
    "docs/ops.md:python0": "the op contract: signatures (`-> Tensor`), checked against every backend "
                           "by test_ops_contract_listing_matches_the_backends",
}

# CUDA-only blocks: the minimal textual substitutions that run them on a CPU, applied only where there
# is no CUDA device (on a GPU machine the block runs as written). Each (old, new) must occur.
CPU_SUBSTITUTIONS = {
    # model.cuda() -> the model on the CPU; triton -> ext, the fused backend that runs on a CPU
    "README.md:python0": [(".cuda()", ""), ('"triton"', '"ext"')],
}

# What a block must have achieved, appended to it (beyond running without an exception).
POSTCONDITIONS = {
    "README.md:python0": "assert gan_fast.fuse.fused_modules(netG) and gan_fast.fuse.fused_modules(netD)\n",
}


def _runnable_source(block) -> str:
    source = block.text
    if DEVICE == "cpu":
        for old, new in CPU_SUBSTITUTIONS.get(block.id, []):
            assert old in source, f"{block.id}: the substitution {old!r} -> {new!r} no longer applies"
            source = source.replace(old, new)
    return source + "\n" + POSTCONDITIONS.get(block.id, "")


def _params():
    out = []
    for b in PYTHON_BLOCKS:
        if b.id in NOT_RUNNABLE:
            continue
        marks = [needs_ext] if '"ext"' in _runnable_source(b) else []
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


def test_every_listed_block_exists():
    # stale entries would exempt or rewrite nothing, silently
    for table in (NOT_RUNNABLE, CPU_SUBSTITUTIONS, POSTCONDITIONS):
        assert set(table) <= BLOCK_IDS, set(table) - BLOCK_IDS
    assert "README.md:python0" in BLOCK_IDS  # the extraction finds the README's fuse example


@pytest.mark.parametrize("block_id", sorted(NOT_RUNNABLE))
def test_not_runnable_blocks_are_not_programs(block_id):
    # the exemption is for listings only: a block that compiles is run, not listed here
    block = next(b for b in PYTHON_BLOCKS if b.id == block_id)
    with pytest.raises(SyntaxError):
        compile(block.text, block_id, "exec")


@pytest.mark.parametrize("block", _params())
def test_python_block_runs(block):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _runnable_source(block)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, f"{block.path} line {block.line}:\n{_runnable_source(block)}\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------- the op contract listing

def _documented_signatures() -> dict[str, tuple[list[str], list[str]]]:
    """{op: (positional parameters, keyword-only parameters)} of docs/ops.md's listing."""
    text = next(b for b in PYTHON_BLOCKS if b.id == "docs/ops.md:python0").text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    sigs = {}
    for name, params in re.findall(r"^(\w+)\(([^)]*)\)\s*->", code, re.M | re.S):
        names = [p.strip() for p in params.split(",") if p.strip()]
        star = names.index("*") if "*" in names else len(names)
        sigs[name] = (names[:star], names[star + 1:])
    return sigs


def _backend_modules():
    from gan_fast.backends import ext

    modules = [ext]
    try:
        import triton  # noqa: F401  (the triton backend is optional; its functions need it to import)
    except ImportError:
        return modules
    from gan_fast.backends import triton as triton_backend

    return modules + [triton_backend]


def test_ops_contract_listing_matches_the_backends():
    documented = _documented_signatures()
    assert len(documented) == 8, documented  # the listing parses
    with open(os.path.join(ROOT, "docs", "ops.md"), encoding="utf-8") as f:
        prose = f.read()
    for module in _backend_modules():
        ops = set(module.__all__) - {"unavailable_reason"}
        assert set(documented) == ops, (module.__name__, set(documented) ^ ops)
        for name, (positional, keyword) in documented.items():
            sig = inspect.signature(getattr(module, name))
            required = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty]
            got_pos = [p.name for p in required if p.kind is not inspect.Parameter.KEYWORD_ONLY]
            got_kw = [p.name for p in required if p.kind is inspect.Parameter.KEYWORD_ONLY]
            assert (got_pos, got_kw) == (positional, keyword), f"{module.__name__}.{name}{sig}"
            for p in sig.parameters.values():  # optional parameters are described in the prose
                if p.default is not inspect.Parameter.empty:
                    assert f"`{p.name}={p.default!r}`" in prose, f"{module.__name__}.{name}: {p.name}"


# ----------------------------------------------------------------------------- the bash blocks' flags

def _documented_flags() -> dict[str, set[str]]:
    """{module: flags} of every ``-m gan_fast.X ...`` in the bash blocks (also under torchrun)."""
    flags: dict[str, set[str]] = {}
    for block in blocks("bash", DOCS):
        for line in re.sub(r"\\\n\s*", " ", block.text).splitlines():
            line = line.split(" #", 1)[0]
            for m in re.finditer(r"-m (gan_fast\.\w+)((?:(?!&&|;).)*)", line):
                flags.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", m.group(2)))
    return flags


_HELP = r"""
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    print(f"==== {module}\n{out.getvalue()}")
"""


def test_documented_cli_flags_exist():
    flags = _documented_flags()
    # the extraction sees the README's commands
    assert {"gan_fast.train", "gan_fast.sample", "gan_fast.summary", "gan_fast.eval", "gan_fast.bench"} <= set(flags)
    assert {"--fused", "--sync-bn", "--interpolate-out", "--no-ema"} <= set().union(*flags.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _HELP, *sorted(flags)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    helps = dict(re.findall(r"^==== (\S+)\n(.*?)(?=^==== |\Z)", r.stdout, re.M | re.S))
    assert set(helps) == set(flags), r.stdout[-3000:]
    missing = {module: sorted(f for f in wanted if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helps[module]))
               for module, wanted in flags.items()}
    assert not any(missing.values()), f"flags shown in the docs that --help does not list: {missing}"
