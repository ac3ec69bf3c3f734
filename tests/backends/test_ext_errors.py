"""The ``ext`` backend refusing what it can't compute: bad inputs raise a clear exception with a
message (never a crash or a silently wrong result), momentum=None is the caller's to resolve, and
without a loadable gan_fast._C every op raises BackendUnavailable saying how to rebuild it.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from gan_fast import backends
from gan_fast.backends import ext

from ..conftest import needs_ext
from .utils import DEVICE, EPS, MOMENTUM, SLOPE, bn_params, make_input


# ------------------------------------------------------------------------------------------------
# Running statistics: nn.BatchNorm's momentum=None is the caller's to resolve.

@needs_ext
def test_momentum_none_is_a_clear_error():
    x, w = make_input((2, 3, 4, 4)), make_input((4, 3, 3, 3))
    g, b, rm, rv = bn_params(4)
    for training in (True, False):
        with pytest.raises(ValueError, match=r"momentum=None .*1 / num_batches_tracked"):
            ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, stride=1, padding=1, training=training, momentum=None,
                                     eps=EPS, negative_slope=SLOPE)
    with pytest.raises(TypeError, match="momentum must be a float"):
        ext.conv_transpose2d_bn_relu(x, make_input((3, 4, 3, 3)), g, b, rm, rv, stride=1, padding=1, training=True,
                                     momentum="0.1", eps=EPS)



# ------------------------------------------------------------------------------------------------
# Bad input: a clear exception with a message, never a crash or a silently wrong result.

def _bad_calls():
    x, w = make_input((2, 3, 8, 8)), make_input((4, 3, 4, 4))
    g, b, rm, rv = bn_params(4)
    conv_bn = dict(stride=2, padding=1, training=True, momentum=MOMENTUM, eps=EPS, negative_slope=SLOPE)
    ct_bn = dict(stride=2, padding=1, training=True, momentum=MOMENTUM, eps=EPS)
    lin = dict(training=True, momentum=MOMENTUM, eps=EPS, negative_slope=SLOPE)
    meta = torch.device("meta")

    def ones(*shape, **kw):
        return torch.ones(*shape, device=DEVICE, **kw)

    def zeros(*shape, **kw):
        return torch.zeros(*shape, device=DEVICE, **kw)

    return [
        # wrong dtype
        ("float64 weight", lambda: ext.conv2d_bn_leaky_relu(x, w.double(), g, b, rm, rv, **conv_bn),
         RuntimeError, "type|dtype"),
        ("integer input", lambda: ext.conv2d_leaky_relu(x.long(), w.long(), None, stride=2, padding=1,
                                                        negative_slope=SLOPE), RuntimeError, "float32"),
        ("integer gamma", lambda: ext.conv2d_bn_leaky_relu(x, w, g.long(), b, rm, rv, **conv_bn),
         RuntimeError, "weight must be float32"),
        ("integer running stats", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm.long(), rv.long(), **conv_bn),
         RuntimeError, "running_mean must be float32"),
        ("integer target", lambda: ext.bce_with_logits(make_input((4,)), ones(4, dtype=torch.long)),
         TypeError, "floating-point"),
        ("bool target", lambda: ext.d_head_bce_with_logits(x, make_input((1, 3, 8, 8)), ones(2, dtype=torch.bool)),
         TypeError, "floating-point"),
        ("integer logits", lambda: ext.bce_with_logits(ones(4, dtype=torch.int32), ones(4)),
         RuntimeError, "logits must be float32"),
        ("d head dtype mix", lambda: ext.d_head_bce_with_logits(x, make_input((1, 3, 8, 8)).double(), ones(2)),
         RuntimeError, "dtype"),
        ("mixed running stat dtypes", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm.double(), rv, **conv_bn),
         RuntimeError, "same dtype"),
        # wrong rank
        ("3-D conv input", lambda: ext.conv2d_bn_leaky_relu(x[0], w, g, b, rm, rv, **conv_bn), ValueError, "4-D"),
        ("3-D convT input", lambda: ext.conv_transpose2d_bn_relu(x[0], make_input((3, 4, 4, 4)), g, b, rm, rv, **ct_bn),
         ValueError, "4-D"),
        ("3-D upsample input", lambda: ext.upsample_conv2d_bn_relu(x[0], make_input((4, 3, 3, 3)), g, b, rm, rv,
                                                                   padding=1, training=True, momentum=MOMENTUM,
                                                                   eps=EPS), ValueError, "4-D"),
        ("3-D linear input", lambda: ext.linear_bn_leaky_relu(make_input((2, 3, 5)), make_input((4, 5)), None, g, b,
                                                              rm, rv, **lin), ValueError, "2-D"),
        ("3-D tanh input", lambda: ext.conv_transpose2d_tanh(x[0], make_input((3, 4, 4, 4)), None, stride=2,
                                                             padding=1), RuntimeError, "4-D"),
        ("3-D d head input", lambda: ext.d_head_bce_with_logits(x[0], make_input((1, 3, 8, 8)), ones(2)),
         RuntimeError, "4-D"),
        ("2-D gamma", lambda: ext.conv2d_bn_leaky_relu(x, w, g.view(2, 2), b, rm, rv, **conv_bn),
         RuntimeError, "shape"),
        # wrong channel count
        ("conv weight channels", lambda: ext.conv2d_bn_leaky_relu(x, make_input((4, 5, 4, 4)), g, b, rm, rv, **conv_bn),
         RuntimeError, "channels"),
        ("conv_act weight channels", lambda: ext.conv2d_leaky_relu(x, make_input((4, 5, 4, 4)), None, stride=2,
                                                                   padding=1, negative_slope=SLOPE),
         RuntimeError, "channels"),
        ("gamma channels", lambda: ext.conv2d_bn_leaky_relu(x, w, ones(5), b, rm, rv, **conv_bn),
         RuntimeError, r"weight must have shape \[4\]"),
        ("running stat channels", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, zeros(5), ones(5),
                                                                   **conv_bn), RuntimeError, r"shape \[C\] = \[4\]"),
        ("eval running stat channels", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, zeros(5), ones(5),
                                                                        **{**conv_bn, "training": False}),
         RuntimeError, r"running_mean must have shape \[4\]"),
        ("bias channels", lambda: ext.conv_transpose2d_tanh(x, make_input((3, 4, 4, 4)), ones(3), stride=2,
                                                            padding=1), RuntimeError, r"bias must have shape \[4\]"),
        ("d head weight shape", lambda: ext.d_head_bce_with_logits(x, make_input((1, 3, 4, 4)), ones(2)),
         RuntimeError, "kernel = the input's spatial size"),
        ("target shape", lambda: ext.d_head_bce_with_logits(x, make_input((1, 3, 8, 8)), ones(3)),
         RuntimeError, "not broadcastable"),
        ("bce target shape", lambda: ext.bce_with_logits(make_input((4,)), ones(2, 4)),
         RuntimeError, "not broadcastable"),
        # device mismatch (meta tensors stand in for a second device on a CPU-only machine; a call
        # mixing them dispatches to the fake kernels, which check devices like the C++ kernels)
        ("meta weight", lambda: ext.conv2d_leaky_relu(x, w.to(meta), None, stride=2, padding=1, negative_slope=SLOPE),
         RuntimeError, "weight is on meta"),
        ("meta gamma", lambda: ext.conv2d_bn_leaky_relu(x, w, g.to(meta), b, rm, rv, **conv_bn),
         RuntimeError, "weight is on meta"),
        ("meta running stats", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm.to(meta), rv.to(meta), **conv_bn),
         RuntimeError, "on meta"),
        ("meta target", lambda: ext.bce_with_logits(make_input((4,)), torch.ones(4, device=meta)),
         RuntimeError, "target is on meta"),
        ("meta head weight", lambda: ext.d_head_bce_with_logits(x, make_input((1, 3, 8, 8)).to(meta), ones(2)),
         RuntimeError, "weight is on meta"),
        *([("cpu gamma, cuda input", lambda: ext.conv2d_bn_leaky_relu(x, w, g.cpu(), b, rm, rv, **conv_bn),
            RuntimeError, "weight is on cpu"),
           ("cpu target, cuda logits", lambda: ext.bce_with_logits(make_input((4,)), torch.ones(4)),
            RuntimeError, "target is on cpu")] if DEVICE == "cuda" else []),
        # other arguments
        ("float stride", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, **{**conv_bn, "stride": 1.5}),
         TypeError, "stride must be an int"),
        ("zero stride", lambda: ext.conv_transpose2d_tanh(x, make_input((3, 4, 4, 4)), None, stride=0, padding=1),
         ValueError, "stride must be >= 1"),
        ("negative padding", lambda: ext.conv2d_leaky_relu(x, w, None, stride=2, padding=(1, -1), negative_slope=SLOPE),
         ValueError, "padding must be >= 0"),
        ("padding too large", lambda: ext.conv_transpose2d_tanh(make_input((1, 3, 2, 2)), make_input((3, 4, 4, 4)),
                                                                None, stride=2, padding=5),
         RuntimeError, "empty output"),
        ("negative slope", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, **{**conv_bn, "negative_slope": -0.1}),
         ValueError, "negative_slope must be >= 0"),
        ("eps 0", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, **{**conv_bn, "eps": 0.0}),
         RuntimeError, "eps must be > 0"),
        ("one running stat", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm, None, **conv_bn), ValueError, "both"),
        ("eval without running stats", lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, None, None,
                                                                         **{**conv_bn, "training": False}),
         ValueError, "evaluation mode"),
        ("batch 1 of 1x1", lambda: ext.conv_transpose2d_bn_relu(make_input((1, 3, 1, 1)), make_input((3, 4, 1, 1)),
                                                                g, b, rm, rv, **{**ct_bn, "stride": 1, "padding": 0}),
         RuntimeError, "more than 1 value per channel"),
        ("linear batch 1", lambda: ext.linear_bn_leaky_relu(make_input((1, 5)), make_input((4, 5)), None, g, b, rm, rv,
                                                            **lin), RuntimeError, "more than 1 value per channel"),
        ("empty logits", lambda: ext.bce_with_logits(make_input((0,)), ones(0)), RuntimeError, "empty"),
    ]


@needs_ext
def test_bad_inputs_raise_clear_errors():
    for label, call, exc, match in _bad_calls():
        try:
            with pytest.raises(exc, match=match):
                call()
        except BaseException as e:  # the wrong exception, or none: say which case
            raise AssertionError(f"bad input case {label!r}: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# The fallback when the extension is missing.

def test_missing_extension_says_how_to_rebuild(monkeypatch):
    # A second copy of gan_fast/backends/ext.py, executed while sys.modules["gan_fast._C"] is None, which makes
    # its `from . import _C` raise ImportError exactly as when the extension was never built (the
    # copy is a separate module: the loaded gan_fast.backends.ext and its registrations stay untouched).
    import gan_fast

    monkeypatch.setitem(sys.modules, "gan_fast._C", None)
    monkeypatch.delattr(gan_fast, "_C", raising=False)  # else `from . import _C` finds the attribute
    spec = importlib.util.spec_from_file_location("gan_fast.backends._ext_without_C", ext.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reason = mod.unavailable_reason()
    assert mod._LOAD_ERROR is reason
    assert reason is not None and "gan_fast._C" in reason and "pip install --no-build-isolation -e ." in reason, reason
    with pytest.raises(backends.BackendUnavailable, match="pip install"):
        mod.bce_with_logits(torch.randn(3), torch.ones(3))
    monkeypatch.setitem(sys.modules, "gan_fast.backends.ext", mod)  # what gan_fast.backends imports
    assert backends.unavailable_reason("ext") == reason
    with pytest.raises(backends.BackendUnavailable, match="pip install"):
        backends.resolve("ext", "cpu")


def test_every_op_raises_backend_unavailable(monkeypatch):
    reason = "the C++/CUDA extension gan_fast._C is not built; rebuild it with `pip install --no-build-isolation -e .`"
    monkeypatch.setattr(ext, "_LOAD_ERROR", reason)
    assert ext.unavailable_reason() == reason
    x, w = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 3, 3)
    g, b, rm, rv = torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4)
    bn = dict(training=True, momentum=MOMENTUM, eps=EPS)
    calls = [
        lambda: ext.conv_transpose2d_bn_relu(x, torch.randn(3, 4, 4, 4), g, b, rm, rv, stride=2, padding=1, **bn),
        lambda: ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, stride=1, padding=1, negative_slope=SLOPE, **bn),
        lambda: ext.conv2d_leaky_relu(x, w, None, stride=1, padding=1, negative_slope=SLOPE),
        lambda: ext.conv_transpose2d_tanh(x, torch.randn(3, 4, 4, 4), None, stride=2, padding=1),
        lambda: ext.linear_bn_leaky_relu(torch.randn(2, 5), torch.randn(4, 5), None, g, b, rm, rv,
                                         negative_slope=SLOPE, **bn),
        lambda: ext.upsample_conv2d_bn_relu(x, w, g, b, rm, rv, padding=1, **bn),
        lambda: ext.d_head_bce_with_logits(x, torch.randn(1, 3, 4, 4), torch.ones(2)),
        lambda: ext.bce_with_logits(torch.randn(3), torch.ones(3)),
    ]
    assert len(calls) == len(ext.__all__) - 1  # every op but unavailable_reason
    for call in calls:
        with pytest.raises(backends.BackendUnavailable, match="rebuild it"):
            call()
    with pytest.raises(backends.BackendUnavailable, match="rebuild it"):
        backends.resolve("ext", "cpu")
