import warnings

import pytest
import torch

from gan_fast import backends


def test_reference_always_available():
    assert backends.resolve("reference", "cpu") == "reference"
    assert backends.unavailable_reason("reference") is None


def test_unknown_backend_is_an_error():
    with pytest.raises(backends.BackendUnavailable, match="unknown backend"):
        backends.resolve("cudnn", "cpu")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton")
    reason = backends.unavailable_reason("triton", "cpu")
    assert reason is not None and "CUDA" in reason


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device="cpu": (
        None if name == "reference" else f"{name} is broken"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", torch.device("cpu")) == "reference"
    assert len(caught) == 1 and "ext is broken" in str(caught[0].message)
    with pytest.raises(backends.BackendUnavailable, match="ext is broken"):
        backends.resolve("ext", "cpu")


def test_import_gan_fast_needs_no_backend():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; sys.modules['gan_fast._C'] = None; "
            "import gan_fast; print(gan_fast.resolve_backend('reference'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "reference", r.stderr
