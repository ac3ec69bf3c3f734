"""Train a DCGAN or an MLP GAN: ``python -m gan_fast.train [--fused] [--data PATH] ...``.

The training step is the one of the PyTorch DCGAN tutorial (pytorch/examples dcgan/main.py), read
top to bottom in ``Trainer.train_step``: update D on a real batch and on a fake batch, then update G
through D. Everything fast lives in the ops that ``--backend`` selects, never in this loop.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__
from . import checkpoint as ckpt
from .backends import BackendUnavailable, ops_for, resolve
from .config import (TrainConfig, UserError, add_model_flags, add_train_flags, config_from_args,
                     run_cli)
from .datasets import load_dataset, to_model_input
from .images import save_grid
from .models import build_models

# Flags that may change when a run is resumed; every other setting comes from the checkpoint.
RESUMABLE_OVERRIDES = ("steps", "epochs", "out", "device", "backend", "amp", "compile", "cuda_graphs",
                       "channels_last", "sample_every", "checkpoint_every", "log_every", "workers", "data")
STAT_NAMES = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")
N_FIXED_NOISE = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gan_fast.train",
        description="Train a DCGAN (or --arch mlp) on the embedded digits or on a folder of images.")
    add_model_flags(p)
    add_train_flags(p)
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


class Trainer:
    def __init__(self, cfg: TrainConfig, state: dict | None = None, log=print):
        self.cfg, self.log = cfg, log
        self.device = pick_device(cfg.device)
        try:
            self.backend = resolve(cfg.backend, self.device)
        except BackendUnavailable as e:
            raise UserError(str(e)) from None
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.image_size, cfg.channels, self.device, cfg.seed,
                                 cfg.workers, log=log)
        self.steps_per_epoch = len(self.data) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the data set "
                            f"({len(self.data)} images)")
        self.total_steps = (cfg.steps if cfg.steps is not None
                            else cfg.epochs * self.steps_per_epoch if cfg.epochs is not None
                            else TrainConfig.DEFAULT_STEPS)

        self.netG, self.netD = build_models(cfg.arch, cfg.nz, cfg.ngf, cfg.ndf, cfg.channels,
                                            cfg.image_size, cfg.g_upsample)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.netG.to(self.device, memory_format=memory_format)
        self.netD.to(self.device, memory_format=memory_format)
        self.use_cuda_graphs = self._wants_cuda_graphs()
        # capturable: Adam keeps its step count on the device, so its step can be graph-captured
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), capturable=self.use_cuda_graphs)
        self.optG = torch.optim.Adam(self.netG.parameters(), **adam)
        self.optD = torch.optim.Adam(self.netD.parameters(), **adam)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        if state is not None:
            self._load_state(state)

        # fuse() keeps every Parameter and buffer object, so the optimizers built above and the
        # state_dict keys are unaffected: checkpoints move freely between backends.
        if self.backend != "reference":
            from .fuse import fuse

            fuse(self.netG, self.backend)
            fuse(self.netD, self.backend)
        self.bce = (F.binary_cross_entropy_with_logits if self.backend == "reference"
                    else ops_for(self.backend).bce_with_logits)
        # the fused D head (last conv + loss in one op) runs outside netD's forward, so not under
        # --compile, which compiles that forward
        self.fused_d_head = self.backend != "reference" and not cfg.compile
        if cfg.compile:
            self.netG.compile()  # in place: the state_dict keys stay those of the plain module
            self.netD.compile()
        self.autocast = (torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16,
                                                                 "fp16": torch.float16}[cfg.amp])
                         if cfg.amp != "off" else contextlib.nullcontext())
        # The same fixed noise on every device and backend, so grids of different runs compare.
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.fixed_noise = torch.randn(N_FIXED_NOISE, cfg.nz, 1, 1, generator=g).to(self.device)

    def _wants_cuda_graphs(self) -> bool:
        """--cuda-graphs on: required (an error when impossible); auto: with a fused backend on CUDA."""
        from .cuda_graphs import unsupported_reason

        mode = self.cfg.cuda_graphs
        if mode == "off" or (mode == "auto" and self.backend == "reference"):
            return False
        reason = unsupported_reason(self)
        if reason is not None and mode == "on":
            raise UserError(f"--cuda-graphs on: {reason}")
        return reason is None

    # ---------------------------------------------------------------- the training step
    def train_step(self, real_u8: torch.Tensor) -> torch.Tensor:
        """One D update and one G update; returns the step's statistics as one device tensor."""
        cfg, netG, netD, scaler = self.cfg, self.netG, self.netD, self.scaler
        real = to_model_input(real_u8)
        if cfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        b = real.shape[0]
        ones = torch.ones(b, device=self.device)
        zeros = torch.zeros(b, device=self.device)

        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad(set_to_none=True)
        with self.autocast:
            err_d_real, out_real = self.d_loss(real, ones)
        scaler.scale(err_d_real).backward()
        z = torch.randn(b, cfg.nz, 1, 1, device=self.device)
        with self.autocast:
            fake = netG(z)
            err_d_fake, out_fake = self.d_loss(fake.detach(), zeros)
        scaler.scale(err_d_fake).backward()
        scaler.step(self.optD)

        # (2) Update G: maximize log(D(G(z))), the non-saturating loss of Goodfellow et al.
        netG.zero_grad(set_to_none=True)
        with self.autocast:
            err_g, out_g = self.d_loss(fake, ones)
        scaler.scale(err_g).backward()
        scaler.step(self.optG)
        scaler.update()

        with torch.no_grad():  # kept on the device: no host sync until the log interval
            return torch.stack([err_d_real + err_d_fake, err_g, torch.sigmoid(out_real.float()).mean(),
                                torch.sigmoid(out_fake.float()).mean(),
                                torch.sigmoid(out_g.float()).mean()]).detach()

    def d_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE-with-logits loss of D on x against target, D's logits)."""
        if self.fused_d_head:
            from .fuse import discriminator_loss

            return discriminator_loss(self.netD, x, target, self.bce)
        logits = self.netD(x)
        return self.bce(logits.float(), target), logits

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"netG": self.netG.state_dict(), "netD": self.netD.state_dict(),
                "optG": self.optG.state_dict(), "optD": self.optD.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "rng": ckpt.rng_state(),
                "config": self.cfg.to_dict(), "version": __version__}

    def _load_state(self, state: dict) -> None:
        try:
            self.netG.load_state_dict(state["netG"])
            self.netD.load_state_dict(state["netD"])
            self.optG.load_state_dict(state["optG"])
            self.optD.load_state_dict(state["optD"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"checkpoint does not match the models: {e}") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> str:
        path = os.path.join(self.cfg.out, ckpt.CHECKPOINT_NAME)
        ckpt.save_atomic(self.state_dict(), path)
        return path

    # ---------------------------------------------------------------- outputs
    @torch.no_grad()
    def save_samples(self) -> str:
        """Fixed-noise grid in eval mode: BN uses running statistics, so sampling never changes the
        model's state (a resumed run stays identical to an uninterrupted one)."""
        was_training = self.netG.training
        self.netG.eval()
        with self.autocast:
            fake = self.netG(self.fixed_noise)
        self.netG.train(was_training)
        path = os.path.join(self.cfg.out, "samples", f"step_{self.step:07d}.png")
        save_grid(fake, path)
        return path

    def is_milestone(self, step: int) -> bool:
        return step % self.cfg.sample_every == 0 or step in self.cfg.milestones or step == self.total_steps

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        metrics = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), resume_step=self.step)
        resolved = {**cfg.to_dict(), "backend_resolved": self.backend, "device_resolved": str(self.device),
                    "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                    "torch": torch.__version__, "gan_fast": __version__}
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        if self.step == 0:
            first = next(self.data.batches(min(N_FIXED_NOISE, len(self.data)), 0))
            save_grid(to_model_input(first), os.path.join(cfg.out, "real.png"))
        if self.step >= self.total_steps:
            self.log(f"already at step {self.step} of {self.total_steps}; nothing to do "
                     "(raise --steps or --epochs to continue)")
            return 0
        self.log(f"training {cfg.arch} {cfg.image_size}x{cfg.image_size}x{cfg.channels} on "
                 f"{self.device} with backend {self.backend}: steps {self.step} -> {self.total_steps}, "
                 f"batch {cfg.batch_size}, out {cfg.out}")

        if self.use_cuda_graphs:  # the same step, replayed from one captured CUDA graph
            from .cuda_graphs import GraphedStep

            step_fn = GraphedStep(self)
        else:
            step_fn = self.train_step
        stop = StopFlag()
        progress = Progress(self.step, self.total_steps, self.log)
        stat_sum, stat_n, t0, interval_start = None, 0, time.perf_counter(), self.step
        with stop:
            while self.step < self.total_steps and not stop.requested:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                for real in self.data.batches(cfg.batch_size, epoch, offset):
                    stats = step_fn(real)
                    stat_sum = stats if stat_sum is None else stat_sum + stats
                    stat_n += 1
                    self.step += 1
                    progress.update(self.step)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        values = (stat_sum / stat_n).tolist()  # the one host sync per interval
                        elapsed = time.perf_counter() - t0
                        row = {"step": self.step, "epoch": epoch, **dict(zip(STAT_NAMES, values)),
                               "images_per_s": (self.step - interval_start) * cfg.batch_size / elapsed}
                        metrics.write(row)
                        progress.report(row)
                        stat_sum, stat_n, t0, interval_start = None, 0, time.perf_counter(), self.step
                    if self.is_milestone(self.step):
                        self.save_samples()
                        metrics.plot(os.path.join(cfg.out, "loss.png"))
                    if self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps or stop.requested:
                        break
        progress.close()
        path = self.save_checkpoint()
        metrics.plot(os.path.join(cfg.out, "loss.png"))
        if stop.requested:
            self.log(f"interrupted at step {self.step}: checkpoint saved to {path}; "
                     f"continue with --resume {path}")
            return 130
        self.log(f"done: {self.step} steps; samples in {os.path.join(cfg.out, 'samples')}, "
                 f"checkpoint {path}")
        return 0


class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (so the checkpoint holds a whole step);
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files, notebooks' pipes)."""

    def __init__(self, start: int, total: int, log):
        self.log, self.total, self.bar = log, total, None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, row: dict) -> None:
        line = (f"[{row['step']}/{self.total}] Loss_D: {row['loss_d']:.4f} Loss_G: {row['loss_g']:.4f} "
                f"D(x): {row['d_x']:.4f} D(G(z)): {row['d_g_z1']:.4f} / {row['d_g_z2']:.4f} "
                f"{row['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("] ", 1)[1], refresh=False)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """metrics.jsonl, one JSON object per log interval; on resume, rows past the checkpoint's step
    (written before a crash) are dropped so the file reads as one continuous run."""

    def __init__(self, path: str, resume_step: int):
        self.path, self.rows = path, []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    with contextlib.suppress(json.JSONDecodeError):
                        row = json.loads(line)
                        if row.get("step", 0) <= resume_step:
                            self.rows.append(row)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, path: str) -> None:
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot(steps, [r["loss_d"] for r in self.rows], label="Loss_D")
        ax_loss.plot(steps, [r["loss_g"] for r in self.rows], label="Loss_G")
        ax_loss.set_xlabel("step")
        ax_loss.set_title("losses")
        ax_loss.legend()
        ax_d.plot(steps, [r["d_x"] for r in self.rows], label="D(x)")
        ax_d.plot(steps, [r["d_g_z1"] for r in self.rows], label="D(G(z)) before D step")
        ax_d.plot(steps, [r["d_g_z2"] for r in self.rows], label="D(G(z)) after D step")
        ax_d.set_xlabel("step")
        ax_d.set_ylim(0, 1)
        ax_d.set_title("discriminator outputs")
        ax_d.legend()
        fig.tight_layout()
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)


def resolve_config(args: argparse.Namespace, given: set[str]) -> tuple[TrainConfig, dict | None]:
    """The run's config and, with --resume, the checkpoint state it continues from."""
    cfg = config_from_args(args)
    if args.resume is None:
        return cfg, None
    state = ckpt.load(ckpt.find_resume_path(args.resume, cfg.out))
    if "config" not in state or "step" not in state:
        raise UserError("--resume: that file is not a gan_fast training checkpoint")
    saved = TrainConfig.from_dict(state["config"])
    conflicts = [name for name in given - set(RESUMABLE_OVERRIDES) - {"resume", "fused"}
                 if getattr(cfg, name, None) != getattr(saved, name, None)]
    if conflicts:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(conflicts))
        raise UserError(f"--resume: {flags} differ from the checkpoint's run; drop them to continue it")
    for name in RESUMABLE_OVERRIDES:
        if name in given or (name == "backend" and "fused" in given):
            setattr(saved, name, getattr(cfg, name))
    if "steps" in given:
        saved.epochs = None
    if "epochs" in given:
        saved.steps = None
    return saved.validate(), state


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Names of the flags that appear on the command line, as opposed to defaults."""
    defaults = {action: action.default for action in parser._actions}
    for action in defaults:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, state = resolve_config(args, given_flags(parser, argv))
    return Trainer(cfg, state).run()


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
