"""Upsample(x2, nearest) -> Conv2d(bias=False, stride 1) -> BatchNorm2d -> ReLU, the resize-convolution
generator block (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts").

The upsampled image is never stored: the conv kernel reads input pixel (ih // 2, iw // 2) for
upsampled position (ih, iw). The input gradient, which sums the upsampled gradient over each 2x2
block, is folded into the transposed-conv kernel the same way, and the weight gradient GEMM reads x
through the same upsampled indexing.
"""
from __future__ import annotations

from .. import reference
from ..reference import ACT_RELU, check_eps, check_momentum
from ._batchnorm import (BatchNormFunction, BatchNormOp, bn_activation_backward, bn_activation_forward,
                         bn_finalize)
from ._common import check_bn, check_input, check_weight, conv_geometry, empty_like_format
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad

_ONE = (1, 1)


def upsample_conv2d_bn_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                    momentum, eps, process_group, *, padding):
    z, partials = conv2d_forward(x, weight, None, _ONE, padding, upsample=2, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, ACT_RELU, 0.0, empty_like_format(z, z.shape))
    return y, z, stats


def upsample_conv2d_bn_relu_backward(dy, inputs, z, stats, training, needs, *, padding):
    x, weight = inputs[:2]
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, ACT_RELU, 0.0, training)
    dx = dw = None
    if needs[0]:
        dx, _ = conv_transpose2d_forward(dz, weight, None, _ONE, padding, out_hw=x.shape[2:], upsample=2)
    if needs[1]:
        dw = conv_weight_grad(dz, x, weight.shape[2:], _ONE, padding, upsample=2)
    return dx, dw, dgamma, dbeta


_OP = BatchNormOp(upsample_conv2d_bn_relu_forward, upsample_conv2d_bn_relu_backward,
                  reference.upsample_conv2d_bn_relu)


def upsample_conv2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                            padding, training, momentum, eps, process_group=None):
    """relu(batch_norm(conv2d(upsample_nearest_x2(x), weight, stride=1, padding))), fused;
    see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    _, padding, (OH, OW) = conv_geometry(x, weight, 1, padding, upsample=2)
    check_bn(x, weight.shape[0], bn_weight, bn_bias, running_mean, running_var, training,
             x.shape[0] * OH * OW)
    return BatchNormFunction.apply(_OP, dict(padding=padding), bool(training), float(check_momentum(momentum)),
                                   check_eps(eps), process_group, running_mean, running_var, x, weight,
                                   bn_weight, bn_bias)
