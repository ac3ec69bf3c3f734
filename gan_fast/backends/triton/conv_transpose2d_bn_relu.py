"""ConvTranspose2d(bias=False) -> BatchNorm2d -> ReLU, the DCGAN generator block.

Forward: one sub-pixel-decomposed implicit-GEMM transposed conv (``_conv.conv_transpose2d_forward``)
whose epilogue also stores the BatchNorm partial statistics; a tiny kernel merges them and updates
the running statistics; one pointwise pass applies normalize + ReLU. Saved for backward: x, the conv
output z and four [C] fp32 vectors; BatchNorm's xhat and the ReLU mask are recomputed from z.
Backward: two pointwise passes give dz (``_batchnorm.bn_activation_backward``); the input gradient of a
transposed conv is a direct conv of dz, the weight gradient a split-K GEMM.
"""
from __future__ import annotations

from .. import reference
from ..reference import ACT_RELU, check_eps, check_momentum
from ._batchnorm import (BatchNormFunction, BatchNormOp, bn_activation_backward, bn_activation_forward,
                         bn_finalize)
from ._common import check_bn, check_input, check_weight, conv_geometry, empty_like_format
from ._conv import conv2d_forward, conv_transpose2d_forward, conv_weight_grad


def conv_transpose2d_bn_relu_forward(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                     momentum, eps, process_group, *, stride, padding):
    z, partials = conv_transpose2d_forward(x, weight, None, stride, padding, stats=training)
    N, C, OH, OW = z.shape
    stats = bn_finalize(partials, C, N * OH * OW, bn_weight, bn_bias, running_mean, running_var,
                        training, momentum, eps, x.device, process_group)
    y = bn_activation_forward(z, stats, ACT_RELU, 0.0, empty_like_format(z, z.shape))
    return y, z, stats


def conv_transpose2d_bn_relu_backward(dy, inputs, z, stats, training, needs, *, stride, padding):
    x, weight = inputs[:2]
    dz, dgamma, dbeta = bn_activation_backward(dy, z, stats, ACT_RELU, 0.0, training)
    dx = dw = None
    if needs[0]:
        # d/dx of a transposed conv is the direct conv of dz with the same weight tensor
        dx, _ = conv2d_forward(dz, weight, None, stride, padding)
    if needs[1]:
        dw = conv_weight_grad(x, dz, weight.shape[2:], stride, padding)
    return dx, dw, dgamma, dbeta


_OP = BatchNormOp(conv_transpose2d_bn_relu_forward, conv_transpose2d_bn_relu_backward,
                  reference.conv_transpose2d_bn_relu)


def conv_transpose2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                             stride, padding, training, momentum, eps, process_group=None):
    """relu(batch_norm(conv_transpose2d(x, weight, stride, padding))), fused; see docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 0)
    stride, padding, (OH, OW) = conv_geometry(x, weight, stride, padding, transposed=True)
    check_bn(x, weight.shape[1], bn_weight, bn_bias, running_mean, running_var, training,
             x.shape[0] * OH * OW)
    return BatchNormFunction.apply(_OP, dict(stride=stride, padding=padding), bool(training),
                                   float(check_momentum(momentum)), check_eps(eps), process_group, running_mean,
                                   running_var, x, weight, bn_weight, bn_bias)
