"""Conv2d(bias=False) -> BatchNorm2d -> LeakyReLU, the DCGAN discriminator block.

Forward: one implicit-GEMM conv (``_conv.conv2d_forward``) whose epilogue stores BatchNorm partial
statistics, a tiny merge + running-stat kernel, one pointwise normalize + LeakyReLU pass. Backward:
dz from two pointwise passes over (dy, z); the input gradient of the strided conv runs as a
sub-pixel-decomposed transposed conv (no multiplications by the zeros a dilated dy would hold), the
weight gradient as a split-K GEMM.
"""
from __future__ import annotations

from .. import reference
from ..reference import ACT_LEAKY_RELU, check_eps, check_momentum, check_slope
from ._batchnorm import (BatchNormFunction, BatchNormOp, bn_activation_backward, bn_activation_forward,
                         bn_finalize)
from ._common import check_bn, check_input, check_weight, conv_geometry, empty_like_format
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv2d_bn_leaky_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                                 eps, process_group, *, stride, padding, negative_slope):
    z, partials = conv2d_forward(x, weight, None, stride, padding, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, ACT_LEAKY_RELU, negative_slope, empty_like_format(z, z.shape))
    return y, z, stats


def conv2d_bn_leaky_relu_backward(dy, inputs, z, stats, training, needs, *, stride, padding, negative_slope):
    x, weight = inputs[:2]
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, ACT_LEAKY_RELU, negative_slope, training)
    dx = dw = None
    if needs[0]:
        dx, _ = conv_transpose2d_forward(dz, weight, None, stride, padding, out_hw=x.shape[2:])
    if needs[1]:
        dw = conv_weight_grad(dz, x, weight.shape[2:], stride, padding)
    return dx, dw, dgamma, dbeta


_OP = BatchNormOp(conv2d_bn_leaky_relu_forward, conv2d_bn_leaky_relu_backward, reference.conv2d_bn_leaky_relu)


def conv2d_bn_leaky_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                         stride, padding, training, momentum, eps, negative_slope, process_group=None):
    """leaky_relu(batch_norm(conv2d(x, weight, stride, padding))), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    stride, padding, (OH, OW) = conv_geometry(x, weight, stride, padding)
    check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training,
             x.shape[0] * OH * OW)
    conf = dict(stride=stride, padding=padding, negative_slope=check_slope(negative_slope))
    return BatchNormFunction.apply(_OP, conf, bool(training), float(check_momentum(momentum)), check_eps(eps),
                                   process_group, running_mean, running_var, x, weight, bn_weight, bn_bias)
