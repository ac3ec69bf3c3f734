"""The one backend registry: which implementation of the fused ops runs.

- ``reference``: the plain nn modules (what every fused backend is validated against);
- ``triton``: Triton kernels behind autograd.Function (``gan_fast.backends.triton``), on CUDA, or on the CPU
  through the Triton interpreter when ``TRITON_INTERPRET=1`` (slow; for tests);
- ``ext``: the C++/CUDA extension compiled from csrc/ (``gan_fast.backends.ext``), on CPU and CUDA;
- ``auto``: the fastest available fused backend for the device, else ``reference`` with one warning.

Both fused backends expose the same functional ops under the same names and signatures, so the fused
modules in ``gan_fast.fuse`` call ``ops_for(backend).<op>(...)`` and never branch on the backend.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "ext")

# Preference order of ``auto`` per device type. The benchmarks (bench/) decide this order; on a
# CPU the Triton interpreter is a correctness tool, never a fast path.
AUTO_ORDER = {"cuda": ("triton", "ext"), "cpu": ("ext",)}

_MODULES = {"triton": "gan_fast.backends.triton", "ext": "gan_fast.backends.ext"}


class BackendUnavailable(RuntimeError):
    """The requested backend can't run here; the message says why and how to fix it."""


def _import_error(name: str) -> str | None:
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as e:
        return f"{_MODULES[name]} can't be imported ({e})"
    reason = getattr(mod, "unavailable_reason", None)
    return reason() if callable(reason) else None


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """None when ``name`` can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if name == "reference":
        return None
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or auto"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"the triton backend runs on CUDA devices, not {device.type} "
                    "(TRITON_INTERPRET=1 runs it on the CPU, slowly, for testing)")
    return _import_error(name)


def is_available(name: str, device: torch.device | str = "cpu") -> bool:
    return unavailable_reason(name, device) is None


def resolve(requested: str, device: torch.device | str = "cpu") -> str:
    """The backend to use for ``requested`` on ``device``.

    An explicit fused backend that can't run raises BackendUnavailable with the reason; ``auto`` falls
    back to ``reference`` with one warning naming the reasons.
    """
    device = torch.device(device)
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailable(f"backend {requested!r} is unavailable: {reason}")
        return requested
    reasons = []
    for name in AUTO_ORDER.get(device.type, ()):
        reason = unavailable_reason(name, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    why = "; ".join(reasons) or f"no fused backend supports {device.type} devices"
    warnings.warn(f"--fused: no fused backend is available, using the reference modules ({why})",
                  stacklevel=2)
    return "reference"


def ops_for(name: str) -> ModuleType:
    """The module holding backend ``name``'s functional ops."""
    if name not in _MODULES:
        raise ValueError(f"backend {name!r} has no fused ops; choose one of {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])
