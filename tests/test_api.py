"""The package-level API as the README calls it (``gan_fast.fuse(...)``, ``gan_fast.build_models(...)``),
each case in a fresh interpreter: what ``gan_fast.fuse`` is depends on which imports ran before, so an
in-process test (where pytest and other tests have imported gan_fast.fuse long ago) can't see it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The README's "Fused backends" snippet on a CPU: "auto" (the README's own alternative) so that the
# case does not depend on the extension being built.
README_CALLS = """
import gan_fast
netG, netD = gan_fast.build_models("dcgan", nz=100, ngf=64, ndf=64, channels=3, image_size=64)
assert gan_fast.fuse(netG, "auto") is netG
assert gan_fast.fuse(netD, "auto") is netD
assert gan_fast.fuse(netD, "auto") is netD   # and any later call
"""

# What a user may have imported first. Each used to leave (or make) gan_fast.fuse the submodule.
PRELUDES = {
    "plain": "",
    "import_submodule_first": "import gan_fast.fuse",
    "from_submodule_first": "from gan_fast.fuse import fused_modules",
    "import_submodule_as_first": "import gan_fast.fuse as m",
    "import_submodule_after_package": "import gan_fast\nimport gan_fast.fuse",
    "from_submodule_after_package": "import gan_fast\nfrom gan_fast.fuse import discriminator_loss",
}

# The deep spellings keep working too, after the README's calls: gan_fast.fuse is the module, callable.
DEEP_SPELLINGS = """
import sys
import gan_fast.fuse as m
from gan_fast.fuse import fuse, fused_modules
assert m is gan_fast.fuse is sys.modules["gan_fast.fuse"] and m.fuse is fuse
assert isinstance(fused_modules(netG), list) and m.fused_modules is fused_modules
assert gan_fast.fuse.discriminator_loss is gan_fast.discriminator_loss is m.discriminator_loss
assert fuse(netG, "auto") is netG
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("prelude", PRELUDES.values(), ids=PRELUDES.keys())
def test_readme_fuse_calls_work_after_any_import_order(prelude):
    code = prelude + "\n" + README_CALLS + DEEP_SPELLINGS + "print('ok')\n"
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_import_gan_fast_loads_no_backend():
    # fuse is imported eagerly by gan_fast/__init__.py: that must stay free of triton and of the
    # compiled extension (both are loaded by the first fuse() / ops_for() that needs them).
    r = _run("import sys, gan_fast\n"
             "loaded = [m for m in ('triton', 'gan_fast._C', 'gan_fast.backends.ext', 'gan_fast.backends.triton') if m in sys.modules]\n"
             "print(loaded)\n")
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
