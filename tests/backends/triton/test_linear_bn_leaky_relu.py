import pytest
import torch

from gan_fast.backends.triton import linear_bn_leaky_relu
from gan_fast.backends.reference import linear_bn_leaky_relu as linear_bn_leaky_relu_reference

from ...conftest import DEVICE
from ..utils import EPS, MOMENTUM, SLOPE, check_bn_op, check_bn_op_against_fp64, gpu_accuracy_test, make_input


def _fused(x, w, bias, g, b, rm, rv, training):
    return linear_bn_leaky_relu(x, w, bias, g, b, rm, rv, training=training, momentum=MOMENTUM, eps=EPS,
                                negative_slope=SLOPE)


def _reference(x, w, bias, g, b, rm, rv, training):
    return linear_bn_leaky_relu_reference(x, w, bias, g, b, rm, rv, training=training, momentum=MOMENTUM,
                                          eps=EPS, negative_slope=SLOPE)


def _as_layout(t, layout):
    # a transposed view is the non-contiguous case of a 2-D input
    return t.t().contiguous().t().detach().requires_grad_() if layout == "transposed" else t


@pytest.mark.parametrize("n, fin, fout, bias, layout", [
    (2, 3, 37, True, "contiguous"),      # BN1d needs batch >= 2
    (3, 63, 1, False, "transposed"),
    (5, 16, 20, True, "strided"),
])
def test_matches_reference(n, fin, fout, bias, layout):
    w = make_input((fout, fin), scale=0.3)
    params = [w, make_input((fout,)) if bias else None]
    if layout == "strided":
        make_x = lambda: make_input((n, fin), "strided")  # noqa: E731
    else:
        make_x = lambda: _as_layout(make_input((n, fin)), layout)  # noqa: E731
    check_bn_op(_fused, _reference, make_x, params, fout, names=["weight", "bias"])


def test_bad_inputs():
    x = make_input((4, 3))
    w = make_input((5, 3))
    g, b = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value"):
        _fused(x[:1], w, None, g, b, None, None, True)
    with pytest.raises(ValueError, match="2-D"):
        _fused(x[:, :, None], w, None, g, b, None, None, True)
    with pytest.raises(ValueError, match="channels"):
        _fused(x, make_input((5, 4)), None, g, b, None, None, True)
    with pytest.raises(TypeError, match="bias"):
        _fused(x, w, make_input((5,)).double(), g, b, None, None, True)


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(128, 256, device=DEVICE), torch.randn(512, 256, device=DEVICE) * 0.05,
              torch.randn(512, device=DEVICE), torch.rand(512, device=DEVICE) + 0.5,
              torch.randn(512, device=DEVICE)]
    check_bn_op_against_fp64(_fused, _reference, inputs, dtype, grad_count=5, cast_count=3)
