import pytest
import torch

from gan_fast.backends.triton import conv2d_bn_leaky_relu
from gan_fast.backends.reference import conv2d_bn_leaky_relu as conv2d_bn_leaky_relu_reference

from ...conftest import DEVICE
from ..utils import EPS, MOMENTUM, SLOPE, check_bn_op, check_bn_op_against_fp64, gpu_accuracy_test, make_input


def _fused(stride, padding, slope=SLOPE, momentum=MOMENTUM):
    return lambda x, w, g, b, rm, rv, training: conv2d_bn_leaky_relu(
        x, w, g, b, rm, rv, stride=stride, padding=padding, training=training, momentum=momentum, eps=EPS,
        negative_slope=slope)


def _reference(stride, padding, slope=SLOPE, momentum=MOMENTUM):
    return lambda x, w, g, b, rm, rv, training: conv2d_bn_leaky_relu_reference(
        x, w, g, b, rm, rv, stride=stride, padding=padding, training=training, momentum=momentum, eps=EPS,
        negative_slope=slope)


@pytest.mark.parametrize("n, cin, cout, size, k, stride, padding, layout", [
    (2, 3, 37, 8, 4, 2, 1, "contiguous"),        # D block k4 s2 p1
    (1, 37, 5, 6, 4, 2, 1, "channels_last"),     # batch 1, spatial > 1
    (3, 4, 63, 7, 4, 2, 1, "strided"),           # odd size: the last input row is never read
    (2, 5, 1, 5, 3, 1, 1, "contiguous"),         # k3 s1 p1, one output channel
])
def test_matches_reference(n, cin, cout, size, k, stride, padding, layout):
    w = make_input((cout, cin, k, k), scale=0.2)
    check_bn_op(_fused(stride, padding), _reference(stride, padding),
                lambda: make_input((n, cin, size, size), layout), [w], cout,
                strided_dy=layout == "strided", names=["weight"])


def test_slope_zero_and_momentum_one():
    w = make_input((6, 3, 4, 4), scale=0.2)
    check_bn_op(_fused(2, 1, 0.0, 1.0), _reference(2, 1, 0.0, 1.0),
                lambda: make_input((2, 3, 4, 4)), [w], 6, steps=1)


def test_large_mean_variance_is_stable():
    # |mean| >> std: the per-tile (mean, M2) merge keeps the variance exact where E[z^2] - E[z]^2
    # would cancel
    x = make_input((2, 3, 6, 6), requires_grad=False) * 0.01 + 100.0
    w = make_input((4, 3, 4, 4), requires_grad=False)
    g, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    y = _fused(2, 1)(x, w, g, b, None, None, True)
    y_ref = _reference(2, 1)(x.double(), w.double(), g.double(), b.double(), None, None, True)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-3, atol=2e-3)


def test_bad_inputs():
    x = make_input((2, 3, 8, 8))
    w = make_input((4, 3, 4, 4))
    g, b = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    kw = dict(stride=2, padding=1, training=True, momentum=0.1, eps=1e-5, negative_slope=0.2)
    with pytest.raises(ValueError, match="channels"):
        conv2d_bn_leaky_relu(x, make_input((4, 5, 4, 4)), g, b, None, None, **kw)
    with pytest.raises(ValueError, match="negative_slope"):
        conv2d_bn_leaky_relu(x, w, g, b, None, None, **{**kw, "negative_slope": -0.1})
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv2d_bn_leaky_relu(make_input((2, 3, 1, 1)), w, g, b, None, None, **{**kw, "padding": 0})
    with pytest.raises(TypeError, match="stride"):
        conv2d_bn_leaky_relu(x, w, g, b, None, None, **{**kw, "stride": 1.5})
    with pytest.raises(ValueError, match="stride"):
        conv2d_bn_leaky_relu(x, w, g, b, None, None, **{**kw, "stride": 0})
    with pytest.raises(ValueError, match="both"):
        conv2d_bn_leaky_relu(x, w, g, b, torch.zeros(4, device=DEVICE), None, **kw)


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(64, 128, 16, 16, device=DEVICE), torch.randn(256, 128, 4, 4, device=DEVICE) * 0.02,
              torch.rand(256, device=DEVICE) + 0.5, torch.randn(256, device=DEVICE)]
    check_bn_op_against_fp64(_fused(2, 1), _reference(2, 1), inputs, dtype, grad_count=4, cast_count=2)
