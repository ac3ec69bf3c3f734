"""Conv2d(bias=False) -> BatchNorm2d -> LeakyReLU, the DCGAN discriminator block.

Forward: one implicit-GEMM conv (``_conv.conv2d_forward``) whose epilogue stores BatchNorm partial
statistics, a tiny merge + running-stat kernel, one pointwise normalize + LeakyReLU pass. Backward:
dz from two pointwise passes over (dy, z); the input gradient of the strided conv runs as a
sub-pixel-decomposed transposed conv (no multiplications by the zeros a dilated dy would hold), the
weight gradient as a split-K GEMM.
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import check_eps, check_momentum, check_slope
from ._activation import LEAKY_RELU
from ._batchnorm import (BatchNormStats, bn_activation_backward, bn_activation_forward, bn_finalize,
                         differentiable_bn_backward, eval_stats)
from ._common import check_bn, check_input, check_weight, empty_like_format, grad_of, pair
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv2d_bn_leaky_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                 padding, training, momentum, eps, slope, process_group=None):
    z, partials = conv2d_forward(x, weight, None, stride, padding, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, LEAKY_RELU, slope, empty_like_format(z, z.shape))
    return y, z, stats


def conv2d_bn_leaky_relu_backward(dy, x, weight, z, stats, stride, padding, training, slope, needs):
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, LEAKY_RELU, slope, training)
    dx = dw = None
    if needs[0]:
        dx, _ = conv_transpose2d_forward(dz, weight, None, stride, padding, out_hw=x.shape[2:])
    if needs[1]:
        dw = conv_weight_grad(dz, x, weight.shape[2:], stride, padding)
    return dx, dw, dgamma, dbeta


class Conv2dBatchNormLeakyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                training, momentum, eps, slope, process_group):
        y, z, stats = conv2d_bn_leaky_relu_forward(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, training,
            momentum, eps, slope, process_group)
        ctx.save_for_backward(x, weight, z, bn_weight, bn_bias, *stats.tensors())
        ctx.conf = (stride, padding, training, stats.count, slope, stats.process_group)
        ctx.affine_dtypes = tuple(t.dtype if t is not None else None for t in (bn_weight, bn_bias))
        ctx.eval_stats = eval_stats(training, running_mean, running_var)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, bn_weight, bn_bias, *stat_tensors = ctx.saved_tensors
        stride, padding, training, count, slope, group = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return differentiable_bn_backward(ctx, group, lambda *t: reference.conv2d_bn_leaky_relu(
                *t, stride=stride, padding=padding, training=training, momentum=0.0, eps=ctx.eps,
                negative_slope=slope), (x, weight, bn_weight, bn_bias), dy)
        dx, dw, dgamma, dbeta = conv2d_bn_leaky_relu_backward(
            dy, x, weight, z, BatchNormStats(*stat_tensors, count, group), stride, padding, training,
            slope, ctx.needs_input_grad[:2])
        gamma_dtype, beta_dtype = ctx.affine_dtypes
        return (dx, grad_of(dw, weight),
                dgamma.to(gamma_dtype) if ctx.needs_input_grad[2] else None,
                dbeta.to(beta_dtype) if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None, None, None)


def conv2d_bn_leaky_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                         stride, padding, training, momentum, eps, negative_slope, process_group=None):
    """leaky_relu(batch_norm(conv2d(x, weight, stride, padding))), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    OH = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    OW = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    if OH <= 0 or OW <= 0:
        raise ValueError(f"the kernel {tuple(weight.shape[2:])} is larger than the padded input")
    check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training,
             x.shape[0] * OH * OW)
    return Conv2dBatchNormLeakyReLUFunction.apply(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, bool(training),
        float(check_momentum(momentum)), check_eps(eps), check_slope(negative_slope), process_group)
