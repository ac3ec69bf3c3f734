"""``python -m gan_fast.gpu_check OUT_DIR`` on a CPU machine: no CUDA is one line and exit 2, a bad
OUT_DIR likewise; the report (JSON, summary table) and the stage runner on fake stages; and the stage
list against what it must cover (gpu-marked tests, every test file that runs on CUDA, the benchmark
cases and providers, a smoke run per backend)."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import torch

from gan_fast import gpu_check
from gan_fast.backends import BACKENDS
from gan_fast.bench.cases import PROVIDERS, default_cases
from gan_fast.gpu_check import (BENCH_RUNS, CUDA_TEST_PATHS, PYTEST_RUNS, QUALITY_BACKENDS, QUALITY_FLAGS,
                                STAGES, Context, Outcome, Stage)

from .conftest import ROOT, run_module

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")

ENVIRONMENT = {"device": {"name": "NVIDIA H200", "capability": "9.0", "slug": "nvidia-h200"},
               "versions": {"torch": "2.9.0+cu128", "triton": "3.6.0", "cuda": "12.8", "driver": "570.86"},
               "git": {"commit": "0123456789abcdef0123", "dirty": False}}


# ------------------------------------------------------------------------------- the command on a CPU

@NO_CUDA
def test_without_cuda_one_line_and_exit_2_before_writing_anything(tmp_path):
    out = tmp_path / "out"
    r = run_module("gan_fast.gpu_check", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: no CUDA device here"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()


def test_out_dir_that_is_a_file_or_under_a_file_is_one_user_error(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(gpu_check.UserError, match=r"^OUT_DIR .*results\.txt is a file, not a folder$"):
        gpu_check.prepare_out_dir(str(a_file))
    with pytest.raises(gpu_check.UserError, match=r"^OUT_DIR .* can't be written: Not a directory$"):
        gpu_check.prepare_out_dir(str(a_file / "out"))
    made = gpu_check.prepare_out_dir(str(tmp_path / "new" / "out"))
    assert os.path.isdir(made) and os.listdir(made) == []  # the write probe leaves nothing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to a read-only folder")
def test_read_only_out_dir_is_one_user_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(gpu_check.UserError, match="can't be written: Permission denied"):
            gpu_check.prepare_out_dir(str(folder))
    finally:
        folder.chmod(0o755)


def test_unknown_stage_is_one_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    with pytest.raises(gpu_check.UserError, match="--stages: unknown benchmarks; choose from extension,"):
        gpu_check.main([str(tmp_path), "--stages", "benchmarks"])


# ------------------------------------------------------------------------------- the stage list

def test_stage_list_covers_the_issue():
    names = [s.name for s in STAGES]
    assert names[0] == "extension"  # the tests and benchmarks need the extension built first
    assert set(names) == {"extension", "quality", *PYTEST_RUNS, *BENCH_RUNS}
    # budgets fit the 8 minutes with the extension already built (its rebuild eats into the last stages)
    assert sum(s.budget_s for s in STAGES[1:]) <= gpu_check.TOTAL_BUDGET_S - 10
    assert gpu_check.TOTAL_BUDGET_S + gpu_check.GRACE_S <= 8 * 60 - 15


def test_pytest_runs_take_every_gpu_test_and_every_file_that_runs_on_cuda():
    gpu = PYTEST_RUNS["gpu-tests"]
    assert gpu[gpu.index("-m") + 1] == "gpu" and "tests" in gpu
    cuda = PYTEST_RUNS["cuda-tests"]
    assert cuda[cuda.index("-m") + 1] == "not gpu"
    for path in CUDA_TEST_PATHS:
        assert os.path.exists(os.path.join(ROOT, path)), path
    # a test file that takes tests/conftest.py's DEVICE (or asks for "cuda") must be in a CUDA run
    uses_cuda = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "conftest.py":
                text = open(path, encoding="utf-8").read()
                if re.search(r"\bDEVICE\b|device=\"cuda\"|\"--device\", \"cuda\"", text):
                    uses_cuda.append(os.path.relpath(path, ROOT))
    assert "tests/test_cuda_graphs.py" in uses_cuda and "tests/backends/utils.py" in uses_cuda
    uncovered = [p for p in uses_cuda if p != "tests/test_gpu_check.py"
                 and not any(p == c or p.startswith(c + "/") for c in CUDA_TEST_PATHS)]
    assert uncovered == []


def test_bench_runs_name_the_step_cases_a_subset_of_ops_and_every_provider():
    cuda_ids = {c.id for c in default_cases("cuda")}
    assert set(gpu_check.STEP_CASES) == {"step/dcgan64-b128", "step/dcgan64-b128-bf16",
                                         "step/dcgan64-b1024-bf16", "step/digits-b64"}
    ops = {c.id: c.op for c in default_cases("cuda") if c.kind == "op"}
    assert {ops[i] for i in gpu_check.OP_CASES} == set(ops.values())  # every fused op, once
    for name, run in BENCH_RUNS.items():
        assert set(run.match) <= cuda_ids, (name, set(run.match) - cuda_ids)
        # --match takes substrings: what runs is exactly the cases listed
        matched = {i for i in cuda_ids if any(m in i for m in run.match)}
        assert matched == set(run.match), name
        kinds = {i.split("/")[0] for i in run.match}
        assert {k + "s" if k == "op" else k for k in kinds} == set(run.cases.split(",")), name
    assert set().union(*(r.providers for r in BENCH_RUNS.values())) == set(PROVIDERS)
    assert set(BENCH_RUNS["bench-step"].match) == set(gpu_check.STEP_CASES)
    assert set(BENCH_RUNS["bench-compile"].providers) == set(gpu_check.COMPILE_PROVIDERS)


def test_bench_flags_exist():
    r = run_module("gan_fast.bench", "--help")
    for flag in ("--device", "--cases", "--match", "--providers", "--rounds", "--out"):
        assert flag in r.stdout, flag


def test_quality_smoke_runs_every_backend_for_200_steps_on_cuda():
    from gan_fast.train import build_parser

    assert set(QUALITY_BACKENDS) == set(BACKENDS)
    for backend in QUALITY_BACKENDS:
        args = build_parser().parse_args([*QUALITY_FLAGS, "--device", "cuda", "--backend", backend,
                                          "--out", "x"])
        assert (args.steps, args.eval_every, args.backend, args.device) == (200, 200, backend, "cuda")
        assert args.data is None  # the embedded digits: the digits FD applies


# ------------------------------------------------------------------------------- readers and judges

def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.a" name="t1"/>'
                   '<testcase classname="tests.a" name="t2"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.b" name="t3"><skipped message="why"/></testcase>'
                   '<testcase classname="tests.b" name="t4"><error message="setup"/></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_check.junit_counts(str(xml)) == {"tests": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                                "failed_tests": ["tests.a::t2", "tests.b::t4"],
                                                "skip_reasons": {"why": 1}}


def test_final_metrics_and_the_quality_band(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 200, "loss_d": 0.9, "loss_g": 1.7, "d_x": 0.6}) + "\n"
                       + json.dumps({"step": 200, "digits_fd": 400.0, "digits_coverage": 0.9,
                                     "digits_confidence": 0.7, "train_s": 3.0}) + "\n")
    ref = gpu_check.final_metrics(str(metrics))
    assert ref == {"loss_d": 0.9, "loss_g": 1.7, "d_x": 0.6, "digits_fd": 400.0, "digits_coverage": 0.9,
                   "digits_confidence": 0.7, "train_s": 3.0}
    judge = gpu_check.quality_problems
    assert judge({"reference": ref, "triton": {**ref, "digits_fd": 700.0}, "ext": {**ref, "digits_fd": 250.0}}) == []
    problems = judge({"reference": ref, "triton": {**ref, "digits_fd": 3700.0},
                      "ext": {**ref, "loss_g": float("nan")}})
    assert problems == ["ext: loss_g missing or not finite",
                        "triton: digits FD 3700.0 outside [200.0, 800.0] (the reference's 400.0 within a factor 2)"]
    assert judge({"reference": ref, "ext": {"problem": "gan_fast.train exited with 1"}}) == [
        "ext: gan_fast.train exited with 1"]
    untrained = judge({"reference": {**ref, "digits_fd": 3722.0}, "ext": ref})
    assert len(untrained) == 1 and "reference: digits FD 3722.0" in untrained[0] and "did not learn" in untrained[0]


def test_bench_rows_problems_and_the_fastest_fused_provider(tmp_path):
    result = tmp_path / "bench.json"
    rows = [{"case": "step/a", "provider": "reference", "status": "ok", "median_s": 0.010, "memory_bytes": 5,
             "times_s": [0.01]},
            {"case": "step/a", "provider": "triton", "status": "ok", "median_s": 0.004},
            {"case": "step/a", "provider": "ext", "status": "ok", "median_s": 0.006},
            {"case": "step/b", "provider": "triton", "status": "error", "reason": "RuntimeError: boom"},
            {"case": "step/b", "provider": "ext", "status": "ok", "median_s": 0.02, "warning": "non-finite"},
            {"case": "step/b", "provider": "compile-default", "status": "skipped", "reason": "no compile"}]
    result.write_text(json.dumps({"results": rows}))
    read = gpu_check.bench_rows(str(result))
    assert read[0] == {"case": "step/a", "provider": "reference", "status": "ok", "median_s": 0.010,
                       "memory_bytes": 5}  # the per-round times stay in the bench result
    assert gpu_check.bench_problems(read) == ["step/b triton: error: RuntimeError: boom", "step/b ext: non-finite",
                                              "step/b compile-default: skipped: no compile"]
    assert gpu_check.fastest_fused(read) == {"step/a": "triton", "step/b": "ext"}


# ------------------------------------------------------------------------------- runner and report

def _context(tmp_path, log, deadline_s=60.0) -> Context:
    return Context(str(tmp_path), log, gpu_check._subprocess_env(), "9.0", time.monotonic() + deadline_s)


def test_run_command_logs_the_output_and_stops_what_runs_past_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    with open(tmp_path / "log", "w", buffering=1) as log:
        ctx = _context(tmp_path, log)
        assert gpu_check.run_command(ctx, [sys.executable, "-c", "print('hello'); raise SystemExit(3)"], 30) == 3
        t0 = time.monotonic()
        # ignores SIGINT, so only the SIGKILL after the grace stops it
        code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
        assert gpu_check.run_command(ctx, [sys.executable, "-c", code], 2) is None
        assert time.monotonic() - t0 < 20
    text = (tmp_path / "log").read_text()
    assert "hello" in text and "up" in text and "# budget 30 s" in text


def _fake_stage(name, status):
    return Stage(name, 30, lambda ctx, budget: Outcome(status, f"{name} said {status}", {"budget": budget}))


def test_main_writes_the_json_and_the_log_and_exits_1_naming_what_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check, "collect_environment", lambda: ENVIRONMENT)

    def prints(ctx, budget):
        code = gpu_check.run_command(ctx, [sys.executable, "-c", "print('from the stage')"], budget)
        return Outcome("passed" if code == 0 else "failed", "printed")

    monkeypatch.setattr(gpu_check, "STAGES", (Stage("first", 30, prints), _fake_stage("second", "failed"),
                                              _fake_stage("third", "passed")))
    out = tmp_path / "out"
    assert gpu_check.main([str(out)]) == 1
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["environment"] == ENVIRONMENT and doc["passed"] is False
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [("first", "passed"), ("second", "failed"),
                                                                  ("third", "passed")]
    assert doc["stages"][1]["details"] == {"budget": 30}
    log = (out / "gpu_check.log").read_text()
    assert "from the stage" in log and "==== second: failed: second said failed" in log
    summary = capsys.readouterr().out
    assert "NVIDIA H200 (sm 9.0), torch 2.9.0+cu128, triton 3.6.0, CUDA 12.8, driver 570.86, commit 0123456789ab" in summary
    assert re.search(r"^second +failed +\d+\.\d +30  second said failed$", summary, re.M), summary
    assert "NOT PASSED: second" in summary

    monkeypatch.setattr(gpu_check, "STAGES", (_fake_stage("first", "passed"),))
    assert gpu_check.main([str(out), "--stages", "first"]) == 0
    assert json.loads((out / "gpu_check.json").read_text())["passed"] is True
    assert "all 1 stages passed" in capsys.readouterr().out


def test_stages_past_the_total_budget_are_not_run(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as log:
        ctx = _context(tmp_path, log, deadline_s=gpu_check.GRACE_S + 1)
        row = gpu_check.run_stage(_fake_stage("late", "passed"), ctx)
        assert row["status"] == "not-run" and "total budget ran out" in row["summary"]
        ctx = _context(tmp_path, log, deadline_s=gpu_check.GRACE_S + 20)
        row = gpu_check.run_stage(_fake_stage("squeezed", "passed"), ctx)
        assert row["status"] == "passed" and 19 < row["details"]["budget"] <= 20  # the time left, not 30


def test_the_json_is_written_first_so_a_crash_in_a_stage_leaves_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    monkeypatch.setattr(gpu_check, "collect_environment", lambda: ENVIRONMENT)

    def crashes(ctx, budget):
        raise RuntimeError("a bug in a stage")

    monkeypatch.setattr(gpu_check, "STAGES", (Stage("crashes", 30, crashes),))
    with pytest.raises(RuntimeError):
        gpu_check.main([str(tmp_path)])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["environment"] == ENVIRONMENT and doc["stages"] == [] and doc["passed"] is None
