"""Benchmarks of the fused backends against eager PyTorch and torch.compile, in one definition of the
cases used twice: ``python -m gan_fast.bench`` (cli.py) prints one table and writes a JSON result;
``pytest bench/ --benchmark-only`` runs the same cases through pytest-benchmark (bench/_pytest.py).

cases.py: the cases and providers; runners.py: what one iteration runs; timing.py: warm-up, timing,
memory, the matmul peaks; measure.py: one result row and the ratios; report.py: metadata, JSON, table,
plot. docs/performance.md explains the method and the output.
"""
