"""One command that proves a GPU machine: ``python -m gan_fast.gpu_check OUT_DIR``.

Offline, in at most 8 minutes on an H100/H200, from a source checkout: the environment (versions,
device, driver, commit) written to OUT_DIR/gpu_check.json before anything else runs; the C++
extension loaded with its CUDA kernels (rebuilt in place for this device's architecture when it lacks
them); every gpu-marked test and the tests that run on CUDA when it is there, each run with a JUnit
XML; a 200-step quality smoke per backend through ``python -m gan_fast.train``; the step and a subset
of the ops benchmarked for every provider through ``python -m gan_fast.bench``. Every stage is a
subprocess with a time budget; what ran out is recorded as ``timeout``. The JSON is rewritten after
each stage, OUT_DIR/gpu_check.log holds everything the stages printed, and a summary table ends the
run. Exit 0: all passed; 1: a stage failed (named in the summary); 2: no CUDA device, or a bad OUT_DIR.
docs/gpu.md says how to commit the results and what to do with them.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import ArgumentParser, UserError, run_cli
from .files import write_atomic

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 minutes in all, less the grace of the last stage to be stopped and the writing of the results
TOTAL_BUDGET_S = 450
# A stage past its budget gets SIGINT first (pytest then still writes its JUnit XML, train its
# checkpoint; bench has written its JSON after every result), SIGKILL after this many seconds.
GRACE_S = 15
# A stage with less time than this left is not started: it could not finish anything.
MIN_STAGE_S = 10

# ------------------------------------------------------------------------------------------- stages

# Every test file that takes a CUDA device when there is one (tests/conftest.py's DEVICE, or
# "cuda" itself): their tests other than the gpu-marked ones, which the gpu-tests run has.
CUDA_TEST_PATHS = ("tests/backends", "tests/test_fuse.py", "tests/test_cuda_graphs.py", "tests/test_docs.py")
PYTEST_RUNS = {
    "gpu-tests": ("-m", "gpu", "tests"),
    "cuda-tests": ("-m", "not gpu", *CUDA_TEST_PATHS),
}


@dataclass(frozen=True)
class BenchRun:
    cases: str              # --cases
    match: tuple            # --match: case ids of gan_fast.bench on CUDA
    providers: tuple        # --providers


STEP_CASES = ("step/dcgan64-b128", "step/dcgan64-b128-bf16", "step/dcgan64-b1024-bf16", "step/digits-b64")
# one case per fused op, at DCGAN-64 batch 128
OP_CASES = ("op/dcgan64-b128/G.3/conv_transpose2d_bn_relu", "op/dcgan64-b128/G.12/conv_transpose2d_tanh",
            "op/dcgan64-b128/D.0/conv2d_leaky_relu", "op/dcgan64-b128/D.2/conv2d_bn_leaky_relu",
            "op/dcgan64-b128/D.11/d_head_bce_with_logits", "op/dcgan64-b128/Gup.3/upsample_conv2d_bn_relu",
            "op/dcgan64-b128/Gmlp.6/linear_bn_leaky_relu")
COMPILE_PROVIDERS = ("compile-default", "compile-reduce-overhead", "compile-max-autotune-no-cudagraphs")
# Eager and fused first, torch.compile last: compiling (max-autotune above all) is the slowest part,
# and a budget that runs out there still leaves the fused numbers measured.
BENCH_RUNS = {
    "bench-step": BenchRun("step", STEP_CASES, ("tutorial", "reference", "eager-best", "reference+graphs",
                                                "triton", "ext")),
    "bench-ops": BenchRun("ops", OP_CASES, ("reference", "triton", "ext")),
    "bench-compile": BenchRun("ops,step", OP_CASES + STEP_CASES, COMPILE_PROVIDERS),
}

QUALITY_BACKENDS = ("reference", "triton", "ext")
QUALITY_FLAGS = ("--steps", "200", "--batch-size", "64", "--seed", "0", "--eval-every", "200",
                 "--eval-n", "1000", "--log-every", "200", "--sample-every", "100000",
                 "--checkpoint-every", "100000")
# The digits FD after 200 steps: a fused backend's run is another draw of a chaotic training (other
# rounding), so it is judged against a band, not the reference's number: within a factor of 2 of it.
# A broken op does not learn (untrained G: 3722; docs/quality.md), far outside the band, and the
# reference must itself have learned, to below half of that.
UNTRAINED_FD = 3722.0
FD_FACTOR = 2.0


@dataclass
class Context:
    out_dir: str
    log: object             # the open gpu_check.log; subprocesses write into it
    env: dict               # the subprocesses' environment
    capability: str         # "9.0"
    deadline: float         # time.monotonic() by which every stage has ended


@dataclass
class Outcome:
    status: str             # passed / failed / timeout / not-run
    summary: str            # one line for the table
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    run: Callable[[Context, float], Outcome]


def run_command(ctx: Context, cmd: list[str], budget_s: float, env: dict | None = None) -> int | None:
    """Run ``cmd`` in the checkout with its output into the log; its exit code, None when it ran past
    ``budget_s`` (then stopped, with its process group)."""
    ctx.log.write(f"\n$ {shlex.join(cmd)}    # budget {budget_s:.0f} s\n")
    ctx.log.flush()
    proc = subprocess.Popen(cmd, cwd=CHECKOUT, env={**ctx.env, **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=ctx.log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None
    except BaseException:  # gpu_check interrupted: the command's own session never gets the terminal's ^C
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the command's process group, SIGKILL to what is left of it after GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _timeout(budget_s: float, what: str, details: dict) -> Outcome:
    return Outcome("timeout", f"ran out of its {budget_s:.0f} s budget; {what}", details)


# ---- extension

# Loads gan_fast._C in a fresh interpreter (a rebuilt library can't be reloaded in this one) and
# calls one of its CUDA kernels: a library built without this architecture fails there.
_EXT_PROBE = """
import json, torch
from gan_fast.backends import ext
out = {"reason": ext.unavailable_reason(), "build_log": ext.BUILD_LOG, "missing_cuda_ops": [], "call": None}
if out["reason"] is None:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    out["missing_cuda_ops"] = [op for op in ext.OPS if has(f"gan_fast::{op}", "CPU")
                               and not has(f"gan_fast::{op}", "CUDA")]
    x = torch.zeros(8, device="cuda")
    try:
        torch.ops.gan_fast.bce_with_logits(x, x)
        torch.cuda.synchronize()
    except Exception as e:
        out["call"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
print("GPU_CHECK_PROBE " + json.dumps(out))
"""


def _probe_extension(ctx: Context, budget_s: float) -> dict:
    with tempfile.TemporaryFile("w+") as out:
        try:
            subprocess.run([sys.executable, "-c", _EXT_PROBE], cwd=CHECKOUT, env=ctx.env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=budget_s)
        except subprocess.TimeoutExpired:
            return {"problem": f"loading gan_fast._C took over {budget_s:.0f} s"}
        out.seek(0)
        text = out.read()
    ctx.log.write(text)
    line = next((t for t in text.splitlines() if t.startswith("GPU_CHECK_PROBE ")), None)
    if line is None:
        return {"problem": "the probe crashed: " + (text.strip().splitlines() or ["no output"])[-1]}
    probe = json.loads(line.split(" ", 1)[1])
    if probe["reason"]:
        probe["problem"] = probe["reason"]
    elif probe["missing_cuda_ops"]:
        probe["problem"] = "built without CUDA kernels (missing: " + ", ".join(probe["missing_cuda_ops"]) + ")"
    elif probe["call"]:
        probe["problem"] = "its CUDA kernel failed: " + probe["call"]
    return probe


def build_extension(ctx: Context, budget_s: float) -> Outcome:
    """gan_fast._C with working CUDA kernels; else ``setup.py build_ext --inplace`` for this device."""
    t0 = time.monotonic()
    before = _probe_extension(ctx, min(budget_s, 120))
    details = {"before": before, "rebuilt": False, "build_log": before.get("build_log")}
    if "problem" not in before:
        return Outcome("passed", "gan_fast._C loaded, CUDA kernels run (no rebuild)", details)
    if not os.path.isfile(os.path.join(CHECKOUT, "setup.py")):
        return Outcome("failed", f"{before['problem']}; no setup.py to rebuild from (not a checkout)", details)
    details.update(rebuilt=True, arch_list=ctx.capability)
    left = budget_s - (time.monotonic() - t0)
    code = run_command(ctx, [sys.executable, "setup.py", "build_ext", "--inplace"], left,
                       env={"TORCH_CUDA_ARCH_LIST": ctx.capability, "GAN_FAST_FORCE_CUDA": "1",
                            "GAN_FAST_EXT_REQUIRED": "1", "MAX_JOBS": str(os.cpu_count() or 4)})
    if code is None:
        return _timeout(budget_s, f"rebuilding for sm {ctx.capability} (log {details['build_log']})", details)
    details["after"] = after = _probe_extension(ctx, 120)
    details["build_log"] = after.get("build_log", details["build_log"])
    if code != 0 or "problem" in after:
        why = after.get("problem", f"setup.py exited with {code}")
        return Outcome("failed", f"rebuilt for sm {ctx.capability}: {why} (log {details['build_log']})", details)
    return Outcome("passed", f"rebuilt for sm {ctx.capability} ({before['problem']}); CUDA kernels run",
                   details)


# ---- tests

def junit_counts(path: str) -> dict:
    """Counts of a JUnit XML and the ids of the tests that failed (at most 20)."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        tags = {child.tag: child for child in case}
        kind = ("failed" if "failure" in tags else "errors" if "error" in tags
                else "skipped" if "skipped" in tags else "passed")
        counts[kind] += 1
        if kind in ("failed", "errors") and len(failed) < 20:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        if kind == "skipped":  # on a GPU a skip can hide a backend that did not load: say why
            reason = tags["skipped"].get("message", "")
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    return {**counts, "failed_tests": failed, "skip_reasons": skip_reasons}


def _counts_line(c: dict) -> str:
    return f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"


def run_pytest(name: str) -> Callable[[Context, float], Outcome]:
    def run(ctx: Context, budget_s: float) -> Outcome:
        xml = os.path.join(ctx.out_dir, f"{name}.xml")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(xml)  # an earlier run's
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *PYTEST_RUNS[name]]
        # a missing extension fails the ext tests (never skips them), whatever the caller's environment
        code = run_command(ctx, cmd, budget_s, env={"GAN_FAST_EXT_REQUIRED": "1"})
        details = {"junit_xml": xml, "exit_code": code}
        if os.path.isfile(xml):
            details.update(junit_counts(xml))
        counted = _counts_line(details) if "tests" in details else "no JUnit XML written"
        if code is None:
            return _timeout(budget_s, counted + " so far", details)
        ok = code == 0 and details.get("passed", 0) > 0  # all skipped proves nothing
        return Outcome("passed" if ok else "failed", f"{counted} (pytest exit {code})", details)
    return run


# ---- quality

def final_metrics(metrics_jsonl: str) -> dict:
    """The last training row's losses and the last evaluation's digits metrics of a run."""
    out = {}
    with open(metrics_jsonl) as f:
        for row in map(json.loads, f):
            keys = ("loss_d", "loss_g", "d_x", "images_per_s") if "loss_d" in row else (
                ("digits_fd", "digits_coverage", "digits_confidence", "train_s") if "digits_fd" in row else ())
            out.update({k: row[k] for k in keys if k in row})
    return out


def quality_problems(results: dict[str, dict]) -> list[str]:
    """What is wrong with the smoke runs' final numbers ({backend: final_metrics or {"problem"}})."""
    problems = []
    for backend, r in results.items():
        if "problem" in r:
            problems.append(f"{backend}: {r['problem']}")
            continue
        bad = [k for k in ("loss_d", "loss_g", "digits_fd") if not math.isfinite(r.get(k, math.nan))]
        if bad:
            problems.append(f"{backend}: {', '.join(bad)} missing or not finite")
    ref = results.get("reference", {}).get("digits_fd", math.nan)
    if not (math.isfinite(ref) and ref < UNTRAINED_FD / 2):
        return problems + [f"reference: digits FD {ref:.1f} after the smoke run, not below "
                           f"{UNTRAINED_FD / 2:.0f}: it did not learn, so there is no band to judge"]
    for backend, r in results.items():
        fd = r.get("digits_fd", math.nan)
        if backend != "reference" and math.isfinite(fd) and not ref / FD_FACTOR <= fd <= ref * FD_FACTOR:
            problems.append(f"{backend}: digits FD {fd:.1f} outside [{ref / FD_FACTOR:.1f}, "
                            f"{ref * FD_FACTOR:.1f}] (the reference's {ref:.1f} within a factor {FD_FACTOR:g})")
    return problems


def run_quality(ctx: Context, budget_s: float) -> Outcome:
    end = time.monotonic() + budget_s
    results = {}
    for backend in QUALITY_BACKENDS:
        run_dir = os.path.join(ctx.out_dir, "quality", backend)
        cmd = [sys.executable, "-m", "gan_fast.train", *QUALITY_FLAGS, "--device", "cuda",
               "--backend", backend, "--out", run_dir]
        code = run_command(ctx, cmd, max(1.0, end - time.monotonic()))
        if code is None:
            return _timeout(budget_s, f"at backend {backend}", {"runs": results})
        metrics = os.path.join(run_dir, "metrics.jsonl")
        results[backend] = (final_metrics(metrics) if code == 0 and os.path.isfile(metrics)
                            else {"problem": f"gan_fast.train exited with {code}"})
    problems = quality_problems(results)
    fds = ", ".join(f"{b} {r['digits_fd']:.0f}" for b, r in results.items() if "digits_fd" in r)
    details = {"runs": results, "problems": problems, "fd_factor": FD_FACTOR}
    if problems:
        return Outcome("failed", "; ".join(problems), details)
    return Outcome("passed", f"finite losses; digits FD {fds} (within x{FD_FACTOR:g} of the reference)", details)


# ---- benchmarks

def bench_rows(result_json: str) -> list[dict]:
    """The rows of a ``gan_fast.bench`` result, the numbers that matter."""
    with open(result_json) as f:
        doc = json.load(f)
    keep = ("case", "provider", "status", "reason", "warning", "median_s", "images_per_s", "tflops",
            "memory_bytes", "speedup_vs_eager", "compile_s")
    return [{k: r[k] for k in keep if r.get(k) is not None} for r in doc.get("results", [])]


def bench_problems(rows: list[dict]) -> list[str]:
    # on a GPU every (case, provider) asked for can run: a skip is a failure too
    return [f"{r['case']} {r['provider']}: {r.get('warning') or r['status'] + ': ' + r.get('reason', '')}"
            for r in rows if r["status"] != "ok" or "warning" in r]


def fastest_fused(rows: list[dict]) -> dict[str, str]:
    """{case: the faster of triton and ext}: what the CUDA entry of AUTO_ORDER is decided by."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["provider"] in ("triton", "ext") and r["status"] == "ok":
            if r["case"] not in best or r["median_s"] < best[r["case"]]["median_s"]:
                best[r["case"]] = r
    return {case: r["provider"] for case, r in best.items()}


def run_bench(name: str) -> Callable[[Context, float], Outcome]:
    def run(ctx: Context, budget_s: float) -> Outcome:
        spec = BENCH_RUNS[name]
        result = os.path.join(ctx.out_dir, f"{name}.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(result)
        cmd = [sys.executable, "-m", "gan_fast.bench", "--device", "cuda", "--cases", spec.cases,
               "--match", ",".join(spec.match), "--providers", ",".join(spec.providers),
               "--rounds", "5", "--out", result]
        code = run_command(ctx, cmd, budget_s)
        rows = bench_rows(result) if os.path.isfile(result) else []
        problems = bench_problems(rows)
        details = {"result_json": result, "exit_code": code, "rows": rows, "problems": problems,
                   "fastest_fused": fastest_fused(rows)}
        ok = sum(r["status"] == "ok" for r in rows)
        if code is None:
            return _timeout(budget_s, f"{ok} results measured", details)
        if code != 0 or problems or not rows:
            return Outcome("failed", f"{ok} ok; " + ("; ".join(problems[:3]) or f"bench exited with {code}"),
                           details)
        counts = {}
        for provider in details["fastest_fused"].values():
            counts[provider] = counts.get(provider, 0) + 1
        faster = ", ".join(f"{p} {n}" for p, n in counts.items())
        return Outcome("passed", f"{ok} ok" + (f"; fastest fused per case: {faster}" if faster else ""),
                       details)
    return run


STAGES = (
    Stage("extension", 150, build_extension),
    Stage("gpu-tests", 80, run_pytest("gpu-tests")),
    Stage("cuda-tests", 110, run_pytest("cuda-tests")),
    Stage("quality", 90, run_quality),
    Stage("bench-step", 75, run_bench("bench-step")),
    Stage("bench-ops", 30, run_bench("bench-ops")),
    Stage("bench-compile", 55, run_bench("bench-compile")),
)

# ------------------------------------------------------------------------------------------- report


def require_cuda() -> None:
    """UserError (one line, exit 2) without a usable CUDA device."""
    with warnings.catch_warnings():  # a CUDA torch without a driver warns; the error below says it
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
    if not available:
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else "torch.cuda.is_available() is False: no driver or no device")
        raise UserError(f"no CUDA device here ({why}); gan_fast.gpu_check proves a GPU machine and "
                        "needs one")


def prepare_out_dir(path: str) -> str:
    """OUT_DIR created if needed and writable, else a UserError naming why."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"OUT_DIR {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"OUT_DIR {path} can't be written: {e.strerror or e}") from None
    return os.path.abspath(path)


def _driver_version() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def collect_environment() -> dict:
    from .bench.report import device_info, git_info, versions

    from torch.utils import cpp_extension

    return {"device": device_info(torch.device("cuda")), "device_count": torch.cuda.device_count(),
            "versions": {**versions(), "driver": _driver_version()}, "git": git_info(),
            "checkout": CHECKOUT, "python": sys.executable, "cuda_home": cpp_extension.CUDA_HOME,
            "environment": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST",
                                                           "TRITON_DEFAULT_FP_FUSION", "TRITON_CACHE_DIR")}}


def write_report(doc: dict, out_dir: str) -> str:
    path = os.path.join(out_dir, "gpu_check.json")
    write_atomic(path, lambda f: f.write(json.dumps(doc, indent=1) + "\n"), text=True)
    return path


def environment_line(env: dict) -> str:
    dev, v, git = env["device"], env["versions"], env.get("git") or {}
    commit = (git.get("commit") or "no git checkout")[:12] + (" (dirty)" if git.get("dirty") else "")
    return (f"{dev['name']} (sm {dev['capability']}), torch {v['torch']}, triton {v.get('triton')}, "
            f"CUDA {v.get('cuda')}, driver {v.get('driver')}, commit {commit}")


def format_summary(doc: dict) -> str:
    """The table printed at the end: one row per stage, then the verdict."""
    lines = [f"gan_fast.gpu_check: {environment_line(doc['environment'])}",
             f"{'stage':14s} {'status':8s} {'seconds':>8s} {'budget':>7s}  result"]
    for s in doc["stages"]:
        lines.append(f"{s['name']:14s} {s['status']:8s} {s['seconds']:8.1f} {s['budget_s']:7.0f}  {s['summary']}")
    bad = [s["name"] for s in doc["stages"] if s["status"] != "passed"]
    lines.append(f"all {len(doc['stages'])} stages passed" if not bad else f"NOT PASSED: {', '.join(bad)}")
    lines.append(f"results: {doc['out_dir']}/gpu_check.json, log: {doc['out_dir']}/gpu_check.log "
                 f"({doc.get('wall_s', 0):.0f} s)")
    return "\n".join(lines)


def run_stage(stage: Stage, ctx: Context) -> dict:
    left = ctx.deadline - time.monotonic() - GRACE_S
    budget = min(stage.budget_s, left)
    t0 = time.monotonic()
    if budget < MIN_STAGE_S:
        outcome = Outcome("not-run", f"the {TOTAL_BUDGET_S} s total budget ran out before it")
    else:
        try:
            outcome = stage.run(ctx, budget)
        except OSError as e:  # e.g. the disk filled: this stage fails, the report is still written
            outcome = Outcome("failed", f"{type(e).__name__}: {e}")
    return {"name": stage.name, "status": outcome.status, "seconds": time.monotonic() - t0,
            "budget_s": budget if outcome.status != "not-run" else stage.budget_s,
            "summary": outcome.summary, "details": outcome.details}


def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels, not the interpreter
    env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's gan_fast
    return env


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m gan_fast.gpu_check",
                       description="Prove a GPU machine in at most 8 minutes: the extension, every GPU "
                                   "test, a quality smoke per backend, the benchmarks (docs/gpu.md).")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for gpu_check.json, gpu_check.log, the JUnit "
                                                      "XMLs, the benchmark results and the smoke runs")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES),
                   help="comma-separated stages to run (a rerun after a fix); the environment is always "
                        "recorded")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_cuda()  # before anything is written
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    names = [s.name for s in STAGES]
    unknown = sorted(set(wanted) - set(names))
    if unknown or not wanted:
        raise UserError(f"--stages: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(names)}")
    out_dir = prepare_out_dir(args.out_dir)
    start = time.monotonic()
    doc = {"schema": 1, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else argv, "out_dir": out_dir,
           "total_budget_s": TOTAL_BUDGET_S, "environment": collect_environment(), "stages": [], "passed": None}
    write_report(doc, out_dir)  # first: a crash in a stage still leaves what machine this was
    log_path = os.path.join(out_dir, "gpu_check.log")
    with open(log_path, "w", buffering=1) as log:
        log.write(f"gan_fast.gpu_check: {environment_line(doc['environment'])}\n")
        ctx = Context(out_dir, log, _subprocess_env(), doc["environment"]["device"]["capability"],
                      deadline=start + TOTAL_BUDGET_S)
        for stage in (s for s in STAGES if s.name in wanted):
            print(f"{stage.name} (up to {stage.budget_s:.0f} s) ...", flush=True)
            log.write(f"\n==== {stage.name}\n")
            row = run_stage(stage, ctx)
            log.write(f"==== {stage.name}: {row['status']}: {row['summary']}\n")
            print(f"  {row['status']}: {row['summary']}", flush=True)
            doc["stages"].append(row)
            doc["wall_s"] = time.monotonic() - start
            write_report(doc, out_dir)
    doc["passed"] = all(s["status"] == "passed" for s in doc["stages"])
    write_report(doc, out_dir)
    print(format_summary(doc))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    run_cli(main)
