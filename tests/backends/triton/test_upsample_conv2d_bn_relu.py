import pytest
import torch

from gan_fast.backends.triton import upsample_conv2d_bn_relu
from gan_fast.backends.reference import upsample_conv2d_bn_relu as upsample_conv2d_bn_relu_reference

from ...conftest import DEVICE
from ..utils import EPS, MOMENTUM, check_bn_op, check_bn_op_against_fp64, gpu_accuracy_test, make_input


def _fused(padding):
    return lambda x, w, g, b, rm, rv, training: upsample_conv2d_bn_relu(
        x, w, g, b, rm, rv, padding=padding, training=training, momentum=MOMENTUM, eps=EPS)


def _reference(padding):
    return lambda x, w, g, b, rm, rv, training: upsample_conv2d_bn_relu_reference(
        x, w, g, b, rm, rv, padding=padding, training=training, momentum=MOMENTUM, eps=EPS)


@pytest.mark.parametrize("n, cin, cout, size, k, padding, layout", [
    (2, 5, 37, 4, 3, 1, "contiguous"),     # the --g-upsample block: 3x3 conv after x2
    (1, 37, 3, 1, 3, 1, "channels_last"),  # 1x1 -> 2x2, batch 1
    (3, 3, 63, 3, 3, 1, "strided"),
    (2, 4, 1, 3, 4, 0, "contiguous"),      # even kernel, no padding
])
def test_matches_reference(n, cin, cout, size, k, padding, layout):
    w = make_input((cout, cin, k, k), scale=0.2)
    check_bn_op(_fused(padding), _reference(padding), lambda: make_input((n, cin, size, size), layout),
                [w], cout, strided_dy=layout == "strided", names=["weight"])


def test_bad_inputs():
    g, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="larger than the padded upsampled input"):
        _fused(0)(make_input((2, 3, 1, 1)), make_input((4, 3, 3, 3)), g, b, None, None, True)
    with pytest.raises(ValueError, match="channels"):
        _fused(1)(make_input((2, 3, 2, 2)), make_input((4, 2, 3, 3)), g, b, None, None, True)


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(64, 128, 8, 8, device=DEVICE), torch.randn(64, 128, 3, 3, device=DEVICE) * 0.02,
              torch.rand(64, device=DEVICE) + 0.5, torch.randn(64, device=DEVICE)]
    check_bn_op_against_fp64(_fused(1), _reference(1), inputs, dtype, grad_count=4, cast_count=2)
