"""ConvTranspose2d (+ bias) -> Tanh, the generator's output layer.

Forward: one sub-pixel-decomposed transposed conv with bias and tanh in its epilogue; only the output
is saved, since tanh' = 1 - tanh^2. Backward: one pointwise pass (dz, bias gradient), then the direct
conv (input gradient) and the split-K GEMM (weight gradient).
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import differentiable_backward
from ._activation import TANH, bias_activation_backward
from ._common import check_bias, check_input, check_weight, grad_of, pair
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv_transpose2d_tanh_forward(x, weight, bias, stride, padding):
    y, _ = conv_transpose2d_forward(x, weight, bias, stride, padding, act=TANH)
    return y


def conv_transpose2d_tanh_backward(dy, x, weight, y, stride, padding, needs):
    dz, dbias = bias_activation_backward(dy, y, TANH, 0.0, has_bias=needs[2])
    dx = dw = None
    if needs[0]:
        dx, _ = conv2d_forward(dz, weight, None, stride, padding)
    if needs[1]:
        dw = conv_weight_grad(x, dz, weight.shape[2:], stride, padding)
    return dx, dw, dbias


class ConvTranspose2dTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        y = conv_transpose2d_tanh_forward(x, weight, bias, stride, padding)
        ctx.save_for_backward(x, weight, bias, y)
        ctx.conf = (stride, padding)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, y = ctx.saved_tensors
        stride, padding = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return (*differentiable_backward(
                lambda *t: reference.conv_transpose2d_tanh(*t, stride=stride, padding=padding),
                (x, weight, bias), (dy,), ctx.needs_input_grad[:3]),
                None, None)
        dx, dw, dbias = conv_transpose2d_tanh_backward(dy, x, weight, y, stride, padding,
                                                       ctx.needs_input_grad[:3])
        return dx, grad_of(dw, weight), (dbias.to(ctx.bias_dtype) if dbias is not None else None), \
            None, None


def conv_transpose2d_tanh(x, weight, bias, *, stride, padding):
    """tanh(conv_transpose2d(x, weight, bias, stride, padding)), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 0)
    check_bias(x, bias, weight.shape[1])
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    OH = (x.shape[2] - 1) * stride[0] - 2 * padding[0] + weight.shape[2]
    OW = (x.shape[3] - 1) * stride[1] - 2 * padding[1] + weight.shape[3]
    if OH <= 0 or OW <= 0:
        raise ValueError(f"transposed conv output size {OH}x{OW} is not positive")
    return ConvTranspose2dTanhFunction.apply(x, weight, bias, stride, padding)
