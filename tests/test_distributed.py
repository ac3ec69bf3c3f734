"""torchrun / DDP on the CPU with gloo and 2 processes, as users launch it."""
import json
import os
import sys

import pytest
import torch

from gan_fast import backends

from .conftest import ROOT, TINY, run_module

STEPS = ["--steps", "6", "--log-every", "1", "--sample-every", "100", "--workers", "0"]
FUSED_CPU = backends.unavailable_reason("ext", "cpu")


def torchrun(nproc, *args):
    return run_module("torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      "-m", "gan_fast.train", *args)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return torch.tensor([[r["loss_d"], r["loss_g"]] for r in rows if "loss_d" in r])


def weights(out):
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return state["netG"], state["netD"]


@pytest.mark.skipif(FUSED_CPU is not None, reason=f"the fused SyncBatchNorm on CPU needs ext: {FUSED_CPU}")
def test_sync_bn_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    i = TINY.index("--batch-size")
    tiny = TINY[:i + 1] + ["4"] + TINY[i + 2:]  # --batch-size 4 per rank: the same global batch of 8
    two = str(tmp_path / "two")
    r = torchrun(2, *tiny, *STEPS, "--backend", "ext", "--sync-bn", "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    one = str(tmp_path / "one")
    r = run_module("gan_fast.train", *TINY, *STEPS, "--backend", "ext", "--sync-bn", "--out", one)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-3, atol=1e-4)
    for got, want in zip(weights(two), weights(one)):
        assert list(got) == list(want)
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-3, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")


def test_two_ranks_train_and_the_checkpoint_resumes_in_one_process(tmp_path):
    out = str(tmp_path / "run")
    r = torchrun(2, *TINY, *STEPS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = losses(out)
    assert rows.shape == (6, 2) and torch.isfinite(rows).all()  # rank 0 alone wrote one row per step
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["world_size"] == 2 and config["global_batch"] == 16
    # resume with another world size: one process continues from step 6
    r = run_module("gan_fast.train", "--resume", "--out", out, "--steps", "8", "--log-every", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 8


def test_sync_bn_with_reference_modules_on_cpu_is_a_clear_error(tmp_path):
    r = torchrun(2, *TINY, *STEPS, "--sync-bn", "--backend", "reference", "--out", str(tmp_path))
    assert r.returncode != 0  # torchrun's own exit code; each rank exited with 2
    assert "error: --sync-bn with the reference modules is nn.SyncBatchNorm, which needs CUDA" in r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "exitcode  : 2" in r.stderr


def test_launch_is_documented():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "torchrun --nproc_per_node" in readme and "srun" in readme
    assert sys.executable  # the tests launch torchrun as `python -m torch.distributed.run`
