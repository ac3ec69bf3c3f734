import pytest
import torch

from gan_fast.backends.triton import conv_transpose2d_tanh
from gan_fast.backends.reference import conv_transpose2d_tanh as conv_transpose2d_tanh_reference

from ...conftest import DEVICE
from ..utils import assert_close, check_against_fp64, check_memory_format, gpu_accuracy_test, grads, make_input


@pytest.mark.parametrize("n, cin, cout, size, stride, padding, bias, layout", [
    (2, 37, 3, 4, 2, 1, False, "contiguous"),       # G's last layer
    (1, 5, 1, 3, 2, 1, True, "channels_last"),
    (3, 4, 63, 1, 1, 0, True, "strided"),           # 1x1 input
    (2, 6, 3, 2, 2, 1, True, "contiguous"),
])
def test_matches_reference(n, cin, cout, size, stride, padding, bias, layout):
    x = make_input((n, cin, size, size), layout)
    w = make_input((cin, cout, 4, 4), scale=0.5)     # large enough to saturate tanh somewhere
    b = make_input((cout,)) if bias else None
    y = conv_transpose2d_tanh(x, w, b, stride=stride, padding=padding)
    y_ref = conv_transpose2d_tanh_reference(x, w, b, stride=stride, padding=padding)
    assert_close(y, y_ref, name="output")
    check_memory_format(y, x)
    dy = make_input(y.shape, "strided", requires_grad=False)
    for got, want, name in zip(grads(y, [x, w, b], dy), grads(y_ref, [x, w, b], dy), "x w b".split()):
        if want is not None:
            assert_close(got, want, name=f"d{name}")


def test_bad_inputs():
    x = make_input((2, 4, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        conv_transpose2d_tanh(x, make_input((3, 3, 4, 4)), None, stride=2, padding=1)
    with pytest.raises(ValueError, match="not positive"):
        conv_transpose2d_tanh(make_input((2, 4, 1, 1)), make_input((4, 3, 2, 2)), None, stride=1, padding=2)


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(64, 64, 32, 32, device=DEVICE), torch.randn(64, 3, 4, 4, device=DEVICE) * 0.05,
              torch.randn(3, device=DEVICE)]
    check_against_fp64(lambda x, w, b: conv_transpose2d_tanh(x, w, b, stride=2, padding=1),
                       lambda x, w, b: conv_transpose2d_tanh_reference(x, w, b, stride=2, padding=1),
                       inputs, dtype, grad_count=3, cast_count=3)
