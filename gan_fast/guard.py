"""The divergence guard: NaN or Inf in the losses, the weights, the BatchNorm running statistics or
the optimizers' state stops the run before such a state can be written over a good checkpoint.

A GAN that diverges (a learning rate far too high, fp16 overflow, a bad batch) does not crash: it
goes on computing NaN, or finite losses over infinite running variances, and the next checkpoint
would replace the last good one. Checking costs a host sync, so it runs where the trainer syncs
anyway: at each log interval, on the statistics already reduced there, and before every checkpoint
write (mandatory). Both checks agree across torchrun ranks (the flag rides the all-reduce they
already do), so every rank stops at the same step.
"""
from __future__ import annotations

import torch

EXIT_DIVERGED = 3


class Diverged(Exception):
    """Training produced non-finite values; the message says where and which checkpoint is good."""


def training_tensors(trainer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating-point tensor of the training state: both models' parameters
    and buffers (BatchNorm running statistics), the average of G with --ema, both optimizers' state."""
    named = []
    modules = [("netG", trainer.netG), ("netD", trainer.netD)]
    if getattr(trainer, "ema", None) is not None:
        modules.append(("netG_ema", trainer.ema.model))
    for prefix, module in modules:
        named += [(f"{prefix}.{n}", t) for n, t in module.named_parameters()]
        named += [(f"{prefix}.{n}", t) for n, t in module.named_buffers()]
    for prefix, opt in (("optG", trainer.optG), ("optD", trainer.optD)):
        for i, state in enumerate(opt.state.values()):
            named += [(f"{prefix}.state.{i}.{k}", v) for k, v in state.items() if torch.is_tensor(v)]
    return [(n, t) for n, t in named if t.is_floating_point() and t.numel()]


def nonfinite_flag(named: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """A one-element float tensor on ``device``, 1 when any tensor holds a NaN or an Inf, else 0;
    computed without a host sync (the caller reads it together with the values it syncs anyway)."""
    if not named:
        return torch.zeros(1, device=device)
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    return (~flags.all()).float().reshape(1)


def nonfinite_names(named: list[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """The names of the first ``limit`` non-finite tensors (a host sync per tensor: for the message
    after a failed check only)."""
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    return bad[:limit] + ([f"{len(bad) - limit} more"] if len(bad) > limit else [])
