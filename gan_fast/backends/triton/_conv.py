"""Implicit-GEMM convolution kernels shared by the fused ops: no im2col buffer is ever written; each
program gathers its [pixels x input-channels] tile for one kernel tap straight from the input and
accumulates tap after tap in fp32 with tl.dot (the "implicit GEMM" of cuDNN, Chetlur et al. 2014,
arXiv:1410.0759). Three kernels cover every direction of every fused layer:

- ``conv2d_forward``: direct convolution, optionally reading a nearest-x2 upsampled input through its
  indexing (the upsampled tensor never exists). It is also the input gradient of a transposed conv,
  which is a direct conv of dy with the same weight tensor.
- ``conv_transpose2d_forward``: transposed convolution by sub-pixel decomposition (Shi et al. 2016,
  arXiv:1609.05158; Odena et al. 2016): the output splits into stride_h x stride_w phases, each a
  dense conv with only the taps congruent to its phase, so the zeros a naive transposed conv
  inserts between input pixels are never multiplied. A k4 s2 layer becomes four 2x2-tap convs. It
  is also the input gradient of a strided conv (the same phases), and with ``upsample=2`` the input
  gradient of upsample + conv, summing each 2x2 block of the upsampled gradient in registers.
- ``conv_weight_grad``: dW[a, b, kh, kw] = sum over (n, p, q) of A[n, a, p, q] * B[n, b, p*s - pad + kh,
  q*s - pad + kw], the weight gradient of both a conv (A = dy, B = x) and a transposed conv
  (A = x, B = dy), as a GEMM whose long reduction over batch x pixels is split across programs
  (split-K) and summed with fp32 atomics.

Both forward kernels can add a bias, store BatchNorm partial statistics from the fp32 accumulator
(``_batchnorm.store_tile_stats``) and apply an activation before the single store. Every tensor is
addressed through its strides; the launchers still hand the kernels channels_last inputs, their channels
zero-padded to a multiple of 16, and a channels_last output (``channels_last``: what lets the loads
vectorize and pipeline), and return the result in the input's memory format.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import conv2d_output_hw, conv_transpose2d_output_hw
from ._activation import NONE, apply_activation
from ._batchnorm import new_partials, store_tile_stats
from ._common import cast_rtne, round_to
from ._common import COMPILE_OPTIONS, INTERPRET, configs, empty_like_format, new_output, num_sms, zero_args

# (BLOCK_M pixels, BLOCK_N output channels, BLOCK_K input channels), num_warps, num_stages[, maxnreg].
# tl.dot needs every block dim >= 16; the 32-wide N tile serves the 1- and 3-channel image layers.
# Every config compiles without a register spill for sm_80 and sm_90, in fp32 (TF32), bf16 and fp16,
# under Triton 3.6's ptxas and 3.9's, and BLOCK_M >= 64 keeps sm_90 on wgmma (M = 64 per warp group):
# `python -m gan_fast.backends.triton.compile_check --full` checks it. The 128-row tiles take 8 warps,
# the 64x64 ones 2 stages, the 128x128 one BLOCK_K 16 (32 spilled in TF32 at 255 registers). The
# transposed conv gets BLOCK_K 16 and no 128x128 tile. The 4th entry is a register allowance (PTX
# .maxnreg): left to itself ptxas capped several tiles at 64-128 registers, for occupancy, and spilled
# 8-84 bytes to fit (TF32 8-warp conv tiles and the narrow image-layer tiles on sm_80); but an
# allowance is not free either: the same narrow tile spilled under 3.9 on sm_90 with one and under 3.6
# on sm_80 without, so the image layers' tile is 64x32 rather than 128x16.
_GEMM_GPU = [
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 3, 208),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3, 208),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16}, 8, 3),
    ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 3, 168),
]
_CONVT_GPU = [
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 4, 2, 168),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, 8, 3, 168),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, 8, 3, 168),
    ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, 4, 3, 168),
    ({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32}, 4, 3, 168),
]
_GEMM_INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
# The BatchNorm partials get one row per M tile; sized for the smallest BLOCK_M any config uses.
_MIN_BLOCK_M = (min(c[0]["BLOCK_M"] for c in _GEMM_GPU + _CONVT_GPU) if not INTERPRET
                else _GEMM_INTERPRET["BLOCK_M"])

_WGRAD_GPU = [
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 3),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 3, 168),  # ptxas's own pick spilled 8 B (fp32, sm_90)
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 8, 3),
]
_WGRAD_INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, TF32: tl.constexpr):
    """acc += a @ b in fp32. The interpreter's tl.dot mishandles bfloat16 (numpy has no bf16), so
    there the operands are widened first: products of two 16-bit floats are exact in fp32, which
    makes this the same arithmetic as the GPU's 16-bit MMA with an fp32 accumulator. fp32 operands
    use TF32 tensor cores exactly when PyTorch would for the same layer (``tf32_allowed``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    if TF32:
        return tl.dot(a, b.to(a.dtype), acc=acc, input_precision="tf32")
    return tl.dot(a, b.to(a.dtype), acc=acc, input_precision="ieee")


@triton.jit
def pixel_coords(rows, ROWS, COLS):
    """Flat indices of an [N, ROWS, COLS] pixel grid -> (n, row, col)."""
    col = rows % COLS
    t = rows // COLS
    return t // ROWS, t % ROWS, col


@triton.jit
def accumulate_tap(acc, x_row, row_ok, w_col, n_ok, C_in, s_xc, s_wi,
                   DOT_FP32: tl.constexpr, TF32: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[rows, :] @ w[:, cols] over the C_in channels of one kernel tap, BLOCK_K at a time:
    x_row / w_col point at channel 0 of each output pixel's input pixel / each output channel."""
    offs_k = tl.arange(0, BLOCK_K)
    for c0 in range(0, C_in, BLOCK_K):
        ck = c0 + offs_k
        k_ok = ck < C_in
        a = tl.load(x_row[:, None] + ck[None, :] * s_xc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_col[None, :] + ck[:, None] * s_wi, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_FP32, TF32)
    return acc


def tf32_allowed(x: torch.Tensor, matmul: bool = False) -> bool:
    """Whether PyTorch itself would run this fp32 layer on TF32 tensor cores: convolutions follow
    torch.backends.cudnn.allow_tf32 (default on), matmuls torch.backends.cuda.matmul.allow_tf32
    (default off). The accuracy tests hold the fused op to 2x PyTorch's own error, so matching its
    precision choice is what makes the comparison fair in both directions."""
    if INTERPRET or x.dtype != torch.float32:
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32 if matmul else torch.backends.cudnn.allow_tf32)


@triton.autotune(configs=configs(_GEMM_GPU, _GEMM_INTERPRET, pre_hook=zero_args("cnt_ptr")),
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "KH", "KW", "UP", "STATS"])
@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, cnt_ptr, pmean_ptr, pm2_ptr,
    N, C_in, H, W, C_out, OH, OW, KH, KW,      # x [N, C_in, H, W], w [C_out, C_in, KH, KW]
    stride_h, stride_w, pad_h, pad_w,
    s_xn, s_xc, s_xh, s_xw, s_wo, s_wi, s_wh, s_ww, s_yn, s_yc, s_yh, s_yw,
    slope,
    UP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
    DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # output pixels (n, oh, ow)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # output channels
    m_ok = offs_m < N * OH * OW
    n_ok = offs_n < C_out
    nb, oh, ow = pixel_coords(offs_m, OH, OW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(0, KH):
        # row in the (virtually) upsampled input; nearest x2 reads pixel ihu // 2
        ihu = oh * stride_h - pad_h + kh
        h_ok = (ihu >= 0) & (ihu < H * UP)
        ih = tl.where(h_ok, ihu, 0) // UP
        for kw in range(0, KW):
            iwu = ow * stride_w - pad_w + kw
            w_okk = (iwu >= 0) & (iwu < W * UP)
            iw = tl.where(w_okk, iwu, 0) // UP
            row_ok = m_ok & h_ok & w_okk
            x_row = x_ptr + nb * s_xn + ih * s_xh + iw * s_xw
            w_col = w_ptr + offs_n * s_wo + kh * s_wh + kw * s_ww
            acc = accumulate_tap(acc, x_row, row_ok, w_col, n_ok, C_in, s_xc, s_wi, DOT_FP32, TF32, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # The reference conv hands BatchNorm and the activation its output rounded to the tensor's dtype;
    # statistics of the unrounded accumulator would normalize the stored 16-bit z with a mean it never
    # had (a channel whose mean dwarfs its spread comes out all wrong). A no-op for fp32.
    acc = round_to(acc, y_ptr.dtype.element_ty)
    if STATS:
        store_tile_stats(acc, m_ok, offs_n, n_ok, pid_m, C_out, cnt_ptr, pmean_ptr, pm2_ptr)
    acc = apply_activation(acc, ACT, slope)
    y_ptrs = y_ptr + (nb * s_yn + oh * s_yh + ow * s_yw)[:, None] + offs_n[None, :] * s_yc
    tl.store(y_ptrs, cast_rtne(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=configs(_CONVT_GPU, _GEMM_INTERPRET, pre_hook=zero_args("cnt_ptr")),
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "KH", "KW", "stride_h", "stride_w",
                      "UP", "STATS"])
@triton.jit
def _conv_transpose2d_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, cnt_ptr, pmean_ptr, pm2_ptr,
    N, C_in, H, W, C_out, OH, OW, KH, KW,      # x [N, C_in, H, W], w [C_in, C_out, KH, KW]
    stride_h, stride_w, pad_h, pad_w,
    PH_ROWS, PH_COLS,                          # output rows / cols of the largest phase
    C_w,                                       # w's output channels, C_out padded to a multiple of 16
    s_xn, s_xc, s_xh, s_xw, s_wi, s_wo, s_wh, s_ww, s_yn, s_yc, s_yh, s_yw,
    slope,
    UP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr,
    DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y[n, co, oh, ow] = sum x[n, ci, ih, iw] * w[ci, co, kh, kw] over ih*s - pad + kh == oh.
    # Output rows with (oh + pad) % s == ph only meet taps kh = ph + s*j, at input row
    # ih = (oh + pad - ph) / s - j: one dense small conv per phase (program_id 2).
    # With UP = 2 (stride 1) the output is the 2x-downsampled sum over each 2x2 block.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph_h = phase // stride_w
    ph_w = phase % stride_w
    # first output row / col of this phase; pad*(s-1) keeps the operand of % non-negative
    oh0 = (ph_h + pad_h * (stride_h - 1)) % stride_h
    ow0 = (ph_w + pad_w * (stride_w - 1)) % stride_w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nb, th, tw = pixel_coords(offs_m, PH_ROWS, PH_COLS)
    oh = oh0 + stride_h * th
    ow = ow0 + stride_w * tw
    m_ok = (nb < N) & (oh < OH) & (ow < OW)
    # The weight is read over its channels padded to C_w (a multiple of 16 with zeros beyond C_out):
    # an unmasked 16-wide run is what lets the 16-bit loads of a 3-channel layer become cp.async.
    w_ok = offs_n < C_w
    # Input row / col of tap (jh, jw) and 2x2 offset (u, v) is base + (u, v) - (jh, jw); the
    # numerators are >= 0 and divisible by the stride (UP > 1 only with stride 1).
    base_h = (oh * UP + pad_h - ph_h) // stride_h
    base_w = (ow * UP + pad_w - ph_w) // stride_w
    x_base = nb * s_xn + base_h * s_xh + base_w * s_xw
    w_base = w_ptr + offs_n * s_wo + ph_h * s_wh + ph_w * s_ww
    taps_h = (KH - ph_h + stride_h - 1) // stride_h
    taps_w = (KW - ph_w + stride_w - 1) // stride_w
    k_steps = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (u, v, jh, jw, channel block) rather than five nested ones: the nest kept
    # every level's induction state and address vectors live (fp32 128x64 tiles spilled up to 640 B
    # on sm_80) and left Triton's pipeliner an inner loop of a few steps; flat, every step is one
    # cp.async-able load pair the pipeliner overlaps with the previous MMAs (issue #15).
    for step in range(0, UP * UP * taps_h * taps_w * k_steps):
        c0 = (step % k_steps) * BLOCK_K
        tap = step // k_steps
        jw = tap % taps_w
        jh = (tap // taps_w) % taps_h
        uv = tap // (taps_w * taps_h)
        dh = uv // UP - jh
        dw = uv % UP - jw
        ih = base_h + dh
        iw = base_w + dw
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ck = c0 + offs_k
        k_ok = ck < C_in
        x_rows = x_ptr + tl.where(row_ok, x_base + dh * s_xh + dw * s_xw, 0)
        a = tl.load(x_rows[:, None] + ck[None, :] * s_xc, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base[None, :] + (stride_h * jh) * s_wh + (stride_w * jw) * s_ww + ck[:, None] * s_wi,
                    mask=k_ok[:, None] & w_ok[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_FP32, TF32)
    n_ok = offs_n < C_out
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # The reference conv hands BatchNorm and the activation its output rounded to the tensor's dtype;
    # statistics of the unrounded accumulator would normalize the stored 16-bit z with a mean it never
    # had (a channel whose mean dwarfs its spread comes out all wrong). A no-op for fp32.
    acc = round_to(acc, y_ptr.dtype.element_ty)
    if STATS:
        store_tile_stats(acc, m_ok, offs_n, n_ok, phase * tl.num_programs(0) + pid_m, C_out,
                         cnt_ptr, pmean_ptr, pm2_ptr)
    acc = apply_activation(acc, ACT, slope)
    y_ptrs = y_ptr + (nb * s_yn + oh * s_yh + ow * s_yw)[:, None] + offs_n[None, :] * s_yc
    tl.store(y_ptrs, cast_rtne(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=configs(_WGRAD_GPU, _WGRAD_INTERPRET, pre_hook=zero_args("dw_ptr")),
                 key=["N", "CA", "P", "Q", "CB", "HB", "WB", "KH", "KW", "UP"])
@triton.jit
def _conv_weight_grad_kernel(
    a_ptr, b_ptr, dw_ptr,
    N, CA, P, Q, CB, HB, WB, KH, KW,           # A [N, CA, P, Q], B [N, CB, HB, WB], dw [CA, CB, KH, KW]
    stride_h, stride_w, pad_h, pad_w,
    s_an, s_ac, s_ah, s_aw, s_bn, s_bc, s_bh, s_bw,
    UP: tl.constexpr, DOT_FP32: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # channels of A
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # (channel of B, kh, kw) flattened
    offs_k = tl.arange(0, BLOCK_K)                     # (n, p, q) flattened: the reduction
    m_ok = offs_m < CA
    j_ok = offs_j < CB * KH * KW
    kw = offs_j % KW
    t = offs_j // KW
    kh = t % KH
    cb = t // KH
    R = N * P * Q
    # split-K: program pid_k reduces one contiguous chunk of the N*P*Q positions
    steps = tl.cdiv(tl.cdiv(R, BLOCK_K), tl.num_programs(2))
    r_start = pid_k * steps * BLOCK_K
    r_end = tl.minimum(r_start + steps * BLOCK_K, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        r = r0 + offs_k
        r_ok = r < r_end
        nb, p, q = pixel_coords(r, P, Q)
        a = tl.load(a_ptr + offs_m[:, None] * s_ac + (nb * s_an + p * s_ah + q * s_aw)[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        ihu = p[:, None] * stride_h - pad_h + kh[None, :]
        iwu = q[:, None] * stride_w - pad_w + kw[None, :]
        b_ok = (r_ok[:, None] & j_ok[None, :] & (ihu >= 0) & (ihu < HB * UP)
                & (iwu >= 0) & (iwu < WB * UP))
        ih = tl.where(b_ok, ihu, 0) // UP
        iw = tl.where(b_ok, iwu, 0) // UP
        b = tl.load(b_ptr + nb[:, None] * s_bn + cb[None, :] * s_bc + ih * s_bh + iw * s_bw,
                    mask=b_ok, other=0.0)
        acc = mma(a, b, acc, DOT_FP32, TF32)
    tl.atomic_add(dw_ptr + offs_m[:, None] * (CB * KH * KW) + offs_j[None, :], acc,
                  mask=m_ok[:, None] & j_ok[None, :])


def channels_last(t: torch.Tensor, pad: bool = False) -> torch.Tensor:
    """t with its channels at stride 1 (a copy unless it is channels_last already), with ``pad`` its
    channels zero-padded to a multiple of 16. The kernels gather channel rows; only rows Triton can
    prove contiguous and 16-byte aligned (a channel count it specializes as divisible by 16) load as
    vectors, and only loads of >= 4 contiguous bytes become the asynchronous copies (cp.async) its
    software pipeliner overlaps with the MMAs. NCHW or 3-channel 16-bit operands left the conv loops
    unpipelined; NCHW outputs and 1- or 3-channel inputs made fp32 tiles spill (issue #15's compile
    check). The copy costs one pass over the tensor; keeping the activations channels_last saves it
    for all but the image layers."""
    c = t.shape[1]
    if pad and c % 16:
        padded = torch.empty((t.shape[0], c + (-c) % 16, *t.shape[2:]), dtype=t.dtype, device=t.device,
                             memory_format=torch.channels_last)
        padded[:, :c] = t
        padded[:, c:].zero_()  # only the padding: the copy writes the rest
        return padded
    return t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """t's strides for a kernel, a channels_last t's canonical ones: a size-1 dim (the 1x1 pixels of
    G's first layer, a 1x1 kernel, batch 1) may carry any stride, and one of 1 there would hide from
    Triton that every pixel row starts 16 elements apart, which is what lets its 16-bit loads become
    cp.async (a stride-1 H, W left the MLP's GEMM-shaped transposed convs unpipelined)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        _, c, _, w = t.shape
        return t.shape[2] * w * c, 1, w * c, c
    return t.stride()


def _in_format_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernel's channels_last output y in x's memory format (the ops' contract)."""
    out = empty_like_format(x, y.shape, y.dtype)
    return y if out.stride() == y.stride() else out.copy_(y)


def _no_partials(device):
    # placeholders for the unused statistics pointers (the config pre_hook zeroes cnt_ptr)
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    return dummy, dummy, dummy


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, *, upsample: int = 1,
                   act: int = NONE, slope: float = 0.0, stats: bool = False, out_dtype=None,
                   tf32: bool | None = None):
    """Direct conv of x [N, Ci, H, W] (read as nearest-upsampled by ``upsample``) with weight
    [Co, Ci, KH, KW]. Returns (y in x's memory format, BatchNorm partials or None)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    OH, OW = conv2d_output_hw((H * upsample, W * upsample), (KH, KW), stride, padding)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"the kernel {KH}x{KW} is larger than the padded input "
                         f"{H * upsample + 2 * ph}x{W * upsample + 2 * pw}")
    # zero input channels add nothing: padding C_in to 16 changes no output
    x_given, x, weight = x, channels_last(x, pad=True), channels_last(weight, pad=True)
    C_in = x.shape[1]
    y = new_output((N, C_out, OH, OW), out_dtype or x.dtype, x.device, torch.channels_last)
    M = N * OH * OW
    partials = new_partials(triton.cdiv(M, _MIN_BLOCK_M), C_out, x.device) if stats else None
    cnt, pmean, pm2 = partials if stats else _no_partials(x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]))  # noqa: E731
    _conv2d_kernel[grid](
        x, weight, bias if bias is not None else weight, y, cnt, pmean, pm2,
        N, C_in, H, W, C_out, OH, OW, KH, KW, sh, sw, ph, pw,
        *strides(x), *strides(weight), *strides(y), float(slope),
        UP=upsample, HAS_BIAS=bias is not None, ACT=act, STATS=stats, DOT_FP32=INTERPRET,
        TF32=tf32_allowed(x) if tf32 is None else tf32, **COMPILE_OPTIONS)
    return _in_format_of(x_given, y), partials


def conv_transpose2d_forward(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, out_hw=None,
                             *, upsample: int = 1, act: int = NONE, slope: float = 0.0,
                             stats: bool = False, out_dtype=None, tf32: bool | None = None):
    """Transposed conv of x [N, Ci, H, W] with weight [Ci, Co, KH, KW]; ``out_hw`` fixes the output
    size (a strided conv's input gradient), else (H-1)*s - 2*pad + K. With ``upsample=2`` the result
    is summed over 2x2 blocks (the input gradient of nearest-x2 upsample + stride-1 conv, out_hw then
    being the low-resolution size). Returns (y in x's memory format, BatchNorm partials or None)."""
    N, C_in, H, W = x.shape
    _, C_out, KH, KW = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    if out_hw is None:
        out_hw = conv_transpose2d_output_hw((H, W), (KH, KW), stride, padding)
    OH, OW = out_hw
    if OH <= 0 or OW <= 0:
        raise ValueError(f"transposed conv output size {OH}x{OW} is not positive")
    if upsample > 1 and (sh, sw) != (1, 1):
        raise ValueError("the upsampled transposed conv supports stride 1 only")
    if H == 1 and W == 1 and upsample == 1:
        # A 1x1 input (G's first layer, z -> 4x4) meets each output pixel with exactly one tap,
        # whatever the stride: a stride >= the kernel puts every tap in its own phase, so the
        # layer runs as KH*KW dense [N x Ci] @ [Ci x Co] GEMMs with no masked-out tap iterations.
        sh, sw = max(sh, KH), max(sw, KW)
    x_given, x = x, channels_last(x, pad=True)
    # zero input channels add nothing; zero output channels past C_out are read, never stored
    C_w = C_out + (-C_out) % 16
    if (x.shape[1], C_w) != (C_in, C_out):
        padded = torch.empty((x.shape[1], C_w, KH, KW), dtype=weight.dtype, device=weight.device,
                             memory_format=torch.channels_last).zero_()
        padded[:C_in, :C_out] = weight
        weight = padded
    C_in, weight = x.shape[1], channels_last(weight)
    y = new_output((N, C_out, OH, OW), out_dtype or x.dtype, x.device, torch.channels_last)
    ph_rows, ph_cols = triton.cdiv(OH, sh), triton.cdiv(OW, sw)
    M = N * ph_rows * ph_cols
    tiles = triton.cdiv(M, _MIN_BLOCK_M) * sh * sw
    partials = new_partials(tiles, C_out, x.device) if stats else None
    cnt, pmean, pm2 = partials if stats else _no_partials(x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]), sh * sw)  # noqa: E731
    _conv_transpose2d_kernel[grid](
        x, weight, bias if bias is not None else weight, y, cnt, pmean, pm2,
        N, C_in, H, W, C_out, OH, OW, KH, KW, sh, sw, ph, pw, ph_rows, ph_cols, C_w,
        *strides(x), *strides(weight), *strides(y), float(slope),
        UP=upsample, HAS_BIAS=bias is not None, ACT=act, STATS=stats, DOT_FP32=INTERPRET,
        TF32=tf32_allowed(x) if tf32 is None else tf32, **COMPILE_OPTIONS)
    return _in_format_of(x_given, y), partials


def conv_weight_grad(a: torch.Tensor, b: torch.Tensor, kernel_hw, stride, padding, *,
                     upsample: int = 1, tf32: bool | None = None) -> torch.Tensor:
    """fp32 dW[CA, CB, KH, KW] = sum_{n,p,q} a[n, :, p, q] (x) b_up[n, :, p*s - pad + kh, q*s - pad + kw]
    where b_up is b nearest-upsampled by ``upsample``."""
    N, a_channels, P, Q = a.shape
    _, b_channels, HB, WB = b.shape
    KH, KW = kernel_hw
    (sh, sw), (ph, pw) = stride, padding
    # zero channels of a or b give zero rows / columns of dw, cut off at the end
    a, b = channels_last(a, pad=True), channels_last(b, pad=True)
    (_, CA, _, _), (_, CB, _, _) = a.shape, b.shape
    dw = torch.zeros((CA, CB, KH, KW), device=a.device, dtype=torch.float32)
    R = N * P * Q
    sms = num_sms(a.device)

    def grid(meta):
        tiles = triton.cdiv(CA, meta["BLOCK_M"]) * triton.cdiv(CB * KH * KW, meta["BLOCK_N"])
        # enough K splits to fill the GPU twice over, but each split keeps >= 4 reduction steps;
        # the interpreter (1 "SM") runs one split
        split = max(1, min(triton.cdiv(R, meta["BLOCK_K"] * 4), triton.cdiv(2 * sms, tiles)))
        return (triton.cdiv(CA, meta["BLOCK_M"]), triton.cdiv(CB * KH * KW, meta["BLOCK_N"]), split)

    _conv_weight_grad_kernel[grid](
        a, b, dw, N, CA, P, Q, CB, HB, WB, KH, KW, sh, sw, ph, pw, *strides(a), *strides(b),
        UP=upsample, DOT_FP32=INTERPRET, TF32=tf32_allowed(a) if tf32 is None else tf32, **COMPILE_OPTIONS)
    return dw if (a_channels, b_channels) == (CA, CB) else dw[:a_channels, :b_channels].contiguous()
