"""The discriminator head fused with its loss: Conv2d(C -> 1, kernel = the input's spatial size,
stride 1, no padding, no bias), i.e. one dot product per sample, then mean BCE-with-logits.

Forward: a GEMV kernel reduces each sample's C*H*W products in fp32 (tiles of samples x features,
partial dot products atomically added into fp32 logits), then the BCE kernel reduces the mean loss
from those fp32 logits (never rounded to bf16 / fp16 on the way). Backward: the BCE kernel gives
dL/dlogit per sample; one kernel writes dx = dlogit (x) w and reduces dw = sum_n dlogit[n] * x[n] in
the same read of x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..reference import differentiable_backward, loss_dtype
from ._common import (COMPILE_OPTIONS, INTERPRET, cast_rtne, check_input, check_weight, new_output_like,
                      strided_offset)
from .bce_with_logits import bce_backward, bce_forward, check_target

_BLOCK_N, _BLOCK_K = (16, 256) if INTERPRET else (16, 128)


@triton.jit
def _features(x_ptr, rows, k, HW, W, s_xn, s_xc, s_xh, s_xw):
    # pointers to x[rows, k] with the feature index k = (c, h, w) flattened in NCHW order
    return x_ptr + rows[:, None] * s_xn + strided_offset(k, HW, W, s_xc, s_xh, s_xw)[None, :]


@triton.jit
def _d_head_logits_kernel(
    x_ptr, w_ptr, logit_ptr,
    N, CHW, HW, W,                           # x [N, C, H, W], w [1, C, H, W], logits fp32 [N]
    s_xn, s_xc, s_xh, s_xw, s_wc, s_wh, s_ww,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_ok = rows < N
    k_ok = k < CHW
    ok = r_ok[:, None] & k_ok[None, :]
    x = tl.load(_features(x_ptr, rows, k, HW, W, s_xn, s_xc, s_xh, s_xw), mask=ok,
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + strided_offset(k, HW, W, s_wc, s_wh, s_ww), mask=k_ok, other=0.0)
    tl.atomic_add(logit_ptr + rows, tl.sum(x * w.to(tl.float32)[None, :], axis=1), mask=r_ok)


@triton.jit
def _d_head_backward_kernel(
    x_ptr, w_ptr, dlogit_ptr, dx_ptr, dw_ptr,
    N, CHW, HW, W,
    s_xn, s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, s_dxn, s_dxc, s_dxh, s_dxw, s_dwc, s_dwh, s_dww,
    X_GRAD: tl.constexpr, W_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per feature block walks the batch: dx rows written as it goes, dw kept in registers
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < CHW
    w = tl.load(w_ptr + strided_offset(k, HW, W, s_wc, s_wh, s_ww), mask=k_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_K,), tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < N
        ok = r_ok[:, None] & k_ok[None, :]
        g = tl.load(dlogit_ptr + rows, mask=r_ok, other=0.0)
        if X_GRAD:
            tl.store(_features(dx_ptr, rows, k, HW, W, s_dxn, s_dxc, s_dxh, s_dxw),
                     cast_rtne(g[:, None] * w[None, :], dx_ptr.dtype.element_ty), mask=ok)
        if W_GRAD:
            x = tl.load(_features(x_ptr, rows, k, HW, W, s_xn, s_xc, s_xh, s_xw), mask=ok,
                        other=0.0).to(tl.float32)
            dw += tl.sum(x * g[:, None], axis=0)
    if W_GRAD:
        tl.store(dw_ptr + strided_offset(k, HW, W, s_dwc, s_dwh, s_dww),
                 cast_rtne(dw, dw_ptr.dtype.element_ty), mask=k_ok)


def d_head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [N] of the full-size 1-channel conv."""
    N, C, H, W = x.shape
    logits = torch.zeros(N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, _BLOCK_N), triton.cdiv(C * H * W, _BLOCK_K))
    _d_head_logits_kernel[grid](x, weight, logits, N, C * H * W, H * W, W, *x.stride(),
                                *weight.stride()[1:], BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, **COMPILE_OPTIONS)
    return logits


def d_head_backward(dlogits: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs):
    N, C, H, W = x.shape
    dx = new_output_like(x) if needs[0] else None
    dw = new_output_like(weight) if needs[1] else None
    dx_arg = dx if dx is not None else x
    dw_arg = dw if dw is not None else weight
    _d_head_backward_kernel[(triton.cdiv(C * H * W, _BLOCK_K),)](
        x, weight, dlogits, dx_arg, dw_arg, N, C * H * W, H * W, W,
        *x.stride(), *weight.stride()[1:], *dx_arg.stride(), *dw_arg.stride()[1:],
        X_GRAD=needs[0], W_GRAD=needs[1], BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, **COMPILE_OPTIONS)
    return dx, dw


class DHeadBCEWithLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target):
        logits = d_head_logits(x, weight)
        flat_target = target.expand(logits.shape).contiguous()
        ctx.save_for_backward(x, weight, target, logits, flat_target)
        ctx.target_meta = (target.shape, target.dtype)
        loss = bce_forward(logits, flat_target).to(loss_dtype(x.dtype, target.dtype))
        out_logits = logits.to(x.dtype)
        ctx.mark_non_differentiable(out_logits)
        return loss, out_logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits):
        x, weight, target, logits, flat_target = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return tuple(differentiable_backward(reference.d_head_bce_with_logits, (x, weight, target),
                                                 (grad_loss, None), ctx.needs_input_grad))
        target_shape, target_dtype = ctx.target_meta
        dlogits, dtarget = bce_backward(grad_loss, logits, flat_target, torch.float32,
                                        ctx.needs_input_grad[2])
        dx, dw = d_head_backward(dlogits, x, weight, ctx.needs_input_grad[:2])
        if dtarget is not None:
            dtarget = dtarget.sum_to_size(target_shape).to(target_dtype)
        return dx, dw, dtarget


def d_head_bce_with_logits(x, weight, target):
    """(mean BCE-with-logits of conv2d(x, weight).view(-1) against target, those logits [N]), fused;
    weight [1, C, H, W] spans x's whole spatial size. See docs/ops.md."""
    check_input(x, "x", 4)
    check_weight(x, weight, 1)
    if tuple(weight.shape) != (1, *x.shape[1:]):
        raise ValueError(f"the D head weight must have shape (1, C, H, W) = {(1, *x.shape[1:])} to "
                         f"produce one logit per sample, got {tuple(weight.shape)}")
    check_target(target, x, (x.shape[0],))
    return DHeadBCEWithLogitsFunction.apply(x, weight, target)
