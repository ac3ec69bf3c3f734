"""What one iteration of a (case, provider) runs: the op under autograd, or a Trainer's training step."""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from .cases import COMPILE_MODES, DTYPES, SETTINGS, Case, build_model, unavailable_reason
from .timing import Runner


def build_case(case: Case, provider: str, device: torch.device | str) -> Runner:
    """The callable that runs one iteration of ``case`` with ``provider`` on ``device``. Raises
    RuntimeError with the reason when the provider can't run here (see ``unavailable_reason``)."""
    device = torch.device(device)
    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        raise RuntimeError(f"{provider} can't run {case.id}: {reason}")
    if provider in COMPILE_MODES:
        # a fresh dynamo for every compiled case: no recompilation limits, no shapes made dynamic
        # because an earlier case ran the same code at another shape
        torch._dynamo.reset()
    t0 = time.perf_counter()
    runner = (_build_op if case.kind == "op" else _build_step)(case, provider, device)
    runner.build_s = time.perf_counter() - t0
    return runner


def _compile_mark_step(provider: str) -> bool:
    return COMPILE_MODES.get(provider) == "reduce-overhead"


def _compile(module: nn.Module, provider: str) -> nn.Module:
    mode = COMPILE_MODES[provider]
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)


class DHeadLoss(nn.Module):
    """The reference composition of d_head_bce_with_logits: the head conv, then the mean BCE."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x, target):
        logits = self.conv(x).view(-1)
        return F.binary_cross_entropy_with_logits(logits.float(), target)


def _build_op(case: Case, provider: str, device: torch.device) -> Runner:
    dtype = DTYPES[case.dtype]
    net = build_model(case.model, SETTINGS[case.setting])
    run = [copy.deepcopy(m) for m in list(net.main)[case.layer:case.layer + case.span]]
    seq = nn.Sequential(*run).to(device).train()
    # inputs drawn on the CPU from a fixed seed: every provider sees the same numbers on any device
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.in_shape, generator=g).to(device, dtype).requires_grad_()
    inputs = [x, *seq.parameters()]
    head = case.op == "d_head_bce_with_logits"
    if head:
        target = (torch.rand(case.batch, generator=g) > 0.5).float().to(device)
        grad_out = None
    else:
        grad_out = torch.randn(case.out_shape, generator=g).to(device, dtype)
    args = (x, target) if head else (x,)
    mark_step = _compile_mark_step(provider)

    if provider in ("triton", "ext"):
        # the fused modules fuse() builds, as users run them (autocast casts and BatchNorm
        # bookkeeping included); fuse keeps the Parameters, so ``inputs`` stays valid
        from ..fuse import fuse

        fused = fuse(seq, provider)
        module = (lambda x, target: fused[0].loss(x, target)[0]) if head else fused
    else:
        module = DHeadLoss(seq[0]) if head else seq
        if provider in COMPILE_MODES:
            module = _compile(module, provider)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def fn():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            y = module(*args)
        return torch.autograd.grad(y, inputs, grad_out)

    return Runner(fn, device, 0.0, keep=(seq, x, grad_out))


def _build_step(case: Case, provider: str, device: torch.device) -> Runner:
    from ..config import TrainConfig
    from ..train import Trainer

    s = SETTINGS[case.setting]
    mode = COMPILE_MODES.get(provider)
    backend = provider if provider in ("triton", "ext") else "reference"
    cfg = TrainConfig(image_size=s.image_size, channels=s.channels, nz=s.nz, ngf=s.ngf, ndf=s.ndf,
                      batch_size=case.batch, device=str(device), backend=backend,
                      amp="off" if case.dtype == "fp32" else case.dtype,
                      compile=mode == "default",  # other modes: compiled below, the same way
                      cuda_graphs="on" if provider == "reference+graphs" else "auto",
                      workers=0, seed=0, out=os.path.join(tempfile.gettempdir(), "gan_fast_bench"))
    trainer = Trainer(cfg.validate(), log=lambda *a, **k: None)
    if mode is not None and mode != "default":
        # what Trainer does for --compile (nn.Module.compile, in place), in another mode
        trainer.netG.compile(mode=mode)
        trainer.netD.compile(mode=mode)
        trainer.cfg.compile = True
    # real digits batches, already on the device (no data loader in the timed loop)
    batches = list(itertools.islice(trainer.data.batches(case.batch, 0), 4))
    if trainer.use_cuda_graphs:
        from ..cuda_graphs import GraphedStep

        step = GraphedStep(trainer)  # what Trainer.run uses
    else:
        step = trainer.train_step
    cycle = itertools.cycle(batches)
    mark_step = _compile_mark_step(provider)

    def fn():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        return step(next(cycle))

    def check(stats):
        return None if bool(torch.isfinite(stats).all()) else f"non-finite step statistics {stats.tolist()}"

    return Runner(fn, device, 0.0, check=check, keep=(trainer, batches))
