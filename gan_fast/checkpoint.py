"""Checkpoints: both models, both optimizers, the step, every RNG state and the config, written
atomically and read back with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from .config import UserError

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and numbers (what weights_only=True can load)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "python": [int(py_version), torch.tensor(py_keys, dtype=torch.int64), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_keys, py_gauss = state["python"]
    random.setstate((version, tuple(py_keys.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        # a resume on fewer GPUs restores the devices it has
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash or Ctrl-C mid-write
    leaves the previous checkpoint intact, never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not a torch file
        raise UserError(f"can't read checkpoint {path}: {e}") from None


def find_resume_path(resume: str, out: str) -> str:
    """--resume with no PATH means the checkpoint in --out; a folder means the checkpoint inside it."""
    if resume == "last":
        path = os.path.join(out, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise UserError(f"--resume: no checkpoint in {out} (looked for {path})")
        return path
    if os.path.isdir(resume):
        return os.path.join(resume, CHECKPOINT_NAME)
    return resume
