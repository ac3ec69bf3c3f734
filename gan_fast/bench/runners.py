"""What one iteration of a (case, provider) runs: the op under autograd, a Trainer's training step, or
the pytorch/examples DCGAN training step (``tutorial``)."""
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

from .cases import (COMPILE_MODES, DTYPES, EAGER_BEST, SETTINGS, TUTORIAL, Case, build_model,
                    unavailable_reason)
from .timing import Runner


# The layouts eager-best tries, each at the case's precision (an fp32 case: fp32 eager; a bf16 case:
# bf16 autocast): whichever is faster depends on the device and the shapes, so both are measured.
EAGER_LAYOUTS = ("NCHW", "channels_last")


def eager_variants(case: Case) -> list[str]:
    """The eager variants ``eager-best`` measures on ``case``, e.g. "fp32 channels_last"."""
    return [f"{case.dtype} {layout}" for layout in EAGER_LAYOUTS]


def build_case(case: Case, provider: str, device: torch.device | str, variant: str | None = None) -> Runner:
    """The callable that runs one iteration of ``case`` with ``provider`` on ``device`` (``variant``:
    one of ``eager_variants(case)``, for eager-best only). Raises RuntimeError with the reason when the
    provider can't run here (see ``unavailable_reason``)."""
    device = torch.device(device)
    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        raise RuntimeError(f"{provider} can't run {case.id}: {reason}")
    if (variant is not None) != (provider == EAGER_BEST) or variant not in (None, *eager_variants(case)):
        raise ValueError(f"{provider} on {case.id}: variant {variant!r}; eager-best takes one of "
                         f"{eager_variants(case)}, the other providers none")
    if provider in COMPILE_MODES:
        # a fresh dynamo for every compiled case: no recompilation limits, no shapes made dynamic
        # because an earlier case ran the same code at another shape
        torch._dynamo.reset()
    t0 = time.perf_counter()
    if case.kind == "op":
        runner = _build_op(case, provider, device)
    elif provider == TUTORIAL:
        runner = _build_tutorial(case, device)
    else:
        runner = _build_step(case, provider, device, channels_last=(variant or "").endswith("channels_last"))
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


def _build_step(case: Case, provider: str, device: torch.device, channels_last: bool = False) -> Runner:
    from ..config import TrainConfig
    from ..train import Trainer

    s = SETTINGS[case.setting]
    mode = COMPILE_MODES.get(provider)
    backend = provider if provider in ("triton", "ext") else "reference"
    cfg = TrainConfig(image_size=s.image_size, channels=s.channels, nz=s.nz, ngf=s.ngf, ndf=s.ndf,
                      batch_size=case.batch, device=str(device), backend=backend,
                      amp="off" if case.dtype == "fp32" else case.dtype,
                      compile=mode == "default",  # other modes: compiled below, the same way
                      channels_last=channels_last,
                      # eager-best is eager by definition (auto keeps the reference eager too)
                      cuda_graphs={"reference+graphs": "on", EAGER_BEST: "off"}.get(provider, "auto"),
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

    return Runner(fn, device, 0.0, check=_finite_stats, keep=(trainer, batches))


def _finite_stats(stats: torch.Tensor) -> str | None:
    return None if bool(torch.isfinite(stats).all()) else f"non-finite step statistics {stats.tolist()}"


class TutorialStep:
    """The training step of pytorch/examples dcgan/main.py (github.com/pytorch/examples/blob/main/dcgan/
    main.py), as users would otherwise run it: eager nn modules in fp32, NCHW, Sigmoid + BCELoss on D's
    output, D on the real batch and on the detached fake batch, one Adam step, then G through D and
    its Adam step (lr 2e-4, beta1 0.5). Only the per-iteration ``.item()`` logging is left out: it
    syncs the host for the print, which is not the step. ``__call__(real)`` takes a float batch in
    [-1, 1] on the device and returns (loss of D, loss of G)."""

    def __init__(self, netG: nn.Module, netD: nn.Module, nz: int, device: torch.device):
        self.netG, self.netD, self.nz, self.device = netG, netD, nz, device
        self.criterion = nn.BCELoss()
        self.optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        netG, netD, criterion = self.netG, self.netD, self.criterion
        b = real.size(0)
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        label = torch.full((b,), 1.0, dtype=real.dtype, device=self.device)
        errD_real = criterion(torch.sigmoid(netD(real)), label)
        errD_real.backward()
        noise = torch.randn(b, self.nz, 1, 1, device=self.device)
        fake = netG(noise)
        label.fill_(0.0)
        errD_fake = criterion(torch.sigmoid(netD(fake.detach())), label)
        errD_fake.backward()
        self.optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(1.0)
        errG = criterion(torch.sigmoid(netD(fake)), label)
        errG.backward()
        self.optimizerG.step()
        return torch.stack([errD_real + errD_fake, errG]).detach()


def tutorial_step(setting: str, device: torch.device | str) -> TutorialStep:
    """A TutorialStep on fresh DCGAN models of ``setting`` (gan_fast.models' Generator and
    Discriminator: at dcgan64 the networks of main.py, D without its Sigmoid), seeded like the Trainer."""
    from ..models import build_models

    s = SETTINGS[setting]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        netG, netD = build_models("dcgan", s.nz, s.ngf, s.ndf, s.channels, s.image_size)
    device = torch.device(device)
    return TutorialStep(netG.to(device).train(), netD.to(device).train(), s.nz, device)


def _build_tutorial(case: Case, device: torch.device) -> Runner:
    from ..datasets import load_digits, to_model_input

    step = tutorial_step(case.setting, device)
    s = SETTINGS[case.setting]
    # real digits batches, already on the device as floats (main.py's DataLoader yields floats)
    images = load_digits(s.image_size, s.channels)[0]
    index = torch.arange(4 * case.batch) % len(images)
    batches = list(to_model_input(images[index].to(device)).split(case.batch))
    cycle = itertools.cycle(batches)
    return Runner(lambda: step(next(cycle)), device, 0.0, check=_finite_stats, keep=(step, batches))
