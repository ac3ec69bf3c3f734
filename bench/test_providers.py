"""The step baselines of issue #16 without timing anything: eager-best reports the variant whose
measured time is the smallest, and the tutorial step trains both networks. ``pytest bench/test_providers.py``
(``--benchmark-only`` skips it)."""
import pytest
import torch

from gan_fast.bench import measure
from gan_fast.bench.cases import EAGER_BEST, step_case
from gan_fast.bench.runners import eager_variants, tutorial_step
from gan_fast.bench.timing import default_timing


@pytest.mark.parametrize("fastest", [0, 1])
def test_eager_best_reports_the_variant_measured_fastest(monkeypatch, fastest):
    case = step_case("tiny", 8)
    variants = eager_variants(case)
    assert variants == ["fp32 NCHW", "fp32 channels_last"]
    seconds = {v: 0.001 if i == fastest else 0.002 + i for i, v in enumerate(variants)}
    measured = []

    def fake_measure(case_, provider, device, timing, variant=None):
        assert (case_, provider) == (case, EAGER_BEST)
        measured.append(variant)
        return {"median_s": seconds[variant], "times_s": [seconds[variant]]}

    monkeypatch.setattr(measure, "measure", fake_measure)
    row = measure.run_one(case, EAGER_BEST, torch.device("cpu"), default_timing("cpu", quick=True), None)
    assert sorted(measured) == sorted(variants)  # every variant measured, in the same run
    assert row["status"] == "ok", row
    assert row["variant"] == variants[fastest]
    assert row["median_s"] == row["times_s"][0] == 0.001
    assert row["variants_median_s"] == seconds


def test_eager_variants_follow_the_case_precision():
    assert eager_variants(step_case("tiny", 8, "bf16")) == ["bf16 NCHW", "bf16 channels_last"]


def test_tutorial_step_updates_both_networks():
    step = tutorial_step("tiny", "cpu")
    before = {name: p.detach().clone() for net in ("netG", "netD")
              for name, p in getattr(step, net).named_parameters(prefix=net)}
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    losses = step(real)
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all())
    after = {name: p for net in ("netG", "netD") for name, p in getattr(step, net).named_parameters(prefix=net)}
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert not unchanged, f"parameters the step did not update: {unchanged}"
    assert {n.split(".")[0] for n in after} == {"netG", "netD"}
