"""Training- and eval-mode BatchNorm pieces shared by the fused conv / linear + BN + activation ops.

Forward: the producing GEMM's epilogue calls ``store_tile_stats`` with its fp32 accumulator, so the
batch statistics come from registers instead of a second read of the conv output. Each tile stores
its row count, mean and centred sum of squares (M2) per channel into a [tiles, C] partials buffer;
``bn_finalize`` merges the tiles with Chan et al.'s parallel variance formula (1979, "Updating
formulae and a pairwise algorithm for computing sample variances"), which, unlike
E[z^2] - E[z]^2, does not cancel when |mean| >> std. It also updates the running statistics (unbiased
variance, momentum) exactly as torch.nn.functional.batch_norm and folds gamma, beta, mean and invstd
into one per-channel scale and shift, so normalize + activation is one pointwise pass.

Backward: one pass reduces sum(dyb) and sum(dyb * xhat) per channel (dyb = dy through the activation
mask, recomputed from the saved conv output z instead of saving xhat), a second writes
dz = gamma * invstd * (dyb - mean(dyb) - xhat * mean(dyb * xhat)), the standard BatchNorm gradient
(Ioffe & Szegedy 2015), which feeds the conv's dgrad and wgrad GEMMs.

``BatchNormFunction`` is the autograd.Function of all four ops; each op file supplies its
``BatchNormOp`` (its producer's forward and backward, and its reference composition).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import differentiable_backward, refuse_double_backward_of_sync_bn
from ._activation import activation_grad, apply_activation
from ._common import (BLOCK_CHANNELS, BLOCK_ROWS, COMPILE_OPTIONS, INTERPRET, cast_rtne, grad_of, new_output,
                      new_output_like, rows_channels_tile, rows_grid, tile_pointers)


@triton.jit
def store_tile_stats(acc, row_ok, cols, col_ok, tile, C, cnt_ptr, mean_ptr, m2_ptr):
    """Per-channel (count, mean, M2) of the valid rows of an fp32 [rows, channels] tile, stored at
    row ``tile`` of the [tiles, C] partials."""
    rowf = row_ok.to(tl.float32)
    cnt = tl.sum(rowf, axis=0)
    mean = tl.sum(acc * rowf[:, None], axis=0) / tl.maximum(cnt, 1.0)
    d = (acc - mean[None, :]) * rowf[:, None]
    m2 = tl.sum(d * d, axis=0)
    off = tile * C + cols
    tl.store(cnt_ptr + off, mean * 0.0 + cnt, mask=col_ok)
    tl.store(mean_ptr + off, mean, mask=col_ok)
    tl.store(m2_ptr + off, m2, mask=col_ok)


@triton.jit
def _bn_finalize_kernel(
    cnt_ptr, pmean_ptr, pm2_ptr,         # [T, C] fp32 partials (training only)
    gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr,   # [C]
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # [C] fp32 outputs
    T, C, momentum, eps,
    TRAINING: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_BETA: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if TRAINING:
        n = tl.zeros((BLOCK_C,), tl.float32)
        mean = tl.zeros((BLOCK_C,), tl.float32)
        m2 = tl.zeros((BLOCK_C,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            ok = (rows < T)[:, None] & c_ok[None, :]
            off = rows[:, None] * C + cols[None, :]
            cnt = tl.load(cnt_ptr + off, mask=ok, other=0.0)
            has = cnt > 0
            # rows never written (count 0) may hold anything: select, never multiply, them away
            pm = tl.where(has, tl.load(pmean_ptr + off, mask=ok, other=0.0), 0.0)
            pm2 = tl.where(has, tl.load(pm2_ptr + off, mask=ok, other=0.0), 0.0)
            nb = tl.sum(cnt, axis=0)
            mb = tl.sum(cnt * pm, axis=0) / tl.maximum(nb, 1.0)
            dm = tl.where(has, pm - mb[None, :], 0.0)
            m2b = tl.sum(pm2 + cnt * dm * dm, axis=0)
            # merge this block of tiles into the running (n, mean, M2)
            ntot = n + nb
            delta = mb - mean
            frac = nb / tl.maximum(ntot, 1.0)
            mean = mean + delta * frac
            m2 = m2 + m2b + delta * delta * n * frac
            n = ntot
        var = m2 / tl.maximum(n, 1.0)
        if UPDATE_RUNNING:
            rm = tl.load(rmean_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            rv = tl.load(rvar_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
            unbiased = m2 / tl.maximum(n - 1.0, 1.0)
            tl.store(rmean_ptr + cols, ((1.0 - momentum) * rm + momentum * mean)
                     .to(rmean_ptr.dtype.element_ty), mask=c_ok)
            tl.store(rvar_ptr + cols, ((1.0 - momentum) * rv + momentum * unbiased)
                     .to(rvar_ptr.dtype.element_ty), mask=c_ok)
    else:
        mean = tl.load(rmean_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    if HAS_AFFINE:
        gamma = tl.load(gamma_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
    else:
        gamma = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_BETA:
        beta = tl.load(beta_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros((BLOCK_C,), tl.float32)
    scale = gamma * invstd
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(invstd_ptr + cols, invstd, mask=c_ok)
    tl.store(scale_ptr + cols, scale, mask=c_ok)
    tl.store(shift_ptr + cols, beta - mean * scale, mask=c_ok)


class BatchNormStats:
    """Per-channel fp32 statistics of one forward pass: what normalize and backward need. ``count`` is
    the number of values per channel the statistics cover (over every rank when synchronised);
    ``process_group`` is set when they are synchronised (SyncBatchNorm), so backward reduces over the
    same group."""

    def __init__(self, mean, invstd, scale, shift, count, process_group=None):
        self.mean, self.invstd, self.scale, self.shift, self.count = mean, invstd, scale, shift, count
        self.process_group = process_group

    def tensors(self):
        return self.mean, self.invstd, self.scale, self.shift


def new_partials(tiles: int, channels: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed (count, mean, M2) partials for ``tiles`` tiles of ``channels`` channels."""
    return tuple(torch.zeros((max(tiles, 1), channels), device=device, dtype=torch.float32)
                 for _ in range(3))


def sync_partials(partials, process_group):
    """This rank's tile partials merged to one (count, mean, M2) per channel, then merged over every
    rank of ``process_group`` (gan_fast.distributed.merge_moments_over_ranks): one row of partials
    for ``bn_finalize``."""
    from ...distributed import merge_moments_over_ranks

    cnt, pmean, pm2 = partials
    has = cnt > 0  # rows no tile wrote (autotune runs of smaller tiles) hold nothing to merge
    n = cnt.sum(0)
    mean = torch.where(has, cnt * pmean, 0.0).sum(0) / n.clamp_min(1.0)
    m2 = torch.where(has, pm2 + cnt * (pmean - mean) ** 2, 0.0).sum(0)
    n, mean, m2 = merge_moments_over_ranks(n, mean, m2, process_group)
    return n[None], mean[None], m2[None]


def bn_finalize(partials, channels: int, count: int, bn_weight, bn_bias, running_mean, running_var,
                training: bool, momentum: float, eps: float, device, process_group=None) -> BatchNormStats:
    """Batch (training) or running (eval) statistics -> per-channel mean, invstd, scale, shift; in
    training also updates running_mean / running_var in place. With ``process_group`` (training only)
    the batch statistics are those of the union of every rank's batch (SyncBatchNorm); ranks are
    assumed to hold batches of equal size for the backward's 1/count (the trainer's are)."""
    if training and process_group is not None:
        import torch.distributed as dist

        partials = sync_partials(partials, process_group)
        count = count * dist.get_world_size(process_group)
    else:
        process_group = None
    out = [new_output(channels, torch.float32, device) for _ in range(4)]
    dummy = out[0]
    cnt, pmean, pm2 = partials if partials is not None else (dummy, dummy, dummy)
    block_c = 64 if INTERPRET else 128
    _bn_finalize_kernel[(triton.cdiv(channels, block_c),)](
        cnt, pmean, pm2,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy,
        running_mean if running_mean is not None else dummy,
        running_var if running_var is not None else dummy,
        *out, cnt.shape[0] if partials is not None else 0, channels, float(momentum), float(eps),
        TRAINING=training, HAS_AFFINE=bn_weight is not None, HAS_BETA=bn_bias is not None,
        UPDATE_RUNNING=training and running_mean is not None,
        BLOCK_T=64 if INTERPRET else 32, BLOCK_C=block_c, **COMPILE_OPTIONS)
    return BatchNormStats(*out, count, process_group)


@triton.jit
def _normalize_activate(z, scale_ptr, shift_ptr, cols, c_ok, slope, ACT: tl.constexpr):
    """act(z * scale + shift) for a [rows, channels] tile: the forward's output, and the backward's
    recomputation of it with the same arithmetic (so the activation mask matches the one torch would
    take from the saved output)."""
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=c_ok, other=0.0)
    return apply_activation(z * scale[None, :] + shift[None, :], ACT, slope)


@triton.jit
def _bn_activation_forward_kernel(
    z_ptr, y_ptr, scale_ptr, shift_ptr,
    ROWS, C, HW, W,
    s_zn, s_zc, s_zh, s_zw, s_yn, s_yc, s_yh, s_yw,
    slope,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # y = act(z * scale + shift): BatchNorm and the activation in one read and one write of z.
    rows, cols, c_ok, ok = rows_channels_tile(ROWS, C, BLOCK_R, BLOCK_C)
    z = tl.load(tile_pointers(z_ptr, rows, cols, HW, W, s_zn, s_zc, s_zh, s_zw), mask=ok,
                other=0.0).to(tl.float32)
    y = _normalize_activate(z, scale_ptr, shift_ptr, cols, c_ok, slope, ACT)
    tl.store(tile_pointers(y_ptr, rows, cols, HW, W, s_yn, s_yc, s_yh, s_yw),
             cast_rtne(y, y_ptr.dtype.element_ty), mask=ok)


def bn_activation_forward(z: torch.Tensor, stats: BatchNormStats, act: int, slope: float,
                          out: torch.Tensor) -> torch.Tensor:
    """out = act(BN(z)) for 4-D z (a linear layer's [N, C] is viewed as [N, C, 1, 1])."""
    N, C, H, W = z.shape
    _bn_activation_forward_kernel[rows_grid(z)](
        z, out, stats.scale, stats.shift, N * H * W, C, H * W, W, *z.stride(), *out.stride(), slope,
        ACT=act, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, **COMPILE_OPTIONS)
    return out


@triton.jit
def _load_dyb_xhat(dy_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, rows, cols, c_ok, ok,
                   HW, W, s_dyn, s_dyc, s_dyh, s_dyw, s_zn, s_zc, s_zh, s_zw, slope, ACT: tl.constexpr):
    """(dyb, xhat) of a [rows, channels] tile: dy through the activation's mask, and the normalized z."""
    dy = tl.load(tile_pointers(dy_ptr, rows, cols, HW, W, s_dyn, s_dyc, s_dyh, s_dyw), mask=ok,
                 other=0.0).to(tl.float32)
    z = tl.load(tile_pointers(z_ptr, rows, cols, HW, W, s_zn, s_zc, s_zh, s_zw), mask=ok,
                other=0.0).to(tl.float32)
    y = _normalize_activate(z, scale_ptr, shift_ptr, cols, c_ok, slope, ACT)
    dyb = tl.where(ok, activation_grad(dy, y, ACT, slope), 0.0)
    mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0)
    return dyb, (z - mean[None, :]) * invstd[None, :]


@triton.jit
def _bn_activation_backward_reduce_kernel(
    dy_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    ROWS, C, HW, W,
    s_dyn, s_dyc, s_dyh, s_dyw, s_zn, s_zc, s_zh, s_zw,
    slope,
    ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, c_ok, ok = rows_channels_tile(ROWS, C, BLOCK_R, BLOCK_C)
    dyb, xhat = _load_dyb_xhat(dy_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, rows, cols, c_ok,
                               ok, HW, W, s_dyn, s_dyc, s_dyh, s_dyw, s_zn, s_zc, s_zh, s_zw, slope, ACT)
    tl.atomic_add(sum_dy_ptr + cols, tl.sum(dyb, axis=0), mask=c_ok)
    tl.atomic_add(sum_dy_xhat_ptr + cols, tl.sum(tl.where(ok, dyb * xhat, 0.0), axis=0), mask=c_ok)


@triton.jit
def _bn_activation_backward_dz_kernel(
    dy_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    dz_ptr, dbias_ptr,
    ROWS, C, HW, W,
    s_dyn, s_dyc, s_dyh, s_dyw, s_zn, s_zc, s_zh, s_zw, s_dzn, s_dzc, s_dzh, s_dzw,
    slope, inv_count,
    ACT: tl.constexpr, TRAINING: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, c_ok, ok = rows_channels_tile(ROWS, C, BLOCK_R, BLOCK_C)
    dyb, xhat = _load_dyb_xhat(dy_ptr, z_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, rows, cols, c_ok,
                               ok, HW, W, s_dyn, s_dyc, s_dyh, s_dyw, s_zn, s_zc, s_zh, s_zw, slope, ACT)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)  # gamma * invstd
    if TRAINING:
        # batch statistics depend on every sample: subtract the mean gradient and its projection
        # on xhat
        mdy = tl.load(sum_dy_ptr + cols, mask=c_ok, other=0.0) * inv_count
        mdyx = tl.load(sum_dy_xhat_ptr + cols, mask=c_ok, other=0.0) * inv_count
        dz = (dyb - mdy[None, :] - xhat * mdyx[None, :]) * scale[None, :]
    else:
        dz = dyb * scale[None, :]
    tl.store(tile_pointers(dz_ptr, rows, cols, HW, W, s_dzn, s_dzc, s_dzh, s_dzw),
             cast_rtne(dz, dz_ptr.dtype.element_ty), mask=ok)
    if BIAS_GRAD:
        # the gradient of a bias added before BatchNorm (Linear's): sum of dz, ~0 in training
        tl.atomic_add(dbias_ptr + cols, tl.sum(tl.where(ok, dz, 0.0), axis=0), mask=c_ok)


def bn_activation_backward(dy: torch.Tensor, z: torch.Tensor, stats: BatchNormStats, act: int,
                           slope: float, training: bool, bias_grad: bool = False):
    """(dz, dgamma fp32 [C], dbeta fp32 [C]) for y = act(BN(z)); 4-D tensors of any strides. With
    ``bias_grad`` a fourth item, the fp32 [C] gradient of a bias added to z's producer."""
    N, C, H, W = z.shape
    sums = torch.zeros((2, C), device=z.device, dtype=torch.float32)  # sum(dyb), sum(dyb * xhat)
    grid = rows_grid(z)
    common = (N * H * W, C, H * W, W, *dy.stride(), *z.stride())
    _bn_activation_backward_reduce_kernel[grid](
        dy, z, *stats.tensors(), sums[0], sums[1], *common, slope,
        ACT=act, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, **COMPILE_OPTIONS)
    total = sums
    if stats.process_group is not None:
        from ...distributed import sum_over_ranks

        total = sum_over_ranks(sums, stats.process_group)
    dz = new_output_like(z)
    dbias = torch.zeros(C, device=z.device, dtype=torch.float32) if bias_grad else total[0]
    _bn_activation_backward_dz_kernel[grid](
        dy, z, *stats.tensors(), total[0], total[1], dz, dbias, *common, *dz.stride(), slope,
        1.0 / stats.count, ACT=act, TRAINING=training, BIAS_GRAD=bias_grad,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, **COMPILE_OPTIONS)
    # gamma and beta get this rank's own sums even when synchronised (see sum_over_ranks)
    if bias_grad:
        return dz, sums[1], sums[0], dbias
    return dz, sums[1], sums[0]


# ---- the autograd.Function of the four producer (conv / linear) + BatchNorm + activation ops

class BatchNormOp(NamedTuple):
    """One producer + BatchNorm + activation op, as BatchNormFunction runs it. ``inputs`` are the op's
    tensor arguments before the running statistics, (x, weight, [bias,] bn_weight, bn_bias); ``conf``
    its own keyword arguments (stride, padding, negative_slope: those of its reference)."""
    # (*inputs, running_mean, running_var, training, momentum, eps, process_group, **conf)
    # -> (y, the producer's output z, BatchNormStats)
    forward: Callable
    # (dy, inputs, z, stats, training, needs_input_grad of inputs, **conf) -> a gradient per input
    backward: Callable
    # reference.py's composition, for second-order gradients
    reference: Callable


class BatchNormFunction(torch.autograd.Function):
    """apply(op, conf, training, momentum, eps, process_group, running_mean, running_var, *inputs).

    Saved for backward: the inputs, the producer's output z and the statistics' four [C] vectors;
    BatchNorm's xhat and the activation's mask are recomputed from z."""

    @staticmethod
    def forward(ctx, op: BatchNormOp, conf: dict, training, momentum, eps, process_group, running_mean,
                running_var, *inputs):
        y, z, stats = op.forward(*inputs, running_mean, running_var, training, momentum, eps, process_group,
                                 **conf)
        ctx.save_for_backward(*inputs, z, *stats.tensors())
        ctx.op, ctx.conf, ctx.bn = op, conf, (training, eps, stats.count, stats.process_group)
        # What a second-order backward needs to replay an eval-mode forward: copies of the running
        # statistics it normalized with (later training steps update the originals in place).
        # Training mode replays from the batch alone.
        replay_eval = not training and running_mean is not None
        ctx.eval_stats = (running_mean.detach().clone(), running_var.detach().clone()) if replay_eval else \
            (None, None)
        return y

    @staticmethod
    def backward(ctx, dy):
        *inputs, z, mean, invstd, scale, shift = ctx.saved_tensors
        training, eps, count, group = ctx.bn
        leading = len(ctx.needs_input_grad) - len(inputs)  # op, conf, ..., running_var
        needs = ctx.needs_input_grad[leading:]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            if group is not None:  # synchronised statistics can't be replayed
                refuse_double_backward_of_sync_bn("triton")
            replay = partial(ctx.op.reference, training=training, momentum=0.0, eps=eps, **ctx.conf)
            grads = differentiable_backward(replay, (*inputs, *ctx.eval_stats), (dy,), (*needs, False, False))
        else:
            stats = BatchNormStats(mean, invstd, scale, shift, count, group)
            grads = ctx.op.backward(dy, inputs, z, stats, training, needs, **ctx.conf)
            # fp32 parameter gradients in their parameters' dtypes
            grads = [grad_of(g, t) if need else None for g, t, need in zip(grads, inputs, needs)]
        return (*[None] * leading, *grads[:len(inputs)])
