import pytest
import torch

from gan_fast.backends.triton import conv2d_leaky_relu
from gan_fast.backends.reference import conv2d_leaky_relu as conv2d_leaky_relu_reference

from ...conftest import DEVICE
from ..utils import assert_close, check_against_fp64, check_memory_format, gpu_accuracy_test, grads, make_input


@pytest.mark.parametrize("n, cin, cout, size, k, stride, padding, bias, layout", [
    (2, 3, 37, 8, 4, 2, 1, False, "contiguous"),      # D's first layer (no bias in DCGAN)
    (1, 1, 3, 5, 4, 2, 1, True, "channels_last"),
    (3, 37, 63, 4, 3, 1, 1, True, "strided"),
    (2, 4, 5, 9, 4, 3, 0, True, "contiguous"),        # stride > kernel overlap: gaps
])
def test_matches_reference(n, cin, cout, size, k, stride, padding, bias, layout):
    x = make_input((n, cin, size, size), layout)
    w = make_input((cout, cin, k, k), scale=0.2)
    b = make_input((cout,)) if bias else None
    kw = dict(stride=stride, padding=padding, negative_slope=0.2)
    y = conv2d_leaky_relu(x, w, b, **kw)
    y_ref = conv2d_leaky_relu_reference(x, w, b, **kw)
    assert_close(y, y_ref, name="output")
    check_memory_format(y, x)
    dy = make_input(y.shape, layout, requires_grad=False)
    for got, want, name in zip(grads(y, [x, w, b], dy), grads(y_ref, [x, w, b], dy), "x w b".split()):
        if want is not None:
            assert_close(got, want, name=f"d{name}")


def test_bfloat16_in_interpreter_or_gpu():
    """bf16 through the same kernels (on the CPU the interpreter widens the MMA operands exactly)."""
    inputs = [torch.randn(2, 5, 8, 8, device=DEVICE), torch.randn(7, 5, 4, 4, device=DEVICE) * 0.2,
              torch.randn(7, device=DEVICE)]
    kw = dict(stride=2, padding=1, negative_slope=0.2)
    check_against_fp64(lambda x, w, b: conv2d_leaky_relu(x, w, b, **kw),
                       lambda x, w, b: conv2d_leaky_relu_reference(x, w, b, **kw),
                       inputs, torch.bfloat16, grad_count=3, cast_count=3, ulp_floor=True)


def test_bad_inputs():
    x = make_input((2, 3, 8, 8))
    w = make_input((4, 3, 4, 4))
    kw = dict(stride=2, padding=1, negative_slope=0.2)
    with pytest.raises(ValueError, match="shape"):
        conv2d_leaky_relu(x, w, make_input((5,)), **kw)
    with pytest.raises(TypeError, match="Tensor"):
        conv2d_leaky_relu(x.tolist(), w, None, **kw)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda|cpu"):
            conv2d_leaky_relu(x, w.cpu(), None, **kw)


@gpu_accuracy_test
def test_gpu_accuracy(dtype):
    inputs = [torch.randn(64, 3, 64, 64, device=DEVICE), torch.randn(64, 3, 4, 4, device=DEVICE) * 0.02,
              torch.randn(64, device=DEVICE)]
    kw = dict(stride=2, padding=1, negative_slope=0.2)
    check_against_fp64(lambda x, w, b: conv2d_leaky_relu(x, w, b, **kw),
                       lambda x, w, b: conv2d_leaky_relu_reference(x, w, b, **kw),
                       inputs, dtype, grad_count=3, cast_count=3)
