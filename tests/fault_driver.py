"""``python -m tests.fault_driver FAULT -- TRAIN ARGS``: ``python -m gan_fast.train TRAIN ARGS`` with
one fault injected at an exact point, for the fault-injection tests (tests/test_faults.py).

FAULT is one of
- ``kill-in-save:N:WHERE``: SIGKILL this process inside its N-th checkpoint write, WHERE being
  ``write`` (half the bytes written to the temporary file), ``rename`` (the temporary file complete,
  not yet renamed) or ``folder`` (renamed, the folder not yet fsynced);
- ``nan-at:K``: after this process's K-th training step, a NaN in one of G's weights (a divergence).
"""
import io
import os
import signal
import sys

import torch

from gan_fast import checkpoint as ckpt
from gan_fast import files
from gan_fast import train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_save(n: int, where: str) -> None:
    real_save_checkpoint, real_torch_save = ckpt.save_checkpoint, torch.save
    calls = 0

    def half_save(obj, f):
        buf = io.BytesIO()
        real_torch_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        die()

    def save_checkpoint(state, path):
        nonlocal calls
        calls += 1
        if calls == n:
            if where == "write":
                torch.save = half_save
            elif where == "rename":
                files.os.replace = lambda *a, **k: die()
            elif where == "folder":
                files.fsync_folder = lambda folder: die()
            else:
                raise ValueError(where)
        return real_save_checkpoint(state, path)

    ckpt.save_checkpoint = save_checkpoint


def nan_at(k: int) -> None:
    real_step = train.Trainer.train_step
    calls = 0

    def train_step(self, real_u8):
        nonlocal calls
        stats = real_step(self, real_u8)
        calls += 1
        if calls == k:
            with torch.no_grad():
                next(self.netG.parameters()).view(-1)[0] = float("nan")
        return stats

    train.Trainer.train_step = train_step


def main() -> None:
    fault, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.fault_driver FAULT -- TRAIN ARGS"
    kind, *params = fault.split(":")
    if kind == "kill-in-save":
        kill_in_save(int(params[0]), params[1])
    elif kind == "nan-at":
        nan_at(int(params[0]))
    else:
        raise ValueError(fault)
    sys.argv = ["gan_fast.train", *args]
    train.cli()


if __name__ == "__main__":
    main()
