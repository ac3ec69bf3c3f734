"""The ext backend's CPU-only forms of its blocks, each against the reference composition it replaces
(issue #16): G's first block (the 1x1 latent -> 4x4) as one matrix product instead of oneDNN's
transposed convolution, the bf16 weight gradients of D's and G's deep blocks as im2col + one GEMM, the
fp32 deepest blocks as GEMMs, the fp32 few-channel image side as GEMM + col2im or the direct image
convolution kernels, and the eager paths that skip a Python autograd layer (conv_act and the D head as
plain autograd.Functions, convolutions without a GEMM form under ATen's autograd).
test_ext_ops.py has every block in every layout and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gan_fast.backends import ext, reference
from gan_fast.backends.reference import ACT_LEAKY_RELU, ACT_NONE

from ..conftest import needs_ext
from .utils import (DEVICE, EPS, MOMENTUM, assert_close, bn_params, check_bn_op_against_fp64, grads,
                    make_input)

RTOL = 1e-5  # fp32, relative to each tensor's largest magnitude (tests.backends.utils.assert_close)


def _block_pair(**kw):
    """conv_transpose2d_bn_relu of ext and of the reference, as f(x, weight, gamma, beta, running_mean,
    running_var, training)."""
    def call(f):
        return lambda *args: f(*args[:-1], training=args[-1], momentum=MOMENTUM, eps=EPS, **kw)
    return call(ext.conv_transpose2d_bn_relu), call(reference.conv_transpose2d_bn_relu)


class _OpNames(TorchDispatchMode):
    """The names of the ATen / gan_fast ops a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the matrix-product form of G's first block is the CPU's")
@pytest.mark.parametrize("n, weight_layout, amp", [(1, "contiguous", False), (3, "channels_last", False),
                                                   (2, "channels_last", True), (3, "contiguous", True)])
def test_g_first_block_from_a_point_is_one_matrix_product(n, weight_layout, amp):
    # G's first block (the 1x1 latent -> 4x4) on the CPU: a GEMM instead of oneDNN's transposed conv
    # (issue #16), forward and backward; the output takes the weight's layout as ATen's does, and
    # matches the reference's output, gradients and running statistics (bf16 autocast: within the
    # reference's own bf16 error against fp64, tests.backends.utils.check_against_fp64's rule).
    cin, cout = 37, 63
    w = make_input((cin, cout, 4, 4), scale=0.2).detach()
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    fused, ref = _block_pair(stride=1, padding=0)
    gamma, beta, rm, rv = bn_params(cout, True)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in (True, True, False):
        x = make_input((n, cin, 1, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), _OpNames() as ops:
            probe = fused(x, w, gamma, beta, rm.clone(), rv.clone(), training)
            probe.backward(make_input(probe.shape, dtype=probe.dtype, requires_grad=False))
        assert "aten::mm" in ops.names and not {"aten::convolution", "aten::convolution_backward"} & ops.names
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fused(x, w, gamma, beta, rm, rv, training)
            y_ref = ref(x, w, gamma, beta, rm_ref, rv_ref, training)
        assert y.dtype == y_ref.dtype and y.stride() == y_ref.stride(), (y.dtype, y.stride(), y_ref.stride())
        if not amp:
            assert_close(y, y_ref, RTOL, "output")
            dy = make_input(y_ref.shape, requires_grad=False)
            for got, want, label in zip(grads(y, [x, w, gamma, beta], dy), grads(y_ref, [x, w, gamma, beta], dy),
                                        ["x", "weight", "gamma", "beta"]):
                assert_close(got, want, RTOL, f"d {label} (training={training})")
            assert_close(rm, rm_ref, RTOL, "running_mean")
            assert_close(rv, rv_ref, RTOL, "running_var")
    if amp:
        check_bn_op_against_fp64(fused, ref, [make_input((n, cin, 1, 1)), w, *bn_params(cout, True)[:2]],
                                 torch.bfloat16, grad_count=4, cast_count=2)


class _ConvBackwardMasks(TorchDispatchMode):
    """The output_mask of every aten::convolution_backward a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::convolution_backward":
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


def _conv_block(name, k, stride, padding):
    kw = dict(stride=stride, padding=padding, momentum=MOMENTUM, eps=EPS)
    if name == "conv2d_bn_leaky_relu":
        kw["negative_slope"] = 0.2

    def call(f):
        return lambda x, w, g, b, rm, rv, training: f(x, w, g, b, rm, rv, training=training, **kw)
    return call(getattr(ext, name)), call(getattr(reference, name))


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the GEMM weight gradient is the CPU's")
@pytest.mark.parametrize("name, n, cin, cout, size, k, stride, padding, gemm", [
    ("conv2d_bn_leaky_relu", 3, 67, 37, 8, 4, 2, 1, True),     # D's deep layers: 8x8 -> 4x4
    ("conv2d_bn_leaky_relu", 2, 64, 63, 5, 3, 1, 1, True),     # 25 output pixels
    ("conv2d_bn_leaky_relu", 2, 37, 63, 8, 4, 2, 1, False),    # < 64 input channels: oneDNN's
    ("conv2d_bn_leaky_relu", 1, 67, 3, 32, 4, 2, 1, False),    # 16x16 output: oneDNN's
    ("conv_transpose2d_bn_relu", 3, 37, 67, 4, 4, 2, 1, True),  # G's blocks: its weight gradient is
    ("conv_transpose2d_bn_relu", 2, 63, 37, 4, 4, 2, 1, False),  # conv2d's of dY (C_out channels)
])
def test_deep_conv_blocks_compute_16_bit_weight_gradients_as_one_gemm(name, n, cin, cout, size, k, stride,
                                                                       padding, gemm):
    # issue #16: oneDNN's bf16 backward-weights of D's and G's deep layers ran at a fraction of its
    # forward's rate; there the blocks compute it as im2col + one GEMM (ext_conv._weight_grad_is_a_gemm),
    # held to the reference's own bf16 error against fp64; fp16 and fp32 keep ATen's
    transposed = name == "conv_transpose2d_bn_relu"
    w = make_input((cin, cout, k, k) if transposed else (cout, cin, k, k), scale=0.1).detach()
    w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = make_input((n, cin, size, size), "channels_last")
    gamma, beta = bn_params(cout, True)[:2]
    fused, ref = _conv_block(name, k, stride, padding)
    for dtype in (torch.bfloat16, torch.float16):
        with _ConvBackwardMasks() as seen:
            y = fused(x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_(), gamma, beta,
                      None, None, True)
            y.backward(torch.randn_like(y))
        assert seen.masks == [[True, not (gemm and dtype == torch.bfloat16), False]], seen.masks  # bf16 only
        check_bn_op_against_fp64(fused, ref, [x, w, gamma, beta], dtype, grad_count=4, cast_count=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), _ConvBackwardMasks() as seen:  # fp32 weight, autocast
        y = fused(x.detach(), w, gamma, beta, None, None, True)  # D's first use: no input gradient
        gw = torch.autograd.grad(y.float().square().sum(), w)[0]
    assert seen.masks == ([] if gemm else [[False, True, False]]), seen.masks
    assert gw.dtype == torch.float32 and gw.is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the fp32 GEMM forms are the CPU's")
@pytest.mark.parametrize("name, n, cin, cout, size, layout, gemm", [
    ("conv2d_bn_leaky_relu", 3, 257, 259, 8, "channels_last", True),    # DCGAN-64's D: 8x8 -> 4x4
    ("conv2d_bn_leaky_relu", 1, 256, 512, 7, "channels_last", True),    # odd size: 7x7 -> 3x3
    ("conv2d_bn_leaky_relu", 2, 257, 259, 8, "contiguous", False),      # NCHW: oneDNN's
    ("conv2d_bn_leaky_relu", 2, 255, 257, 8, "channels_last", False),   # weight < 2^20 values
    ("conv2d_bn_leaky_relu", 2, 256, 256, 10, "channels_last", False),  # 25 output pixels
    ("conv_transpose2d_bn_relu", 2, 259, 257, 4, "channels_last", True),  # DCGAN-64's G: 4x4 -> 8x8
    ("conv_transpose2d_bn_relu", 3, 512, 256, 3, "channels_last", True),  # 3x3 -> 6x6
    ("conv_transpose2d_bn_relu", 2, 259, 257, 5, "channels_last", False),  # 25 input pixels
])
def test_deepest_fp32_blocks_run_as_gemms(name, n, cin, cout, size, layout, gemm):
    # issue #16: oneDNN's fp32 convolutions of the deepest, widest blocks (256 <-> 512 channels at
    # 4x4) measured 25-45% slower than im2col + GEMM and GEMM + col2im (ext_conv._deep_layer_is_a_gemm):
    # there the blocks' forward, input and weight gradients are GEMMs, and match the reference's output,
    # gradients and running statistics within fp32's 1e-5; eval (no autograd) takes the same forward
    transposed = name == "conv_transpose2d_bn_relu"
    w = make_input((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4), scale=0.05).detach()
    w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma, beta, rm, rv = bn_params(cout, True)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    fused, ref = _conv_block(name, 4, 2, 1)
    for training in (True, False):
        x = make_input((n, cin, size, size), layout)
        with _OpNames() as ops:
            y = fused(x, w, gamma, beta, rm, rv, training)
            dy = make_input(y.shape, requires_grad=False)
            got = grads(y, [x, w, gamma, beta], dy)
        y_ref = ref(x, w, gamma, beta, rm_ref, rv_ref, training)
        convs = {"aten::convolution", "aten::convolution_backward"} & ops.names
        assert (not convs) == gemm and ("aten::mm" in ops.names) == gemm, ops.names
        assert_close(y, y_ref, RTOL, f"output (training={training})")
        for g, want, label in zip(got, grads(y_ref, [x, w, gamma, beta], dy), ["x", "weight", "gamma", "beta"]):
            assert_close(g, want, RTOL, f"d {label} (training={training})")
        assert_close(rm, rm_ref, RTOL, "running_mean")
        assert_close(rv, rv_ref, RTOL, "running_var")
        if gemm:
            assert y.is_contiguous(memory_format=torch.channels_last) and got[0].is_contiguous(
                memory_format=torch.channels_last)
    x = make_input((n, cin, size, size), layout, requires_grad=False)
    with torch.no_grad(), _OpNames() as ops:
        y = fused(x, w, gamma, beta, rm, rv, False)
    assert ("aten::convolution" not in ops.names) == gemm, ops.names
    assert_close(y, ref(x, w, gamma, beta, rm_ref, rv_ref, False), RTOL, "eval output, no autograd")


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the eager CPU paths")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_act_in_eager_cpu_mode_skips_the_library_autograd_layer(transposed, dtype):
    # issue #16: conv_act's torch.library autograd layer cost 200-300 us per forward + backward at the
    # digits size. In eager mode on a CPU: fp32 D's first layer (a few-channel image) is the op's own
    # kernels (csrc/cpu/image_conv.h) under a plain autograd.Function; G's last layer is ext_conv's GEMM +
    # col2im forward, and its gradients are the same image kernels (conv2d's of the image dY). In bf16
    # both are ATen's convolution and the activation in place, bit for bit ATen's arithmetic.
    w = make_input((37, 3, 4, 4), dtype=dtype, scale=0.2)  # conv2d: 3 -> 37 channels; transposed: 37 -> 3
    x = make_input((2, 37, 6, 6) if transposed else (2, 3, 12, 12), "channels_last", dtype=dtype)
    name, kw = ("conv_transpose2d_tanh", {}) if transposed else ("conv2d_leaky_relu", {"negative_slope": 0.2})

    def fused(a, b):
        return getattr(ext, name)(a, b, None, stride=2, padding=1, **kw)

    def ref(a, b):
        return getattr(reference, name)(a, b, None, stride=2, padding=1, **kw)

    with _OpNames() as ops:
        y = fused(x, w)
        dy = make_input(y.shape, "channels_last", requires_grad=False, dtype=dtype)
        got = torch.autograd.grad(y, [x, w], dy)
    fp32 = dtype == torch.float32
    assert (("gan_fast::conv_act" in ops.names and "gan_fast::conv_act_backward" in ops.names) == fp32
            and ("aten::convolution" not in ops.names and "aten::convolution_backward" not in ops.names) == fp32), \
        ops.names
    assert ("gan_fast::col2im" in ops.names) == (fp32 and transposed), ops.names
    if fp32 and not transposed:
        assert type(y.grad_fn).__name__ == "_ConvActFunctionBackward", y.grad_fn
    y_ref = ref(x, w)
    assert y.stride() == y_ref.stride()
    with torch.no_grad():  # sampling: the same path
        y_no_grad = fused(x, w)
    for a, b, label in [(y, y_ref, "y"), (y_no_grad, y_ref, "y without autograd"),
                        *zip(got, torch.autograd.grad(y_ref, [x, w], dy), ["dx", "dw"])]:
        if fp32:
            assert_close(a, b, RTOL, label)
        else:
            assert torch.equal(a, b), label


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the GEMM + col2im forms are the CPU's")
@pytest.mark.parametrize("n, image_channels, feature_channels, size, k, stride, padding", [
    (64, 1, 32, 32, 4, 2, 1),   # digits: G's last layer, D's first layer
    (2, 3, 64, 64, 4, 2, 1),    # DCGAN-64
    (1, 4, 37, 7, 3, 2, 2),     # odd image, padding wider than a stride
    (3, 2, 5, 9, 5, 3, 0),      # stride 3, kernel 5: taps that skip pixels
    (2, 1, 63, 6, 3, 1, 1),     # stride 1
])
def test_few_channel_image_side_is_gemm_and_col2im(n, image_channels, feature_channels, size, k, stride, padding):
    # issue #16: G's last transposed convolution and D's first layer's input gradient (an image of at
    # most 4 channels from many feature channels) ran 4-10x slower in oneDNN's fp32 kernels than one GEMM
    # + csrc/cpu/col2im_cpu.cpp. G's last layer is that GEMM + col2im, and its gradients, like all of
    # D's first layer, the direct image kernels (csrc/cpu/image_conv.h; their input gradient is columns
    # + col2im too). Both against the reference on awkward shapes, outputs poisoned first, D's first
    # layer with and without an input gradient (the G update, the D update).
    from gan_fast.backends import ext_conv

    w = make_input((feature_channels, image_channels, k, k), scale=0.2).detach().requires_grad_()
    # channels_last memory even for 1 channel (G's output is; .contiguous(channels_last) keeps NCHW strides)
    image = make_input((n, size, size, image_channels), requires_grad=False).permute(0, 3, 1, 2)
    ext.set_poison_outputs(True)
    try:
        features = make_input(ext_conv.conv(image.detach(), w.detach(), (stride,) * 2, (padding,) * 2,
                                            False).shape, "channels_last")
        with _OpNames() as ops:  # G's last layer: features -> image
            y = ext.conv_transpose2d_tanh(features, w, None, stride=stride, padding=padding)
            dy = make_input(y.shape, requires_grad=False)
            got = torch.autograd.grad(y, [features, w], dy)
        assert {"gan_fast::col2im", "gan_fast::conv_act", "gan_fast::conv_act_backward"} <= ops.names, ops.names
        assert not {"aten::convolution", "aten::convolution_backward"} & ops.names, ops.names
        y_ref = reference.conv_transpose2d_tanh(features, w, None, stride=stride, padding=padding)
        assert_close(y, y_ref, RTOL, "G's last layer")
        assert y.is_contiguous(memory_format=torch.channels_last)
        for g, want, label in zip(got, torch.autograd.grad(y_ref, [features, w], dy), ["d features", "d weight"]):
            assert_close(g, want, RTOL, label)
        for needs_grad in (True, False):  # D's first layer: image -> features, then its gradients
            x = image.detach().requires_grad_(needs_grad)
            with _OpNames() as ops:
                z = ext.conv2d_leaky_relu(x, w, None, stride=stride, padding=padding, negative_slope=0.2)
                dz = make_input(z.shape, "channels_last", requires_grad=False)  # as D's second layer gives it
                got = torch.autograd.grad(z, [x, w] if needs_grad else [w], dz)
            assert "gan_fast::conv_act_backward" in ops.names and "aten::convolution" not in ops.names, ops.names
            z_ref = reference.conv2d_leaky_relu(x, w, None, stride=stride, padding=padding, negative_slope=0.2)
            assert_close(z, z_ref, RTOL, "D's first layer")
            want = torch.autograd.grad(z_ref, [x, w] if needs_grad else [w], dz)
            for g, wnt, label in zip(got, want, ["d image", "d weight"] if needs_grad else ["d weight"]):
                assert_close(g, wnt, RTOL, label)
    finally:
        ext.set_poison_outputs(False)


@needs_ext
def test_col2im_rejects_columns_that_do_not_fit_the_image():
    cols = torch.randn(2, 3, 4, 4, 4, 1)
    with pytest.raises(RuntimeError, match=r"gan_fast::col2im: cols .* do not fit an image"):
        torch.ops.gan_fast.col2im(cols, [9, 8], [2, 2], [1, 1])  # 9 rows give 4 output rows, not 3
    with pytest.raises(RuntimeError, match="cols must be"):
        torch.ops.gan_fast.col2im(cols[0], [7, 8], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="stride must be two positive ints"):
        torch.ops.gan_fast.col2im(cols, [7, 8], [0, 2], [1, 1])


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the eager CPU paths")
def test_block_convolutions_without_a_gemm_form_use_atens_autograd():
    # the blocks' convolutions go through ext_conv's Python autograd.Function only where a GEMM form
    # may apply (~0.1 ms of Python a call otherwise: issue #16); elsewhere F.conv2d's own autograd
    from gan_fast.backends import ext_conv

    small = make_input((2, 32, 8, 8), "channels_last")
    y = ext_conv.conv(small, make_input((64, 32, 4, 4)), (2, 2), (1, 1), transposed=False)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0", y.grad_fn
    deep = make_input((2, 256, 8, 8), "channels_last")
    y = ext_conv.conv(deep, make_input((512, 256, 4, 4), "channels_last"), (2, 2), (1, 1), transposed=False)
    assert type(y.grad_fn).__name__ == "_ConvFunctionBackward", y.grad_fn
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 weight-gradient GEMM's shapes
        y = ext_conv.conv(make_input((2, 64, 8, 8), "channels_last"), make_input((128, 64, 4, 4)), (2, 2), (1, 1),
                          transposed=False)
    assert type(y.grad_fn).__name__ == "_ConvFunctionBackward", y.grad_fn


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the eager CPU paths")
def test_d_head_in_eager_mode_skips_the_library_autograd_layer():
    x, w = make_input((3, 37, 4, 4), "channels_last"), make_input((1, 37, 4, 4), scale=0.1)
    target = torch.tensor([1.0, 0.0, 1.0])
    loss, logits = ext.d_head_bce_with_logits(x, w, target)
    node = loss.grad_fn  # the loss's own node, or the fp32 cast's in front of it
    while type(node).__name__ == "ToCopyBackward0":
        node = node.next_functions[0][0]
    assert type(node).__name__ == "_DHeadFunctionBackward", node
    want, _ = reference.d_head_bce_with_logits(x, w, target)
    assert_close(loss, want, RTOL, "loss")
    for g, r in zip(torch.autograd.grad(loss, [x, w]), torch.autograd.grad(want, [x, w])):
        assert_close(g, r, RTOL, "gradient")


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the bf16 GEMM forms are the CPU's")
@pytest.mark.parametrize("name, n, cin, cout, size", [
    ("conv2d_bn_leaky_relu", 2, 257, 259, 8),       # D's 256 -> 512 block: forward as im2col + GEMM
    ("conv_transpose2d_bn_relu", 3, 259, 257, 4),   # G's 512 -> 256 block: input gradient as im2col + GEMM
])
def test_deepest_bf16_blocks_take_the_im2col_forms(name, n, cin, cout, size):
    # issue #16: in bf16 the deepest blocks' conv2d forward (and so the transposed convolution's input
    # gradient) is im2col + one GEMM, 3.2 -> 1.2 ms at DCGAN-64's 256 -> 512; GEMM + col2im is not taken in
    # bf16 (it would round kH x kW partial products). Held to the reference's own bf16 error vs fp64.
    transposed = name == "conv_transpose2d_bn_relu"
    w = make_input((cin, cout, 4, 4) if transposed else (cout, cin, 4, 4), scale=0.05).detach()
    w = w.contiguous(memory_format=torch.channels_last).requires_grad_()
    x = make_input((n, cin, size, size), "channels_last")
    gamma, beta = bn_params(cout, True)[:2]
    fused, ref = _conv_block(name, 4, 2, 1)
    with _OpNames() as ops, _ConvBackwardMasks() as seen:
        y = fused(x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_(), gamma, beta,
                  None, None, True)
        y.backward(torch.randn_like(y))
    # conv2d: forward and weight gradient GEMMs, input gradient oneDNN's (col2im); transposed: forward
    # oneDNN's (col2im), input and weight gradients GEMMs
    assert ("aten::convolution" in ops.names) == transposed, ops.names
    assert seen.masks == ([] if transposed else [[True, False, False]]), seen.masks
    check_bn_op_against_fp64(fused, ref, [x, w, gamma, beta], torch.bfloat16, grad_count=4, cast_count=2)


def _image_conv_cases():
    """(n, c, cout, h, w, k, stride, padding, bias, act, slope, layout): the digits and DCGAN-64 first
    layers, then 24 drawn from a fixed seed: batch 1-3, 1-4 image channels, output channels around a
    vector's width (tails of 1-15 lanes), kernels 1-5, strides 1-3, paddings 0-2, with and without a
    bias, LeakyReLU of slope 0 / 0.2 / 1 or no activation, channels_last or a strided channels_last view."""
    cases = [(3, 1, 32, 32, 32, 4, 2, 1, False, ACT_LEAKY_RELU, 0.2, "channels_last"),
             (2, 3, 64, 64, 64, 4, 2, 1, False, ACT_LEAKY_RELU, 0.2, "channels_last")]
    gen = torch.Generator().manual_seed(16)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]  # noqa: E731
    while len(cases) < 26:
        k, stride, padding = pick([1, 2, 3, 4, 5]), pick([1, 2, 3]), pick([0, 1, 2])
        h, w = pick([5, 7, 9, 16]), pick([4, 6, 11])
        if h + 2 * padding < k or w + 2 * padding < k:
            continue
        act, slope = pick([(ACT_LEAKY_RELU, 0.0), (ACT_LEAKY_RELU, 0.2), (ACT_LEAKY_RELU, 1.0), (ACT_NONE, 0.0)])
        cases.append((pick([1, 2, 3]), pick([1, 2, 3, 4]), pick([3, 5, 16, 17, 37, 63]), h, w, k, stride, padding,
                      pick([False, True]), act, slope, pick(["channels_last", "strided"])))
    return cases


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="csrc/cpu's kernels")
def test_image_conv_kernels_match_float64():
    # csrc/cpu/image_conv.h: conv_act's CPU op computes conv2d + LeakyReLU of a channels_last fp32 image
    # of at most 4 channels with its own kernels. Output, input / weight / bias gradients (each alone and
    # all together) against fp64, outputs poisoned first; the profiler shows no ATen convolution (the
    # fallback the op takes for other calls).
    ops = torch.ops.gan_fast
    for n, c, cout, h, w, k, stride, padding, has_bias, act, slope, layout in _image_conv_cases():
        where = (n, c, cout, h, w, k, stride, padding, has_bias, act, slope, layout)
        # channels_last memory even for 1 channel (as the trainer's batches and G's output are), or every
        # other column of a wider such image: strides, not a copy
        x = make_input((n, h, 2 * w if layout == "strided" else w, c), requires_grad=False).permute(0, 3, 1, 2)
        x = x[..., ::2] if layout == "strided" else x
        weight = make_input((cout, c, k, k), requires_grad=False, scale=0.3)
        bias = make_input((cout,), requires_grad=False) if has_bias else None
        ext.set_poison_outputs(True)
        try:
            with torch.profiler.profile() as prof:
                y = ops.conv_act(x, weight, bias, [stride] * 2, [padding] * 2, False, act, slope)
                dy = make_input(y.shape, "channels_last", requires_grad=False)
                grads = [ops.conv_act_backward(dy, y, x, weight, has_bias, [stride] * 2, [padding] * 2, False, act,
                                               slope, mask)
                         for mask in ([True, True, True], [True, False, False], [False, True, False])]
        finally:
            ext.set_poison_outputs(False)
        names = {e.name for e in prof.events()}
        assert not {"aten::convolution", "aten::convolution_backward"} & names, (where, names)
        x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
        b64 = bias.double().requires_grad_() if has_bias else None
        z = F.conv2d(x64, w64, b64, stride, padding)
        y64 = F.leaky_relu(z, slope) if act == ACT_LEAKY_RELU else z
        want = torch.autograd.grad(y64, [x64, w64] + ([b64] if has_bias else []), dy.double())
        assert y.is_contiguous(memory_format=torch.channels_last), where
        assert_close(y.double(), y64, RTOL, f"{where} y")
        for got, label in zip(grads[0][:2 + has_bias], ["dx", "dw", "db"]):
            assert_close(got.double(), want[["dx", "dw", "db"].index(label)], RTOL, f"{where} {label}")
        assert torch.equal(grads[1][0], grads[0][0]) and grads[1][1].numel() == 0, where  # the input gradient alone
        assert torch.equal(grads[2][1], grads[0][1]) and grads[2][0].numel() == 0, where  # the weight gradient alone


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="csrc/cpu's kernels")
def test_image_conv_kernels_keep_nan_and_inf_where_the_reference_does():
    x = make_input((2, 9, 9, 3), requires_grad=False).permute(0, 3, 1, 2)
    x[0, 1, 2, 3], x[1, 0, 7, 7], x[1, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    weight = make_input((37, 3, 4, 4), requires_grad=False, scale=0.3)
    y = ext.conv2d_leaky_relu(x, weight, None, stride=2, padding=1, negative_slope=0.2)
    want = reference.conv2d_leaky_relu(x, weight, None, stride=2, padding=1, negative_slope=0.2)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isinf(y), torch.isinf(want))
    fin = torch.isfinite(want)
    assert fin.any() and not fin.all()
    assert_close(torch.where(fin, y, 0.0), torch.where(fin, want, 0.0), RTOL, "finite outputs")


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="csrc/cpu's kernels")
def test_image_conv_of_an_empty_batch_or_a_wrong_output_is_the_ops_answer():
    weight = make_input((5, 1, 4, 4), requires_grad=False)
    empty = torch.empty(0, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = ext.conv2d_leaky_relu(empty, weight, None, stride=2, padding=1, negative_slope=0.2)
    assert y.shape == (0, 5, 4, 4)
    x = make_input((2, 8, 8, 1), requires_grad=False).permute(0, 3, 1, 2)
    y = torch.ops.gan_fast.conv_act(x, weight, None, [2, 2], [1, 1], False, ACT_LEAKY_RELU, 0.2)
    with pytest.raises(RuntimeError, match=r"conv_act_backward: output has shape .* gives \[2, 5, 4, 4\]"):
        torch.ops.gan_fast.conv_act_backward(y[:, :, :3], y[:, :, :3], x, weight, False, [2, 2], [1, 1], False,
                                             ACT_LEAKY_RELU, 0.2, [True, True, False])


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="csrc/cpu's kernels")
def test_image_conv_second_order_gradients_match_the_reference():
    # create_graph=True through D's first layer (a gradient penalty, as WGAN-GP / R1 take it): the
    # backward of _ConvActFunction is then ATen's differentiable composition
    x = make_input((2, 9, 9, 3), requires_grad=False).permute(0, 3, 1, 2).requires_grad_()
    weight = make_input((37, 3, 4, 4), scale=0.3)
    got, want = [], []
    for f, out in ((ext.conv2d_leaky_relu, got), (reference.conv2d_leaky_relu, want)):
        y = f(x, weight, None, stride=2, padding=1, negative_slope=0.2)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        out += torch.autograd.grad(gx.square().sum(), [x, weight])
    assert type(ext.conv2d_leaky_relu(x, weight, None, stride=2, padding=1, negative_slope=0.2).grad_fn).__name__ \
        == "_ConvActFunctionBackward"
    for g, w, label in zip(got, want, ["d2 x", "d2 weight"]):
        assert_close(g, w, RTOL, label)
