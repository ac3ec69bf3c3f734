"""Data-parallel training under torchrun: ``torchrun --nproc_per_node N -m gan_fast.train ...``.

What a rank does, and why:
- the process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR);
  NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK), gloo on CPU;
- G and D are wrapped in DistributedDataParallel with ``broadcast_buffers=False``: a GAN step runs D
  three times (real, fake, fake for G) and G once before the backward passes, and re-broadcasting the
  BatchNorm buffers at each forward writes them in place while autograd still holds them (the choice
  stylegan2-ada-pytorch makes too). Ranks then keep their own running statistics unless --sync-bn
  makes them equal; checkpoints hold rank 0's;
- each rank reads its own rows of every global batch (global batch = --batch-size x world size, the
  same permutation on every rank) and draws the noise of the whole global batch, keeping its rows:
  with --sync-bn the run is the same as one process with the global batch, and a run resumed with
  another world size continues the same data and noise streams;
- rank 0 alone writes grids, metrics, plots and checkpoints; logged statistics are averaged over ranks;
- a stop request (Ctrl-C / SIGTERM on any rank) is agreed on by all ranks at the same step, so no rank
  waits forever in a collective; an exception on one rank ends the job (torchrun stops the others).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_arg: str) -> tuple[DistContext, str]:
    """Join the process group torchrun set up; returns (context, the device this rank uses)."""
    if not launched_by_torchrun():
        return SINGLE, device_arg
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_arg in ("auto", "cuda") and torch.cuda.is_available()
    if device_arg.startswith("cuda:"):
        raise ValueError("under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda or auto")
    if use_cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {ctx.local_rank} but this node has {torch.cuda.device_count()} "
                             "CUDA device(s); lower --nproc_per_node")
        torch.cuda.set_device(ctx.local_rank)
        device = f"cuda:{ctx.local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return ctx, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """model in DistributedDataParallel (see the module comment for broadcast_buffers)."""
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    ids = [device.index] if device.type == "cuda" else None
    # torch >= 2.13 names it forward_sync_buffers (buffers still synced once at construction, which
    # is what we want: every rank starts from rank 0's state); older torch: broadcast_buffers
    no_forward_sync = ("forward_sync_buffers" if "forward_sync_buffers"
                       in inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=ids, **{no_forward_sync: False})


def mean_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    return sum_over_ranks(t, None) / ctx.world_size if ctx.enabled else t


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def merge_moments_over_ranks(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, group):
    """SyncBatchNorm's one collective, shared by both fused backends: this rank's per-channel
    (count, mean, M2 = sum of squared deviations), each [C] fp32, all-gathered over ``group`` and merged
    with Chan et al.'s pairwise formula (1979). Gathering (count, mean, M2) rather than summing (sum,
    sum of squares) keeps the variance free of cancellation, as nn.SyncBatchNorm does by gathering
    means and variances; counts are gathered too, so ranks may hold different numbers of values.
    Returns the global (count, mean, M2)."""
    channels = mean.shape[0]
    local = torch.stack([count, mean, m2])                             # [3, C]
    world = dist.get_world_size(group)
    gathered = local.new_empty((world * 3, channels))  # rank-major concatenation (gloo and NCCL)
    # all_gather_single is the newer name (torch >= 2.13) of all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    n_r, mean_r, m2_r = gathered.view(world, 3, channels).unbind(1)  # [world, C] each
    total = n_r.sum(0)
    merged = (n_r * mean_r).sum(0) / total.clamp_min(1.0)
    return total, merged, (m2_r + n_r * (mean_r - merged) ** 2).sum(0)


def sum_over_ranks(local: torch.Tensor, group) -> torch.Tensor:
    """``local`` summed over every rank of ``group``, as a new tensor (``local`` stays as it is).

    SyncBatchNorm's backward collective in both fused backends: the input gradient needs the
    per-channel (sum dy, sum dy * xhat) of the whole synchronised batch, while gamma and beta keep
    this rank's own sums, which DDP averages, as nn.SyncBatchNorm does (torch/nn/modules/_functions.py)."""
    total = local.clone()
    dist.all_reduce(total, group=group)
    return total
