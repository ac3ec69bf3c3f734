"""Checkpoints: both models, both optimizers, the step, every RNG state and the config, written
atomically and read back with ``torch.load(weights_only=True)``.

What is kept on disk, and why it can be trusted:
- a checkpoint is written to a temporary file in the run folder, fsynced, renamed over the previous
  one, and the folder is fsynced: a kill or a power cut at any moment leaves either the previous
  checkpoint or the new one, never a mix. A kill inside a save can leave the temporary file
  (``.tmp-*``); the next start in that folder removes it;
- every checkpoint carries a SHA-256 of its payload (``"sha256"``: every tensor's bytes, dtype and
  shape, every other value, in order), checked on load: a file corrupted on disk or in transfer is
  refused with one line instead of training on garbage. The file stays a plain dict that
  ``torch.load(weights_only=True)`` reads; files without the key (older checkpoints, other programs'
  weights) load unchecked.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import random
import tempfile
import warnings
import zipfile

import numpy as np
import torch

from .config import UserError
from . import files

CHECKPOINT_NAME = "checkpoint.pt"
CHECKSUM_KEY = "sha256"
TEMP_PATTERNS = (files.TEMP_PREFIX + "*", "*.tmp.png")  # files.write_atomic's; the second from older versions


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


# ---------------------------------------------------------------- integrity
def payload_digest(obj) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every other
    value's type and repr, in order. It depends only on the values, so it is the same before
    torch.save and after torch.load (on any device)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):  # the same after a round trip either way
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def _to_cpu(obj):
    """The state with every tensor on the CPU: one device-to-host copy, shared by the checksum and
    torch.save (which would copy anyway); the file then loads on any machine."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------- writing
def save_checkpoint(state: dict, path: str) -> None:
    """A training checkpoint: the state with its checksum, written atomically."""
    state = _to_cpu(state)
    save_atomic({**state, CHECKSUM_KEY: payload_digest(state)}, path)


def save_atomic(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically and durably (files.write_atomic)."""
    files.write_atomic(path, lambda f: torch.save(obj, f))


def prepare_out_dir(out: str) -> list[str]:
    """Create the run folder, check that it can be written (a read-only folder or a path under a file
    is one line at the start, not a traceback at the first save), and remove the temporary files a
    kill inside a save left behind (returns their paths)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: can't create the run folder: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=files.TEMP_PREFIX + "probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {out}: can't write in the run folder: {e.strerror or e}") from None
    return remove_temporaries(out)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the temporary files of interrupted writes in ``folder``; returns their paths."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


# ---------------------------------------------------------------- reading
def load(path: str, map_location="cpu") -> dict:
    """A checkpoint (or any weights file torch.load reads with weights_only=True), its checksum
    verified when it has one. Anything unreadable is a UserError with one line saying why."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise UserError(f"can't read checkpoint {path}: the file is empty (a write that never finished?)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not a torch file
        raise UserError(f"can't read checkpoint {path}: {_unreadable_reason(path, e)}") from None
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        saved = state.pop(CHECKSUM_KEY)
        if payload_digest(state) != saved:
            raise UserError(f"can't read checkpoint {path}: its contents do not match its checksum "
                            "(the file is corrupted)")
    return state


def _unreadable_reason(path: str, e: Exception) -> str:
    """Why torch.load failed, in a few words. Never PyTorch's advice to pass weights_only=False:
    a file that needs it is not one of our checkpoints, and loading it would run arbitrary code."""
    if not zipfile.is_zipfile(path):
        return "not a PyTorch file (wrong file, or corrupted)"
    if isinstance(e, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain values (not a checkpoint, or corrupted)"
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not message or "weights_only" in message or "miniz" in message or "PytorchStreamReader" in message:
        return f"the file is damaged (truncated or corrupted; {type(e).__name__})"
    return message[:200]


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


def load_resume_state(resume: str, out: str) -> dict:
    """The training state --resume continues from (``resumed_from``: its file, the last good
    checkpoint until the resumed run writes one)."""
    path = find_resume_path(resume, out)
    state = load(path)
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise UserError("--resume: that file is not a gan_fast training checkpoint")
    state["resumed_from"] = path
    return state
