"""What a run keeps on disk: file modes that follow the umask, the standalone generator netG.pt,
--keep-checkpoints snapshots, and the optional TensorBoard log."""
import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

import gan_fast
from gan_fast.sample import generator_from_checkpoint
from gan_fast.train import main as train_main

from .conftest import ROOT, TINY, run_module


def _train(out, *extra):
    assert train_main([*TINY, "--channels", "3", "--out", str(out), *extra]) == 0


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    # checkpoint.pt went through mkstemp (always 0o600) while config.json, the PNGs... followed the umask
    previous = os.umask(umask)
    try:
        _train(tmp_path, "--steps", "2")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for name in ("checkpoint.pt", "netG.pt", "netG.json", "config.json", "metrics.jsonl"):
        assert _mode(tmp_path / name) == expected, f"{name}: {oct(_mode(tmp_path / name))}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _train(out, "--steps", "2")
    return out


def test_netG_loads_with_plain_torch(run_dir):
    # what a pytorch/examples user writes: the class, torch.load, load_state_dict; nothing else
    with open(run_dir / "netG.json") as f:
        meta = json.load(f)
    assert meta == {"class": "Generator", "kwargs": {"nz": 8, "ngf": 4, "nc": 3, "image_size": 16,
                                                     "upsample": False}, "step": 2, "ema": False}
    netG = getattr(gan_fast, meta["class"])(**meta["kwargs"])
    weights = torch.load(run_dir / "netG.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in weights.values())  # a plain state_dict
    netG.load_state_dict(weights)
    from_checkpoint, _, _, step = generator_from_checkpoint(str(run_dir), None, torch.device("cpu"))
    assert step == 2
    z = torch.randn(4, 8, 1, 1)
    with torch.no_grad():
        assert torch.equal(netG.eval()(z), from_checkpoint.eval()(z))


def test_sample_reads_netG_with_its_json(run_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r = run_module("gan_fast.sample", "--netG", str(run_dir / "netG.pt"), "--n", "4", "--out", str(a))
    assert r.returncode == 0, r.stderr  # no model flags: netG.json gives them
    r = run_module("gan_fast.sample", "--checkpoint", str(run_dir), "--n", "4", "--out", str(b))
    assert r.returncode == 0, r.stderr
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    r = run_module("gan_fast.sample", "--netG", str(run_dir / "netG.pt"), "--image-size", "32")
    assert r.returncode == 2
    assert r.stderr == (f"error: --image-size 32: the generator in {run_dir / 'netG.pt'} has --image-size 16 "
                        "(its netG.json); drop the flag\n")


def test_netG_is_the_ema_generator_with_ema(tmp_path):
    _train(tmp_path, "--steps", "3", "--ema", "0.9")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    weights = torch.load(tmp_path / "netG.pt", weights_only=True)
    assert weights.keys() == state["netG_ema"].keys()
    assert all(torch.equal(weights[k], state["netG_ema"][k]) for k in weights)
    assert not all(torch.equal(weights[k], state["netG"][k]) for k in weights)
    with open(tmp_path / "netG.json") as f:
        assert json.load(f)["ema"] is True


def _snapshots(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(("checkpoint_", "netG_")))


def test_keep_checkpoints(tmp_path):
    _train(tmp_path, "--steps", "4", "--checkpoint-every", "1")
    assert _snapshots(tmp_path) == []  # default 0: only checkpoint.pt and netG.pt
    _train(tmp_path, "--steps", "7", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--resume")
    assert _snapshots(tmp_path) == ["checkpoint_0000006.pt", "checkpoint_0000007.pt", "netG_0000006.json",
                                    "netG_0000006.pt", "netG_0000007.json", "netG_0000007.pt"]
    for step in (6, 7):
        state = torch.load(tmp_path / f"checkpoint_{step:07d}.pt", weights_only=True)
        assert state["step"] == step
        weights = torch.load(tmp_path / f"netG_{step:07d}.pt", weights_only=True)
        assert all(torch.equal(weights[k], state["netG"][k]) for k in weights)
    with open(tmp_path / "checkpoint.pt", "rb") as f, open(tmp_path / "checkpoint_0000007.pt", "rb") as g:
        assert f.read() == g.read()
    # a snapshot is a checkpoint like the others: it resumes, and its netG samples by itself
    r = run_module("gan_fast.sample", "--netG", str(tmp_path / "netG_0000006.pt"), "--n", "1",
                   "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    r = run_module("gan_fast.train", *TINY, "--channels", "3", "--keep-checkpoints", "-1", "--out", str(tmp_path))
    assert r.returncode == 2 and "--keep-checkpoints must be 0 or more" in r.stderr


def test_tensorboard_missing_is_one_line(tmp_path):
    # tensorboard is an optional extra: without it, --tensorboard is a clear error before training
    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None\n"  # an import that fails
            "from gan_fast.train import cli; cli()")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code, *TINY, "--steps", "1", "--tensorboard", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2
    assert "error: --tensorboard needs the tensorboard package: pip install 'gan_fast[tensorboard]'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is an optional extra (pip install 'gan_fast[tensorboard]')")
def test_tensorboard_gets_the_metrics_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "--steps", "6", "--log-every", "2", "--tensorboard", "--checkpoint-every", "3")
    _train(tmp_path, "--steps", "8", "--log-every", "2", "--tensorboard", "--resume")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "loss_d" in events.Tags()["scalars"] and "images_per_s" in events.Tags()["scalars"]
    logged = [(e.step, e.value) for e in events.Scalars("loss_d")]
    assert [s for s, _ in logged] == [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(abs(v - r["loss_d"]) < 1e-5 for (_, v), r in zip(logged, rows))


def test_disk_full_writing_netG_is_one_line_naming_the_checkpoint_just_written(tmp_path, monkeypatch):
    import errno

    from gan_fast.config import UserError

    real_save = torch.save

    def full_for_netG(obj, f):
        if "optG" not in obj:  # the generator export, right after checkpoint.pt was written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", full_for_netG)
    with pytest.raises(UserError) as e:
        train_main([*TINY, "--steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path)])
    path = tmp_path / "checkpoint.pt"
    assert str(e.value) == (f"can't write {tmp_path / 'netG.pt'} at step 2: No space left on device; the last "
                            f"good checkpoint is {path} (step 2)")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "real.png"]
