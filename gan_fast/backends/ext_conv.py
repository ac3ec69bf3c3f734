"""The convolutions of the ext backend's blocks (gan_fast.backends.ext): ATen's, and on a CPU two GEMM
forms that measured faster than oneDNN's there (issue #16): G's first block from the 1x1 latent as one
matrix product, and the bf16 weight gradients of the deep blocks as im2col + one GEMM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import differentiable_backward

__all__ = ["conv", "conv_transpose2d_of_a_point"]


def conv_transpose2d_of_a_point(x: Tensor, weight: Tensor) -> Tensor:
    """conv_transpose2d of a 1x1 input with padding 0 (G's first layer, from the latent vector) as one
    matrix product: out[n, co, i, j] = sum_ci x[n, ci] * weight[ci, co, i, j], so the output's rows
    are x [N, C_in] @ weight [C_in, kH * kW * C_out]. At the digits size oneDNN's CPU transposed
    convolution took 1.4-1.7 ms for this 8-MFLOP product, forward + backward (a few percent of the
    training step), the GEMM form 0.5 ms. The weight's layout decides the output's: a channels_last weight is (ci, i, j, co) in
    memory and gives a channels_last output, a contiguous one (ci, co, i, j) a contiguous output; both
    are views, and autograd's matmul backward gives x's and the weight's gradients as GEMMs too."""
    n, cin, cout, kh, kw = x.shape[0], x.shape[1], weight.shape[1], weight.shape[2], weight.shape[3]
    rows = x.reshape(n, cin)
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        y = rows @ weight.permute(0, 2, 3, 1).reshape(cin, kh * kw * cout)
        return y.view(n, kh, kw, cout).permute(0, 3, 1, 2)
    return (rows @ weight.reshape(cin, cout * kh * kw)).view(n, cout, kh, kw)


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
            and x.shape[1] >= 64 and grad_y.shape[2] * grad_y.shape[3] <= 64 and weight.shape[2:].numel() > 1
            and grad_y.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last))


def _conv2d_weight_grad_gemm(x: Tensor, grad_y: Tensor, kernel: tuple, stride: tuple, padding: tuple) -> Tensor:
    """conv2d's weight gradient dW[co, ci, i, j] = sum_{n, oh, ow} dY[n, co, oh, ow] x[n, ci, s*oh+i-p, s*ow+j-p]
    as dY [N*OH*OW, C_out]^T @ im2col(x) [N*OH*OW, kH*kW*C_in]: with channels_last x each im2col row
    is kH*kW runs of C_in contiguous values (one strided view and one copy), dY's rows are its memory
    as is, and the product [C_out, (i, j, ci)] is the channels_last weight's memory. Returned in
    grad_y's dtype, as [C_out, C_in, kH, kW] channels_last."""
    n, cin = x.shape[:2]
    cout, oh, ow = grad_y.shape[1:]
    kh, kw = kernel
    xp = F.pad(x.to(grad_y.dtype), (padding[1], padding[1], padding[0], padding[0]))
    s = xp.stride()  # NCHW-order strides of channels_last memory
    cols = xp.as_strided((n, oh, ow, kh, kw, cin), (s[0], stride[0] * s[2], stride[1] * s[3], s[2], s[3], s[1]))
    rows = grad_y.permute(0, 2, 3, 1).reshape(n * oh * ow, cout)
    dw = rows.t() @ cols.reshape(n * oh * ow, kh * kw * cin)
    return dw.view(cout, kh, kw, cin).permute(0, 3, 1, 2)


class _ConvFunction(torch.autograd.Function):
    """F.conv2d or F.conv_transpose2d (no bias, no output padding, dilation 1, one group) whose weight
    gradient is a GEMM where _weight_grad_is_a_gemm says so; the input gradient and every other case
    are ATen's convolution_backward, as the functions' own backward computes them. A transposed
    convolution's weight gradient dW[ci, co, i, j] = sum x[n, ci, ih, iw] dY[n, co, s*ih+i-p, s*iw+j-p]
    is conv2d's with dY as its input and x as its output gradient, [C_in, C_out, kH, kW] as the
    transposed weight is laid out."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, transposed):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, transposed)
        return (F.conv_transpose2d if transposed else F.conv2d)(x, weight, None, stride, padding)

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
        image, grad = (grad_y, x) if transposed else (x, grad_y)  # of the conv2d whose weight gradient it is
        gemm = need_w and _weight_grad_is_a_gemm(image, grad, weight)
        gx = gw = None
        if need_x or (need_w and not gemm):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_y, x, weight.to(grad_y.dtype), None, stride, padding, [1, 1], transposed, [0, 0], 1,
                [need_x, need_w and not gemm, False])
        if gemm:
            gw = _conv2d_weight_grad_gemm(image, grad, tuple(weight.shape[2:]), stride, padding)
        return gx, gw, None, None, None


def conv(x: Tensor, weight: Tensor, stride: tuple, padding: tuple, transposed: bool) -> Tensor:
    """The D blocks' convolution and the G blocks' transposed convolution: _ConvFunction in eager mode
    on a CPU (where its weight gradient may be a GEMM), the plain function elsewhere and under
    torch.compile."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _ConvFunction.apply(x, weight, stride, padding, transposed)
    return (F.conv_transpose2d if transposed else F.conv2d)(x, weight, None, stride, padding)
