"""The ext backend's BatchNorm + activation under SyncBatchNorm (gan_fast.backends.ext._bn_act with a
process group): statistics over every rank, the extension's bn_act / bn_update_stats_ kernels for the
per-element work. gan_fast.backends.ext checks that the extension loaded before it calls this."""
from __future__ import annotations

import torch

from .reference import ACT_LEAKY_RELU, ACT_RELU, loss_dtype, refuse_double_backward_of_sync_bn

__all__ = ["SyncBatchNormAct"]


class SyncBatchNormAct(torch.autograd.Function):
    """BatchNorm + activation with statistics over every rank of ``process_group`` (SyncBatchNorm).

    Forward: this rank's (count, mean, M2) per channel, one all-gather, Chan et al.'s merge (no
    cancellation, unlike summing squares), then the extension's bn_act normalizes with the merged
    statistics and bn_update_stats_ updates the running ones. Backward: the activation mask and this
    rank's sum(dy) and sum(dy * xhat), one all-reduce, and the BatchNorm input gradient over the global
    count; gamma and beta get this rank's own sums, which DDP averages, as nn.SyncBatchNorm does
    (torch/nn/modules/_functions.py). The reductions here are torch ops around the collective; ranks
    hold batches of equal size."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, slope, group):
        import torch.distributed as dist

        from ..distributed import merge_moments_over_ranks

        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.to(loss_dtype(x.dtype)), dim=dims, correction=0)  # the kernels' accumulation dtype
        n = x.numel() // x.shape[1]
        total, mean, m2 = merge_moments_over_ranks(torch.full_like(mean, n), mean, var * n, group)
        var = m2 / total
        world = dist.get_world_size(group)
        ops = torch.ops.gan_fast
        # the eval-mode path of bn_act normalizes with the statistics it is given: the global ones
        stat_dtype = running_mean.dtype if running_mean is not None else mean.dtype
        y = ops.bn_act(x, weight, bias, mean.to(stat_dtype), var.to(stat_dtype), False, eps, act, slope)[0]
        if running_mean is not None:
            ops.bn_update_stats_(running_mean, running_var, mean, var, momentum, n * world)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.conf = (eps, act, slope, group, n * world)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..distributed import sum_over_ranks

        refuse_double_backward_of_sync_bn("ext")
        x, weight, bias, mean, var = ctx.saved_tensors
        eps, act, slope, group, count = ctx.conf
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        acc = mean.dtype
        invstd = torch.rsqrt(var + eps)
        xhat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        gamma = weight.to(acc).view(shape) if weight is not None else torch.ones(shape, dtype=acc, device=x.device)
        dyb = dy.to(acc)
        if act in (ACT_RELU, ACT_LEAKY_RELU):  # the mask of the forward's output, recomputed
            pre = xhat * gamma + (bias.to(acc).view(shape) if bias is not None else 0.0)
            dyb = torch.where(pre > 0, dyb, dyb * (0.0 if act == ACT_RELU else slope))
        local = torch.stack([dyb.sum(dims), (dyb * xhat).sum(dims)])
        sums = sum_over_ranks(local, group)
        dx = (gamma * invstd.view(shape)) * (dyb - sums[0].view(shape) / count
                                            - xhat * sums[1].view(shape) / count)
        need = ctx.needs_input_grad
        return (dx.to(x.dtype) if need[0] else None,
                local[1].to(weight.dtype) if weight is not None and need[1] else None,
                local[0].to(bias.dtype) if bias is not None and need[2] else None,
                None, None, None, None, None, None, None)
