import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gan_fast import checkpoint as ckpt
from gan_fast import train
from gan_fast.train import main

from .conftest import ROOT, TINY, needs_ext, run_module


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_end_to_end_outputs(tmp_path):
    out = str(tmp_path / "run")
    r = run_module("gan_fast.train", *TINY, "--steps", "4", "--log-every", "2", "--sample-every", "2",
                   "--out", out, "--fused")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    # --fused with no fused backend for this device: one warning, reference used
    if "backend reference" in r.stdout:
        assert r.stderr.count("warning: --fused") == 1
    assert "Loss_D" in r.stdout and "D(G(z))" in r.stdout and "img/s" in r.stdout
    for name in ("config.json", "real.png", "loss.png", "metrics.jsonl", "checkpoint.pt",
                 "samples/step_0000002.png", "samples/step_0000004.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]) >= {"loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2", "images_per_s"}
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["step"] == 4 and {"netG", "netD", "optG", "optD", "rng", "config"} <= set(state)
    assert state["config"]["image_size"] == 16
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["total_steps"] == 4


def test_milestones_and_end_grid(tmp_path):
    out = str(tmp_path)
    assert main([*TINY, "--steps", "101", "--sample-every", "1000", "--log-every", "50", "--out", out]) == 0
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_0000100.png", "step_0000101.png"]


@pytest.mark.parametrize("extra", [[], ["--arch", "mlp"], ["--g-upsample", "--channels", "3"],
                                   ["--amp", "bf16", "--channels-last"]])
def test_resume_is_exact(tmp_path, extra):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = [*TINY, "--log-every", "1", "--checkpoint-every", "100", *extra]
    assert main([*common, "--steps", "6", "--out", full]) == 0
    assert main([*common, "--steps", "3", "--out", part]) == 0
    assert main(["--resume", "--out", part, "--steps", "6", "--log-every", "1"]) == 0
    a, b = _rows(full), _rows(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2"):
            assert ra[k] == rb[k], (ra["step"], k)
    sa = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    sb = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    for k in sa["netG"]:
        assert torch.equal(sa["netG"][k], sb["netG"][k]), k


def test_resume_crosses_epochs_with_epochs_flag(tmp_path):
    # 1797 digits / batch 512 = 3 steps per epoch: resuming mid-epoch 1 must pick up the same batches
    args = ["--image-size", "16", "--nz", "4", "--ngf", "2", "--ndf", "2", "--batch-size", "512",
            "--log-every", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main([*args, "--epochs", "2", "--out", full]) == 0
    assert main([*args, "--steps", "4", "--out", part]) == 0
    assert main(["--resume", os.path.join(part, "checkpoint.pt"), "--out", part, "--epochs", "2"]) == 0
    assert [r["loss_g"] for r in _rows(full)] == [r["loss_g"] for r in _rows(part)]
    assert len(_rows(full)) == 6


def test_resume_refuses_changed_model_flags(tmp_path, capsys):
    out = str(tmp_path)
    assert main([*TINY, "--steps", "1", "--out", out]) == 0
    r = run_module("gan_fast.train", "--resume", "--out", out, "--ngf", "16")
    assert r.returncode == 2 and "--ngf differs from the checkpoint" in r.stderr
    r = run_module("gan_fast.train", "--resume", "--out", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    r = run_module("gan_fast.train", "--resume", str(bad), "--out", out)
    assert r.returncode == 2 and "can't read checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--image-size", "48"], "power of two"),
    (["--batch-size", "1"], "at least 2"),
    (["--batch-size", "4096"], "larger than the data set"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--backend", "triton", "--device", "cpu"], "backend 'triton' is unavailable"),
    (["--fused", "--backend", "reference"], "--fused means --backend auto"),
    (["--steps", "0"], "at least 1"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
    r = run_module("gan_fast.train", "--out", str(tmp_path), "--steps", "1", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.save_atomic({"a": torch.ones(2)}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(ckpt.load(path)["a"], torch.ones(2))  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == ["c.pt"]  # and no temporary file is left behind


def test_ctrl_c_saves_checkpoint_and_exits_cleanly(tmp_path):
    out = str(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "gan_fast.train", *TINY, "--steps", "100000",
                             "--log-every", "1", "--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.jsonl")) or not _rows(out):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stdout
    state = ckpt.load(os.path.join(out, "checkpoint.pt"))
    assert 1 <= state["step"] < 100000


@pytest.mark.parametrize("backend, device, native, want", [
    ("ext", "cpu", True, "bf16"),
    ("triton", "cpu", True, "off"),     # Triton's interpreter: a test vehicle, not a fast path
    ("ext", "cpu", False, "off"),      # emulated bf16 would be slower than fp32
    ("reference", "cpu", True, "off"),  # the reference modules stay what fused runs are held to
    ("triton", "cuda", True, "off"),    # not measured on a GPU yet
])
def test_amp_auto_picks_bf16_for_fused_backends_on_a_bf16_cpu(monkeypatch, backend, device, native, want):
    monkeypatch.setattr(train, "cpu_computes_bf16_natively", lambda: native)
    amp, reason = train.resolve_amp("auto", backend, device)
    assert amp == want and (reason is not None) == (want == "bf16")
    for explicit in ("off", "bf16", "fp16"):  # a given --amp is never changed
        assert train.resolve_amp(explicit, backend, device) == (explicit, None)


@needs_ext
@pytest.mark.parametrize("native", [True, False])
def test_fused_run_says_on_its_first_line_that_it_trains_in_bf16(tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(train, "cpu_computes_bf16_natively", lambda: native)
    auto, off = str(tmp_path / "auto"), str(tmp_path / "off")
    assert main([*TINY, "--steps", "1", "--backend", "ext", "--device", "cpu", "--out", auto]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert main([*TINY, "--steps", "1", "--backend", "ext", "--device", "cpu", "--amp", "off", "--out", off]) == 0
    first_off = capsys.readouterr().out.splitlines()[0]
    with open(os.path.join(auto, "config.json")) as f:
        resolved = json.load(f)
    assert resolved["amp"] == "auto" and resolved["amp_resolved"] == ("bf16" if native else "off")
    if native:
        assert first.startswith("training ") and ", bf16 autocast (--amp auto:" in first, first
        assert "--amp off trains in fp32" in first
    else:
        assert "autocast" not in first, first
    assert "autocast" not in first_off and "--amp auto" not in first_off, first_off
    with open(os.path.join(off, "config.json")) as f:
        assert json.load(f)["amp_resolved"] == "off"
