"""The ext backend's CPU-only forms of its blocks, each against the reference composition it replaces:
G's first block (the 1x1 latent -> 4x4) as one matrix product instead of oneDNN's transposed
convolution (issue #16). test_ext_ops.py has every block in every layout and dtype."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan_fast.backends import ext, reference

from ..conftest import needs_ext
from .utils import (DEVICE, EPS, MOMENTUM, assert_close, bn_params, check_bn_op_against_fp64, grads,
                    make_input)

RTOL = 1e-5  # fp32, relative to each tensor's largest magnitude (tests.backends.utils.assert_close)


def _block_pair(**kw):
    """conv_transpose2d_bn_relu of ext and of the reference, as f(x, weight, gamma, beta, running_mean,
    running_var, training)."""
    def call(f):
        return lambda *args: f(*args[:-1], training=args[-1], momentum=MOMENTUM, eps=EPS, **kw)
    return call(ext.conv_transpose2d_bn_relu), call(reference.conv_transpose2d_bn_relu)


class _OpNames(TorchDispatchMode):
    """The names of the ATen / gan_fast ops a block of code dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


@needs_ext
@pytest.mark.skipif(DEVICE != "cpu", reason="the matrix-product form of G's first block is the CPU's")
@pytest.mark.parametrize("n, weight_layout, amp", [(1, "contiguous", False), (3, "channels_last", False),
                                                   (2, "channels_last", True), (3, "contiguous", True)])
def test_g_first_block_from_a_point_is_one_matrix_product(n, weight_layout, amp):
    # G's first block (the 1x1 latent -> 4x4) on the CPU: a GEMM instead of oneDNN's transposed conv
    # (issue #16), forward and backward; the output takes the weight's layout as ATen's does, and
    # matches the reference's output, gradients and running statistics (bf16 autocast: within the
    # reference's own bf16 error against fp64, tests.backends.utils.check_against_fp64's rule).
    cin, cout = 37, 63
    w = make_input((cin, cout, 4, 4), scale=0.2).detach()
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    w.requires_grad_()
    fused, ref = _block_pair(stride=1, padding=0)
    gamma, beta, rm, rv = bn_params(cout, True)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for training in (True, True, False):
        x = make_input((n, cin, 1, 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), _OpNames() as ops:
            probe = fused(x, w, gamma, beta, rm.clone(), rv.clone(), training)
            probe.backward(make_input(probe.shape, dtype=probe.dtype, requires_grad=False))
        assert "aten::mm" in ops.names and not {"aten::convolution", "aten::convolution_backward"} & ops.names
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fused(x, w, gamma, beta, rm, rv, training)
            y_ref = ref(x, w, gamma, beta, rm_ref, rv_ref, training)
        assert y.dtype == y_ref.dtype and y.stride() == y_ref.stride(), (y.dtype, y.stride(), y_ref.stride())
        if not amp:
            assert_close(y, y_ref, RTOL, "output")
            dy = make_input(y_ref.shape, requires_grad=False)
            for got, want, label in zip(grads(y, [x, w, gamma, beta], dy), grads(y_ref, [x, w, gamma, beta], dy),
                                        ["x", "weight", "gamma", "beta"]):
                assert_close(got, want, RTOL, f"d {label} (training={training})")
            assert_close(rm, rm_ref, RTOL, "running_mean")
            assert_close(rv, rv_ref, RTOL, "running_var")
    if amp:
        check_bn_op_against_fp64(fused, ref, [make_input((n, cin, 1, 1)), w, *bn_params(cout, True)[:2]],
                                 torch.bfloat16, grad_count=4, cast_count=2)
