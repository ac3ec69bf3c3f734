"""What a run keeps next to its checkpoint, and reading checkpoints back for the other commands.

- ``netG.pt``: the generator alone, a plain state_dict as pytorch/examples' ``netG_epoch_N.pth`` (the
  averaged generator with --ema, the one the sample grids show), with ``netG.json``: its class in
  gan_fast and the arguments that build it. ``python -m gan_fast.sample --netG RUN/netG.pt`` reads
  both; plain PyTorch needs only torch.load and that class (README).
- ``--keep-checkpoints K``: numbered snapshots ``checkpoint_STEP.pt`` and ``netG_STEP.pt`` of the last
  K saves (hard links of the files just written where the file system allows: no second copy).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from . import checkpoint as ckpt
from . import files
from .config import TrainConfig, UserError

NETG_NAME = "netG.pt"
SNAPSHOT = re.compile(r"^(checkpoint|netG)_(\d+)\.(pt|json)$")
# the TrainConfig fields that shape the generator (ndf shapes only D)
GENERATOR_ARGS = ("arch", "nz", "ngf", "channels", "image_size", "g_upsample")
GENERATOR_CLASSES = {"dcgan": "Generator", "mlp": "MLPGenerator"}  # gan_fast.models, by --arch


def read_training_checkpoint(path: str) -> tuple[str, dict]:
    """(the file, its state) of a gan_fast training checkpoint given as a file or a run folder."""
    if os.path.isdir(path):
        path = os.path.join(path, ckpt.CHECKPOINT_NAME)
    state = ckpt.load(path)
    if not isinstance(state, dict) or "config" not in state or "netG" not in state:
        raise UserError(f"{path} is not a gan_fast training checkpoint")
    return path, state


def generator_metadata(cfg: TrainConfig, step: int, ema: bool) -> dict:
    """netG.json: the class of the generator in netG.pt and its constructor's arguments (what plain
    PyTorch code needs to load it), the step and whether it is the EMA generator."""
    kwargs = {"nz": cfg.nz, "ngf": cfg.ngf, "nc": cfg.channels, "image_size": cfg.image_size}
    if cfg.arch == "dcgan":
        kwargs["upsample"] = cfg.g_upsample
    return {"class": GENERATOR_CLASSES[cfg.arch], "kwargs": kwargs, "step": step, "ema": ema}


def read_generator_metadata(netg_path: str) -> dict | None:
    """The model flags (TrainConfig fields in GENERATOR_ARGS) of the netG.json next to a netG.pt
    (netG_STEP.json next to netG_STEP.pt); None when there is none (e.g. pytorch/examples' files)."""
    meta_path = os.path.splitext(netg_path)[0] + ".json"
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        arch = {cls: arch for arch, cls in GENERATOR_CLASSES.items()}[meta["class"]]
        kw = dict(meta["kwargs"])
        flags = {"arch": arch, "nz": kw.pop("nz"), "ngf": kw.pop("ngf"), "channels": kw.pop("nc"),
                 "image_size": kw.pop("image_size"), "g_upsample": kw.pop("upsample", False)}
        if kw:
            raise ValueError(f"unknown arguments {sorted(kw)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"can't read {meta_path}: {type(e).__name__}: {e}") from None
    return flags


def save_generator(weights: dict, meta: dict, folder: str, name: str = NETG_NAME) -> str:
    """Write netG.pt (a plain state_dict: tensors only) and its netG.json, each atomically."""
    path = os.path.join(folder, name)
    ckpt.save_atomic({k: v.detach().cpu() for k, v in weights.items()}, path)
    meta_path = os.path.splitext(path)[0] + ".json"
    files.write_atomic(meta_path, lambda f: json.dump(meta, f, indent=2), text=True)
    return path


def after_checkpoint(trainer, path: str) -> None:
    """Called by Trainer.save_checkpoint once ``path`` (checkpoint.pt) is written: the generator export
    next to it and, with --keep-checkpoints K, the numbered snapshots of the last K saves."""
    folder = os.path.dirname(os.path.abspath(path))
    netG = trainer.sample_model  # the EMA generator with --ema, as the sample grids
    meta = generator_metadata(trainer.cfg, trainer.step, ema=trainer.ema is not None)
    netg_path = save_generator(netG.state_dict(), meta, folder)
    keep = trainer.cfg.keep_checkpoints
    if keep > 0:
        snapshot(folder, path, netg_path, trainer.step)
        prune_snapshots(folder, keep)


def _link_or_copy(src: str, dst: str) -> None:
    tmp = files.temporary_path(dst)
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)  # the same bytes under a second name; save_atomic's rename never edits them
    except OSError:  # no hard links here (some network and FAT file systems): a copy
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def snapshot(folder: str, checkpoint_path: str, netg_path: str, step: int) -> None:
    for src, stem in ((checkpoint_path, "checkpoint"), (netg_path, "netG")):
        _link_or_copy(src, os.path.join(folder, f"{stem}_{step:07d}.pt"))
    _link_or_copy(os.path.splitext(netg_path)[0] + ".json", os.path.join(folder, f"netG_{step:07d}.json"))


def prune_snapshots(folder: str, keep: int) -> list[str]:
    """Delete the numbered snapshots of all but the newest ``keep`` steps; returns what was removed."""
    by_step: dict[int, list[str]] = {}
    for name in os.listdir(folder):
        m = SNAPSHOT.match(name)
        if m:
            by_step.setdefault(int(m.group(2)), []).append(name)
    removed = []
    for step in sorted(by_step)[:-keep]:
        for name in by_step[step]:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def load_generator_file(path: str) -> dict:
    """A generator state_dict file (netG.pt, pytorch/examples' netG_epoch_N.pth)."""
    weights = ckpt.load(path)
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise UserError(f"{path} is not a state_dict of tensors")
    return weights


TENSORBOARD_DIR = "tensorboard"


def attach_tensorboard(metrics, cfg: TrainConfig, resume_step: int = 0):
    """With --tensorboard, every row written to ``metrics`` (train.MetricsLog: metrics.jsonl) also goes
    to TensorBoard event files in OUT/tensorboard, one scalar per number, at the row's step. Returns the
    SummaryWriter (None without --tensorboard or on ranks that write no metrics).

    On resume the events past the checkpoint's step (logged before a crash) are purged, as
    metrics.jsonl drops its rows past that step, so both read as one continuous run."""
    if not cfg.tensorboard or metrics is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package, an optional extra
        raise UserError("--tensorboard needs the tensorboard package: pip install 'gan_fast[tensorboard]' "
                        "(or pip install tensorboard)") from None
    writer = SummaryWriter(os.path.join(cfg.out, TENSORBOARD_DIR),
                           purge_step=resume_step + 1 if resume_step else None)
    write_jsonl = metrics.write

    def write(row: dict) -> None:
        write_jsonl(row)
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)
        writer.flush()  # rows come once per log interval: flushing each keeps a killed run's events

    metrics.write = write
    return writer
