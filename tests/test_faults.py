"""What a run survives (issue #13): divergence, corrupted checkpoints, signals, kills inside a save,
unwritable and failing outputs, an interrupt between log rows; and a fault-injection run that goes
through all of them and still ends bit-exactly where an uninterrupted run does."""
import errno
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from gan_fast import checkpoint as ckpt
from gan_fast import train
from gan_fast.config import UserError
from gan_fast.train import main

from .conftest import ROOT, TINY, run_module


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _temporaries(out):
    return glob.glob(os.path.join(out, ".tmp-*")) + glob.glob(os.path.join(out, "*.tmp.png"))


def _assert_finite(state):
    for group in ("netG", "netD"):
        for name, t in state[group].items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (group, name)
    for group in ("optG", "optD"):
        for s in state[group]["state"].values():
            for k, v in s.items():
                assert torch.isfinite(v).all(), (group, k)


# One intra-op thread for the runs these tests start: the faults do not depend on it, and on a busy
# 2-core machine two OpenMP threads that wait for each other make a tiny step up to 50x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _popen(*args, module="gan_fast.train"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # each log line as it is printed: _wait_for_training reads them
    env.update(ONE_THREAD)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc) -> str:
    """Block until the run in ``proc`` has logged its first row of this process (it is training, its
    signal handlers are installed); returns the output read so far."""
    seen = ""
    while True:
        line = proc.stdout.readline()
        assert line, f"the run ended before training: {seen}{proc.communicate()}"
        seen += line
        if line.startswith("["):
            return seen


# ---------------------------------------------------------------- divergence (item 3)
def test_huge_lr_exits_3_and_never_overwrites_a_good_checkpoint(tmp_path):
    out = str(tmp_path)
    assert main([*TINY, "--steps", "2", "--out", out]) == 0
    path = os.path.join(out, "checkpoint.pt")
    with open(path, "rb") as f:
        good = f.read()
    # the reproducer: --lr 1e16 used to print "Loss_D: nan", exit 0 and save NaN weights
    r = run_module("gan_fast.train", *TINY, "--steps", "20", "--lr", "1e16", "--log-every", "1",
                   "--checkpoint-every", "1", "--out", out)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at step ")
    with open(path, "rb") as f:
        assert f.read() == good


def test_inf_running_var_behind_finite_losses_is_caught_before_the_checkpoint(tmp_path):
    # --lr 3e8: the losses stay finite while BatchNorm's running_var overflows; no log row before
    # step 100, so the check before the step-4 checkpoint write is what stops it
    out = str(tmp_path)
    r = run_module("gan_fast.train", *TINY, "--steps", "8", "--lr", "3e8", "--log-every", "100",
                   "--checkpoint-every", "4", "--out", out)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "training diverged at step 4" in r.stderr and "running_var" in r.stderr
    assert "no checkpoint was written" in r.stderr
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_nonfinite_losses_at_the_log_interval_name_the_steps_and_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path)
    assert main([*TINY, "--steps", "4", "--out", out]) == 0
    path = os.path.join(out, "checkpoint.pt")
    r = run_module("tests.fault_driver", "nan-at:3", "--", "--resume", "--out", out, "--steps", "20",
                   "--log-every", "5", "--checkpoint-every", "100")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "training diverged at step 10" in r.stderr  # the first log step after the NaN (step 7)
    assert "Loss_D" in r.stderr and "steps 6-10" in r.stderr
    assert f"the last good checkpoint is {path} (step 4)" in r.stderr
    assert ckpt.load(path)["step"] == 4


def test_inf_running_var_is_caught_at_the_log_interval(tmp_path, capsys):
    # the same divergence seen at the log interval, where the statistics are synced anyway
    out = str(tmp_path)
    assert main([*TINY, "--steps", "8", "--lr", "3e8", "--log-every", "2", "--checkpoint-every", "100",
                 "--out", out]) == 3
    err = capsys.readouterr().err
    assert "training diverged at step 2: non-finite training state" in err and "running_var" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


# ---------------------------------------------------------------- integrity (item 4)
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    assert main([*TINY, "--steps", "2", "--out", out]) == 0
    return os.path.join(out, "checkpoint.pt")


def _corrupt(data: bytes, how: str) -> bytes:
    rng = random.Random(0)
    if how == "empty":
        return b""
    if how == "random bytes":
        return bytes(rng.getrandbits(8) for _ in range(4096))
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "4 KiB in the middle":  # the reproducer: loaded and trained on NaN before
        mid = len(data) // 2
        return data[:mid] + bytes(rng.getrandbits(8) for _ in range(4096)) + data[mid + 4096:]
    if how == "one flipped bit in a weight":
        i = data.index(b"PK", len(data) // 3)  # somewhere in the tensor records
        return data[:i - 7] + bytes([data[i - 7] ^ 1]) + data[i - 6:]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["empty", "random bytes", "truncated", "4 KiB in the middle",
                                 "one flipped bit in a weight"])
def test_corrupted_checkpoint_is_one_line(tmp_path, good_checkpoint, how):
    with open(good_checkpoint, "rb") as f:
        data = f.read()
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(_corrupt(data, how))
    with pytest.raises(UserError) as e:
        main(["--resume", str(bad), "--out", str(tmp_path / "run"), "--steps", "4"])
    message = str(e.value)
    assert message.startswith(f"can't read checkpoint {bad}: ") and len(message) > len(f"can't read checkpoint {bad}: ") + 5
    assert "\n" not in message and "weights_only" not in message


def test_corrupted_checkpoint_from_the_command_line(tmp_path, good_checkpoint):
    bad = tmp_path / "checkpoint.pt"
    with open(good_checkpoint, "rb") as f:
        bad.write_bytes(_corrupt(f.read(), "random bytes"))
    r = run_module("gan_fast.train", "--resume", str(bad), "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: can't read checkpoint {bad}: not a PyTorch file "
                                             "(wrong file, or corrupted)"]


def test_checkpoints_carry_a_checksum_and_stay_plain_torch_files(good_checkpoint):
    raw = torch.load(good_checkpoint, weights_only=True)  # what users and other tools do
    assert raw[ckpt.CHECKSUM_KEY] == ckpt.payload_digest({k: v for k, v in raw.items()
                                                          if k != ckpt.CHECKSUM_KEY})
    assert ckpt.CHECKSUM_KEY not in ckpt.load(good_checkpoint)


# ---------------------------------------------------------------- signals (item 5)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_save_and_exit(tmp_path, sig):
    out = str(tmp_path)
    proc = _popen(*TINY, "--steps", "100000", "--log-every", "1", "--out", out)
    seen = _wait_for_training(proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    stdout = seen + stdout
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and f"interrupted by {signal.Signals(sig).name}" in stdout
    state = ckpt.load(os.path.join(out, "checkpoint.pt"))
    assert 1 <= state["step"] < 100000
    assert [r["step"] for r in _rows(out)][-1] == state["step"]


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint(tmp_path):
    out = str(tmp_path)
    proc = _popen("--standalone", "--nproc_per_node=2", "-m", "gan_fast.train", *TINY, "--steps", "100000",
                  "--log-every", "1", "--workers", "0", "--out", out, module="torch.distributed.run")
    seen = _wait_for_training(proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    stdout, stderr = proc.communicate(timeout=120)
    stdout = seen + stdout
    assert "interrupted by SIGTERM" in stdout, stderr[-3000:]
    state = ckpt.load(os.path.join(out, "checkpoint.pt"))
    assert state["step"] % train.STOP_CHECK_EVERY == 0  # the step the ranks agreed on


# ---------------------------------------------------------------- temporary files, fsync (item 6)
def test_leftover_temporary_files_are_removed_on_start(tmp_path):
    out = str(tmp_path)
    for name in (".tmp-abc123.pt", "loss.png.tmp.png"):  # what a kill inside a write leaves
        (tmp_path / name).write_bytes(b"")
    assert main([*TINY, "--steps", "1", "--out", out]) == 0
    assert _temporaries(out) == []


def test_save_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")
                                                                if os.path.exists("/proc/self/fd") else None)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    ckpt.save_checkpoint({"a": torch.ones(2)}, str(tmp_path / "c.pt"))
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder
    if events[2][1] is not None:
        assert events[2][1] is True and events[0][1] is False


# ---------------------------------------------------------------- unwritable outputs (item 7)
def test_out_under_a_file_is_one_line_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_module("gan_fast.train", *TINY, "--steps", "1", "--out", str(tmp_path / "file" / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --out {tmp_path / 'file' / 'run'}: can't create the "
                                             "run folder: Not a directory"]


def _make_read_only(folder):
    """Make ``folder`` unwritable; returns the undo, or None when that is impossible here. chmod for a
    user; root writes into any folder, so for root the immutable attribute (chattr +i)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return lambda: folder.chmod(0o700)
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_out_is_one_line_at_start(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    undo = _make_read_only(out)
    if undo is None:
        pytest.skip("running as root on a file system without chattr +i: no folder is read-only to root")
    try:
        r = run_module("gan_fast.train", *TINY, "--steps", "1", "--out", str(out))
    finally:
        undo()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"error: --out {out}: can't write in the run folder: " in r.stderr


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refuse)  # the write probe fails, as in a read-only folder
    monkeypatch.setattr(train.Trainer, "train_step", lambda *a: pytest.fail("trained"))
    with pytest.raises(UserError, match="can't write in the run folder: Permission denied"):
        main([*TINY, "--steps", "1", "--out", str(tmp_path)])


def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    real_save, saves = torch.save, []

    def save_until_full(obj, f):
        if "optG" in obj:  # checkpoints only: the generator export (netG.pt) follows each of them
            saves.append(1)
        if len(saves) >= 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(UserError) as e:
        main([*TINY, "--steps", "6", "--checkpoint-every", "2", "--out", out])
    path = os.path.join(out, "checkpoint.pt")
    assert str(e.value) == (f"can't write {path} at step 4: No space left on device; the last good "
                            f"checkpoint is {path} (step 2)")
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load(path)["step"] == 2
    assert _temporaries(out) == []


# ---------------------------------------------------------------- statistics at an interrupt (item 8)
def test_interrupt_writes_the_partial_row_and_a_grid_and_resume_covers_every_step(tmp_path):
    out = str(tmp_path)
    proc = _popen(*TINY, "--steps", "100000", "--log-every", "7", "--checkpoint-every", "100000",
                  "--sample-every", "100000", "--out", out)
    _wait_for_training(proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    stopped = ckpt.load(os.path.join(out, "checkpoint.pt"))["step"]
    steps = [r["step"] for r in _rows(out)]
    assert steps[-1] == stopped  # the statistics up to the interrupt, even between log steps
    assert os.path.isfile(os.path.join(out, "samples", f"step_{stopped:07d}.png"))
    end = stopped + 10
    assert main(["--resume", "--out", out, "--steps", str(end)]) == 0
    steps = [r["step"] for r in _rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == end and stopped in steps


def test_a_checkpoint_between_log_rows_resumes_the_same_row(tmp_path, monkeypatch):
    # a crash after the step-3 checkpoint, log rows every 6 steps: the resumed run's step-6 row must
    # average steps 1-6, as the uninterrupted run's does, not 4-6
    args = [*TINY, "--log-every", "6", "--checkpoint-every", "3", "--steps", "6"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main([*args, "--out", full]) == 0
    real_save = train.Trainer.save_checkpoint

    def crash_after_first_save(self):
        path = real_save(self)
        raise RuntimeError("crash")

    monkeypatch.setattr(train.Trainer, "save_checkpoint", crash_after_first_save)
    with pytest.raises(RuntimeError, match="crash"):
        main([*args, "--out", part])
    monkeypatch.setattr(train.Trainer, "save_checkpoint", real_save)
    assert ckpt.load(os.path.join(part, "checkpoint.pt"))["step"] == 3
    assert main(["--resume", "--out", part]) == 0
    a, b = _rows(full), _rows(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [6]
    for k in train.STAT_NAMES:
        assert a[0][k] == b[0][k], k


# ---------------------------------------------------------------- fault injection
@pytest.mark.slow
def test_fault_injection_every_run_resumes_exactly(tmp_path):
    """Kill -9 inside each phase of a save and at random steps, SIGTERM, SIGINT and a divergence, one
    after another on one run folder: after each, the checkpoint is whole, verified and finite; the
    next start removes any temporary file; the run ends bit-exactly as the uninterrupted one."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"fault injection seed {seed}")
    steps = 120
    args = [*TINY, "--log-every", "1", "--checkpoint-every", "7", "--sample-every", "100000",
            "--workers", "0"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    # every run of this test in a subprocess with one thread, the reference too: the same arithmetic
    r = run_module("gan_fast.train", *args, "--steps", str(steps), "--out", ref, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    path = os.path.join(out, "checkpoint.pt")
    resume = ["--resume", "--out", out, "--steps", str(steps)]

    def check_checkpoint():
        state = ckpt.load(path)  # verifies the checksum
        _assert_finite(state)
        return state["step"]

    # a kill inside each phase of a save: the previous checkpoint (or, once renamed, the new one) holds
    for i, where in enumerate(("write", "rename", "folder")):
        before = check_checkpoint() if i else None
        run_args = [*args, "--steps", str(steps), "--out", out] if i == 0 else resume
        r = run_module("tests.fault_driver", f"kill-in-save:2:{where}", "--", *run_args, env=ONE_THREAD)
        assert r.returncode == -signal.SIGKILL, r.stderr
        after = check_checkpoint()
        if where == "folder":
            assert after == (before or 0) + 14  # the second save of this run was renamed
        else:
            assert after == (7 if before is None else before + 7)
            assert _temporaries(out), "the kill did not land inside the save"

    # a divergence: the run stops with exit 3, nothing non-finite reaches the checkpoint
    before = check_checkpoint()
    r = run_module("tests.fault_driver", f"nan-at:{rng.randint(1, 20)}", "--", *resume, env=ONE_THREAD)
    assert r.returncode == 3 and "training diverged" in r.stderr, r.stderr
    assert _temporaries(out) == []
    assert check_checkpoint() >= before

    # kill -9, SIGTERM and SIGINT at random moments of training
    for sig in rng.sample([signal.SIGKILL, signal.SIGTERM, signal.SIGINT], 3):
        start = check_checkpoint()
        proc = _popen(*resume)
        _wait_for_training(proc)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal landed
            break
        assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), stderr
        assert "Traceback" not in stderr
        print(f"{signal.Signals(sig).name}: the checkpoint went from step {start} to {check_checkpoint()}")

    r = run_module("gan_fast.train", *resume, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert _temporaries(out) == []
    a, b = ckpt.load(os.path.join(ref, "checkpoint.pt")), ckpt.load(path)
    assert a["step"] == b["step"] == steps
    for group in ("netG", "netD"):
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (seed, group, k)
    for group in ("optG", "optD"):
        for p, s in a[group]["state"].items():
            for k in s:
                assert torch.equal(s[k], b[group]["state"][p][k]), (seed, group, k)
    rows_a = {r["step"]: r for r in _rows(ref)}
    rows_b = {r["step"]: r for r in _rows(out)}
    assert sorted(rows_b) == list(range(1, steps + 1))
    for step, row in rows_a.items():
        for k in train.STAT_NAMES:
            assert math.isclose(row[k], rows_b[step][k], rel_tol=0, abs_tol=0), (seed, step, k)
