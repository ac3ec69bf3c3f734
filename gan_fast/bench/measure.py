"""One measurement: build, warm up and time a (case, provider) into a result row; the speedup ratios."""
from __future__ import annotations

import statistics
import traceback

import torch

from .cases import COMPILE_MODES, EAGER, Case, unavailable_reason
from .runners import build_case
from .timing import MemoryMeter, Peaks, Timing, cleanup, peak_key, time_rounds, warm_up


def metrics(case: Case, median_s: float, peaks: Peaks | None, device) -> dict:
    """images/s, TFLOP/s and % of peak of a case at ``median_s`` seconds per call."""
    tflops = case.flops / median_s / 1e12
    out = {"median_s": median_s, "images_per_s": case.batch / median_s, "tflops": tflops,
           "flops": case.flops}
    if peaks is not None:
        key = peak_key(case, device)
        out.update(peak_key=key, pct_peak=100 * tflops / peaks.get_peak(key))
    return out


def run_one(case: Case, provider: str, device: torch.device, timing: Timing, peaks: Peaks | None,
            verbose: bool = False) -> dict:
    """Build, warm up and time one (case, provider); a dict of the result (status ok / skipped /
    error, never raises for a provider's failure)."""
    row = {"case": case.id, "kind": case.kind, "provider": provider}
    reason = unavailable_reason(case, provider, device)
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason}
    runner = None
    try:
        meter = MemoryMeter(device)
        runner = build_case(case, provider, device)
        w = warm_up(runner, timing)
        meter.reset()
        times = time_rounds(runner, timing.rounds, w.steps_per_measure)
        median = statistics.median(times)
        problem = runner.check()
        row.update(status="ok", **metrics(case, median, peaks, device), times_s=times,
                   steps_per_measure=w.steps_per_measure, rounds=timing.rounds,
                   memory_bytes=meter.peak_bytes(), memory_kind=meter.kind, build_s=runner.build_s,
                   first_call_s=w.first_call_s, warmup_calls_s=w.calls_s,
                   # what the warm-up cost beyond steady-state calls: compilation, autotuning,
                   # graph capture, cuDNN's algorithm search
                   compile_s=max(0.0, sum(w.calls_s) - len(w.calls_s) * median),
                   time_to_first_step_s=runner.build_s + w.first_call_s)
        if problem:
            row["warning"] = problem
    except Exception as e:  # noqa: BLE001 - one provider's failure is a result, not the end of the run
        if verbose:
            traceback.print_exc()
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        if runner is not None:
            runner.close()
        del runner
        cleanup(device)
    return row


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), "")
    return line[:300]


def add_ratios(results: list[dict]) -> None:
    """speedup_vs_eager = eager time / provider time; speedup_vs_best_compile = fastest compile
    mode's time / provider time (both > 1 when the provider is faster)."""
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for rows in by_case.values():
        ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
        eager = ok.get(EAGER)
        compiled = [r for p, r in ok.items() if p in COMPILE_MODES]
        best = min(compiled, key=lambda r: r["median_s"]) if compiled else None
        for r in ok.values():
            r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if eager else None
            r["speedup_vs_best_compile"] = best["median_s"] / r["median_s"] if best else None
            r["best_compile"] = best["provider"] if best else None
