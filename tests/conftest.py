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


# ------------------------------------------------------------------------------------------------
# The ext backend's tests: `@needs_ext` (or pytest.param("ext", marks=needs_ext)).
#
# An extension that failed to build (setup.py tolerates compiler errors so that the install
# succeeds) or can't be loaded makes these tests FAIL, with the reason gan_fast.backends.ext gives (the build
# log's location and how to rebuild): skipping them let the README's `python -m pytest` go green
# with ~90 ext tests silently skipped. Only a user who set GAN_FAST_NO_EXT=1 on purpose (as for the
# install) gets skips instead.

needs_ext = pytest.mark.needs_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def ext_missing_reason() -> str | None:
    from gan_fast.backends import ext

    return ext.unavailable_reason()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_ext: needs the C++ extension gan_fast._C; fails without "
                                       "it unless GAN_FAST_NO_EXT=1 (then skipped)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_ext") is None:
        return
    reason = ext_missing_reason()
    if reason is None:
        return
    if _flag("GAN_FAST_NO_EXT") and not _flag("GAN_FAST_EXT_REQUIRED"):
        pytest.skip(f"GAN_FAST_NO_EXT=1: the ext backend is off on purpose ({reason})")
    pytest.fail(f"the ext backend is unavailable: {reason}. "
                "Set GAN_FAST_NO_EXT=1 to skip the ext tests on purpose.", pytrace=False)
