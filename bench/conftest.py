"""pytest-benchmark runs of the cases of ``gan_fast.bench``: ``pytest bench/ --benchmark-only``.

The cases, providers and measurement are those of ``python -m gan_fast.bench``; this file only
parametrizes over them and times them with pytest-benchmark. Settings come from the environment:

- ``GAN_FAST_BENCH_DEVICE``: auto (default: cuda when available), cpu, cuda, cuda:N
- ``GAN_FAST_BENCH_QUICK=1``: tiny shapes, few iterations (a smoke test, not a measurement)
- ``GAN_FAST_BENCH_STEPS_PER_MEASURE``, ``GAN_FAST_BENCH_ROUNDS``, ``GAN_FAST_BENCH_WARMUP``
- ``GAN_FAST_BENCH_THREADS``: CPU threads of torch (default: torch's default; 1 with QUICK on a CPU)

See docs/performance.md.
"""
from __future__ import annotations

import os

import pytest
import torch

from gan_fast.bench.cases import EAGER_BEST, PROVIDERS, default_cases, unavailable_reason
from gan_fast.bench.measure import measure_eager_best, metrics
from gan_fast.bench.runners import build_case
from gan_fast.bench.timing import MemoryMeter, Peaks, SyncEvery, Timing, cleanup, default_timing, warm_up


def settings_from_env() -> tuple[torch.device, bool, Timing]:
    """(device, quick, timing) from the GAN_FAST_BENCH_* variables above; sets torch's CPU threads
    (quick on a CPU: 1, as ``python -m gan_fast.bench --quick``)."""
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


DEVICE, QUICK, TIMING = settings_from_env()


def pytest_generate_tests(metafunc):
    """Every test asking for ``case`` and ``provider`` runs on every case with every provider (the
    one parametrization of the op and the step benchmarks)."""
    if {"case", "provider"} <= set(metafunc.fixturenames):
        cases = default_cases(DEVICE, QUICK)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
        metafunc.parametrize("provider", PROVIDERS)


@pytest.fixture(scope="session")
def peaks():
    """The device's measured matmul peaks (fp32 / tf32 / bf16), each measured on first use."""
    return Peaks(DEVICE, QUICK)


@pytest.fixture
def bench_run(peaks):
    """``bench_run(benchmark, case, provider)``: skip with the reason where ``provider`` can't run
    ``case``; else build, warm up (untimed), and time ``TIMING.rounds`` rounds of ``steps_per_measure``
    calls with pytest-benchmark (a device synchronisation ends every round); the case's images/s,
    TFLOP/s, % of peak, memory and compile time go to the benchmark's extra_info (--benchmark-json).
    eager-best first measures its variants the way ``python -m gan_fast.bench`` does, then times the
    fastest (``variant`` in extra_info)."""

    def run(benchmark, case, provider):
        reason = unavailable_reason(case, provider, DEVICE)
        if reason is not None:
            pytest.skip(reason)
        benchmark.group = case.id
        variant = measure_eager_best(case, DEVICE, TIMING)[0] if provider == EAGER_BEST else None
        meter = MemoryMeter(DEVICE)
        runner = build_case(case, provider, DEVICE, variant)
        try:
            w = warm_up(runner, TIMING)
            meter.reset()
            benchmark.pedantic(SyncEvery(runner, w.steps_per_measure), rounds=TIMING.rounds,
                               iterations=w.steps_per_measure, warmup_rounds=0)
            info = {"case": case.id, "provider": provider, "batch": case.batch, "dtype": case.dtype,
                    "variant": variant, "steps_per_measure": w.steps_per_measure, "build_s": runner.build_s,
                    "first_call_s": w.first_call_s,
                    "time_to_first_step_s": runner.build_s + w.first_call_s,
                    "memory_bytes": meter.peak_bytes(), "memory_kind": meter.kind}
            stats = getattr(getattr(benchmark, "stats", None), "stats", None)  # None: --benchmark-disable
            if stats is not None:
                info.update(metrics(case, stats.median, peaks, DEVICE))
                info["compile_s"] = max(0.0, sum(w.calls_s) - len(w.calls_s) * stats.median)
            benchmark.extra_info.update(info)
            problem = runner.check()
            assert problem is None, problem
        finally:
            runner.close()
            del runner
            cleanup(DEVICE)

    return run
