"""pytest-benchmark runs of the cases of ``gan_fast.bench``: ``pytest bench/ --benchmark-only``.

The cases, providers and measurement are those of ``python -m gan_fast.bench`` (gan_fast/bench.py);
these files only parametrize over them. Settings come from the environment:

- ``GAN_FAST_BENCH_DEVICE``: auto (default: cuda when available), cpu, cuda, cuda:N
- ``GAN_FAST_BENCH_QUICK=1``: tiny shapes, few iterations (a smoke test, not a measurement)
- ``GAN_FAST_BENCH_STEPS_PER_MEASURE``, ``GAN_FAST_BENCH_ROUNDS``, ``GAN_FAST_BENCH_WARMUP``
- ``GAN_FAST_BENCH_THREADS``: CPU threads of torch (default: torch's default; 1 with QUICK on a CPU)

See docs/performance.md.
"""
import pytest

from gan_fast import bench as gb

DEVICE, QUICK, TIMING = gb.pytest_settings()


@pytest.fixture(scope="session")
def peaks():
    """The device's measured matmul peaks (fp32 / tf32 / bf16), each measured on first use."""
    return gb.Peaks(DEVICE, QUICK)


@pytest.fixture
def bench_settings():
    return DEVICE, TIMING
