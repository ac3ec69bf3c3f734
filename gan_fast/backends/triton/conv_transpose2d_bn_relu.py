"""ConvTranspose2d(bias=False) -> BatchNorm2d -> ReLU, the DCGAN generator block.

Forward: one sub-pixel-decomposed implicit-GEMM transposed conv (``_conv.conv_transpose2d_forward``)
whose epilogue also stores the BatchNorm partial statistics; a tiny kernel merges them and updates
the running statistics; one pointwise pass applies normalize + ReLU. Saved for backward: x, the conv
output z and four [C] fp32 vectors; BatchNorm's xhat and the ReLU mask are recomputed from z.
Backward: two pointwise passes give dz (``_batchnorm.bn_activation_backward``); the input gradient of a
transposed conv is a direct conv of dz, the weight gradient a split-K GEMM.
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


def conv_transpose2d_bn_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                     stride, padding, training, momentum, eps, process_group=None):
    z, partials = conv_transpose2d_forward(x, weight, None, stride, padding, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, RELU, 0.0, empty_like_format(z, z.shape))
    return y, z, stats


def conv_transpose2d_bn_relu_backward(dy, x, weight, z, stats, stride, padding, training, needs):
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, RELU, 0.0, training)
    dx = dw = None
    if needs[0]:
        # d/dx of a transposed conv is the direct conv of dz with the same weight tensor
        dx, _ = conv2d_forward(dz, weight, None, stride, padding)
    if needs[1]:
        dw = conv_weight_grad(x, dz, weight.shape[2:], stride, padding)
    return dx, dw, dgamma, dbeta


class ConvTranspose2dBatchNormReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                training, momentum, eps, process_group):
        y, z, stats = conv_transpose2d_bn_relu_forward(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, training,
            momentum, eps, process_group)
        ctx.save_for_backward(x, weight, z, bn_weight, bn_bias, *stats.tensors())
        ctx.conf = (stride, padding, training, stats.count, stats.process_group)
        ctx.affine_dtypes = tuple(t.dtype if t is not None else None for t in (bn_weight, bn_bias))
        ctx.eval_stats = eval_stats(training, running_mean, running_var)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z, bn_weight, bn_bias, *stat_tensors = ctx.saved_tensors
        stride, padding, training, count, group = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return differentiable_bn_backward(ctx, group, lambda *t: reference.conv_transpose2d_bn_relu(
                *t, stride=stride, padding=padding, training=training, momentum=0.0, eps=ctx.eps),
                (x, weight, bn_weight, bn_bias), dy)
        stats = BatchNormStats(*stat_tensors, count, group)
        dx, dw, dgamma, dbeta = conv_transpose2d_bn_relu_backward(
            dy, x, weight, z, stats, stride, padding, training, ctx.needs_input_grad[:2])
        gamma_dtype, beta_dtype = ctx.affine_dtypes
        return (dx, grad_of(dw, weight),
                dgamma.to(gamma_dtype) if ctx.needs_input_grad[2] else None,
                dbeta.to(beta_dtype) if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None, None)


def conv_transpose2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                             stride, padding, training, momentum, eps, process_group=None):
    """relu(batch_norm(conv_transpose2d(x, weight, stride, padding))), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 0)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    C = weight.shape[1]
    OH = (x.shape[2] - 1) * stride[0] - 2 * padding[0] + weight.shape[2]
    OW = (x.shape[3] - 1) * stride[1] - 2 * padding[1] + weight.shape[3]
    if OH <= 0 or OW <= 0:
        raise ValueError(f"transposed conv output size {OH}x{OW} is not positive")
    check_bn(x, C, bn_weight, bn_bias, running_mean, running_var, training, x.shape[0] * OH * OW)
    return ConvTranspose2dBatchNormReLUFunction.apply(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, bool(training),
        float(check_momentum(momentum)), check_eps(eps), process_group)
