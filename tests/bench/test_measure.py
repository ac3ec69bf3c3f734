"""gan_fast.bench's measurement without timing anything: eager-best reports the variant whose measured
time is the smallest, the tutorial step (issue #16's baseline) trains both networks, and a case's
providers take turns round by round."""
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


def test_providers_of_a_case_take_turns_and_a_failing_one_stops_no_other(monkeypatch):
    """python -m gan_fast.bench times a case's providers in alternation (measure.run_case_interleaved):
    each one's warm-up and first round alone, then one round each per turn, in a rotating order; a
    provider whose build or a later round raises is an error row and the others are measured."""
    from gan_fast.bench.timing import Runner

    case = step_case("tiny", 8)
    calls = []

    def fake_build(case_, provider, device, variant=None):
        if provider == "triton":
            raise RuntimeError("no triton here\nsecond line")
        name = provider if variant is None else f"{provider}[{variant}]"

        def call():
            if provider == "ext" and calls.count(name) == 2:  # warm-up and first round, then it fails
                raise ValueError("lost the device")
            calls.append(name)
        return Runner(call, device, 0.0)

    monkeypatch.setattr(measure, "build_case", fake_build)
    monkeypatch.setattr(measure, "unavailable_reason", lambda *a: None)
    timing = default_timing("cpu", quick=True)
    timing.warmup, timing.rounds, timing.steps_per_measure = 1, 3, 1
    rows = measure.run_case_interleaved(case, ["tutorial", "triton", EAGER_BEST, "ext"], torch.device("cpu"),
                                        timing, None)
    names = ["tutorial", *(f"{EAGER_BEST}[{v}]" for v in eager_variants(case))]
    solo = [n for n in names + ["ext"] for _ in range(2)]  # warm-up call, then its first round
    turns = names[1:] + names[:1] + names[2:] + names[:2]  # rounds 1 and 2, each started one later; ext failed
    assert calls == solo + turns
    by = {r["provider"]: r for r in rows}
    assert by["triton"]["status"] == "error" and by["triton"]["reason"] == "RuntimeError: no triton here"
    assert by["ext"]["status"] == "error" and by["ext"]["reason"] == "ValueError: lost the device"
    for provider in ("tutorial", EAGER_BEST):
        assert by[provider]["status"] == "ok" and by[provider]["rounds"] == 3 and by[provider]["interleaved"]
    assert by[EAGER_BEST]["variant"] in eager_variants(case)
