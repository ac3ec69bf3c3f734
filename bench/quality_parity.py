"""Does a fused backend learn what the reference learns? And how fast does each reach a given quality?

    python bench/quality_parity.py                      # parity: FD of each fused backend vs the
                                                        # reference's seed-to-seed spread
    python bench/quality_parity.py --time-to-quality    # seconds until the digits FD first drops
                                                        # below --threshold, per backend

Each run is ``python -m gan_fast.train`` on the embedded digits (in this process, through
``gan_fast.train.main``) with ``--eval-every``; the digits FD comes from the run's metrics.jsonl
(gan_fast.eval; docs/quality.md). Parity holds when every fused run's final digits FD lies within
[min - margin, max + margin] of the reference runs' FDs over ``--seeds``, with margin = the larger of
``--margin`` x (max - min) and ``--min-margin`` x the median: GAN training is chaotic, so a fused
backend (different rounding) from the same seed is another draw from the seed-to-seed distribution,
not a copy of the reference run, and a range of three draws misses a fourth half of the time. A
broken fused op is far outside (the FD of an untrained generator is ~3700, noise ~2200; trained runs
are in the low hundreds).

``test_fused_ext_learns_what_the_reference_learns`` in tests/test_eval.py is the short CI version.
This file is not collected by pytest (not a test_*.py file). Times are wall-clock training seconds
(evaluation excluded) on this machine; on a shared CPU use --threads 1, which is both faster and
steadier there than two contended threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gan_fast.backends import unavailable_reason  # noqa: E402
from gan_fast.train import main as train_main  # noqa: E402


def quality_run(backend: str, seed: int, args, out: str, amp: str = "off") -> list[dict]:
    """Train one run; its evaluation rows (step, digits_fd, ..., train_s)."""
    flags = ["--backend", backend, "--seed", str(seed), "--steps", str(args.steps),
             "--ngf", str(args.ngf), "--ndf", str(args.ndf), "--nz", str(args.nz),
             "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every),
             "--eval-n", str(args.n), "--device", args.device, "--out", out,
             "--log-every", str(args.steps), "--sample-every", str(10 * args.steps),
             "--checkpoint-every", str(10 * args.steps)]
    if args.ema is not None:
        flags += ["--ema", str(args.ema)]
    # the reference stays fp32: what a fused run is held to
    flags += ["--amp", "off" if backend == "reference" else amp]
    code = train_main(flags)
    if code != 0:
        raise SystemExit(f"training {backend} seed {seed} exited with {code}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "digits_fd" in r]


def available_backends(requested: list[str], device: str) -> list[str]:
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out = []
    for name in requested:
        reason = unavailable_reason(name, dev)
        if reason is None:
            out.append(name)
        else:
            print(f"skipping {name}: {reason}")
    return out


def parity(args) -> int:
    backends = available_backends(args.backends, args.device)
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            seeds = args.seeds if backend == "reference" else args.seeds[:args.fused_seeds]
            for amp in ["off"] if backend == "reference" else args.fused_amp:
                run = backend if amp == "off" else f"{backend} {amp}"
                for seed in seeds:
                    rows = quality_run(backend, seed, args, os.path.join(tmp, f"{backend}-{amp}-{seed}"), amp)
                    fd = rows[-1]["digits_fd"]
                    results.setdefault(run, {})[seed] = fd
                    curve = ", ".join(f"{r['step']}: {r['digits_fd']:.0f}" for r in rows)
                    print(f"{run:9s} seed {seed}: final digits FD {fd:8.2f}  "
                          f"(train {rows[-1]['train_s']:.0f} s; curve {curve})", flush=True)
    ref = list(results.get("reference", {}).values())
    if len(ref) < 2:
        print("parity needs the reference on at least 2 seeds")
        return 2
    lo, hi = min(ref), max(ref)
    margin = max(args.margin * (hi - lo), args.min_margin * statistics.median(ref))
    print(f"reference seeds: digits FD in [{lo:.2f}, {hi:.2f}]; accepted: [{lo - margin:.2f}, "
          f"{hi + margin:.2f}] (margin: {args.margin} x spread, at least {args.min_margin} x median)")
    ok = True
    for backend, fds in results.items():
        if backend == "reference":
            continue
        for seed, fd in fds.items():
            inside = lo - margin <= fd <= hi + margin
            ok &= inside
            print(f"{backend} seed {seed}: {fd:.2f} {'within' if inside else 'OUTSIDE'} the reference spread")
    return 0 if ok else 1


def time_to_quality(args) -> int:
    backends = available_backends(args.backends, args.device)
    print(f"seconds of training until the digits FD (n={args.n}, checked every {args.eval_every} steps) "
          f"first drops below {args.threshold}:")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for seed in args.seeds[:args.fused_seeds]:
                rows = quality_run(backend, seed, args, os.path.join(tmp, f"{backend}-{seed}"),
                                   args.fused_amp[0])
                hit = next((r for r in rows if r["digits_fd"] < args.threshold), None)
                steps_s = rows[-1]["step"] / rows[-1]["train_s"]
                if hit is None:
                    print(f"  {backend:9s} seed {seed}: not reached in {args.steps} steps "
                          f"(best {min(r['digits_fd'] for r in rows):.1f}; {steps_s:.1f} steps/s)")
                else:
                    print(f"  {backend:9s} seed {seed}: {hit['train_s']:7.1f} s (step {hit['step']}, "
                          f"FD {hit['digits_fd']:.2f}; {steps_s:.1f} steps/s)", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time-to-quality", action="store_true")
    p.add_argument("--backends", nargs="+", default=["reference", "ext", "triton"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--fused-seeds", type=int, default=1,
                   help="seeds per fused backend (the first ones of --seeds); time-to-quality uses "
                        "as many for every backend")
    p.add_argument("--steps", type=int, default=None, help="default: 1500 (parity), 3000 (time-to-quality)")
    p.add_argument("--eval-every", type=int, default=None, help="default: 250 (parity), 100 (time)")
    p.add_argument("--n", type=int, default=1000, help="generated samples per evaluation")
    p.add_argument("--fused-amp", choices=("off", "bf16", "fp16"), nargs="+", default=["off"],
                   help="autocast of the fused runs, one set of runs each (issue #16: does bf16 learn as the "
                        "fp32 reference does?); time-to-quality uses the first")
    p.add_argument("--threshold", type=float, default=100.0,
                   help="digits FD target of --time-to-quality (the floor is 19, see docs/quality.md)")
    p.add_argument("--margin", type=float, default=1.0, help="accepted margin, in units of the spread")
    p.add_argument("--min-margin", type=float, default=0.25, help="smallest margin, a fraction of the median")
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--nz", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ema", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 3000 if args.time_to_quality else 1500
    if args.eval_every is None:
        args.eval_every = 100 if args.time_to_quality else 250
    if args.threads:
        torch.set_num_threads(args.threads)
    return time_to_quality(args) if args.time_to_quality else parity(args)


if __name__ == "__main__":
    sys.exit(main())
