"""One measurement: build, warm up and time a (case, provider) into a result row; the speedup ratios."""
from __future__ import annotations

import statistics
import traceback

import torch

from .cases import COMPILE_MODES, EAGER, EAGER_BEST, TUTORIAL, Case, unavailable_reason
from .runners import build_case, eager_variants
from .timing import ALWAYS_PEAKS, MemoryMeter, Peaks, Timing, cleanup, peak_key, time_rounds, warm_up


# The ratio columns: every provider against these baselines of its case (> 1: the provider is faster).
BASELINES = (("tutorial", TUTORIAL), ("eager_best", EAGER_BEST), ("eager", EAGER))


def metrics(case: Case, median_s: float, peaks: Peaks | None, device) -> dict:
    """images/s, TFLOP/s and % of the matmul peaks of a case at ``median_s`` seconds per call:
    ``pct_peak`` of the case's own precision (``peak_key``), ``pct_peak_fp32`` / ``pct_peak_bf16`` of
    the measured fp32 and bf16 peaks."""
    tflops = case.flops / median_s / 1e12
    out = {"median_s": median_s, "images_per_s": case.batch / median_s, "tflops": tflops,
           "flops": case.flops}
    if peaks is not None:
        key = peak_key(case, device)
        out.update(peak_key=key, pct_peak=100 * tflops / peaks.get_peak(key),
                   **{f"pct_peak_{k}": 100 * tflops / peaks.get_peak(k) for k in ALWAYS_PEAKS})
    return out


def measure(case: Case, provider: str, device: torch.device, timing: Timing,
            variant: str | None = None) -> dict:
    """Build, warm up and time one (case, provider[, eager variant]): the measured fields of a result
    row, ``median_s`` first. Raises what the provider raises."""
    runner = None
    try:
        meter = MemoryMeter(device)
        runner = build_case(case, provider, device, variant)
        w = warm_up(runner, timing)
        meter.reset()
        times = time_rounds(runner, timing.rounds, w.steps_per_measure)
        median = statistics.median(times)
        out = dict(median_s=median, times_s=times, steps_per_measure=w.steps_per_measure,
                   rounds=timing.rounds, memory_bytes=meter.peak_bytes(), memory_kind=meter.kind,
                   build_s=runner.build_s, first_call_s=w.first_call_s, warmup_calls_s=w.calls_s,
                   # what the warm-up cost beyond steady-state calls: compilation, autotuning,
                   # graph capture, cuDNN's algorithm search
                   compile_s=max(0.0, sum(w.calls_s) - len(w.calls_s) * median),
                   time_to_first_step_s=runner.build_s + w.first_call_s)
        problem = runner.check()
        if problem:
            out["warning"] = problem
        return out
    finally:
        if runner is not None:
            runner.close()
        del runner
        cleanup(device)


def measure_eager_best(case: Case, device: torch.device, timing: Timing) -> tuple[str, dict[str, dict]]:
    """Measure every eager variant of ``case`` in this run: (the fastest, {variant: measurement})."""
    by_variant = {v: measure(case, EAGER_BEST, device, timing, v) for v in eager_variants(case)}
    return min(by_variant, key=lambda v: by_variant[v]["median_s"]), by_variant


def run_one(case: Case, provider: str, device: torch.device, timing: Timing, peaks: Peaks | None,
            verbose: bool = False) -> dict:
    """Build, warm up and time one (case, provider); a dict of the result (status ok / skipped /
    error, never raises for a provider's failure). eager-best's row is its fastest variant's, with
    ``variant`` and every variant's ``variants_median_s``."""
    row = {"case": case.id, "kind": case.kind, "provider": provider}
    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    try:
        if provider == EAGER_BEST:
            variant, by_variant = measure_eager_best(case, device, timing)
            measured = by_variant[variant]
            row.update(variant=variant, variants_median_s={v: m["median_s"] for v, m in by_variant.items()})
        else:
            measured = measure(case, provider, device, timing)
        row.update(status="ok", **metrics(case, measured.pop("median_s"), peaks, device), **measured)
    except Exception as e:  # noqa: BLE001 - one provider's failure is a result, not the end of the run
        if verbose:
            traceback.print_exc()
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
    return row


class _Contender:
    """One (provider[, eager variant]) of a case, built and warmed up, waiting for its rounds."""

    def __init__(self, case: Case, provider: str, device: torch.device, timing: Timing,
                 variant: str | None = None):
        self.provider, self.variant, self.runner, self.times = provider, variant, None, []
        meter = MemoryMeter(device)
        self.runner = build_case(case, provider, device, variant)
        self.warm = warm_up(self.runner, timing)
        # its memory: one round alone (the other contenders' memory is already resident)
        meter.reset()
        self.times += time_rounds(self.runner, 1, self.warm.steps_per_measure)
        self.memory_bytes, self.memory_kind = meter.peak_bytes(), meter.kind

    def measured(self) -> dict:
        """The fields measure() returns, from this contender's rounds."""
        median, w = statistics.median(self.times), self.warm
        out = dict(median_s=median, times_s=self.times, steps_per_measure=w.steps_per_measure,
                   rounds=len(self.times), memory_bytes=self.memory_bytes, memory_kind=self.memory_kind,
                   build_s=self.runner.build_s, first_call_s=w.first_call_s, warmup_calls_s=w.calls_s,
                   compile_s=max(0.0, sum(w.calls_s) - len(w.calls_s) * median),
                   time_to_first_step_s=self.runner.build_s + w.first_call_s, interleaved=True)
        problem = self.runner.check()
        if problem:
            out["warning"] = problem
        return out


def run_case_interleaved(case: Case, providers: list[str], device: torch.device, timing: Timing,
                         peaks: Peaks | None, verbose: bool = False) -> list[dict]:
    """run_one's rows for every provider of ``case``, timed in alternation: each provider (and each
    variant of eager-best) is built and warmed up, then round r runs one timed round of each, in an
    order rotated by r. A machine whose speed drifts (a shared or virtual CPU: 10-30% over minutes
    here) then slows every provider of the case alike, and their ratios hold where one provider's
    rounds after another's would not."""
    rows, contenders = {}, []
    try:
        for provider in providers:
            rows[provider] = {"case": case.id, "kind": case.kind, "provider": provider}
            reason = unavailable_reason(case, provider, device)
            if reason is not None:
                rows[provider].update(status="skipped", reason=reason)
                continue
            try:
                for variant in eager_variants(case) if provider == EAGER_BEST else [None]:
                    contenders.append(_Contender(case, provider, device, timing, variant))
            except Exception as e:  # noqa: BLE001 - one provider's failure is a result, not the end of the run
                contenders = _drop(contenders, rows[provider], e, verbose)
        for r in range(1, timing.rounds):  # round 0 was each one's own, alone, with its memory
            turn = contenders[r % len(contenders):] + contenders[:r % len(contenders)] if contenders else []
            for c in turn:
                if c not in contenders:  # its provider failed earlier in this turn
                    continue
                try:
                    c.times += time_rounds(c.runner, 1, c.warm.steps_per_measure)
                except Exception as e:  # noqa: BLE001 - as above, in a later round
                    contenders = _drop(contenders, rows[c.provider], e, verbose)
        for provider, row in rows.items():
            mine = [c for c in contenders if c.provider == provider]
            if not mine or "status" in row:
                continue
            by_variant = {c.variant: c.measured() for c in mine}
            if provider == EAGER_BEST:
                variant = min(by_variant, key=lambda v: by_variant[v]["median_s"])
                row.update(variant=variant, variants_median_s={v: m["median_s"] for v, m in by_variant.items()})
            else:
                variant = None
            measured = by_variant[variant]
            row.update(status="ok", **metrics(case, measured.pop("median_s"), peaks, device), **measured)
    finally:
        for c in contenders:
            c.runner.close()
        contenders.clear()
        cleanup(device)
    return list(rows.values())


def _drop(contenders: list, row: dict, e: Exception, verbose: bool) -> list:
    """Record ``e`` as the error of ``row``'s provider, close its contenders and return the others."""
    if verbose:
        traceback.print_exc()
    row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
    for c in contenders:
        if c.provider == row["provider"]:
            c.runner.close()
    return [c for c in contenders if c.provider != row["provider"]]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), "")
    return line[:300]


def add_ratios(results: list[dict]) -> None:
    """speedup_vs_<baseline> = the baseline's time / the provider's time for each of ``BASELINES``
    (tutorial, eager-best, the reference); speedup_vs_best_compile = the fastest compile mode's time /
    the provider's time. Above 1 when the provider is faster; None where the baseline did not run."""
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for rows in by_case.values():
        ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
        compiled = [r for p, r in ok.items() if p in COMPILE_MODES]
        best = min(compiled, key=lambda r: r["median_s"]) if compiled else None
        for r in ok.values():
            for name, provider in BASELINES:
                base = ok.get(provider)
                r[f"speedup_vs_{name}"] = base["median_s"] / r["median_s"] if base else None
            r["speedup_vs_best_compile"] = best["median_s"] / r["median_s"] if best else None
            r["best_compile"] = best["provider"] if best else None
