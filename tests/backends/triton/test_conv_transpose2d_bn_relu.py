import pytest
import torch

from gan_fast.backends.triton import conv_transpose2d_bn_relu
from gan_fast.backends.reference import conv_transpose2d_bn_relu as conv_transpose2d_bn_relu_reference

from ...conftest import DEVICE
from ..utils import EPS, MOMENTUM, check_bn_op, check_bn_op_against_fp64, gpu_accuracy_test, make_input


def _fused(stride, padding):
    return lambda x, w, g, b, rm, rv, training: conv_transpose2d_bn_relu(
        x, w, g, b, rm, rv, stride=stride, padding=padding, training=training, momentum=MOMENTUM, eps=EPS)


def _reference(stride, padding):
    return lambda x, w, g, b, rm, rv, training: conv_transpose2d_bn_relu_reference(
        x, w, g, b, rm, rv, stride=stride, padding=padding, training=training, momentum=MOMENTUM, eps=EPS)


@pytest.mark.parametrize("n, cin, cout, size, stride, padding, layout, affine", [
    (2, 5, 37, 1, 1, 0, "contiguous", True),        # G's first layer: 1x1 latent -> 4x4, a GEMM
    (3, 6, 3, 3, 2, 1, "channels_last", True),      # k4 s2 p1, 3 -> 6
    (1, 3, 63, 4, 2, 1, "strided", False),          # batch 1 (spatial > 1), affine=False
    (2, 37, 1, 2, 2, 1, "contiguous", True),        # one output channel
])
def test_matches_reference(n, cin, cout, size, stride, padding, layout, affine):
    w = make_input((cin, cout, 4, 4), scale=0.2)
    check_bn_op(_fused(stride, padding), _reference(stride, padding),
                lambda: make_input((n, cin, size, size), layout), [w], cout, affine=affine,
                strided_dy=layout == "strided", names=["weight"])


def test_odd_kernel_and_stride():
    # k3 s3 p0: phases with a single tap; k5 s2 p2
    for k, s, p in ((3, 3, 0), (5, 2, 2)):
        w = make_input((4, 5, k, k), scale=0.2)
        check_bn_op(_fused(s, p), _reference(s, p), lambda: make_input((2, 4, 3, 3)), [w], 5, steps=1)


def test_bad_inputs():
    x = make_input((2, 4, 3, 3))
    w = make_input((4, 5, 4, 4))
    g, b = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    kw = dict(stride=2, padding=1, training=True, momentum=0.1, eps=1e-5)
    with pytest.raises(ValueError, match="channels"):
        conv_transpose2d_bn_relu(x, make_input((3, 5, 4, 4)), g, b, None, None, **kw)
    with pytest.raises(TypeError, match="dtype"):
        conv_transpose2d_bn_relu(x, w.half(), g, b, None, None, **kw)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        conv_transpose2d_bn_relu(x.long(), w, g, b, None, None, **kw)
    with pytest.raises(ValueError, match="4-D"):
        conv_transpose2d_bn_relu(x[0], w, g, b, None, None, **kw)
    with pytest.raises(ValueError, match="shape"):
        conv_transpose2d_bn_relu(x, w, torch.ones(4, device=DEVICE), b, None, None, **kw)
    with pytest.raises(ValueError, match="more than 1 value"):
        conv_transpose2d_bn_relu(make_input((1, 4, 1, 1)), make_input((4, 5, 1, 1)), g, b, None, None,
                                 **{**kw, "stride": 1, "padding": 0})
    with pytest.raises(ValueError, match="running"):
        conv_transpose2d_bn_relu(x, w, g, b, None, None, **{**kw, "training": False})


@gpu_accuracy_test
@pytest.mark.parametrize("n, cin, cout, size, stride, padding", [(64, 100, 512, 1, 1, 0),
                                                                  (64, 256, 128, 8, 2, 1)])
def test_gpu_accuracy(dtype, n, cin, cout, size, stride, padding):
    inputs = [torch.randn(n, cin, size, size, device=DEVICE), torch.randn(cin, cout, 4, 4, device=DEVICE) * 0.02,
              torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE)]
    check_bn_op_against_fp64(_fused(stride, padding), _reference(stride, padding), inputs, dtype, grad_count=4,
                             cast_count=2)
