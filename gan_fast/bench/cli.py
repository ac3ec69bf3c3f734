"""``python -m gan_fast.bench``: run the cases, print one table, write a JSON result (docs/performance.md)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

import torch

from ..config import UserError, pick_device
from .cases import PROVIDERS, default_cases, select_cases, unavailable_reason
from .measure import add_ratios, run_case_interleaved, run_one
from .report import default_out, device_info, format_table, git_info, plot, versions, write_json
from .timing import ALWAYS_PEAKS, Peaks, default_timing, peak_key


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gan_fast.bench",
        description="Benchmark the fused backends against eager PyTorch and torch.compile: the fused "
                    "ops and the whole training step. Prints one table, writes a JSON result.")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--cases", default="ops,step",
                   help="comma-separated kinds to run: ops, step (default both)")
    p.add_argument("--match", default=None,
                   help="comma-separated substrings; run only the cases whose id contains one")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help=f"comma-separated providers (default all: {','.join(PROVIDERS)})")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one case per op, few iterations: a smoke test, not a measurement")
    p.add_argument("--steps-per-measure", type=int, default=None,
                   help="calls per timed round (default: enough for ~50 ms on a GPU, ~200 ms on a CPU)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds; the median is reported")
    p.add_argument("--no-interleave", action="store_true",
                   help="time each provider's rounds in one go, one provider after the other (default: the "
                        "providers of a case take turns, one round each, so a drifting machine speed slows "
                        "them alike)")
    p.add_argument("--warmup", type=int, default=None,
                   help="synchronised calls before timing (the first compiles / captures)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's default, all cores; --quick on a CPU: 1, "
                        "which keeps a smoke run fast on a busy machine)")
    p.add_argument("--out", default=None,
                   help="JSON result path (default bench/results/<device-slug>-<date>.json)")
    p.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                   help="don't run: print the table of (and --plot) an earlier result")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a bar chart of images/s per provider per case")
    p.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")
    return p


def _split(s: str | None) -> list[str]:
    return [t.strip() for t in (s or "").split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--from {args.from_json}: {e}") from None
        print(format_table(doc))
        if args.plot:
            plot(doc, args.plot)
            print(f"plot: {args.plot}")
        return 0

    device = pick_device(args.device)
    kinds = _split(args.cases)
    bad = [k for k in kinds if k.rstrip("s") not in ("op", "step")]
    if bad or not kinds:
        raise UserError(f"--cases takes ops and/or step, got {args.cases!r}")
    providers = _split(args.providers)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise UserError(f"--providers: unknown {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(PROVIDERS)}")
    cases = select_cases(default_cases(device, args.quick), kinds, _split(args.match))
    if not cases:
        raise UserError("no case matches --cases / --match (see --list)")
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(threads)
    timing = default_timing(device, args.quick)
    for name in ("steps_per_measure", "rounds", "warmup"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
            setattr(timing, name, value)

    if args.list:
        for c in cases:
            avail = [p if unavailable_reason(c, p, device) is None else f"({p})" for p in providers]
            print(f"{c.id:60s} {c.flops / 1e9:10.3f} GFLOP  {' '.join(avail)}")
        print("(provider): unavailable here")
        return 0

    date = datetime.datetime.now(datetime.timezone.utc)
    info = device_info(device)
    out = args.out or default_out(info, args.quick, date)
    doc = {"schema": 1, "date": date.isoformat(timespec="seconds"), "device": info,
           "versions": versions(), "git": git_info(), "argv": sys.argv[1:] if argv is None else argv,
           "quick": args.quick, "timing": dataclasses.asdict(timing),
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                    "matmul": torch.backends.cuda.matmul.allow_tf32},
           "peaks_tflops": {}, "cases": [c.to_dict() for c in cases], "results": []}
    peaks = Peaks(device, args.quick)
    for key in dict.fromkeys([*ALWAYS_PEAKS, *(peak_key(c, device) for c in cases)]):
        print(f"measuring the {key} matmul peak ...", file=sys.stderr, flush=True)
        peaks.get_peak(key)
    doc["peaks_tflops"] = peaks
    t_start = time.perf_counter()
    for n, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        if args.no_interleave:
            rows = [run_one(case, provider, device, timing, peaks, verbose=args.verbose) for provider in providers]
        else:
            rows = run_case_interleaved(case, providers, device, timing, peaks, verbose=args.verbose)
        doc["results"] += rows
        for row in rows:
            if row["status"] != "skipped":
                what = (f"{row['median_s'] * 1e3:.3f} ms" if row["status"] == "ok"
                        else f"error: {row['reason']}")
                print(f"[{n}/{len(cases)}] {case.id} {row['provider']}: {what}", file=sys.stderr, flush=True)
        print(f"[{n}/{len(cases)}] {case.id}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        add_ratios(doc["results"])
        doc["peaks_tflops"] = dict(peaks)
        doc["wall_s"] = time.perf_counter() - t_start
        write_json(doc, out)  # after every result: a crash keeps what was measured
    print(format_table(doc))
    print(f"\nresult: {out} ({doc['wall_s']:.0f} s)")
    if args.plot:
        plot(doc, args.plot)
        print(f"plot: {args.plot}")
    return 0
