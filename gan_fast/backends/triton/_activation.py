"""Pointwise activations applied in kernel epilogues, and the backward pass of bias + activation for
the fused ops without BatchNorm.

The activation is reference.ACT_NONE / ACT_RELU / ACT_LEAKY_RELU / ACT_TANH (0 to 3), a tl.constexpr
so each kernel compiles only the branch it uses; the kernels spell the numbers, since a jitted function
reads no plain Python global.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ACT_NONE as NONE  # noqa: F401  (the name _conv.py imports)
from ._common import (BLOCK_CHANNELS, BLOCK_ROWS, COMPILE_OPTIONS, cast_rtne, new_output_like, rows_channels_tile,
                      rows_grid, tile_pointers)


@triton.jit
def tanh_fp32(v):
    # tl has no portable tanh across the GPU backends and the interpreter. For |v| >= 0.625,
    # (1 - e) / (1 + e) with e = exp(-2|v|) <= 0.29: one exp of a non-positive argument (no
    # overflow) and no cancellation in 1 - e. Below, where 1 - e cancels (1e-7 would come out 40%
    # off), the odd minimax polynomial of the Cephes library's tanhf (S. Moshier), accurate to a few
    # ulp and exactly v (sign of zero included) for tiny v.
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    big = tl.where(v < 0, -t, t)
    z = v * v
    p = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
          + 1.33314422036e-1) * z - 3.33332819422e-1)
    small = v + v * z * p
    return tl.where(a < 0.625, small, big)


@triton.jit
def apply_activation(v, ACT: tl.constexpr, slope):
    # `v < 0` rather than `v > 0` in the selects keeps NaN flowing through, as torch.relu does.
    if ACT == 1:  # ACT_RELU
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:  # ACT_LEAKY_RELU
        v = tl.where(v < 0, v * slope, v)
    elif ACT == 3:  # ACT_TANH
        v = tanh_fp32(v)
    return v


@triton.jit
def activation_grad(dy, y, ACT: tl.constexpr, slope):
    """dL/d(pre-activation) from dL/dy and the activation's OUTPUT y, as torch's in-place ReLU /
    LeakyReLU backward does it (y > 0 exactly where the input was > 0 for slope >= 0), and
    tanh' = 1 - y^2."""
    if ACT == 1:  # ACT_RELU: torch's threshold_backward, 0 where y <= 0, so a NaN output passes dy
        dy = tl.where(y <= 0, 0.0, dy)
    elif ACT == 2:  # ACT_LEAKY_RELU
        dy = tl.where(y > 0, dy, dy * slope)
    elif ACT == 3:  # ACT_TANH
        dy = dy * (1.0 - y * y)
    return dy


@triton.jit
def _bias_activation_backward_kernel(
    dy_ptr, y_ptr, dz_ptr, dbias_ptr,
    ROWS, C, HW, W,                      # rows = N*H*W, one column per channel
    s_dyn, s_dyc, s_dyh, s_dyw,
    s_yn, s_yc, s_yh, s_yw,
    s_dzn, s_dzc, s_dzh, s_dzw,
    slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dz = dy * act'(y) in one pass; the bias gradient (sum of dz over N, H, W) is reduced per tile
    # and atomically added into an fp32 [C] buffer.
    rows, cols, c_ok, ok = rows_channels_tile(ROWS, C, BLOCK_R, BLOCK_C)
    dy = tl.load(tile_pointers(dy_ptr, rows, cols, HW, W, s_dyn, s_dyc, s_dyh, s_dyw), mask=ok,
                 other=0.0).to(tl.float32)
    y = tl.load(tile_pointers(y_ptr, rows, cols, HW, W, s_yn, s_yc, s_yh, s_yw), mask=ok,
                other=0.0).to(tl.float32)
    dz = activation_grad(dy, y, ACT, slope)
    tl.store(tile_pointers(dz_ptr, rows, cols, HW, W, s_dzn, s_dzc, s_dzh, s_dzw),
             cast_rtne(dz, dz_ptr.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + cols, tl.sum(tl.where(ok, dz, 0.0), axis=0), mask=c_ok)


def bias_activation_backward(dy: torch.Tensor, y: torch.Tensor, act: int, slope: float,
                             has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dz, dbias fp32 or None) for y = act(z + bias); tensors are 4-D [N, C, H, W] of any strides."""
    N, C, H, W = y.shape
    dz = new_output_like(y)
    dbias = torch.zeros(C, device=y.device, dtype=torch.float32) if has_bias else dz
    _bias_activation_backward_kernel[rows_grid(y)](
        dy, y, dz, dbias, N * H * W, C, H * W, W, *dy.stride(), *y.stride(), *dz.stride(), slope,
        ACT=act, HAS_BIAS=has_bias, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, **COMPILE_OPTIONS)
    return dz, (dbias if has_bias else None)
