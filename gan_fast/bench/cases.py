"""Benchmarks of the fused backends against eager PyTorch and torch.compile: ``python -m gan_fast.bench``.

One definition of the cases, used twice: ``python -m gan_fast.bench`` runs them and prints one table
(times, images/s, achieved TFLOP/s, % of the device's measured matmul peak, speedups over eager and
over the best torch.compile mode) and writes a JSON result; ``pytest bench/ --benchmark-only`` runs
the same cases through pytest-benchmark (bench/test_bench_*.py parametrize over ``default_cases``
and call ``build_case``). docs/performance.md explains the method and the output.

Cases:
- ``op/<setting>-b<batch>/<model>.<layer>/<op>``: one fused op of docs/ops.md, forward + backward
  (the gradient of the input and of every parameter, through ``torch.autograd.grad``), at the shape
  where a model of ``<setting>`` runs it. The runs are found by ``gan_fast.fuse``'s own pattern
  matcher in the models of ``gan_fast.models``, so every op the fused models run is here, at every
  shape they run it. ``reference`` is the nn.Sequential of the original layers (BatchNorm in training
  mode), the compile providers are torch.compile of that Sequential, ``triton`` / ``ext`` are that
  Sequential after ``gan_fast.fuse(seq, name)``: the fused module users run, on the same tensors.
- ``step/<setting>-b<batch>[-bf16]``: ``Trainer.train_step``, the whole training step users run (D on
  a real and a fake batch, G through D, both Adam steps), on uint8 batches already in device memory.
  ``triton`` / ``ext`` are Trainers with that backend and their defaults, so on CUDA the step is
  replayed from a CUDA graph (``--cuda-graphs auto``) exactly as ``python -m gan_fast.train`` does.

Providers: ``reference`` (eager nn modules), ``reference+graphs`` (the eager step captured in a CUDA
graph, ``--cuda-graphs on``; step cases on CUDA only), ``compile-default``,
``compile-max-autotune-no-cudagraphs``, ``compile-reduce-overhead`` (CUDA only), ``triton`` (CUDA
only: the Triton interpreter is a correctness tool, never benchmarked) and ``ext``; each is skipped
with the reason where it can't run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .flops import count_layers, forward_backward_flops, train_step_flops

# ---------------------------------------------------------------------------------------- providers

PROVIDERS = ("reference", "reference+graphs", "compile-default", "compile-max-autotune-no-cudagraphs",
             "compile-reduce-overhead", "triton", "ext")
COMPILE_MODES = {"compile-default": "default",
                 "compile-max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
                 "compile-reduce-overhead": "reduce-overhead"}
EAGER = "reference"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Setting:
    """Model hyper-parameters of a benchmark setting (TrainConfig's names)."""
    image_size: int
    channels: int
    nz: int
    ngf: int
    ndf: int


SETTINGS = {
    # pytorch/examples dcgan/main.py (CelebA / LSUN at 64x64)
    "dcgan64": Setting(image_size=64, channels=3, nz=100, ngf=64, ndf=64),
    # gan_fast's defaults: TrainConfig() on the embedded digits
    "digits": Setting(image_size=32, channels=1, nz=64, ngf=32, ndf=32),
    # --quick: the smallest model, for smoke tests
    "tiny": Setting(image_size=16, channels=1, nz=8, ngf=8, ndf=8),
}

# The networks whose fused runs become op cases. Gmlp brings linear_bn_leaky_relu, Gup the
# upsample_conv2d_bn_relu of --g-upsample; the MLP discriminator has no fused run.
MODELS = ("G", "D", "Gup", "Gmlp")

# The one op case --quick compiles (the D block: conv, BatchNorm statistics, LeakyReLU).
QUICK_COMPILE_OP = "conv2d_bn_leaky_relu"

# Batch of the DCGAN-64 op cases on a CPU: at batch 128 the CPU run would take far more than its
# 10-minute budget on 2 cores.
CPU_DCGAN64_OP_BATCH = 16

_OP_OF_FUSED = {
    "FusedConvTranspose2dBatchNormReLU": "conv_transpose2d_bn_relu",
    "FusedConv2dBatchNormLeakyReLU": "conv2d_bn_leaky_relu",
    "FusedUpsampleConv2dBatchNormReLU": "upsample_conv2d_bn_relu",
    "FusedLinearBatchNormLeakyReLU": "linear_bn_leaky_relu",
    "FusedConv2dLeakyReLU": "conv2d_leaky_relu",
    "FusedConvTranspose2dTanh": "conv_transpose2d_tanh",
    "FusedDHead": "d_head_bce_with_logits",
}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str              # "op" or "step"
    setting: str           # a key of SETTINGS
    batch: int
    dtype: str             # "fp32" or "bf16" (autocast for steps)
    flops: int             # analytic FLOPs of one call (gan_fast.flops)
    math: str = "conv"     # "conv" or "linear": which TF32 switch applies to fp32 on CUDA
    # op cases only
    model: str = ""        # a key of MODELS
    layer: int = -1        # index of the run's first layer in model.main
    span: int = 0          # number of layers of the run
    op: str = ""
    in_shape: tuple = ()
    out_shape: tuple = ()
    # False: the compile providers skip this case (--quick compiles one case only: compiling is most
    # of a smoke run's time, about 10 s per op and a minute for the step on 2 CPU cores)
    compile: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def build_model(model: str, setting: Setting) -> nn.Module:
    """The network ``model`` of ``setting``, DCGAN-initialised from seed 0 (the same on every call)."""
    from .models import Discriminator, Generator, MLPGenerator, init_weights

    s = setting
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = {"G": lambda: Generator(s.nz, s.ngf, s.channels, s.image_size),
               "Gup": lambda: Generator(s.nz, s.ngf, s.channels, s.image_size, upsample=True),
               "D": lambda: Discriminator(s.ndf, s.channels, s.image_size),
               "Gmlp": lambda: MLPGenerator(s.nz, s.ngf, s.channels, s.image_size)}[model]()
        net.apply(init_weights)
    return net


def _input_shape(model: str, setting: Setting, batch: int) -> tuple:
    if model == "D":
        return (batch, setting.channels, setting.image_size, setting.image_size)
    return (batch, setting.nz, 1, 1)


def _main_input_shapes(net: nn.Module, input_shape) -> list[tuple]:
    """(input shape, output shape) of every child of ``net.main``, in order."""
    from .flops import trace_shapes

    trace, _ = trace_shapes(net, input_shape, modules=list(net.main))
    return [(i, o) for _, _, i, o in trace]


def op_cases(setting_name: str, batch: int, dtype: str = "fp32") -> list[Case]:
    """One case per fused run of the models of ``setting_name`` (duplicate shapes once)."""
    return list(_op_cases(setting_name, batch, dtype))


@functools.lru_cache(maxsize=None)
def _op_cases(setting_name: str, batch: int, dtype: str) -> tuple[Case, ...]:
    from .fuse import match_run

    setting = SETTINGS[setting_name]
    cases, seen = [], set()
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    for model in MODELS:
        net = build_model(model, setting)
        layers = list(net.main)
        shapes = _main_input_shapes(net, _input_shape(model, setting, batch))
        i = 0
        while i < len(layers):
            # fuse's own matcher says what fuse() would fuse; it wraps the layers in a fused module
            # without changing them, and only stores the backend name, so this runs on any machine
            hit = match_run(layers, i, "ext", last=i == len(layers) - 1)
            if hit is None:
                i += 1
                continue
            fused, span = hit
            op = _OP_OF_FUSED[type(fused).__name__]
            run = layers[i:i + span]
            gemm = next(m for m in run if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))
            in_shape, out_shape = shapes[i][0], shapes[i + span - 1][1]
            key = (op, in_shape, tuple(gemm.weight.shape), str(gemm))
            if key not in seen:
                seen.add(key)
                counts = count_layers(nn.Sequential(*run), in_shape)
                cases.append(Case(
                    id=f"op/{setting_name}-b{batch}{suffix}/{model}.{i}/{op}", kind="op",
                    setting=setting_name, batch=batch, dtype=dtype,
                    flops=forward_backward_flops(counts, input_requires_grad=True),
                    math="linear" if isinstance(gemm, nn.Linear) else "conv", model=model, layer=i,
                    span=span, op=op, in_shape=in_shape,
                    out_shape=() if op == "d_head_bce_with_logits" else out_shape))
            i += span
    return tuple(cases)


@functools.lru_cache(maxsize=None)
def step_case(setting_name: str, batch: int, dtype: str = "fp32") -> Case:
    from .models import build_models

    s = SETTINGS[setting_name]
    netG, netD = build_models("dcgan", s.nz, s.ngf, s.ndf, s.channels, s.image_size)
    flops = train_step_flops(netG, netD, batch, s.nz).total
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    return Case(id=f"step/{setting_name}-b{batch}{suffix}", kind="step", setting=setting_name,
                batch=batch, dtype=dtype, flops=flops)


def default_cases(device: torch.device | str, quick: bool = False) -> list[Case]:
    """The benchmark's cases on ``device`` (``quick``: tiny shapes, for smoke tests)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if quick:
        ops = _one_per_op(op_cases("tiny", 8))
        steps = [step_case("tiny", 8)] + ([step_case("tiny", 8, "bf16")] if cuda else [])
        return [c if c.op == QUICK_COMPILE_OP else dataclasses.replace(c, compile=False)
                for c in ops + steps]
    if cuda:
        ops = op_cases("dcgan64", 128) + op_cases("digits", 64)
        steps = [step_case("dcgan64", 128), step_case("dcgan64", 128, "bf16"),
                 step_case("dcgan64", 1024, "bf16"), step_case("digits", 64)]
    else:
        ops = op_cases("digits", 64) + op_cases("dcgan64", CPU_DCGAN64_OP_BATCH)
        steps = [step_case("digits", 64)]
    return ops + steps


def _one_per_op(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.op not in seen:
            seen.add(c.op)
            out.append(c)
    return out


def select_cases(cases: list[Case], kinds=None, match=None) -> list[Case]:
    """``kinds``: subset of {"op", "step"} (also "ops", "steps"); ``match``: substrings of case ids."""
    if kinds:
        kinds = {k.rstrip("s") for k in kinds}
        cases = [c for c in cases if c.kind in kinds]
    if match:
        cases = [c for c in cases if any(m in c.id for m in match)]
    return cases


def unavailable_reason(case: Case, provider: str, device: torch.device | str) -> str | None:
    """None when ``provider`` can run ``case`` on ``device``, else why not (a pytest.skip reason)."""
    from . import backends

    device = torch.device(device)
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}"
    if provider == "reference+graphs":
        if case.kind != "step":
            return "the CUDA-graph capture of the reference (--cuda-graphs on) applies to the whole step"
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        return None
    if provider in COMPILE_MODES:
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if COMPILE_MODES[provider] == "reduce-overhead" and device.type != "cuda":
            return "mode reduce-overhead records CUDA graphs, which need a CUDA device"
        if not case.compile:
            return "--quick runs torch.compile on one op case only (compiling takes most of a smoke run)"
        return None
    if provider in ("triton", "ext"):
        reason = backends.unavailable_reason(provider, device)
        if reason is not None:
            return reason
        if provider == "triton" and device.type != "cuda":
            return ("the Triton interpreter (TRITON_INTERPRET=1) runs the triton backend on the CPU for "
                    "testing only; it is never benchmarked")
    return None


# ---------------------------------------------------------------------------------------- runners

class Runner:
    """One benchmark instance: ``runner()`` runs one iteration (no synchronisation); ``sync()`` waits
    for the device. ``build_s``: construction time (model, inputs; not compilation, which happens at
    the first call)."""

    def __init__(self, fn: Callable[[], Any], device: torch.device, build_s: float, check=None,
                 keep=None):
        self.fn, self.device, self.build_s = fn, device, build_s
        self._check, self._keep, self.last = check, keep, None

    def __call__(self):
        out = self.fn()
        if self._check is not None:  # keep only what check() reads: no extra memory held otherwise
            self.last = out
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self) -> str | None:
        """None, or a problem with the last iteration's result (e.g. a non-finite loss)."""
        return self._check(self.last) if self._check is not None and self.last is not None else None

    def close(self) -> None:
        self.fn = self.last = self._keep = self._check = None


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


class _DHeadLoss(nn.Module):
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
        from .fuse import fuse

        fused = fuse(seq, provider)
        module = (lambda x, target: fused[0].loss(x, target)[0]) if head else fused
    else:
        module = _DHeadLoss(seq[0]) if head else seq
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
    from .config import TrainConfig
    from .train import Trainer

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
        from .cuda_graphs import GraphedStep

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


# ---------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    warmup: int            # synchronised calls before timing (the first compiles / captures)
    rounds: int            # timed rounds; the median round is reported
    steps_per_measure: int | None   # calls per round (None: enough for ``round_s``)
    round_s: float         # target duration of a round when steps_per_measure is None
    max_steps: int = 1000


def default_timing(device: torch.device | str, quick: bool = False) -> Timing:
    device = torch.device(device)
    if quick:
        return Timing(warmup=3 if device.type == "cuda" else 2, rounds=3, steps_per_measure=None,
                      round_s=0.01, max_steps=20)
    if device.type == "cuda":
        return Timing(warmup=6, rounds=10, steps_per_measure=None, round_s=0.05)
    return Timing(warmup=2, rounds=5, steps_per_measure=None, round_s=0.2)


@dataclass
class WarmUp:
    first_call_s: float    # the first call (compilation, autotuning, graph capture happen here)
    calls_s: list          # every warm-up call, synchronised
    steps_per_measure: int


def warm_up(runner: Runner, timing: Timing) -> WarmUp:
    """Run the warm-up calls, each synchronised and timed; pick the calls per round."""
    calls = []
    runner.sync()
    for _ in range(max(1, timing.warmup)):
        t0 = time.perf_counter()
        runner()
        runner.sync()
        calls.append(time.perf_counter() - t0)
    steps = timing.steps_per_measure
    if steps is None:
        est = min(calls[1:]) if len(calls) > 1 else calls[0]
        steps = max(1, min(timing.max_steps, math.ceil(timing.round_s / max(est, 1e-7))))
    return WarmUp(calls[0], calls, steps)


def time_rounds(runner: Runner, rounds: int, steps: int) -> list[float]:
    """Seconds per call of each round of ``steps`` calls: CUDA events around the round on a GPU
    (one synchronisation per round), perf_counter on a CPU."""
    times = []
    cuda = runner.device.type == "cuda"
    for _ in range(rounds):
        runner.sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                runner()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                runner()
            times.append((time.perf_counter() - t0) / steps)
    return times


class SyncEvery:
    """pytest-benchmark's target: one iteration per call, synchronising after every ``steps``-th so
    that a round of ``steps`` iterations (``pedantic(iterations=steps)``) ends with the device idle."""

    def __init__(self, runner: Runner, steps: int):
        self.runner, self.steps, self.n = runner, steps, 0

    def __call__(self):
        self.runner()
        self.n += 1
        if self.n % self.steps == 0:
            self.runner.sync()


class MemoryMeter:
    """Peak memory of the timed iterations: torch.cuda.max_memory_allocated on a GPU (reset after the
    warm-up, so it holds the persistent tensors plus the step's peak); on a CPU the growth of the
    process's peak resident set over its resident set before the case was built (approximate: the
    allocator keeps freed memory), or None where /proc can't say."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_delta"
        self.base = None
        if device.type == "cpu":
            _malloc_trim()
            self.base = _proc_status("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
            except OSError:
                self.base = None

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _proc_status("VmHWM")
        return None if peak is None or self.base is None else max(0, peak - self.base)


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cleanup(device: torch.device | str) -> None:
    """Free what the last case held (between cases)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- peak

def peak_key(case: Case, device: torch.device | str) -> str:
    """Which measured matmul peak a case is compared with: bf16; on CUDA tf32 where PyTorch runs
    fp32 convolutions (cudnn.allow_tf32, default on) or matmuls (cuda.matmul.allow_tf32) in TF32 and
    the Triton backend follows it; else fp32."""
    if case.dtype == "bf16":
        return "bf16"
    if torch.device(device).type == "cuda":
        tf32 = (torch.backends.cuda.matmul.allow_tf32 if case.math == "linear"
                else torch.backends.cudnn.allow_tf32)
        return "tf32" if tf32 else "fp32"
    return "fp32"


def measure_peak(device: torch.device | str, key: str, quick: bool = False) -> float:
    """Achieved TFLOP/s of a large square matmul in ``key``'s precision (fp32, tf32, bf16): the
    best of a few rounds."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = (4096 if quick else 8192) if cuda else (512 if quick else 2048)
    dtype = torch.bfloat16 if key == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ctx = _matmul_tf32(key == "tf32") if cuda else contextlib.nullcontext()
    with ctx:
        runner = Runner(lambda: torch.mm(a, b, out=c), device, 0.0)
        w = warm_up(runner, Timing(warmup=3, rounds=0, steps_per_measure=None,
                                   round_s=0.1 if cuda else 0.3, max_steps=200))
        best = min(time_rounds(runner, 3 if quick else 5, w.steps_per_measure))
    del a, b, c
    return 2 * n ** 3 / best / 1e12


@contextlib.contextmanager
def _matmul_tf32(enabled: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = old


class Peaks(dict):
    """Measured peaks by key, measured on first use."""

    def __init__(self, device, quick: bool = False):
        super().__init__()
        self.device, self.quick = torch.device(device), quick

    def get_peak(self, key: str) -> float:
        if key not in self:
            self[key] = measure_peak(self.device, key, self.quick)
        return self[key]


# ---------------------------------------------------------------------------------------- one result

def metrics(case: Case, median_s: float, peaks: Peaks | None, device) -> dict:
    """images/s, TFLOP/s and % of peak of a case at ``median_s`` seconds per call."""
    tflops = case.flops / median_s / 1e12
    out = {"median_s": median_s, "images_per_s": case.batch / median_s, "tflops": tflops,
           "flops": case.flops}
    if peaks is not None:
        key = peak_key(case, device)
        out.update(peak_key=key, pct_peak=100 * tflops / peaks.get_peak(key))
    return out


def run_one(case: Case, provider: str, device: torch.device, timing: Timing, peaks: Peaks | None,
            verbose: bool = False) -> dict:
    """Build, warm up and time one (case, provider); a dict of the result (status ok / skipped /
    error, never raises for a provider's failure)."""
    row = {"case": case.id, "kind": case.kind, "provider": provider}
    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    runner = None
    try:
        meter = MemoryMeter(device)
        runner = build_case(case, provider, device)
        w = warm_up(runner, timing)
        meter.reset()
        times = time_rounds(runner, timing.rounds, w.steps_per_measure)
        median = statistics.median(times)
        problem = runner.check()
        row.update(status="ok", **metrics(case, median, peaks, device), times_s=times,
                   steps_per_measure=w.steps_per_measure, rounds=timing.rounds,
                   memory_bytes=meter.peak_bytes(), memory_kind=meter.kind, build_s=runner.build_s,
                   first_call_s=w.first_call_s, warmup_calls_s=w.calls_s,
                   # what the warm-up cost beyond steady-state calls: compilation, autotuning,
                   # graph capture, cuDNN's algorithm search
                   compile_s=max(0.0, sum(w.calls_s) - len(w.calls_s) * median),
                   time_to_first_step_s=runner.build_s + w.first_call_s)
        if problem:
            row["warning"] = problem
    except Exception as e:  # noqa: BLE001 - one provider's failure is a result, not the end of the run
        if verbose:
            traceback.print_exc()
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        if runner is not None:
            runner.close()
        del runner
        cleanup(device)
    return row


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), "")
    return line[:300]


def add_ratios(results: list[dict]) -> None:
    """speedup_vs_eager = eager time / provider time; speedup_vs_best_compile = fastest compile
    mode's time / provider time (both > 1 when the provider is faster)."""
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for rows in by_case.values():
        ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
        eager = ok.get(EAGER)
        compiled = [r for p, r in ok.items() if p in COMPILE_MODES]
        best = min(compiled, key=lambda r: r["median_s"]) if compiled else None
        for r in ok.values():
            r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if eager else None
            r["speedup_vs_best_compile"] = best["median_s"] / r["median_s"] if best else None
            r["best_compile"] = best["provider"] if best else None


# ---------------------------------------------------------------------------------------- pytest

def pytest_settings() -> tuple[torch.device, bool, Timing]:
    """(device, quick, timing) of ``pytest bench/``, from the environment: GAN_FAST_BENCH_DEVICE
    (auto, cpu, cuda, cuda:N), GAN_FAST_BENCH_QUICK=1, GAN_FAST_BENCH_STEPS_PER_MEASURE,
    GAN_FAST_BENCH_ROUNDS, GAN_FAST_BENCH_WARMUP, GAN_FAST_BENCH_THREADS (CPU threads of torch; quick
    on a CPU: 1, as ``python -m gan_fast.bench --quick``)."""
    name = os.environ.get("GAN_FAST_BENCH_DEVICE", "auto")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    quick = os.environ.get("GAN_FAST_BENCH_QUICK", "") not in ("", "0")
    timing = default_timing(device, quick)
    for field in ("steps_per_measure", "rounds", "warmup"):
        value = os.environ.get(f"GAN_FAST_BENCH_{field.upper()}")
        if value:
            setattr(timing, field, int(value))
    threads = os.environ.get("GAN_FAST_BENCH_THREADS") or ("1" if quick and device.type == "cpu" else "")
    if threads:
        torch.set_num_threads(int(threads))
    return device, quick, timing


def run_pytest_benchmark(benchmark, case: Case, provider: str, device: torch.device, timing: Timing,
                         peaks: Peaks | None = None) -> None:
    """The body of every test in bench/: skip with the reason where ``provider`` can't run ``case``;
    else build, warm up (untimed), and time ``timing.rounds`` rounds of ``steps_per_measure`` calls
    with pytest-benchmark (a device synchronisation ends every round); the case's images/s, TFLOP/s,
    % of peak, memory and compile time go to the benchmark's extra_info (--benchmark-json)."""
    import pytest

    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = case.id
    meter = MemoryMeter(device)
    runner = build_case(case, provider, device)
    try:
        w = warm_up(runner, timing)
        meter.reset()
        benchmark.pedantic(SyncEvery(runner, w.steps_per_measure), rounds=timing.rounds,
                           iterations=w.steps_per_measure, warmup_rounds=0)
        info = {"case": case.id, "provider": provider, "batch": case.batch, "dtype": case.dtype,
                "steps_per_measure": w.steps_per_measure, "build_s": runner.build_s,
                "first_call_s": w.first_call_s, "time_to_first_step_s": runner.build_s + w.first_call_s,
                "memory_bytes": meter.peak_bytes(), "memory_kind": meter.kind}
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)  # None with --benchmark-disable
        if stats is not None:
            info.update(metrics(case, stats.median, peaks, device))
            info["compile_s"] = max(0.0, sum(w.calls_s) - len(w.calls_s) * stats.median)
        benchmark.extra_info.update(info)
        problem = runner.check()
        assert problem is None, problem
    finally:
        runner.close()
        del runner
        cleanup(device)


# ---------------------------------------------------------------------------------------- metadata

def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, slug=_slug(props.name), memory_bytes=props.total_memory,
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=info["cpu"], slug="cpu-" + _slug(info["cpu"]))
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "gan_fast": __version__,
         "cuda": torch.version.cuda, "cudnn": None, "triton": None}
    with contextlib.suppress(Exception):
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        import triton

        v["triton"] = triton.__version__
    return v


def git_info() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def default_out(info: dict, quick: bool, date: datetime.datetime) -> str:
    """bench/results/<device-slug>-<date>[-quick][-N].json, in the checkout gan_fast runs from (else
    under the current directory)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = checkout if os.path.isdir(os.path.join(checkout, "bench")) else os.getcwd()
    root = os.path.relpath(os.path.join(base, "bench", "results"))
    stem = f"{info['slug']}-{date:%Y-%m-%d}" + ("-quick" if quick else "")
    path = os.path.join(root, stem + ".json")
    n = 2
    while os.path.exists(path):
        path = os.path.join(root, f"{stem}-{n}.json")
        n += 1
    return path


def write_json(doc: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- table

COLUMNS = (("case", "case"), ("provider", "provider"), ("ms", "ms"), ("img/s", "img/s"),
           ("TFLOP/s", "TFLOP/s"), ("%peak", "% peak"), ("x eager", "x eager"),
           ("x best compile", "x best compile"), ("mem MiB", "mem MiB"), ("compile s", "compile s"),
           ("1st step s", "1st step s"))


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(doc: dict) -> str:
    """The result table of a benchmark document (one row per case and provider that ran)."""
    rows, notes = [], {}
    for r in doc["results"]:
        if r.get("status") != "ok":
            key = (r["status"], r["provider"], r.get("reason", ""))
            notes.setdefault(key, []).append(r["case"])
            continue
        mem = r.get("memory_bytes")
        rows.append([r["case"], r["provider"] + (" (!)" if r.get("warning") else ""),
                     _fmt(r["median_s"] * 1e3, ".3f"), _fmt(r["images_per_s"], ",.0f"),
                     _fmt(r["tflops"], ".3f"), _fmt(r.get("pct_peak"), ".1f"),
                     _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_best_compile"), ".2f"),
                     _fmt(None if mem is None else mem / 2 ** 20, ",.0f"), _fmt(r.get("compile_s"), ".1f"),
                     _fmt(r.get("time_to_first_step_s"), ".2f")])
    header = [h for _, h in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = []
    dev, ver = doc["device"], doc["versions"]
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in doc.get("peaks_tflops", {}).items())
    lines.append(f"device: {dev['name']} ({dev['type']}; CPU threads: {dev['cpu_threads']}); torch "
                 f"{ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}; commit "
                 f"{(doc['git']['commit'] or '?')[:10]}{' (dirty)' if doc['git'].get('dirty') else ''}; "
                 f"{doc['date']}")
    lines.append(f"measured matmul peak, TFLOP/s: {peaks or '-'}")
    sep = "  "
    lines.append(sep.join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append(sep.join("-" * w for w in widths))
    last_case = None
    for row in rows:
        shown = list(row)
        if row[0] == last_case:
            shown[0] = ""
        last_case = row[0]
        lines.append(sep.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(shown, widths))))
    lines.append("")
    lines.append("ms: median time per call; x eager / x best compile: speedup over the reference "
                 "(eager) and over the fastest torch.compile mode of the same case; % peak: of the "
                 "matmul peak above in the case's precision; mem: " +
                 ("torch.cuda.max_memory_allocated" if dev["type"] == "cuda" else "peak RSS growth") +
                 "; compile s: warm-up time beyond steady-state calls; 1st step s: build + first call.")
    for r in doc["results"]:
        if r.get("warning"):
            lines.append(f"(!) {r['case']} {r['provider']}: {r['warning']}")
    for (status, provider, reason), cases in notes.items():
        where = "all cases" if len(cases) == len({r['case'] for r in doc['results']}) else (
            f"{len(cases)} case(s)" if len(cases) > 2 else ", ".join(cases))
        lines.append(f"{status}: {provider} ({where}): {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plot

def plot(doc: dict, path: str) -> None:
    """images/s per provider per case, one panel for the whole steps and one for the ops; a log scale
    where a panel's values span more than 20x, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    panels = [(kind, list(dict.fromkeys(r["case"] for r in ok if r["kind"] == kind)))
              for kind in ("step", "op")]
    panels = [(k, cs) for k, cs in panels if cs]
    if not panels:
        raise ValueError("the result holds no successful measurement to plot")
    value = {(r["case"], r["provider"]): r["images_per_s"] for r in ok}
    heights = [0.9 + sum(0.16 * max(1, sum((c, p) in value for p in providers)) + 0.12 for c in cs)
               for _, cs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (kind, cases) in zip(axes[:, 0], panels):
        n = max(1, len(providers))
        bar = 0.8 / n
        values = [v for (c, _), v in value.items() if c in cases]
        log = max(values) / max(min(values), 1e-9) > 20
        for j, p in enumerate(providers):
            ys = [i + (j - (n - 1) / 2) * bar for i in range(len(cases))]
            xs = [value.get((c, p), 0.0) for c in cases]
            ax.barh(ys, xs, height=bar, color=colors(j % 10), label=p)
            for y, x in zip(ys, xs):
                if x > 0:
                    ax.text(x, y, f" {x:,.0f}", va="center", fontsize=6)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([c.split("/", 1)[1] for c in cases], fontsize=7 if kind == "op" else 9)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.set_xlim(right=max(values) * (3 if log else 1.15))
        ax.set_xlabel(f"images/s ({'log scale, ' if log else ''}higher is better)")
        ax.set_title("whole training step (Trainer.train_step)" if kind == "step"
                     else "fused ops, forward + backward")
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    dev = doc["device"]
    fig.suptitle(f"gan_fast benchmarks: {dev['name']}, torch {doc['versions']['torch']}, "
                 f"{doc['date'][:10]}" + (" (--quick: not a measurement)" if doc.get("quick") else ""),
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gan_fast.bench",
        description="Benchmark the fused backends against eager PyTorch and torch.compile: the fused "
                    "ops and the whole training step. Prints one table, writes a JSON result.")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--cases", default="ops,step",
                   help="comma-separated kinds to run: ops, step (default both)")
    p.add_argument("--match", default=None,
                   help="comma-separated substrings; run only the cases whose id contains one")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma-separated providers (default all: {','.join(PROVIDERS)})")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one case per op, few iterations: a smoke test, not a measurement")
    p.add_argument("--steps-per-measure", type=int, default=None,
                   help="calls per timed round (default: enough for ~50 ms on a GPU, ~200 ms on a CPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=None,
                   help="synchronised calls before timing (the first compiles / captures)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's default, all cores; --quick on a CPU: 1, "
                        "which keeps a smoke run fast on a busy machine)")
    p.add_argument("--out", default=None,
                   help="JSON result path (default bench/results/<device-slug>-<date>.json)")
    p.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                   help="don't run: print the table of (and --plot) an earlier result")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a bar chart of images/s per provider per case")
    p.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    return p


def _split(s: str | None) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    from .config import UserError
    from .config import pick_device

    args = build_parser().parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--from {args.from_json}: {e}") from None
        print(format_table(doc))
        if args.plot:
            plot(doc, args.plot)
            print(f"plot: {args.plot}")
        return 0

    device = pick_device(args.device)
    kinds = _split(args.cases)
    bad = [k for k in kinds if k.rstrip("s") not in ("op", "step")]
    if bad or not kinds:
        raise UserError(f"--cases takes ops and/or step, got {args.cases!r}")
    providers = _split(args.providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise UserError(f"--providers: unknown {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(PROVIDERS)}")
    cases = select_cases(default_cases(device, args.quick), kinds, _split(args.match))
    if not cases:
        raise UserError("no case matches --cases / --match (see --list)")
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(threads)
    timing = default_timing(device, args.quick)
    for name in ("steps_per_measure", "rounds", "warmup"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
            setattr(timing, name, value)

    if args.list:
        for c in cases:
            avail = [p if unavailable_reason(c, p, device) is None else f"({p})" for p in providers]
            print(f"{c.id:60s} {c.flops / 1e9:10.3f} GFLOP  {' '.join(avail)}")
        print("(provider): unavailable here")
        return 0

    date = datetime.datetime.now(datetime.timezone.utc)
    info = device_info(device)
    out = args.out or default_out(info, args.quick, date)
    doc = {"schema": 1, "date": date.isoformat(timespec="seconds"), "device": info,
           "versions": versions(), "git": git_info(), "argv": sys.argv[1:] if argv is None else argv,
           "quick": args.quick, "timing": dataclasses.asdict(timing),
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                    "matmul": torch.backends.cuda.matmul.allow_tf32},
           "peaks_tflops": {}, "cases": [c.to_dict() for c in cases], "results": []}
    peaks = Peaks(device, args.quick)
    for key in dict.fromkeys(peak_key(c, device) for c in cases):
        print(f"measuring the {key} matmul peak ...", file=sys.stderr, flush=True)
        peaks.get_peak(key)
    doc["peaks_tflops"] = peaks
    todo = [(c, p) for c in cases for p in providers]
    t_start = time.perf_counter()
    for n, (case, provider) in enumerate(todo, 1):
        t0 = time.perf_counter()
        row = run_one(case, provider, device, timing, peaks, verbose=args.verbose)
        doc["results"].append(row)
        if row["status"] != "skipped":
            what = (f"{row['median_s'] * 1e3:.3f} ms" if row["status"] == "ok"
                    else f"error: {row['reason']}")
            print(f"[{n}/{len(todo)}] {case.id} {provider}: {what} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        add_ratios(doc["results"])
        doc["peaks_tflops"] = dict(peaks)
        doc["wall_s"] = time.perf_counter() - t_start
        write_json(doc, out)  # after every result: a crash keeps what was measured
    print(format_table(doc))
    print(f"\nresult: {out} ({doc['wall_s']:.0f} s)")
    if args.plot:
        plot(doc, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cli() -> None:
    from .config import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
