"""The convolutions of the ext backend's blocks (gan_fast.backends.ext): ATen's, and on a CPU the GEMM
forms that measured faster than oneDNN's there (issue #16): G's first block from the 1x1 latent as one
matrix product, the bf16 weight gradients of the deep blocks as im2col + one GEMM, the fp32 forward
and both gradients of the deepest, widest blocks (im2col + GEMM, GEMM + col2im), and in fp32 the
few-channel image side of G's last transposed convolution and of D's first layer's input gradient
(GEMM + col2im).

The GEMM forms are the classic lowering of a convolution to a matrix product (Chellapilla et al. 2006,
"High Performance Convolutional Neural Networks for Document Processing"; Caffe's im2col / col2im),
written for channels_last memory, where an im2col row is kH * kW runs of C_in contiguous values."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import (ACT_NONE, below_autograd, conv2d_output_hw, conv_transpose2d_output_hw,
                        differentiable_backward)

__all__ = ["conv", "conv_transpose2d_of_a_point"]


def conv_transpose2d_of_a_point(x: Tensor, weight: Tensor) -> Tensor:
    """conv_transpose2d of a 1x1 input with padding 0 (G's first layer, from the latent vector) as one
    matrix product: out[n, co, i, j] = sum_ci x[n, ci] * weight[ci, co, i, j], so the output's rows
    are x [N, C_in] @ weight [C_in, kH * kW * C_out]. At the digits size oneDNN's CPU transposed
    convolution took 1.4-1.7 ms for this 8-MFLOP product, forward + backward (a few percent of the
    training step), the GEMM form 0.5 ms. The weight's layout decides the output's: a channels_last
    weight is (ci, i, j, co) in memory and gives a channels_last output, a contiguous one (ci, co, i, j)
    a contiguous output; both are views, and autograd's matmul backward gives x's and the weight's
    gradients as GEMMs too."""
    n, cin, cout, kh, kw = x.shape[0], x.shape[1], weight.shape[1], weight.shape[2], weight.shape[3]
    rows = x.reshape(n, cin)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        y = rows @ weight.permute(0, 2, 3, 1).reshape(cin, kh * kw * cout)
        return y.view(n, kh, kw, cout).permute(0, 3, 1, 2)
    return (rows @ weight.reshape(cin, cout * kh * kw)).view(n, cout, kh, kw)


# The shapes where a GEMM form measured faster than oneDNN (the rules below, and _a_gemm_may_apply's
# superset of them): bf16 weight gradients from this many input channels and up to this many output
# pixels; the deepest blocks from a weight of this many values and up to this many output pixels;
# the image side of a convolution with up to this many image channels.
_WGRAD_MIN_CHANNELS, _WGRAD_MAX_PIXELS = 64, 64
_DEEP_MIN_WEIGHT_VALUES, _DEEP_MAX_PIXELS = 1 << 20, 16
_IMAGE_MAX_CHANNELS = 4


def _weight_grad_is_a_gemm(x: Tensor, grad_y: Tensor, weight: Tensor) -> bool:
    """Where conv2d's weight gradient runs as im2col + one GEMM (_conv2d_weight_grad_gemm) on the CPU:
    bf16, channels_last, at least 64 input channels and at most 64 output pixels: D's and G's deep
    layers, whose bf16 backward-weights oneDNN ran at a fraction of its forward's rate on the 2-core
    Xeon of issue #16 (D's 64 -> 128 layer at 8x8 -> 4x4, batch 64: 1.9 ms of a 2.5 ms backward; the
    GEMM form 0.7 ms; DCGAN-64's 256 -> 512 layer, batch 16: 7.1 -> 1.2 ms). Elsewhere (fp32, fp16,
    wide images, few channels) oneDNN measured as fast or was not measured. A fixed rule rather than a
    per-process timing, so a run computes the same numbers every time. For a transposed convolution
    the caller passes its dY as x and its input as grad_y (_ConvFunction)."""
    return (x.device.type == "cpu" and grad_y.dtype == torch.bfloat16 and x.dim() == 4
            and x.shape[1] >= _WGRAD_MIN_CHANNELS and grad_y.shape[2] * grad_y.shape[3] <= _WGRAD_MAX_PIXELS
            and weight.shape[2:].numel() > 1
            and grad_y.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last))


def _deep_layer_is_a_gemm(tensors: tuple, out_hw: tuple, weight: Tensor, dtype=torch.float32) -> bool:
    """Where a conv2d whose output has ``out_hw`` pixels (for a transposed convolution, the conv2d whose
    input gradient it is) runs as GEMMs on the CPU, ``tensors`` being its activations at hand (input,
    output gradient) and ``dtype`` theirs and the weight's: all channels_last,
    at most 16 output pixels and a weight of at least 2^20 values (4 MiB), i.e. the deepest blocks of
    DCGAN-64 and larger (256 <-> 512 channels at 8x8 <-> 4x4). There oneDNN's fp32 kernels measured
    25-45% slower than the GEMM forms on the 2-core Xeon of issue #16 (batch 16: forward 6.2 -> 4.7 ms,
    input gradient 7.5 -> 5.4, weight gradient 9.1 -> 4.2; 512 -> 1024 channels: 48 -> 20, 38 -> 21,
    69 -> 31), at batch 16 to 64. With fewer channels (128 -> 256) the two tied, and with more output
    pixels (8x8) oneDNN's forward won; the rule keeps oneDNN there. In bf16 only the im2col forms
    (conv2d's forward, and so the transposed convolution's input gradient) are taken: oneDNN's bf16
    forward measured 3.2 ms against 1.2 for im2col + GEMM at 256 -> 512, batch 16, while GEMM + col2im
    would add up kH x kW bf16-rounded products where oneDNN rounds once. Fixed, as
    _weight_grad_is_a_gemm."""
    return (weight.device.type == "cpu" and weight.dtype == dtype and weight.dim() == 4
            and weight.shape[2:].numel() > 1 and weight.numel() >= _DEEP_MIN_WEIGHT_VALUES
            and 0 < out_hw[0] * out_hw[1] <= _DEEP_MAX_PIXELS
            and all(t.dtype == dtype and t.dim() == 4 and t.shape[0] > 0 and t.device.type == "cpu"
                    and t.is_contiguous(memory_format=torch.channels_last) for t in tensors))


def _image_side_is_a_gemm(features: Tensor, weight: Tensor, image_channels: int) -> bool:
    """Where a convolution's image side, an image of at most 4 channels computed from ``features``
    (G's last transposed convolution from its input; D's first layer's input gradient from its output
    gradient), runs as GEMM + col2im on the CPU: fp32, channels_last features. oneDNN's fp32 kernels
    for these few-output-channel products measured 4-10x slower on the 2-core Xeon of issue #16 than
    the GEMM and csrc/cpu/col2im_cpu.cpp together: [64, 32, 16, 16] -> [64, 1, 32, 32] (digits) 2.9
    -> 0.28 ms; [16, 64, 32, 32] -> [16, 3, 64, 64] (DCGAN-64) 2.2 -> 0.63; batch 128 3.3 -> 0.48;
    and tiny shapes 0.06 -> 0.013. In bf16 the GEMM would round each tap's product before col2im adds
    them, where oneDNN rounds once: oneDNN keeps bf16. Fixed, as _weight_grad_is_a_gemm."""
    return (features.device.type == "cpu" and features.dtype == torch.float32 and weight.dtype == torch.float32
            and features.dim() == 4 and weight.dim() == 4 and weight.device.type == "cpu"
            and 0 < image_channels <= _IMAGE_MAX_CHANNELS and weight.shape[2:].numel() > 1
            and features.shape[0] > 0 and features.is_contiguous(memory_format=torch.channels_last))


def _im2col(x: Tensor, kernel: tuple, stride: tuple, padding: tuple, out_hw: tuple) -> Tensor:
    """[N * OH * OW, kH * kW * C_in]: row (n, oh, ow) holds the kernel's window at (oh, ow) in (i, j, ci)
    order; one strided view of the padded input and one copy."""
    n, cin = x.shape[:2]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    s = xp.stride()  # NCHW-order strides (of channels_last memory, in the fast case)
    cols = xp.as_strided((n, *out_hw, *kernel, cin), (s[0], stride[0] * s[2], stride[1] * s[3], s[2], s[3], s[1]))
    return cols.reshape(n * out_hw[0] * out_hw[1], kernel[0] * kernel[1] * cin)


def _weight_matrix(weight: Tensor) -> Tensor:
    """A conv2d weight [C_out, C_in, kH, kW] as [C_out, (i, j, ci)]: a view of a channels_last weight."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _conv2d_gemm(x: Tensor, weight: Tensor, stride: tuple, padding: tuple) -> Tensor:
    """conv2d(x, weight) as im2col(x) @ weight^T, returned channels_last."""
    kernel = tuple(weight.shape[2:])
    out_hw = conv2d_output_hw(x.shape[2:], kernel, stride, padding)
    y = _im2col(x, kernel, stride, padding, out_hw) @ _weight_matrix(weight).t()
    return y.view(x.shape[0], *out_hw, weight.shape[0]).permute(0, 3, 1, 2)


def _conv2d_input_grad_gemm(grad_y: Tensor, weight: Tensor, image_hw: tuple, stride: tuple,
                            padding: tuple) -> Tensor:
    """conv2d's input gradient (= conv_transpose2d(grad_y, weight)) as dY [N*OH*OW, C_out] @ weight
    [C_out, (i, j, ci)], then col2im (csrc/cpu/col2im_cpu.cpp: each image pixel gathers its taps'
    columns, clipped to the image, so no padded copy). Returned channels_last."""
    n, cout, oh, ow = grad_y.shape
    cin, (kh, kw) = weight.shape[1], weight.shape[2:]
    rows = grad_y.permute(0, 2, 3, 1).reshape(n * oh * ow, cout)
    cols = (rows @ _weight_matrix(weight)).view(n, oh, ow, kh, kw, cin)
    return torch.ops.gan_fast.col2im(cols, image_hw, stride, padding)


def _conv2d_weight_grad_gemm(x: Tensor, grad_y: Tensor, kernel: tuple, stride: tuple, padding: tuple) -> Tensor:
    """conv2d's weight gradient dW[co, ci, i, j] = sum_{n, oh, ow} dY[n, co, oh, ow] x[n, ci, s*oh+i-p, s*ow+j-p]
    as dY [N*OH*OW, C_out]^T @ im2col(x) [N*OH*OW, kH*kW*C_in]: dY's rows are its channels_last memory as
    is, and the product [C_out, (i, j, ci)] is the channels_last weight's memory. Returned in grad_y's
    dtype, as [C_out, C_in, kH, kW] channels_last."""
    cout, oh, ow = grad_y.shape[1:]
    rows = grad_y.permute(0, 2, 3, 1).reshape(-1, cout)
    dw = rows.t() @ _im2col(x.to(grad_y.dtype), kernel, stride, padding, (oh, ow))
    return dw.view(cout, kernel[0], kernel[1], x.shape[1]).permute(0, 3, 1, 2)


def _forward(x: Tensor, weight: Tensor, stride: tuple, padding: tuple, transposed: bool, bias=None) -> Tensor:
    """F.conv2d / F.conv_transpose2d, or their GEMM form where _deep_layer_is_a_gemm or
    _image_side_is_a_gemm says so (fp32 never under autocast, which would compute the GEMM in its own
    dtype). A transposed convolution is the input gradient of the conv2d whose weight is its own
    ([C_in, C_out, kH, kW] is conv2d's [C_out', C_in', kH, kW])."""
    y = None
    if x.device.type == "cpu" and x.dim() == 4 and weight.dim() == 4:
        fp32 = not torch.is_autocast_enabled("cpu")
        if transposed:
            image_hw = conv_transpose2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding)
            if (fp32 and x.shape[1] == weight.shape[0] and min(image_hw) > 0
                    and (_deep_layer_is_a_gemm((x,), tuple(x.shape[2:]), weight)
                         or _image_side_is_a_gemm(x, weight, weight.shape[1]))):
                y = _conv2d_input_grad_gemm(x, weight, image_hw, stride, padding)
        elif x.shape[1] == weight.shape[1]:
            out_hw = conv2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding)
            if min(out_hw) > 0 and ((fp32 and _deep_layer_is_a_gemm((x,), out_hw, weight))
                                    or _deep_layer_is_a_gemm((x,), out_hw, weight, torch.bfloat16)):
                y = _conv2d_gemm(x, weight, stride, padding)
    if y is None:
        return (F.conv_transpose2d if transposed else F.conv2d)(x, weight, bias, stride, padding)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class _ConvFunction(torch.autograd.Function):
    """F.conv2d or F.conv_transpose2d (no bias, no output padding, dilation 1, one group) whose forward
    and gradients are GEMMs where _deep_layer_is_a_gemm says so, and whose weight gradient is one
    where _weight_grad_is_a_gemm says so; every other case is ATen's convolution_backward, as the
    functions' own backward computes it. A transposed convolution's weight gradient
    dW[ci, co, i, j] = sum x[n, ci, ih, iw] dY[n, co, s*ih+i-p, s*iw+j-p] is conv2d's with dY as its
    input and x as its output gradient, [C_in, C_out, kH, kW] as the transposed weight is laid out;
    its input gradient is conv2d(dY, weight)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, transposed):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, transposed)
        return _forward(x, weight, stride, padding, transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, transposed = ctx.conf
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            conv = F.conv_transpose2d if transposed else F.conv2d
            return (*differentiable_backward(lambda a, b: conv(a, b, None, stride, padding), (x, weight),
                                             (grad_y,), (need_x, need_w)), None, None, None)
        x = x.to(grad_y.dtype)  # the forward's dtype (autocast's, under autocast)
        if transposed and _image_side_is_a_gemm(x, weight, weight.shape[1]):
            return (*_image_transposed_grads(grad_y, x, weight, stride, padding, need_x, need_w), None, None, None)
        image, grad = (grad_y, x) if transposed else (x, grad_y)  # of the conv2d whose weight gradient it is
        whole = _deep_layer_is_a_gemm((image, grad), tuple(grad.shape[2:]), weight)
        im2col_x = transposed and _deep_layer_is_a_gemm((image, grad), tuple(grad.shape[2:]), weight, torch.bfloat16)
        image_x = not transposed and _image_side_is_a_gemm(grad_y, weight, x.shape[1])
        gemm_x = need_x and (whole or im2col_x or image_x)
        gemm_w = need_w and (whole or _weight_grad_is_a_gemm(image, grad, weight))
        gx = gw = None
        if (need_x and not gemm_x) or (need_w and not gemm_w):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_y, x, weight.to(grad_y.dtype), None, stride, padding, [1, 1], transposed, [0, 0], 1,
                [need_x and not gemm_x, need_w and not gemm_w, False])
        if gemm_x:
            gx = (_conv2d_gemm(grad_y, weight, stride, padding) if transposed
                  else _conv2d_input_grad_gemm(grad_y, weight, tuple(x.shape[2:]), stride, padding))
        if gemm_w:
            gw = _conv2d_weight_grad_gemm(image, grad, tuple(weight.shape[2:]), stride, padding)
        return gx, gw, None, None, None


def _image_transposed_grads(grad_y: Tensor, x: Tensor, weight: Tensor, stride: tuple, padding: tuple,
                            need_x: bool, need_w: bool) -> tuple:
    """The gradients of a transposed convolution to a few-channel image (G's last layer) from dY, the
    image's gradient: dX = conv2d(dY, weight), and dW = conv2d's weight gradient with dY as its input
    and X as its output gradient. Both are conv2d's of a few-channel image, which the conv_act op
    computes with its own kernels (csrc/cpu/image_conv.h) where dY is channels_last fp32, and with
    ATen's convolution otherwise. oneDNN's backward of this layer took 0.6 ms a step at the digits
    size (issue #16)."""
    ops = torch.ops.gan_fast
    if grad_y.shape[1] == 1 and grad_y.is_contiguous() and grad_y.stride(1) != 1:
        # one channel: NCHW memory is NHWC memory, and the NHWC strides say so (the op's kernels take
        # channels_last images; ATen's elementwise ops give a 1-channel result NCHW strides)
        h, w = grad_y.shape[2:]
        grad_y = grad_y.as_strided(grad_y.shape, (h * w, 1, w, 1))
    with below_autograd():  # a backward without create_graph: no graph to record, and no op autograd layer
        gx = ops.conv_act(grad_y, weight, None, stride, padding, False, ACT_NONE, 0.0) if need_x else None
        gw = (ops.conv_act_backward(x, x, grad_y, weight, False, stride, padding, False, ACT_NONE, 0.0,
                                    [False, True, False])[1] if need_w else None)
    return gx, gw


def conv(x: Tensor, weight: Tensor, stride: tuple, padding: tuple, transposed: bool, bias=None) -> Tensor:
    """The blocks' convolutions (D's, and G's transposed ones; ``bias`` only for the conv_act layers):
    _ConvFunction in eager mode on a CPU (where its forward and gradients may be GEMMs), _forward
    without autograd (sampling, evaluation), the plain function elsewhere and under torch.compile."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            return _forward(x, weight, stride, padding, transposed, bias)
        if _a_gemm_may_apply(x, weight, stride, padding, transposed):
            y = _ConvFunction.apply(x, weight, stride, padding, transposed)
            return y if bias is None else y + bias.view(1, -1, 1, 1)
    # ATen's own autograd: _ConvFunction would compute the same, through a Python forward and backward
    # (~0.1 ms a call, 15-20 calls a step: most of the step at a small batch)
    return (F.conv_transpose2d if transposed else F.conv2d)(x, weight, bias, stride, padding)


def _a_gemm_may_apply(x: Tensor, weight: Tensor, stride: tuple, padding: tuple, transposed: bool) -> bool:
    """Whether _ConvFunction's forward or backward could take a GEMM form for this call: a superset of
    _deep_layer_is_a_gemm, _weight_grad_is_a_gemm and _image_side_is_a_gemm, decided from the forward's
    shapes and the dtype it computes in (autocast's, under autocast); the backward decides again with
    the real tensors."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[2:].numel() <= 1:
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if transposed:  # the conv2d whose input gradient it is: input channels weight.shape[1], output = x
        image_channels, out_hw = weight.shape[1], tuple(x.shape[2:])
    else:
        image_channels, out_hw = x.shape[1], conv2d_output_hw(x.shape[2:], weight.shape[2:], stride, padding)
    pixels = out_hw[0] * out_hw[1]
    deep = weight.numel() >= _DEEP_MIN_WEIGHT_VALUES and pixels <= _DEEP_MAX_PIXELS
    fp32 = dtype == torch.float32 and deep
    bf16 = dtype == torch.bfloat16 and (deep or (image_channels >= _WGRAD_MIN_CHANNELS and pixels <= _WGRAD_MAX_PIXELS))
    # the image side: G's last layer's forward (from channels_last features), or D's first layer's
    # input gradient, which only a differentiable input asks for (in the G update, not the D update)
    image = (dtype == torch.float32 and image_channels <= _IMAGE_MAX_CHANNELS
             and (x.is_contiguous(memory_format=torch.channels_last) if transposed else x.requires_grad))
    return ((fp32 or bf16) and x.is_contiguous(memory_format=torch.channels_last)) or image
