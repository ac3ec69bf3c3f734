"""Every case of ``gan_fast.bench`` (each fused op forward + backward, the whole training step) with
every provider, through pytest-benchmark: ``pytest bench/ --benchmark-only``. bench/conftest.py
parametrizes ``case`` and ``provider`` and holds the run; ``-k`` selects by id, e.g. ``-k "step and ext"``."""
import pytest

pytest.importorskip("pytest_benchmark")


def test_bench(benchmark, bench_run, case, provider):
    bench_run(benchmark, case, provider)
