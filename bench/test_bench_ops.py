"""Each fused op, forward + backward, at the layer shapes where the models run it: every provider
(reference eager, torch.compile modes, triton, ext) on the same case. ``pytest bench/ --benchmark-only``."""
import pytest

from gan_fast import bench as gb

pytest.importorskip("pytest_benchmark")

DEVICE, QUICK, _ = gb.pytest_settings()
CASES = gb.select_cases(gb.default_cases(DEVICE, QUICK), kinds=["op"])


@pytest.mark.parametrize("provider", gb.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(benchmark, bench_settings, peaks, case, provider):
    device, timing = bench_settings
    gb.run_pytest_benchmark(benchmark, case, provider, device, timing, peaks)
