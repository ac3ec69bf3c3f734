"""Upsample(x2, nearest) -> Conv2d(bias=False, stride 1) -> BatchNorm2d -> ReLU, the resize-convolution
generator block (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").

The upsampled image is never stored: the conv kernel reads input pixel (ih // 2, iw // 2) for
upsampled position (ih, iw). The input gradient, which sums the upsampled gradient over each 2x2
block, is folded into the transposed-conv kernel the same way, and the weight gradient GEMM reads x
through the same upsampled indexing.
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import check_eps, check_momentum
from ._activation import RELU
from ._batchnorm import (BatchNormStats, bn_activation_backward, bn_activation_forward, bn_finalize,
                         differentiable_bn_backward, eval_stats)
from ._common import check_bn, check_input, check_weight, empty_like_format, grad_of, pair
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad

_ONE = (1, 1)


def upsample_conv2d_bn_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, padding,
                                    training, momentum, eps, process_group=None):
    z, partials = conv2d_forward(x, weight, None, _ONE, padding, upsample=2, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, RELU, 0.0, empty_like_format(z, z.shape))
    return y, z, stats


def upsample_conv2d_bn_relu_backward(dy, x, weight, z, stats, padding, training, needs):
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, RELU, 0.0, training)
    dx = dw = None
    if needs[0]:
        dx, _ = conv_transpose2d_forward(dz, weight, None, _ONE, padding, out_hw=x.shape[2:], upsample=2)
    if needs[1]:
        dw = conv_weight_grad(dz, x, weight.shape[2:], _ONE, padding, upsample=2)
    return dx, dw, dgamma, dbeta


class UpsampleConv2dBatchNormReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, padding, training,
                momentum, eps, process_group):
        y, z, stats = upsample_conv2d_bn_relu_forward(x, weight, bn_weight, bn_bias, running_mean,
                                                      running_var, padding, training, momentum, eps,
                                                      process_group)
        ctx.save_for_backward(x, weight, z, bn_weight, bn_bias, *stats.tensors())
        ctx.conf = (padding, training, stats.count, stats.process_group)
        ctx.affine_dtypes = tuple(t.dtype if t is not None else None for t in (bn_weight, bn_bias))
        ctx.eval_stats = eval_stats(training, running_mean, running_var)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, bn_weight, bn_bias, *stat_tensors = ctx.saved_tensors
        padding, training, count, group = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return differentiable_bn_backward(ctx, group, lambda *t: reference.upsample_conv2d_bn_relu(
                *t, padding=padding, training=training, momentum=0.0, eps=ctx.eps), (x, weight, bn_weight, bn_bias), dy)
        dx, dw, dgamma, dbeta = upsample_conv2d_bn_relu_backward(
            dy, x, weight, z, BatchNormStats(*stat_tensors, count, group), padding, training,
            ctx.needs_input_grad[:2])
        gamma_dtype, beta_dtype = ctx.affine_dtypes
        return (dx, grad_of(dw, weight),
                dgamma.to(gamma_dtype) if ctx.needs_input_grad[2] else None,
                dbeta.to(beta_dtype) if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


def upsample_conv2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                            padding, training, momentum, eps, process_group=None):
    """relu(batch_norm(conv2d(upsample_nearest_x2(x), weight, stride=1, padding))), fused;
    see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    padding = pair(padding, "padding")
    OH = 2 * x.shape[2] + 2 * padding[0] - weight.shape[2] + 1
    OW = 2 * x.shape[3] + 2 * padding[1] - weight.shape[3] + 1
    if OH <= 0 or OW <= 0:
        raise ValueError(f"the kernel {tuple(weight.shape[2:])} is larger than the padded upsampled input")
    check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training,
             x.shape[0] * OH * OW)
    return UpsampleConv2dBatchNormReLUFunction.apply(
        x, weight, bn_weight, bn_bias, running_mean, running_var, padding, bool(training),
        float(check_momentum(momentum)), check_eps(eps), process_group)
