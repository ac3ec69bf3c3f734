"""The ``ext`` backend (gan_fast.backends.ext over the C++ extension built from csrc/) against the compositions
of nn modules it replaces (docs/ops.md): outputs, every gradient, running statistics over several
training steps then eval, in every memory layout; bf16 accuracy against an fp64 reference;
torch.compile. test_ext_isa.py checks each ISA build of the CPU kernels, test_ext_cpu_paths.py the
CPU-only forms of blocks, test_ext_library.py the ops' torch.library registrations, test_ext_errors.py
bad inputs and the missing extension.

Run on the CPU here and on CUDA where there is one (tests.backends.utils.DEVICE). Without a built
extension these tests fail, naming the build log, unless GAN_FAST_NO_EXT=1 (then they are skipped).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gan_fast.backends import ext, reference

from ..conftest import needs_ext
from .utils import (DEVICE, EPS, MOMENTUM, SLOPE, assert_close, bn_params, check_against_fp64, check_bn_op,
                    check_memory_format, grads, make_input)

RTOL = 1e-5  # fp32, relative to each tensor's largest magnitude (tests.backends.utils.assert_close)


# Each BN block as f(x, weight, [bias,] gamma, beta, running_mean, running_var, training), the
# signature tests.backends.utils.check_bn_op drives.
def _bn_pair(name, **kw):
    fused, ref = getattr(ext, name), getattr(reference, name)
    bn_kw = dict(momentum=MOMENTUM, eps=EPS)
    if name != "conv_transpose2d_bn_relu" and name != "upsample_conv2d_bn_relu":
        bn_kw["negative_slope"] = SLOPE

    def call(f):
        return lambda *args: f(*args[:-1], training=args[-1], **kw, **bn_kw)
    return call(fused), call(ref)


def _layout_input(shape, layout):
    if layout == "transposed":  # [N, in] stored column-major: non-contiguous, not a 4-D layout
        return make_input(shape[::-1]).detach().t().requires_grad_()
    return make_input(shape, layout)


# ------------------------------------------------------------------------------------------------
# fp32 against the reference: output, gradients, running statistics (training steps, then eval).

@needs_ext
@pytest.mark.parametrize("op, n, cin, cout, size, k, stride, padding, layout, affine", [
    ("conv_transpose2d_bn_relu", 1, 37, 63, 1, 4, 1, 0, "contiguous", True),     # G's first block: 1x1 -> 4x4
    ("conv_transpose2d_bn_relu", 2, 63, 37, 4, 4, 2, 1, "channels_last", True),  # G block 4 -> 8
    ("conv_transpose2d_bn_relu", 3, 3, 1, 8, 4, 2, 1, "strided", True),          # one output channel, 8 -> 16
    ("conv_transpose2d_bn_relu", 3, 1, 3, 1, 2, 1, 0, "contiguous", False),      # one input channel, affine=False
    ("conv_transpose2d_bn_relu", 3, 37, 63, 5, 4, 2, 1, "channels_last", True),  # odd size; several partial sums
    ("conv_transpose2d_bn_relu", 2, 3, 37, 3, 3, 1, 1, "strided", False),
    ("conv2d_bn_leaky_relu", 2, 3, 37, 16, 4, 2, 1, "contiguous", True),      # D block 16 -> 8
    ("conv2d_bn_leaky_relu", 1, 37, 63, 6, 4, 2, 1, "channels_last", True),   # batch 1, spatial > 1
    ("conv2d_bn_leaky_relu", 3, 63, 1, 7, 4, 2, 1, "strided", True),          # odd size, one output channel
    ("conv2d_bn_leaky_relu", 3, 1, 3, 4, 4, 2, 1, "contiguous", False),       # 4x4 -> 2x2, one input channel
    ("conv2d_bn_leaky_relu", 3, 3, 63, 16, 3, 1, 1, "channels_last", True),   # 768 rows of 63 channels
    ("conv2d_bn_leaky_relu", 2, 37, 3, 16, 4, 2, 1, "strided", False),
    # stride 1: upsample_conv2d_bn_relu has none
    ("upsample_conv2d_bn_relu", 2, 37, 63, 4, 3, 1, 1, "contiguous", True),   # 3x3 pad 1: a 4x4 s2 transposed conv
    ("upsample_conv2d_bn_relu", 2, 3, 37, 1, 3, 1, 1, "channels_last", True),  # 1x1 -> 2x2
    ("upsample_conv2d_bn_relu", 1, 37, 3, 2, 3, 1, 1, "contiguous", True),     # batch 1, 2x2 -> 4x4
    ("upsample_conv2d_bn_relu", 3, 63, 3, 5, 3, 1, 1, "strided", False),
    ("upsample_conv2d_bn_relu", 2, 1, 1, 3, 3, 1, 1, "channels_last", True),
    ("upsample_conv2d_bn_relu", 2, 3, 37, 4, 3, 1, 0, "contiguous", True),     # not 3x3 pad 1: upsample then conv
    ("upsample_conv2d_bn_relu", 3, 37, 3, 3, 1, 1, 0, "strided", True),
])
def test_conv_bn_blocks(op, n, cin, cout, size, k, stride, padding, layout, affine):
    w = make_input((cin, cout, k, k) if op == "conv_transpose2d_bn_relu" else (cout, cin, k, k), scale=0.2)
    conv = dict(padding=padding) if op == "upsample_conv2d_bn_relu" else dict(stride=stride, padding=padding)
    fused, ref = _bn_pair(op, **conv)
    check_bn_op(fused, ref, lambda: make_input((n, cin, size, size), layout), [w], cout, steps=3, affine=affine,
                strided_dy=layout != "contiguous", rtol=RTOL, names=["weight"])


@needs_ext
@pytest.mark.parametrize("n, fin, fout, layout, bias, affine", [
    (8, 37, 63, "contiguous", True, True),
    (16, 63, 37, "strided", False, True),
    (5, 3, 1, "transposed", True, False),
    (12, 37, 3, "contiguous", False, True),
    # (in_features = 1 is left out: BatchNorm1d(w * x) does not depend on w's magnitude, so the weight
    # gradient is exactly 0 and both sides hold only rounding noise)
])
def test_linear_bn_leaky_relu(n, fin, fout, layout, bias, affine):
    w = make_input((fout, fin), scale=0.3)
    params, names = ([w, make_input((fout,))], ["weight", "bias"]) if bias else ([w, None], ["weight", "bias"])
    fused, ref = _bn_pair("linear_bn_leaky_relu")
    check_bn_op(fused, ref, lambda: _layout_input((n, fin), layout), params, fout, steps=3, affine=affine,
                strided_dy=layout != "contiguous", rtol=RTOL, names=names)


@needs_ext
@pytest.mark.parametrize("block, n, size", [("conv2d_bn_leaky_relu", 2, 2), ("conv2d_bn_leaky_relu", 3, 2),
                                            ("conv_transpose2d_bn_relu", 2, 1), ("linear_bn_leaky_relu", 2, 0),
                                            ("linear_bn_leaky_relu", 3, 0)])
def test_two_or_three_values_per_channel_float64(block, n, size):
    # With 2 or 3 values per channel BatchNorm is degenerate (2 values always normalize to +-1, so its
    # input gradient is 0) and the backward cancels terms far larger than its result: fp32 then holds
    # only rounding noise on both sides (PyTorch's own fp32 error there is as large as ours), so these
    # counts are checked in float64, where the same kernels must agree to ~1e-12.
    torch.manual_seed(0)
    c, cin = 3, 2
    x_shape = (n, cin) if size == 0 else (n, cin, size, size)
    w = torch.randn(*((c, cin) if size == 0 else (c, cin, 2, 2) if block.startswith("conv2d") else (cin, c, 1, 1)),
                    dtype=torch.float64, device=DEVICE).requires_grad_()
    kw = dict(stride=2, padding=0) if block.startswith("conv2d") else dict(stride=1, padding=0) if size else {}
    fused, ref = _bn_pair(block, **kw)
    params = [w, None] if size == 0 else [w]
    g = (torch.rand(c, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, device=DEVICE).requires_grad_()
    rm, rv = torch.zeros(c, dtype=torch.float64, device=DEVICE), torch.ones(c, dtype=torch.float64, device=DEVICE)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in (True, True, False):
        x = torch.randn(x_shape, dtype=torch.float64, device=DEVICE).requires_grad_()
        y, y_ref = fused(x, *params, g, b, rm, rv, training), ref(x, *params, g, b, rm_ref, rv_ref, training)
        dy = torch.randn_like(y_ref)
        inputs = [x, w, g, b]
        for got, want in zip([y, *grads(y, inputs, dy)], [y_ref, *grads(y_ref, inputs, dy)]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * max(want.abs().max().item(), 1.0))
        torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("threads", [1, 5])
def test_thread_counts(threads):
    # The CPU reductions split the work by thread count (planes: channel x batch-chunk tasks, the
    # batch split only when there are fewer channels than threads; rows: row chunks); 1 and 5 threads
    # reach the single-chunk and the many-chunk sums whatever the machine has.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 1 channel: 5 batch chunks at 5 threads; 63 channels x 1280 rows: 5 row chunks
        for cout, layout, size in ((1, "contiguous", 16), (3, "strided", 8), (63, "channels_last", 16)):
            w = make_input((cout, 3, 3, 3), scale=0.3)
            fused, ref = _bn_pair("conv2d_bn_leaky_relu", stride=1, padding=1)
            check_bn_op(fused, ref, lambda: make_input((5, 3, size, size), layout), [w], cout, steps=2, rtol=RTOL,
                        strided_dy=True, names=["weight"])
    finally:
        torch.set_num_threads(before)


@needs_ext
@pytest.mark.parametrize("op, n, cin, cout, size, k, stride, padding, layout, bias", [
    ("conv2d_leaky_relu", 2, 1, 37, 16, 4, 2, 1, "contiguous", True),         # D's first layer
    ("conv2d_leaky_relu", 1, 3, 63, 8, 4, 2, 1, "channels_last", False),
    ("conv2d_leaky_relu", 3, 37, 3, 7, 3, 1, 1, "strided", True),
    ("conv2d_leaky_relu", 2, 63, 1, 4, 4, 1, 0, "channels_last", True),       # 4x4 -> 1x1
    ("conv_transpose2d_tanh", 2, 37, 1, 16, 4, 2, 1, "contiguous", False),    # G's last layer 16 -> 32
    ("conv_transpose2d_tanh", 1, 63, 3, 4, 4, 2, 1, "channels_last", True),
    ("conv_transpose2d_tanh", 3, 3, 37, 1, 4, 1, 0, "strided", True),         # 1x1 -> 4x4
    ("conv_transpose2d_tanh", 2, 1, 63, 5, 3, 1, 1, "channels_last", False),
])
def test_conv_activation_ops(op, n, cin, cout, size, k, stride, padding, layout, bias):
    # output, its memory format and the gradients of x, weight and bias (fp32)
    transposed = op == "conv_transpose2d_tanh"
    w = make_input((cin, cout, k, k), scale=0.3) if transposed else make_input((cout, cin, k, k), scale=0.2)
    b = make_input((cout,)) if bias else None
    kw = dict(stride=stride, padding=padding) if transposed else dict(stride=stride, padding=padding,
                                                                      negative_slope=SLOPE)
    x = make_input((n, cin, size, size), layout)
    y, y_ref = getattr(ext, op)(x, w, b, **kw), getattr(reference, op)(x, w, b, **kw)
    assert_close(y, y_ref, RTOL, "output")
    check_memory_format(y, x)
    dy = make_input(y_ref.shape, "strided" if layout != "contiguous" else "contiguous", requires_grad=False)
    inputs = [x, w, b]
    for got, want, label in zip(grads(y, inputs, dy), grads(y_ref, inputs, dy), ["x", "weight", "bias"]):
        assert (got is None) == (want is None), label
        if want is not None:
            assert_close(got, want, RTOL, f"d {label}")


# ------------------------------------------------------------------------------------------------
# D head and BCE.

def _target(kind, n):
    if kind == "hard":
        return (torch.rand(n, device=DEVICE) > 0.5).float()
    if kind == "soft":
        return torch.rand(n, device=DEVICE).requires_grad_()
    if kind == "scalar":
        return torch.tensor(0.9, device=DEVICE)
    return torch.full((1,), 0.1, device=DEVICE)  # "one": shape [1], broadcast over the batch


@needs_ext
@pytest.mark.parametrize("n, c, size, layout, target", [
    (3, 63, 4, "contiguous", "hard"),     # DCGAN's D head: kernel 4 over a 4x4 map
    (1, 37, 1, "channels_last", "soft"),
    (2, 3, 3, "strided", "scalar"),
    (3, 1, 2, "channels_last", "one"),
    (2, 37, 4, "channels_last", "soft"),
])
def test_d_head_bce_with_logits(n, c, size, layout, target):
    x = make_input((n, c, size, size), layout)
    # logits ~ N(0, 1): a confident logit's loss log1p(e^-|l|) has relative error |l| * eps of the
    # logit's own (1e-5 for |l| ~ 10 from a 1000-term fp32 dot), however it is computed; the
    # confident regime is test_bce_huge_logits_are_finite_and_exact's, against fp64
    w = make_input((1, c, size, size), scale=(c * size * size) ** -0.5)
    t = _target(target, n)
    loss, logits = ext.d_head_bce_with_logits(x, w, t)
    loss_ref, logits_ref = reference.d_head_bce_with_logits(x, w, t)
    assert loss.dim() == 0 and not logits.requires_grad
    assert_close(loss, loss_ref, RTOL, "loss")
    assert_close(logits, logits_ref, RTOL, "logits")
    inputs = [x, w, t]
    for got, want, label in zip(grads(loss, inputs, None), grads(loss_ref, inputs, None), ["x", "weight", "target"]):
        assert (got is None) == (want is None), label
        if want is not None:
            assert_close(got, want, RTOL, f"d {label}")
            if label == "x":
                check_memory_format(got, x)


@needs_ext
@pytest.mark.parametrize("shape, target, layout", [
    ((64,), "hard", "contiguous"),
    ((3, 1), "soft", "contiguous"),
    ((2, 37, 3), "soft", "strided"),
    ((5,), "one", "contiguous"),
    ((1,), "scalar", "contiguous"),
])
def test_bce_with_logits(shape, target, layout):
    logits = make_input(shape, layout, scale=3.0)
    t = _target(target, shape[-1])
    if target in ("hard", "soft"):
        t = torch.rand(shape, device=DEVICE)
        t = (t > 0.5).float() if target == "hard" else t.requires_grad_()
    loss = ext.bce_with_logits(logits, t)
    loss_ref = F.binary_cross_entropy_with_logits(logits, t.expand(shape))
    assert_close(loss, loss_ref, RTOL, "loss")
    inputs = [logits, t]
    for got, want, label in zip(grads(loss, inputs, None), grads(loss_ref, inputs, None), ["logits", "target"]):
        assert (got is None) == (want is None), label
        if want is not None:
            assert_close(got, want, RTOL, f"d {label}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_huge_logits_are_finite_and_exact(dtype):
    # |logit| = 100: exp(100) overflows fp32 and 1 + exp(-100) rounds to 1, so only a stable formula
    # keeps both the large losses (100 * (1 - t)) and the tiny ones (log1p(e^-100) ~ 3.7e-44) right.
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 100.0, -100.0, 30.0, -30.0], device=DEVICE, dtype=dtype)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 1.0, 0.0], device=DEVICE, dtype=dtype)
    logits.requires_grad_()
    loss = ext.bce_with_logits(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    l64, t64 = logits.detach().double().requires_grad_(), target.double()
    loss64 = F.binary_cross_entropy_with_logits(l64, t64)
    (grad64,) = torch.autograd.grad(loss64, l64)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), loss64, rtol=2 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(grad.double(), grad64, rtol=2 * torch.finfo(dtype).eps, atol=1e-45)
    # the same through the D head: logits of +-100 from the GEMV
    x = torch.ones(4, 2, 1, 1, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.full((1, 2, 1, 1), 50.0, device=DEVICE, dtype=dtype, requires_grad=True)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], device=DEVICE, dtype=dtype).view(4, 1, 1, 1)
    xs = (x * sign)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], device=DEVICE, dtype=dtype)
    loss, logits = ext.d_head_bce_with_logits(xs, w, t)
    assert logits.tolist() == [100.0, -100.0, 100.0, -100.0]
    loss_ref, _ = reference.d_head_bce_with_logits(xs.double(), w.double(), t.double())
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2 * torch.finfo(dtype).eps, atol=0)
    gx, gw = torch.autograd.grad(loss, [x, w])
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


# ------------------------------------------------------------------------------------------------
# Running statistics: nn.BatchNorm's momentum=None is the caller's to resolve.

@needs_ext
def test_cumulative_average_through_the_effective_momentum():
    # nn.BatchNorm2d(momentum=None) averages all batches so far: at step k it passes F.batch_norm the
    # momentum 1 / k (num_batches_tracked after incrementing), which is what callers of ext pass.
    conv = nn.Conv2d(3, 5, 3, 1, 1, bias=False).to(DEVICE)
    bn = nn.BatchNorm2d(5, momentum=None).to(DEVICE)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for k in range(1, 5):
        x = make_input((2, 3, 6, 6), requires_grad=False)
        y_ref = F.leaky_relu(bn(conv(x)), SLOPE)
        y = ext.conv2d_bn_leaky_relu(x, conv.weight, bn.weight, bn.bias, rm, rv, stride=1, padding=1, training=True,
                                     momentum=1.0 / k, eps=bn.eps, negative_slope=SLOPE)
        assert_close(y, y_ref, RTOL, "output")
        assert_close(rm, bn.running_mean, RTOL, "running_mean")
        assert_close(rv, bn.running_var, RTOL, "running_var")
    assert int(bn.num_batches_tracked) == 4


# ------------------------------------------------------------------------------------------------
# bf16: error against an fp64 reference at most twice PyTorch's own bf16 error.

BF16_CASES = {
    "conv_transpose2d_bn_relu": (
        lambda x, w, g, b: ext.conv_transpose2d_bn_relu(x, w, g, b, None, None, stride=2, padding=1,
                                                        training=True, momentum=MOMENTUM, eps=EPS),
        lambda x, w, g, b: reference.conv_transpose2d_bn_relu(x, w, g, b, None, None, stride=2, padding=1,
                                                              training=True, momentum=MOMENTUM, eps=EPS),
        lambda: [torch.randn(4, 32, 4, 4), torch.randn(32, 16, 4, 4) * 0.05, torch.rand(16) + 0.5, torch.randn(16)],
        4, 2),
    "conv2d_bn_leaky_relu": (
        lambda x, w, g, b: conv2d_bn_leaky_relu_eval(ext.conv2d_bn_leaky_relu, x, w, g, b),
        lambda x, w, g, b: conv2d_bn_leaky_relu_eval(reference.conv2d_bn_leaky_relu, x, w, g, b),
        lambda: [torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last),
                 torch.randn(32, 16, 4, 4) * 0.05, torch.rand(32) + 0.5, torch.randn(32)],
        4, 2),
    "linear_bn_leaky_relu": (
        lambda x, w, bias, g, b: ext.linear_bn_leaky_relu(x, w, bias, g, b, None, None, training=True,
                                                          momentum=MOMENTUM, eps=EPS, negative_slope=SLOPE),
        lambda x, w, bias, g, b: reference.linear_bn_leaky_relu(x, w, bias, g, b, None, None, training=True,
                                                          momentum=MOMENTUM, eps=EPS, negative_slope=SLOPE),
        lambda: [torch.randn(16, 64), torch.randn(48, 64) * 0.1, torch.randn(48), torch.rand(48) + 0.5,
                 torch.randn(48)],
        5, 3),
    "upsample_conv2d_bn_relu": (
        lambda x, w, g, b: ext.upsample_conv2d_bn_relu(x, w, g, b, None, None, padding=1, training=True,
                                                       momentum=MOMENTUM, eps=EPS),
        lambda x, w, g, b: reference.upsample_conv2d_bn_relu(x, w, g, b, None, None, padding=1, training=True,
                                                       momentum=MOMENTUM, eps=EPS),
        lambda: [torch.randn(4, 16, 4, 4), torch.randn(24, 16, 3, 3) * 0.1, torch.rand(24) + 0.5, torch.randn(24)],
        4, 2),
    "conv2d_leaky_relu": (
        lambda x, w, b: ext.conv2d_leaky_relu(x, w, b, stride=2, padding=1, negative_slope=SLOPE),
        lambda x, w, b: reference.conv2d_leaky_relu(x, w, b, stride=2, padding=1, negative_slope=SLOPE),
        lambda: [torch.randn(4, 3, 16, 16), torch.randn(16, 3, 4, 4) * 0.1, torch.randn(16) * 0.1],
        3, 3),
    "conv_transpose2d_tanh": (
        lambda x, w, b: ext.conv_transpose2d_tanh(x, w, b, stride=2, padding=1),
        lambda x, w, b: reference.conv_transpose2d_tanh(x, w, b, stride=2, padding=1),
        lambda: [torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last),
                 torch.randn(16, 3, 4, 4) * 0.1, torch.randn(3) * 0.1],
        3, 3),
    "d_head_bce_with_logits": (
        lambda x, w, t: ext.d_head_bce_with_logits(x, w, t),
        lambda x, w, t: reference.d_head_bce_with_logits(x, w, t),
        lambda: [torch.randn(16, 32, 4, 4), torch.randn(1, 32, 4, 4) * 0.05, torch.rand(16)],
        2, 3),
    "bce_with_logits": (
        lambda logits, t: ext.bce_with_logits(logits, t),
        lambda logits, t: F.binary_cross_entropy_with_logits(logits, t),
        lambda: [torch.randn(64) * 3, torch.rand(64)],
        1, 2),
}


def conv2d_bn_leaky_relu_eval(f, x, w, g, b):
    """Eval mode (running statistics, fp32 as under autocast) for one of the bf16 cases."""
    rm = torch.linspace(-0.2, 0.2, w.shape[0], device=x.device, dtype=g.dtype)
    rv = torch.linspace(0.5, 1.5, w.shape[0], device=x.device, dtype=g.dtype)
    return f(x, w, g, b, rm, rv, stride=2, padding=1, training=False, momentum=MOMENTUM, eps=EPS,
             negative_slope=SLOPE)


@needs_ext
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_accuracy(name):
    fused, reference, make, grad_count, cast_count = BF16_CASES[name]
    torch.manual_seed(0)
    inputs = [t.to(DEVICE) for t in make()]
    check_against_fp64(fused, reference, inputs, torch.bfloat16, grad_count, cast_count, ulp_floor=DEVICE == "cpu")


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bf16_running_statistics(layout):
    # Under autocast the activations are bf16 while gamma, beta and the running statistics stay fp32:
    # the statistics are reduced in fp32 from the same bf16 conv output, so they match torch's
    # mixed-dtype batch_norm to fp32 accuracy, and the output to one bf16 rounding.
    torch.manual_seed(0)
    w = make_input((37, 3, 4, 4), dtype=torch.bfloat16, requires_grad=False, scale=0.2)
    g, b, rm, rv = bn_params(37)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in (True, True, False):
        x = make_input((3, 3, 8, 8), layout, torch.bfloat16, requires_grad=False)
        kw = dict(stride=2, padding=1, training=training, momentum=MOMENTUM, eps=EPS, negative_slope=SLOPE)
        y = ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, **kw)
        y_ref = reference.conv2d_bn_leaky_relu(x, w, g, b, rm_ref, rv_ref, **kw)
        assert y.dtype == torch.bfloat16
        check_memory_format(y, x)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=2 ** -8 * y_ref.abs().max().item())
        assert_close(rm, rm_ref, RTOL, "running_mean")
        assert_close(rv, rv_ref, RTOL, "running_var")


# ------------------------------------------------------------------------------------------------
# torch.compile.

@needs_ext
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = make_input((2, 3, 8, 8), "channels_last")
    w = make_input((4, 3, 4, 4), scale=0.2)
    wh = make_input((1, 4, 4, 4), scale=0.2)
    g, b, rm, rv = bn_params(4)
    t = torch.rand(2, device=DEVICE)

    def step(x, w, g, b, rm, rv, wh, t):
        y = ext.conv2d_bn_leaky_relu(x, w, g, b, rm, rv, stride=2, padding=1, training=True, momentum=MOMENTUM,
                                     eps=EPS, negative_slope=SLOPE)
        return ext.d_head_bce_with_logits(y, wh, t)

    rm_eager, rv_eager = rm.clone(), rv.clone()
    loss_eager, logits_eager = step(x, w, g, b, rm_eager, rv_eager, wh, t)
    loss, logits = torch.compile(step, fullgraph=True)(x, w, g, b, rm, rv, wh, t)
    assert_close(loss, loss_eager, RTOL, "loss")
    assert_close(logits, logits_eager, RTOL, "logits")
    assert_close(rm, rm_eager, RTOL, "running_mean (updated in place by the compiled graph)")
    assert_close(rv, rv_eager, RTOL, "running_var")
    for got, want, label in zip(torch.autograd.grad(loss, [x, w, g, b, wh]),
                                torch.autograd.grad(loss_eager, [x, w, g, b, wh]), "x w gamma beta w_head".split()):
        assert_close(got, want, RTOL, f"d {label}")
