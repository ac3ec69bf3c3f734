"""binary_cross_entropy_with_logits(logits, target), mean reduction, forward and backward in Triton.

Stable for any logit: loss = (1 - t)*l - min(l, 0) + log1p(exp(-|l|)) never exponentiates a positive
number, and log1p is evaluated accurately for tiny arguments (below), so confident logits keep their
small losses instead of rounding them to 0. The mean is reduced in fp32 with one atomic add per
block. The backward reads the incoming loss gradient through a pointer, so no host sync is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..reference import differentiable_backward, loss_dtype
from ._common import COMPILE_OPTIONS, INTERPRET, cast_rtne, check_input, check_tensor, new_output

_BLOCK = 1024 if not INTERPRET else 4096


@triton.jit
def log1p_fp32(u):
    # log(1 + u) for u in [0, 1] without losing u when 1 + u rounds: the correction factor
    # u / ((1 + u) - 1) undoes the rounding of 1 + u (Goldberg 1991, "What every computer scientist
    # should know about floating-point arithmetic", theorem 4)
    v = 1.0 + u
    d = v - 1.0
    return tl.where(d == 0.0, u, tl.log(v) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def bce_with_logits_fp32(logit, target):
    # (1 - t) * l - log_sigmoid(l), with log_sigmoid(l) = min(l, 0) - log1p(exp(-|l|)): torch's own
    # arrangement, so an infinite logit gives the reference's inf (l = +inf, t = 0) rather than the
    # NaN of max(l, 0) - l * t
    return (1.0 - target) * logit - tl.minimum(logit, 0.0) + log1p_fp32(tl.exp(-tl.abs(logit)))


@triton.jit
def sigmoid_fp32(v):
    e = tl.exp(-tl.abs(v))  # never overflows
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _bce_forward_kernel(logit_ptr, target_ptr, loss_ptr, numel, inv_numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    logit = tl.load(logit_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    loss = tl.where(ok, bce_with_logits_fp32(logit, target), 0.0)
    tl.atomic_add(loss_ptr, tl.sum(loss, axis=0) * inv_numel)


@triton.jit
def _bce_backward_kernel(logit_ptr, target_ptr, grad_loss_ptr, dlogit_ptr, dtarget_ptr, numel,
                         inv_numel, TARGET_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # d/dl = (sigmoid(l) - t) / numel, d/dt = -l / numel, both times the incoming gradient
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(grad_loss_ptr).to(tl.float32) * inv_numel
    logit = tl.load(logit_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dlogit_ptr + offs, cast_rtne((sigmoid_fp32(logit) - target) * g, dlogit_ptr.dtype.element_ty),
             mask=ok)
    if TARGET_GRAD:
        tl.store(dtarget_ptr + offs, cast_rtne(-logit * g, dtarget_ptr.dtype.element_ty), mask=ok)


def bce_forward(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fp32 scalar mean loss of flat contiguous logits and target of equal numel."""
    loss = torch.zeros((), device=logits.device, dtype=torch.float32)
    n = logits.numel()
    _bce_forward_kernel[(triton.cdiv(n, _BLOCK),)](logits, target, loss, n, 1.0 / n, BLOCK=_BLOCK,
                                                   **COMPILE_OPTIONS)
    return loss


def bce_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 logit_dtype: torch.dtype, target_grad: bool):
    """(dlogits, dtarget or None), flat, for flat contiguous logits and target."""
    n = logits.numel()
    dlogits = new_output(n, logit_dtype, logits.device)
    dtarget = new_output(n, target.dtype, logits.device) if target_grad else dlogits
    _bce_backward_kernel[(triton.cdiv(n, _BLOCK),)](
        logits, target, grad_loss.contiguous(), dlogits, dtarget, n, 1.0 / n,
        TARGET_GRAD=target_grad, BLOCK=_BLOCK, **COMPILE_OPTIONS)
    return dlogits, (dtarget if target_grad else None)


class BCEWithLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        flat_logits = logits.reshape(-1).contiguous()
        flat_target = target.expand(logits.shape).reshape(-1).contiguous()
        ctx.save_for_backward(logits, target, flat_logits, flat_target)
        ctx.shapes = (logits.shape, target.shape, target.dtype)
        out_dtype = loss_dtype(logits.dtype, target.dtype)
        return bce_forward(flat_logits, flat_target).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, flat_logits, flat_target = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return tuple(differentiable_backward(reference.bce_with_logits, (logits, target), (grad_loss,),
                                                 ctx.needs_input_grad))
        logit_shape, target_shape, target_dtype = ctx.shapes
        dlogits, dtarget = bce_backward(grad_loss, flat_logits, flat_target, flat_logits.dtype,
                                        ctx.needs_input_grad[1])
        if dtarget is not None:
            dtarget = dtarget.view(logit_shape).sum_to_size(target_shape).to(target_dtype)
        return dlogits.view(logit_shape), dtarget


def check_target(target, like: torch.Tensor, shape) -> None:
    check_tensor(target, "target", device=like.device)
    try:
        torch.broadcast_shapes(target.shape, shape)
    except RuntimeError:
        raise ValueError(f"target of shape {tuple(target.shape)} does not broadcast to the logits' "
                         f"shape {tuple(shape)}") from None
    if torch.broadcast_shapes(target.shape, shape) != torch.Size(shape):
        raise ValueError(f"target of shape {tuple(target.shape)} would broadcast the logits' shape "
                         f"{tuple(shape)}")


def bce_with_logits(logits, target):
    """binary_cross_entropy_with_logits(logits, target) with mean reduction, fused; target may be
    hard 0/1 or soft labels broadcastable to logits. See docs/ops.md."""
    check_input(logits, "logits", logits.dim() if isinstance(logits, torch.Tensor) else 1)
    check_target(target, logits, logits.shape)
    return BCEWithLogitsFunction.apply(logits, target)
