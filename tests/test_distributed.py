"""torchrun / DDP on the CPU with gloo and 2 processes, as users launch it."""
import json
import os

import pytest
import torch

from .conftest import TINY, needs_ext, run_module
from .markdown_blocks import blocks, shell_commands

STEPS = ["--steps", "6", "--log-every", "1", "--sample-every", "100", "--workers", "0"]


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


@needs_ext  # the fused SyncBatchNorm on CPU is ext's
def test_sync_bn_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    i = TINY.index("--batch-size")
    tiny = TINY[:i + 1] + ["4"] + TINY[i + 2:]  # --batch-size 4 per rank: the same global batch of 8
    two = str(tmp_path / "two")
    # fp32 (--amp auto would train ext in bf16 on a CPU with native bf16, whose rounding differs
    # with the split of the batch): the statistics over ranks must equal one process's exactly
    r = torchrun(2, *tiny, *STEPS, "--backend", "ext", "--sync-bn", "--amp", "off", "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    one = str(tmp_path / "one")
    r = run_module("gan_fast.train", *TINY, *STEPS, "--backend", "ext", "--sync-bn", "--amp", "off", "--out", one)
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


# The SLURM script's shell expansions, as torchrun would receive them (each must occur: asserted).
SLURM_VALUES = {"$SLURM_NNODES": "4", "$head:29500": "node0:29500", "$SLURM_JOB_ID": "1234"}


def _parse(parser, argv, what):
    # argparse reports a bad flag by printing and exiting; turn that into a failure that names it
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{what} rejects {argv} (exit {e.code})") from None


def test_launch_is_documented(capsys):
    """Every torchrun command in the README is one that torchrun and gan_fast.train accept, as written
    (the 2-rank tests above run the launch itself, with small flags)."""
    from torch.distributed.run import get_args_parser

    from gan_fast.train import build_parser

    commands = [c for b in blocks("bash", ["README.md"]) for c in shell_commands(b) if "torchrun" in c]
    assert len(commands) >= 2 and any(c[0] == "srun" for c in commands), commands  # one node; SLURM
    used = set()
    for cmd in commands:
        argv = cmd[cmd.index("torchrun") + 1:]
        for i, token in enumerate(argv):
            if "$" in token:
                assert token in SLURM_VALUES, f"no value for {token} in SLURM_VALUES"
                argv[i] = SLURM_VALUES[token]
                used.add(token)
        args = _parse(get_args_parser(), argv, "torchrun")
        assert args.module and args.training_script == "gan_fast.train", cmd
        _parse(build_parser(), args.training_script_args, "python -m gan_fast.train")
    assert used == set(SLURM_VALUES), used
