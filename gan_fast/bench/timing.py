"""Timing one benchmark instance: warm-up, timed rounds, peak memory, the device's matmul peaks."""
from __future__ import annotations

import contextlib
import gc
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cases import Case


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

# Measured on every run whatever the cases' precisions: every row reports its % of both.
ALWAYS_PEAKS = ("fp32", "bf16")


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
