"""The editable install (the README's ``pip install --no-build-isolation -e .``) must keep working when
Python runs from the folder that holds a clone named gan_fast: that folder is sys.path[0], and the clone
(which has no __init__.py at its top) is a namespace-package candidate called gan_fast."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT

pytest.importorskip("setuptools.build_meta", reason="building the editable wheel needs setuptools")


def _build_editable_wheel(project: str, out: str) -> str:
    """What pip runs for `pip install --no-build-isolation -e .` (PEP 660), without the extension."""
    env = {**os.environ, "GAN_FAST_NO_EXT": "1"}
    env.pop("PYTHONPATH", None)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_editable(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, out], cwd=project, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(out, r.stdout.strip().splitlines()[-1])


def test_editable_install_works_from_the_clones_parent_folder(tmp_path):
    parent = tmp_path / "work"
    clone = parent / "gan_fast"  # a clone named like the package, as `git clone .../gan_fast` makes
    clone.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), clone / name)
    shutil.copytree(os.path.join(ROOT, "gan_fast"), clone / "gan_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    wheel = _build_editable_wheel(str(clone), str(tmp_path / "dist"))

    # install it as pip would (unpack the wheel into site-packages) into a venv that sees this
    # environment's torch and other dependencies
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    which = subprocess.run([python, "-c", "import gan_fast; print(gan_fast.__file__, gan_fast.__version__)"],
                           cwd=parent, env=env, capture_output=True, text=True, timeout=300)
    assert which.returncode == 0, which.stderr
    assert which.stdout.split()[0] == str(clone / "gan_fast" / "__init__.py")
    r = subprocess.run([python, "-m", "gan_fast.train", "--help"], cwd=parent, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage: python -m gan_fast.train" in r.stdout
