"""Conv2d (+ bias) -> LeakyReLU, the discriminator's first layer (no BatchNorm on D's input, Radford
et al. 2015 sec. 3).

Forward: one implicit-GEMM conv with bias and LeakyReLU in its epilogue; only the output is saved.
Backward: one pointwise pass turns dy into dz with the mask read from the output and reduces the bias
gradient on the way; then the sub-pixel transposed conv (input gradient) and the split-K GEMM (weight
gradient).
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import ACT_LEAKY_RELU, check_slope, differentiable_backward
from ._activation import bias_activation_backward
from ._common import check_bias, check_input, check_weight, conv_geometry, grad_of
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv2d_leaky_relu_forward(x, weight, bias, stride, padding, slope):
    y, _ = conv2d_forward(x, weight, bias, stride, padding, act=ACT_LEAKY_RELU, slope=slope)
    return y


def conv2d_leaky_relu_backward(dy, x, weight, y, stride, padding, slope, needs):
    dz, dbias = bias_activation_backward(dy, y, ACT_LEAKY_RELU, slope, has_bias=needs[2])
    dx = dw = None
    if needs[0]:
        dx, _ = conv_transpose2d_forward(dz, weight, None, stride, padding, out_hw=x.shape[2:])
    if needs[1]:
        dw = conv_weight_grad(dz, x, weight.shape[2:], stride, padding)
    return dx, dw, dbias


class Conv2dLeakyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, slope):
        y = conv2d_leaky_relu_forward(x, weight, bias, stride, padding, slope)
        ctx.save_for_backward(x, weight, bias, y)
        ctx.conf = (stride, padding, slope)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, y = ctx.saved_tensors
        stride, padding, slope = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return (*differentiable_backward(
                lambda *t: reference.conv2d_leaky_relu(*t, stride=stride, padding=padding,
                                                       negative_slope=slope),
                (x, weight, bias), (dy,), ctx.needs_input_grad[:3]),
                None, None, None)
        dx, dw, dbias = conv2d_leaky_relu_backward(dy, x, weight, y, stride, padding, slope,
                                                   ctx.needs_input_grad[:3])
        return dx, grad_of(dw, weight), grad_of(dbias, bias), None, None, None


def conv2d_leaky_relu(x, weight, bias, *, stride, padding, negative_slope):
    """leaky_relu(conv2d(x, weight, bias, stride, padding)), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    check_bias(x, bias, weight.shape[0])
    stride, padding, _ = conv_geometry(x, weight, stride, padding)
    return Conv2dLeakyReLUFunction.apply(x, weight, bias, stride, padding, check_slope(negative_slope))
