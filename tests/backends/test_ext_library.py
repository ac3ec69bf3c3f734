"""The ``ext`` backend's torch.library side: float64 gradcheck of every op (the autograd formulas
registered in gan_fast.backends.ext) and torch.library.opcheck of every raw op of gan_fast._C
(schema, fake kernel, autograd registration, AOT dispatch). gradcheck runs on the CPU, opcheck on
tests.backends.utils.DEVICE.
"""
from __future__ import annotations

import os

import pytest
import torch

from gan_fast.backends import ext

from ..conftest import needs_ext
from .utils import DEVICE, EPS, MOMENTUM, SLOPE, make_input


# ------------------------------------------------------------------------------------------------
# gradcheck (float64, CPU).

def _f64(*shape, scale=1.0, positive=False):
    t = torch.rand(*shape, dtype=torch.float64) + 0.5 if positive else torch.randn(*shape, dtype=torch.float64) * scale
    return t.requires_grad_()


def _gradcheck_case(name, training):
    """(function of the differentiable inputs, those inputs) for one op, small and float64. No running
    statistics in training (gradcheck calls the op many times; their update is not differentiable),
    fixed ones in eval."""
    stats = (None, None) if training else (torch.randn(3, dtype=torch.float64) * 0.1,
                                          torch.rand(3, dtype=torch.float64) + 0.5)
    bn = dict(training=training, momentum=MOMENTUM, eps=EPS)
    gamma_beta = [_f64(3, positive=True), _f64(3)]
    cl = torch.channels_last
    if name == "conv_transpose2d_bn_relu":
        return (lambda x, w, g, b: ext.conv_transpose2d_bn_relu(x, w, g, b, *stats, stride=2, padding=1, **bn),
                [_f64(2, 2, 2, 2), _f64(2, 3, 4, 4, scale=0.3), *gamma_beta])
    if name == "conv2d_bn_leaky_relu":
        return (lambda x, w, g, b: ext.conv2d_bn_leaky_relu(x, w, g, b, *stats, stride=2, padding=1,
                                                            negative_slope=SLOPE, **bn),
                [_f64(2, 2, 5, 5).detach().contiguous(memory_format=cl).requires_grad_(), _f64(3, 2, 3, 3, scale=0.3),
                 *gamma_beta])
    if name == "linear_bn_leaky_relu":
        return (lambda x, w, bias, g, b: ext.linear_bn_leaky_relu(x, w, bias, g, b, *stats, negative_slope=SLOPE,
                                                                  **bn),
                [_f64(4, 5), _f64(3, 5, scale=0.3), _f64(3), *gamma_beta])
    if name == "upsample_conv2d_bn_relu":
        return (lambda x, w, g, b: ext.upsample_conv2d_bn_relu(x, w, g, b, *stats, padding=1, **bn),
                [_f64(2, 2, 2, 2), _f64(3, 2, 3, 3, scale=0.3), *gamma_beta])
    if name == "conv2d_leaky_relu":
        return (lambda x, w, b: ext.conv2d_leaky_relu(x, w, b, stride=2, padding=1, negative_slope=SLOPE),
                [_f64(2, 2, 4, 4), _f64(3, 2, 3, 3, scale=0.3), _f64(3)])
    if name == "conv_transpose2d_tanh":
        return (lambda x, w, b: ext.conv_transpose2d_tanh(x, w, b, stride=2, padding=1),
                [_f64(2, 2, 2, 2).detach().contiguous(memory_format=cl).requires_grad_(), _f64(2, 3, 4, 4, scale=0.3),
                 _f64(3)])
    if name == "d_head_bce_with_logits":
        return (lambda x, w, t: ext.d_head_bce_with_logits(x, w, t)[0],
                [_f64(3, 2, 2, 2), _f64(1, 2, 2, 2), torch.rand(3, dtype=torch.float64).requires_grad_()])
    assert name == "bce_with_logits"
    return (lambda logits, t: ext.bce_with_logits(logits, t),
            [_f64(2, 3, scale=3.0), torch.rand(2, 3, dtype=torch.float64).requires_grad_()])


GRADCHECK_CASES = [(name, training) for name in ("conv_transpose2d_bn_relu", "conv2d_bn_leaky_relu",
                                                 "linear_bn_leaky_relu", "upsample_conv2d_bn_relu")
                   for training in (True, False)]
GRADCHECK_CASES += [(name, True) for name in ("conv2d_leaky_relu", "conv_transpose2d_tanh", "d_head_bce_with_logits",
                                              "bce_with_logits")]


@needs_ext
@pytest.mark.parametrize("name, training", GRADCHECK_CASES)
def test_gradcheck(name, training):
    torch.manual_seed(0)
    fn, inputs = _gradcheck_case(name, training)
    # fast_mode checks the Jacobian through random projections: the same mistakes, a fraction of the time
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@needs_ext
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_bn_act_eager_gradients_and_second_order(affine, training):
    # bn_act_eager's autograd node is C++ (csrc/bn_act_autograd.cpp): its gradients by finite
    # differences with every combination of optional gamma / beta (the node's edges are only the
    # tensors given), and create_graph=True's differentiable gradients (gradgradcheck)
    torch.manual_seed(1)
    x = _f64(3, 4, 2, 3)
    params = {"weight": _f64(4, positive=True), "bias": _f64(4)}
    given = [k for k in ("weight", "bias") if affine in (k, "both")]
    stats = (None, None) if training else (torch.randn(4, dtype=torch.float64) * 0.1,
                                          torch.rand(4, dtype=torch.float64) + 0.5)

    def fn(x, *p):
        kw = dict(zip(given, p))
        return torch.ops.gan_fast.bn_act_eager(x, kw.get("weight"), kw.get("bias"), *stats, training, EPS, 2,
                                               SLOPE)[0]

    inputs = [x, *(params[k] for k in given)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    if affine != "bias":  # torch's own F.batch_norm(weight=None, bias=b) fails gradgradcheck (d bias / d dy = 0)
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_act_in_chunks_is_separate_calls_in_one_output(layout):
    # chunks=k (D's real and fake batch in one pass): each chunk normalized with its own statistics,
    # bit for bit what k calls give, into one output (no concatenation); gamma / beta get the sum of
    # the chunks' gradients; float64 gradcheck and gradgradcheck of the C++ node with chunks
    ops = torch.ops.gan_fast
    x = make_input((6, 37, 3, 5), layout, requires_grad=False)
    g, b = torch.rand(37, device=DEVICE) + 0.5, torch.randn(37, device=DEVICE)
    dy = make_input(x.shape, layout, requires_grad=False)
    ext.set_poison_outputs(True)
    try:
        y, mean, var = ops.bn_act(x, g, b, None, None, True, EPS, 2, SLOPE, 3)
        grads = ops.bn_act_backward(dy, x, g, b, mean, var, True, EPS, 2, SLOPE, 3)
    finally:
        ext.set_poison_outputs(False)
    assert mean.shape == var.shape == (3, 37) and y.stride() == x.stride()
    parts = [ops.bn_act(xk, g, b, None, None, True, EPS, 2, SLOPE) for xk in x.chunk(3)]
    assert torch.equal(y, torch.cat([p[0] for p in parts]))
    assert torch.equal(mean, torch.stack([p[1] for p in parts])) and torch.equal(var, torch.stack([p[2] for p in parts]))
    each = [ops.bn_act_backward(dk, xk, g, b, p[1], p[2], True, EPS, 2, SLOPE)
            for dk, xk, p in zip(dy.chunk(3), x.chunk(3), parts)]
    assert torch.equal(grads[0], torch.cat([e[0] for e in each]))
    for i in (1, 2):
        torch.testing.assert_close(grads[i], sum(e[i] for e in each), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="chunks must be >= 1 and divide the batch"):
        ops.bn_act(x, g, b, None, None, True, EPS, 2, SLOPE, 4)
    with pytest.raises(RuntimeError, match="needs training=True"):
        ops.bn_act(x, g, b, torch.zeros(37), torch.ones(37), False, EPS, 2, SLOPE, 2)
    with pytest.raises(RuntimeError, match=r"mean and var must be \[3, 37\]"):
        ops.bn_act_backward(dy, x, g, b, mean[0], var[0], True, EPS, 2, SLOPE, 3)

    x64, g64, b64 = _f64(4, 3, 2, 3), _f64(3, positive=True), _f64(3)
    fn = lambda x, g, b: ops.bn_act_eager(x, g, b, None, None, True, EPS, 2, SLOPE, 2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x64, g64, b64], eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, [x64, g64, b64], eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck of every raw op (schema, fake kernel, autograd registration, AOT dispatch).

def _raw_samples():
    """(op, args, layout) for every raw op, in both layouts."""
    ops = torch.ops.gan_fast
    out = []
    for layout in ("contiguous", "channels_last"):
        first = len(out)
        x = make_input((2, 5, 3, 4), layout)
        g = (torch.rand(5, device=DEVICE) + 0.5).requires_grad_()
        b = torch.randn(5, device=DEVICE).requires_grad_()
        rm, rv = torch.randn(5, device=DEVICE) * 0.1, torch.rand(5, device=DEVICE) + 0.5
        out += [(ops.bn_act, (x, g, b, None, None, True, EPS, 2, SLOPE)),
                (ops.bn_act, (x, None, None, rm, rv, False, EPS, 1, 0.0)),
                (ops.bn_act, (x, g, b, None, None, True, EPS, 2, SLOPE, 2)),  # two chunks: D's real + fake
                (ops.bn_act_eager, (x, g, b, None, None, True, EPS, 2, SLOPE)),
                (ops.bn_act_eager, (x, None, None, rm, rv, False, EPS, 1, 0.0)),
                (ops.bn_act_eager, (x, g, b, None, None, True, EPS, 2, SLOPE, 2))]
        y, m, v = ops.bn_act(x.detach(), g.detach(), b.detach(), None, None, True, EPS, 2, SLOPE)
        out += [(ops.bn_act_backward, (make_input(x.shape, layout, requires_grad=False), x.detach(), g.detach(),
                                       b.detach(), m, v, True, EPS, 2, SLOPE)),
                (ops.bn_act_backward, (make_input(x.shape, "strided", requires_grad=False), x.detach(), None, None,
                                       rm, rv, False, EPS, 0, 0.0))]
        out.append((ops.bn_update_stats_, (rm.clone(), rv.clone(), m, v, MOMENTUM, 24)))
        _, m2, v2 = ops.bn_act(x.detach(), g.detach(), b.detach(), None, None, True, EPS, 2, SLOPE, 2)
        out.append((ops.bn_act_backward, (make_input(x.shape, layout, requires_grad=False), x.detach(), g.detach(),
                                          b.detach(), m2, v2, True, EPS, 2, SLOPE, 2)))
        w = make_input((4, 5, 3, 3))
        wt = make_input((5, 4, 4, 4))
        bias = make_input((4,))
        out += [(ops.conv_act, (x, w, bias, [2, 1], [1, 0], False, 2, SLOPE)),
                (ops.conv_act, (x, wt, None, [2, 2], [1, 1], True, 3, 0.0))]
        yc = ops.conv_act(x.detach(), w.detach(), bias.detach(), [1, 1], [1, 1], False, 2, SLOPE)
        out.append((ops.conv_act_backward, (make_input(yc.shape, layout, requires_grad=False), yc, x.detach(),
                                            w.detach(), True, [1, 1], [1, 1], False, 2, SLOPE, [True, True, True])))
        # a 3-channel channels_last image: the CPU op's own kernels (csrc/cpu/image_conv.h)
        xi = make_input((2, 7, 6, 3), requires_grad=False).permute(0, 3, 1, 2).requires_grad_()
        wi = make_input((5, 3, 3, 3))
        out.append((ops.conv_act, (xi, wi, bias.detach()[:1].expand(5).contiguous(), [2, 1], [1, 0], False, 2, SLOPE)))
        yi = ops.conv_act(xi.detach(), wi.detach(), None, [1, 1], [1, 1], False, 0, 0.0)
        out.append((ops.conv_act_backward, (make_input((2, 7, 6, 5), requires_grad=False).permute(0, 3, 1, 2), yi,
                                            xi.detach(), wi.detach(), False, [1, 1], [1, 1], False, 0, 0.0,
                                            [True, True, False])))
        yt = ops.conv_act(x.detach(), wt.detach(), None, [2, 2], [1, 1], True, 3, 0.0)
        out.append((ops.conv_act_backward, (make_input(yt.shape, "strided", requires_grad=False), yt, x.detach(),
                                            wt.detach(), False, [2, 2], [1, 1], True, 3, 0.0, [False, True, False])))
        xh = make_input((3, 4, 2, 2), layout)
        wh = make_input((1, 4, 2, 2), layout)  # the head's weight in the input's layout too
        t = torch.rand(3, device=DEVICE)
        out.append((ops.d_head_bce, (xh, wh, t)))
        _, lg = ops.d_head_bce(xh.detach(), wh.detach(), t)
        out.append((ops.d_head_bce_backward, (torch.tensor(0.7, device=DEVICE), xh.detach(), wh.detach(), t, lg,
                                              [True, layout == "contiguous"])))
        out[first:] = [(op, args, layout) for op, args in out[first:]]
    logits = make_input((3, 4))
    out += [(ops.bce_with_logits, (logits, torch.rand(3, 4, device=DEVICE).requires_grad_()), "contiguous"),
            (ops.bce_with_logits, (make_input((3, 4), "strided"), torch.rand(1, device=DEVICE)), "strided"),
            (ops.bce_with_logits_backward, (torch.tensor(1.5, device=DEVICE), logits.detach(),
                                            torch.rand(3, 4, device=DEVICE)), "contiguous"),
            # CPU only: ext_conv's GEMM + col2im forms run on a CPU
            (ops.col2im, (torch.randn(2, 3, 4, 4, 4, 3), [7, 8], [2, 2], [1, 1]), "contiguous")]
    return out


@needs_ext
def test_opcheck_every_raw_op():
    torch.manual_seed(0)
    samples = _raw_samples()
    # every op but the testing hooks set_poison_outputs, cpu_kernel_isa and cpu_threads_used (no
    # tensors: nothing for opcheck to check)
    hooks = {"set_poison_outputs", "cpu_kernel_isa", "cpu_threads_used"}
    assert {op._qualified_op_name.split("::")[1] for op, _, _ in samples} == set(ext.OPS) - hooks
    for op, args, layout in samples:
        # Every check on the contiguous samples; the other layouts' (whose fake kernels must predict
        # the real strides) skip the AOT-dispatch check, which costs most and which
        # test_torch_compile_fullgraph runs on a channels_last graph.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(op.default, args, test_utils=utils + (("test_aot_dispatch_dynamic",) if layout ==
                                                                     "contiguous" else ()))


@needs_ext
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores to see a second thread")
def test_cpu_kernels_run_on_every_thread():
    # at::parallel_for is an inline `#pragma omp parallel`: the extension built without -fopenmp ran
    # every CPU kernel on one thread, half of a 2-core machine (its BatchNorm took 2x ATen's)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.ops.gan_fast.cpu_threads_used(64) == 2
    finally:
        torch.set_num_threads(threads)
