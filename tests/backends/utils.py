"""Comparison and input helpers for the op tests."""
from __future__ import annotations

import pytest
import torch

from ..conftest import DEVICE

LAYOUTS = ("contiguous", "channels_last", "strided")
# BatchNorm's eps and momentum and LeakyReLU's slope where a test has no reason to pick others
EPS, MOMENTUM, SLOPE = 1e-5, 0.1, 0.2


def gpu_accuracy_test(test):
    """Marks a GPU accuracy test: run once per dtype the fused ops take (its ``dtype`` argument),
    skipped without a CUDA device."""
    test = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    return pytest.mark.gpu(test)


def make_input(shape, layout="contiguous", dtype=torch.float32, requires_grad=True, scale=1.0):
    """A fresh random tensor (never zeros) in the requested memory layout: NCHW-contiguous,
    channels_last, or a non-contiguous view (every other column of a wider tensor)."""
    if layout == "strided":
        wide = list(shape)
        wide[-1] *= 2
        t = (torch.randn(wide, device=DEVICE) * scale).to(dtype)[..., ::2]
    else:
        t = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    assert t.shape == torch.Size(shape)
    return t.requires_grad_(requires_grad)


def assert_close(actual, expected, rtol=1e-4, name="", min_scale=1e-6):
    """Elementwise close within rtol, with an atol scaled to the tensor's magnitude (sums of many
    products cancel to near-zero entries whose relative error means nothing). ``min_scale`` is the
    magnitude to scale by when the expected tensor is itself ~0 by cancellation (a bias before
    BatchNorm gets a zero gradient up to rounding)."""
    assert actual is not None and expected is not None, name
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=rtol * max(scale, min_scale),
                               msg=lambda m: f"{name}: {m}")
    assert not torch.isnan(actual).any(), f"{name}: NaN in the output"


def bn_params(channels, affine=True):
    """BatchNorm weight, bias (leaf tensors requiring grad) and running stats, all random."""
    if affine:
        gamma = (torch.rand(channels, device=DEVICE) + 0.5).requires_grad_()
        beta = (torch.randn(channels, device=DEVICE) * 0.5).requires_grad_()
    else:
        gamma = beta = None
    running_mean = torch.randn(channels, device=DEVICE) * 0.1
    running_var = torch.rand(channels, device=DEVICE) + 0.5
    return gamma, beta, running_mean, running_var


def grads(out, inputs, dy):
    """Gradients of <out, dy> w.r.t. the inputs that require grad (None for the others)."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, live, dy))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def error_vs_fp64(value, reference64):
    return (value.double() - reference64).abs().max().item()


def check_bn_op(fused, reference, make_x, params, channels, *, steps=2, affine=True, strided_dy=False,
                rtol=1e-4, names=()):
    """Run ``steps`` training steps then one eval step of fused and reference, each on a fresh input,
    and compare the output, its memory format, every gradient (x, ``params``, gamma, beta) and the
    running statistics after every step. fused / reference take
    (x, *params, gamma, beta, running_mean, running_var, training)."""
    gamma, beta, rm, rv = bn_params(channels, affine)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in [True] * steps + [False]:
        x = make_x()
        y = fused(x, *params, gamma, beta, rm, rv, training)
        y_ref = reference(x, *params, gamma, beta, rm_ref, rv_ref, training)
        assert_close(y, y_ref, rtol, "output")
        check_memory_format(y, x)
        dy = make_input(y_ref.shape, "strided" if strided_dy else "contiguous", y_ref.dtype, False)
        inputs = [x, *params, gamma, beta]
        labels = ["x", *(names or [f"param{i}" for i in range(len(params))]), "bn_weight", "bn_bias"]
        got_grads, want_grads = grads(y, inputs, dy), grads(y_ref, inputs, dy)
        # A bias before training-mode BatchNorm has an exact gradient of 0: both sides hold only the
        # rounding of a sum of the pre-BN gradients dz, which the weight gradient also sums (times
        # inputs of order 1), so its magnitude sets the scale the bias gradient is judged at.
        dz_scale = max((g.abs().max().item() for g, lab in zip(want_grads, labels)
                        if g is not None and lab == "weight"), default=1e-6)
        for got, want, label in zip(got_grads, want_grads, labels):
            assert (got is None) == (want is None), label
            if want is not None:
                assert_close(got, want, rtol, f"d {label} (training={training})",
                             min_scale=dz_scale if label == "bias" else 1e-6)
        assert_close(rm, rm_ref, rtol, "running_mean")
        assert_close(rv, rv_ref, rtol, "running_var")


def check_memory_format(y, x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
    else:
        assert y.is_contiguous(), "output is not contiguous"


def check_against_fp64(fused, reference, inputs, dtype, grad_count, cast_count, ulp_floor=False):
    """GPU accuracy rule (flash-attention's): the fused op's error against an fp64 reference is at
    most twice PyTorch's own error in ``dtype``. ``inputs``: fp32 tensors; the first ``cast_count``
    are cast to ``dtype`` (activations and weights; BatchNorm parameters stay fp32, as under
    autocast); gradients are compared for the first ``grad_count``. ``ulp_floor`` also allows one
    unit in the last place of ``dtype`` at the tensor's magnitude (for small CPU cases, where both
    errors are a single rounding and "twice" is a coin flip)."""
    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(i < grad_count) if t is not None else None
                  for i, t in enumerate(tensors)]
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        dy = torch.ones_like(out) if out.dim() == 0 else dy_fixed[0].to(out.dtype)
        gs = torch.autograd.grad(out, [t for t in leaves[:grad_count]], dy)
        return [out, *gs]

    torch.manual_seed(1)
    probe = reference(*[t.detach() if t is not None else None for t in inputs])
    probe = probe[0] if isinstance(probe, tuple) else probe
    dy_fixed = [torch.randn(probe.shape, device=probe.device, dtype=torch.float64)]
    low = [t.to(dtype) if (t is not None and i < cast_count) else t for i, t in enumerate(inputs)]
    f64 = [t.double() if t is not None else None for t in inputs]
    exact = run(reference, f64)
    ours = run(fused, low)
    torchs = run(reference, low)
    for i, (e, o, t) in enumerate(zip(exact, ours, torchs)):
        err_ours = error_vs_fp64(o, e)
        err_torch = error_vs_fp64(t, e)
        tiny = (torch.finfo(dtype).eps if ulp_floor else 1e-6) * e.abs().max().item()
        assert err_ours <= 2 * err_torch + tiny, (i, dtype, err_ours, err_torch)


def check_bn_op_against_fp64(fused, reference, inputs, dtype, grad_count, cast_count):
    """check_against_fp64 for BatchNorm ops in check_bn_op's signature, in training mode without
    running statistics."""
    def training(f):
        return lambda *tensors: f(*tensors, None, None, True)
    check_against_fp64(training(fused), training(reference), inputs, dtype, grad_count, cast_count)
