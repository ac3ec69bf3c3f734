"""Linear (+ bias) -> BatchNorm1d -> LeakyReLU, the MLP GAN block.

A Linear layer is a 1x1 convolution of a 1x1 image, so x [N, in] is viewed as [N, in, 1, 1] and runs
through the same implicit-GEMM kernels as the conv ops: the GEMM's epilogue adds the bias and stores
the BatchNorm partial statistics, one pointwise pass normalizes and applies LeakyReLU. The bias does
not change the training-mode output (BatchNorm subtracts the batch mean) but does move running_mean,
so it is applied exactly where nn.Linear applies it.
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import ACT_LEAKY_RELU, check_eps, check_momentum, check_slope
from ._batchnorm import (BatchNormFunction, BatchNormOp, bn_activation_backward, bn_activation_forward,
                         bn_finalize)
from ._common import check_bias, check_bn, check_input, check_weight, new_output_like
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad, tf32_allowed

_ONE, _ZERO = (1, 1), (0, 0)


def _as_image(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None]


def linear_bn_leaky_relu_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                                 momentum, eps, process_group, *, negative_slope):
    z4, partials = conv2d_forward(_as_image(x), _as_image(weight), bias, _ONE, _ZERO, stats=training,
                                 tf32=tf32_allowed(x, matmul=True))
    z = z4[:, :, 0, 0]
    stats = bn_finalize(partials, z.shape[1], z.shape[0], bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = new_output_like(z)
    bn_activation_forward(z4, stats, ACT_LEAKY_RELU, negative_slope, _as_image(y))
    return y, z, stats


def linear_bn_leaky_relu_backward(dy, inputs, z, stats, training, needs, *, negative_slope):
    x, weight = inputs[:2]
    dz4, dgamma, dbeta, *dbias = bn_activation_backward(_as_image(dy), _as_image(z), stats, ACT_LEAKY_RELU,
                                                        negative_slope, training, bias_grad=needs[2])
    dbias = dbias[0] if dbias else None
    dx = dw = None
    if needs[0]:
        # dx = dz @ W: the transposed 1x1 conv, whose weight layout [in_T, out_T] is W [out, in]
        dx4, _ = conv_transpose2d_forward(dz4, _as_image(weight), None, _ONE, _ZERO,
                                          tf32=tf32_allowed(dz4, matmul=True))
        dx = dx4[:, :, 0, 0]
    if needs[1]:
        dw = conv_weight_grad(dz4, _as_image(x), (1, 1), _ONE, _ZERO,
                              tf32=tf32_allowed(x, matmul=True))[:, :, 0, 0]
    return dx, dw, dbias, dgamma, dbeta


_OP = BatchNormOp(linear_bn_leaky_relu_forward, linear_bn_leaky_relu_backward, reference.linear_bn_leaky_relu)


def linear_bn_leaky_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                         training, momentum, eps, negative_slope, process_group=None):
    """leaky_relu(batch_norm(linear(x, weight, bias))) for x [N, in], fused; see docs/ops.md."""
    check_input(x, "x", 2)
    check_weight(x, weight, 1, dim=2)
    check_bias(x, bias, weight.shape[0])
    check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training, x.shape[0])
    return BatchNormFunction.apply(_OP, dict(negative_slope=check_slope(negative_slope)), bool(training),
                                   float(check_momentum(momentum)), check_eps(eps), process_group, running_mean,
                                   running_var, x, weight, bias, bn_weight, bn_bias)
