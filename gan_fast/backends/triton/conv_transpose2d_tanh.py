"""ConvTranspose2d (+ bias) -> Tanh, the generator's output layer.

Forward: one sub-pixel-decomposed transposed conv with bias and tanh in its epilogue; only the output
is saved, since tanh' = 1 - tanh^2. Backward: one pointwise pass (dz, bias gradient), then the direct
conv (input gradient) and the split-K GEMM (weight gradient).
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import ACT_TANH, differentiable_backward
from ._activation import bias_activation_backward
from ._common import check_bias, check_input, check_weight, conv_geometry, grad_of
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv_transpose2d_tanh_forward(x, weight, bias, stride, padding):
    y, _ = conv_transpose2d_forward(x, weight, bias, stride, padding, act=ACT_TANH)
    return y


def conv_transpose2d_tanh_backward(dy, x, weight, y, stride, padding, needs):
    dz, dbias = bias_activation_backward(dy, y, ACT_TANH, 0.0, has_bias=needs[2])
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
        return dx, grad_of(dw, weight), grad_of(dbias, bias), None, None


def conv_transpose2d_tanh(x, weight, bias, *, stride, padding):
    """tanh(conv_transpose2d(x, weight, bias, stride, padding)), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 0)
    check_bias(x, bias, weight.shape[1])
    stride, padding, _ = conv_geometry(x, weight, stride, padding, transposed=True)
    return ConvTranspose2dTanhFunction.apply(x, weight, bias, stride, padding)
