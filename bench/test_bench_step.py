"""The whole training step (``Trainer.train_step``: D on real and fake, G through D, both Adam steps)
on batches already in device memory, for every provider. ``pytest bench/ --benchmark-only``."""
import pytest

from gan_fast import bench as gb

pytest.importorskip("pytest_benchmark")

DEVICE, QUICK, _ = gb.pytest_settings()
CASES = gb.select_cases(gb.default_cases(DEVICE, QUICK), kinds=["step"])


@pytest.mark.parametrize("provider", gb.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, bench_settings, peaks, case, provider):
    device, timing = bench_settings
    gb.run_pytest_benchmark(benchmark, case, provider, device, timing, peaks)
