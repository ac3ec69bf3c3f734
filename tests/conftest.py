# The annotations below (str | None) are 3.10 syntax when evaluated; pyproject promises Python >= 3.9,
# where collecting any test would fail without this.
from __future__ import annotations

import os
import subprocess
import sys

import torch

# Without a CUDA device the Triton kernels run through Triton's interpreter, which must be switched on
# before triton is first imported; this conftest is imported before any test module.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image-size", "16", "--nz", "8", "--ngf", "4", "--ndf", "4", "--batch-size", "8"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_module(module: str, *args: str, cwd: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would (without the test-only TRITON_INTERPRET, unless
    ``env`` sets it), capturing its output."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full = {**base, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full, timeout=600)


@pytest.fixture
def tiny_args():
    return list(TINY)
