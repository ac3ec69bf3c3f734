"""Train a DCGAN or an MLP GAN: ``python -m gan_fast.train [--fused] [--data PATH] ...``.

The training step is the one of the PyTorch DCGAN tutorial (pytorch/examples dcgan/main.py), read
top to bottom in ``Trainer.train_step``: update D on a real batch and on a fake batch, then update G
through D. Everything fast lives in the ops that ``--backend`` selects, never in this loop.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__
from . import checkpoint as ckpt
from . import distributed
from . import export
from . import guard
from .backends import BackendUnavailable, ops_for, resolve
from .config import (ArgumentParser, TrainConfig, UserError, add_model_flags, add_train_flags, config_from_args,
                     given_flags, pick_device, resumed_config, run_cli)
from .cuda_graphs import set_adam_flags
from .datasets import SKIPPED_FILES_NAME, load_dataset, to_model_input
from .eval import build_evaluator, format_metrics
from .fuse import can_stack_batches, discriminator_loss, fuse
from .images import save_grid
from .models import build_models
from .optim import Adam
from .run_log import IntervalStats, MetricsLog, Progress
from .signals import StopFlag

STAT_NAMES = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")
STAT_LABELS = ("Loss_D", "Loss_G", "D(x)", "D(G(z)) before the D step", "D(G(z)) after it")
N_FIXED_NOISE = 64
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request under torchrun


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m gan_fast.train",
        description="Train a DCGAN (or --arch mlp) on the embedded digits or on a folder of images.")
    add_model_flags(p)
    add_train_flags(p)
    return p


def computes_in_channels_last(backend: str, device_type: str, arch: str) -> bool:
    """Whether a DCGAN's fused convolutions compute in channels_last, so that the Trainer keeps G, D
    and the real batch in it (as --channels-last does) and no activation is reordered on the way:
    oneDNN's CPU convolutions (ext on a CPU; ext's ops keep their input's layout), and the Triton
    implicit-GEMM convs, whose launchers copy every NCHW operand to channels_last (padded to 16
    channels) on each call (issue #15: the gathers along contiguous channels are what pipeline)."""
    return arch == "dcgan" and (backend, device_type) in (("ext", "cpu"), ("triton", "cuda"))


def cpu_computes_bf16_natively() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16's dot products, or AMX tiles), where oneDNN's
    bf16 convolutions run at up to twice the fp32 rate; elsewhere bf16 is emulated and slower."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_amp(amp: str, backend: str, device_type: str) -> tuple[str, str | None]:
    """(the autocast dtype a run uses: off, bf16 or fp16; why, when --amp auto picked it). auto is
    bf16 for the ext backend on a CPU that computes bf16 natively (issue #16: its DCGAN steps 1.6-1.7x
    faster than in fp32 there, docs/performance.md, and digits FD within the fp32 reference's band,
    docs/quality.md), off elsewhere: the reference modules are what fused runs are held to,
    triton on a CPU is its interpreter (a test vehicle), and on CUDA bf16 is not measured yet."""
    if amp != "auto":
        return amp, None
    if backend == "ext" and device_type == "cpu" and cpu_computes_bf16_natively():
        return "bf16", "--amp auto: this CPU computes bf16 natively; --amp off trains in fp32"
    return "off", None


class Trainer:
    def __init__(self, cfg: TrainConfig, state: dict | None = None, log=print,
                 dist: distributed.DistContext = distributed.SINGLE):
        self.cfg, self.log, self.dist = cfg, log, dist
        self.device = pick_device(cfg.device)
        try:
            self.backend = resolve(cfg.backend, self.device)
        except BackendUnavailable as e:
            raise UserError(str(e)) from None
        torch.manual_seed(cfg.seed)
        self.data = load_dataset(cfg.data, cfg.image_size, cfg.channels, self.device, cfg.seed,
                                 cfg.workers, log=log, skipped_list=os.path.join(
                                     cfg.out, SKIPPED_FILES_NAME) if dist.is_main else None)
        self.global_batch = cfg.batch_size * dist.world_size  # every rank's rows of one batch
        self.steps_per_epoch = len(self.data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the global batch (--batch-size {cfg.batch_size} x {dist.world_size} "
                            f"rank(s)) is larger than the data set ({len(self.data)} images)")
        self.total_steps = (cfg.steps if cfg.steps is not None
                            else cfg.epochs * self.steps_per_epoch if cfg.epochs is not None
                            else TrainConfig.DEFAULT_STEPS)

        self.netG, self.netD = build_models(cfg.arch, cfg.nz, cfg.ngf, cfg.ndf, cfg.channels,
                                            cfg.image_size, cfg.g_upsample)
        if cfg.sync_bn:
            if dist.enabled and self.backend == "reference" and self.device.type != "cuda":
                raise UserError("--sync-bn with the reference modules is nn.SyncBatchNorm, which needs "
                                "CUDA; on CPU use a fused backend (--backend ext)")
            # the same Parameter and buffer objects in SyncBatchNorm layers; fuse() keeps them synced
            self.netG = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.netG)
            self.netD = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.netD)
        self.channels_last = cfg.channels_last or computes_in_channels_last(self.backend, self.device.type,
                                                                            cfg.arch)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.netG.to(self.device, memory_format=memory_format)
        self.netD.to(self.device, memory_format=memory_format)
        self.amp, self.amp_reason = resolve_amp(cfg.amp, self.backend, self.device.type)
        self.use_cuda_graphs = self._wants_cuda_graphs()
        # capturable: Adam keeps its step count on the device, so its step can be graph-captured.
        # fused on a CPU: torch's one-pass Adam kernel over all of a model's tensors, where the default
        # runs 7 ops per tensor (a DCGAN-64 G's step: 13.5 -> 2.3 ms on 2 cores; the same update up to
        # rounding), fed channels_last tensors as flat views (gan_fast.optim). CUDA keeps torch's
        # default (foreach) until it is measured there.
        self.fused_adam = self.device.type == "cpu"
        adam = dict(lr=cfg.lr, betas=(cfg.beta1, 0.999), capturable=self.use_cuda_graphs,
                    fused=self.fused_adam or None)
        self.optG = Adam(self.netG.parameters(), **adam)
        self.optD = Adam(self.netD.parameters(), **adam)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.step = 0
        self.interval = IntervalStats(0)  # the statistics since the last metrics row
        self.last_good: tuple[str, int] | None = None  # (path, step) of the newest checkpoint known good
        self.saved_step = None
        # --ema: the average is a copy of the reference modules, taken before fuse (gan_fast/ema.py)
        self.ema = None
        if cfg.ema is not None:
            from .ema import EMA

            self.ema = EMA(self.netG, cfg.ema)
        if state is not None:
            self._load_state(state)
        self.evaluator = None  # built by run() when --eval-every asks for it

        # fuse() keeps every Parameter and buffer object, so the optimizers built above and the
        # state_dict keys are unaffected: checkpoints move freely between backends.
        if self.backend != "reference":
            fuse(self.netG, self.backend)
            fuse(self.netD, self.backend)
        self.bce = (F.binary_cross_entropy_with_logits if self.backend == "reference"
                    else ops_for(self.backend).bce_with_logits)
        # the fused D head (last conv + loss in one op) runs outside netD's forward, so not under
        # --compile, which compiles that forward, nor under DDP, whose forward hooks the gradients
        self.fused_d_head = self.backend != "reference" and not cfg.compile and not dist.enabled
        # D's update on the real and the fake batch in one pass (BatchNorm statistics still per batch;
        # fuse.discriminator_loss): half its convolution calls. Measured on the 2-core CPU of issue #16,
        # the step: bf16 1.02-1.08x at digits and DCGAN-64; fp32 1.02-1.04x at digits and 1.02x at
        # DCGAN-64 (once D's first layer and the BatchNorm reductions got their own kernels; 0.99-1.03x
        # before). fp16 autocast on a CPU is not measured: not there.
        self.stacked_d_update = (self.fused_d_head and self.backend == "ext" and self.device.type == "cpu"
                                 and self.amp in ("off", "bf16") and can_stack_batches(self.netD))
        if cfg.compile:
            self.netG.compile()  # in place: the state_dict keys stay those of the plain module
            self.netD.compile()
        # what the step calls: the models, or their DistributedDataParallel wrappers under torchrun
        self.G, self.D = ((distributed.wrap(self.netG, self.device), distributed.wrap(self.netD, self.device))
                          if dist.enabled else (self.netG, self.netD))
        self.autocast = (torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16,
                                                                 "fp16": torch.float16}[self.amp])
                         if self.amp != "off" else contextlib.nullcontext())
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
        cfg, netG, netD, scaler = self.cfg, self.G, self.D, self.scaler
        if self.channels_last:  # in the float conversion itself, with the strides of NHWC even for 1 channel
            real_u8 = real_u8.to(torch.float32, memory_format=torch.channels_last)
        real = to_model_input(real_u8)
        b = real.shape[0]
        ones = torch.ones(b, device=self.device)
        zeros = torch.zeros(b, device=self.device)

        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad(set_to_none=True)
        if self.stacked_d_update:  # D has no randomness: drawing z first changes nothing
            z = self.noise(b)
            with self.autocast:
                fake = netG(z)
                # in fake's dtype (autocast's): D's first layer would cast an fp32 stack of both again
                loss, out = discriminator_loss(self.netD, torch.cat([real.to(fake.dtype), fake.detach()]),
                                               torch.cat([ones, zeros]), self.bce, batch_chunks=2)
            err_d, out_real, out_fake = 2 * loss, out[:b], out[b:]  # 2 x the mean over both: real + fake
            scaler.scale(err_d).backward()
        else:
            with self.autocast:
                err_d_real, out_real = self.d_loss(real, ones)
            scaler.scale(err_d_real).backward()
            z = self.noise(b)
            with self.autocast:
                fake = netG(z)
                err_d_fake, out_fake = self.d_loss(fake.detach(), zeros)
            scaler.scale(err_d_fake).backward()
            err_d = err_d_real + err_d_fake
        scaler.step(self.optD)

        # (2) Update G: maximize log(D(G(z))), the non-saturating loss of Goodfellow et al.
        # D is frozen: its weight gradients here would be thrown away by the next D update. It runs
        # unwrapped: DDP's reducer would wait for those gradients, and there is nothing to all-reduce.
        netG.zero_grad(set_to_none=True)
        with frozen(self.netD):
            with self.autocast:
                err_g, out_g = self.d_loss(fake, ones, self.netD)
            scaler.scale(err_g).backward()
        scaler.step(self.optG)
        scaler.update()

        with torch.no_grad():  # kept on the device: no host sync until the log interval
            return torch.stack([err_d, err_g, torch.sigmoid(out_real.float()).mean(),
                                torch.sigmoid(out_fake.float()).mean(),
                                torch.sigmoid(out_g.float()).mean()]).detach()

    def d_loss(self, x: torch.Tensor, target: torch.Tensor,
               netD: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE-with-logits loss of D on x against target, D's logits); ``netD``: the module to run,
        by default self.D (the DDP wrapper under torchrun)."""
        if self.fused_d_head:
            return discriminator_loss(self.netD, x, target, self.bce)
        logits = (self.D if netD is None else netD)(x)
        return self.bce(logits.float(), target), logits

    def noise(self, b: int) -> torch.Tensor:
        """This rank's latent vectors: the whole global batch's noise is drawn (the same on every rank)
        and each rank keeps its rows, so the run does not depend on how the batch is split."""
        r = self.dist.rank
        z = torch.randn(b * self.dist.world_size, self.cfg.nz, 1, 1, device=self.device)
        return z[r * b:(r + 1) * b] if self.dist.enabled else z

    # ---------------------------------------------------------------- state
    def state_dict(self, interval_sum: torch.Tensor | None = None) -> dict:
        """Everything a resume needs; ``interval_sum``: the statistics summed since the last metrics
        row (over ranks under torchrun), so the next row of a resumed run covers the whole interval."""
        state = {"netG": self.netG.state_dict(), "netD": self.netD.state_dict(),
                 "optG": self.optG.state_dict(), "optD": self.optD.state_dict(),
                 "scaler": self.scaler.state_dict(), "step": self.step, "rng": ckpt.rng_state(),
                 "config": self.cfg.to_dict(), "version": __version__,
                 "log_interval": {"sum": (self.interval.sum if interval_sum is None else interval_sum)
                                  if self.interval.n else None, "n": self.interval.n}}
        if self.ema is not None:
            state["netG_ema"] = self.ema.state_dict()
        return state

    def _load_state(self, state: dict) -> None:
        try:
            self.netG.load_state_dict(state["netG"])
            self.netD.load_state_dict(state["netD"])
            self.optG.load_state_dict(state["optG"])
            self.optD.load_state_dict(state["optD"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"checkpoint does not match the models: {e}") from None
        # load_state_dict brings back the capturable and fused flags of the run that wrote the
        # checkpoint; this run's device and --cuda-graphs decide them
        set_adam_flags(self.optG, self.use_cuda_graphs, self.fused_adam)
        set_adam_flags(self.optD, self.use_cuda_graphs, self.fused_adam)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.interval = IntervalStats(self.step, state.get("log_interval"), self.device)
        if state.get("resumed_from"):
            self.last_good = (state["resumed_from"], self.step)
        if self.ema is not None:
            if state.get("netG_ema") is None:  # --ema added on resume: the average starts here
                self.log(f"--ema: the checkpoint holds no average yet; it starts from G at step {self.step}")
            self.ema.load_state_dict(state.get("netG_ema") or state["netG"])
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> str:
        """Check the training state for NaN/Inf (every rank), then write it (rank 0). Raises Diverged
        instead of writing a non-finite state over the last good checkpoint."""
        path = os.path.join(self.cfg.out, ckpt.CHECKPOINT_NAME)
        if self.saved_step == self.step:
            return path
        tensors = guard.training_tensors(self)
        # one host sync and one all-reduce: the interval's statistics and the non-finite flag
        partial = self.interval.sum if self.interval.n else torch.zeros(len(STAT_NAMES), device=self.device)
        checked = distributed.mean_over_ranks(
            torch.cat([partial, guard.nonfinite_flag(tensors, self.device)]), self.dist).cpu()
        if checked[-1] > 0 or not torch.isfinite(checked).all():
            raise self.diverged("non-finite training state before writing a checkpoint")
        if self.dist.is_main:
            with self.writing(path):
                ckpt.save_checkpoint(self.state_dict(interval_sum=checked[:-1]), path)
        self.last_good, self.saved_step = (path, self.step), self.step
        if self.dist.is_main:  # then the generator alone next to it, and --keep-checkpoints snapshots
            with self.writing(os.path.join(self.cfg.out, export.NETG_NAME)):
                export.after_checkpoint(self, path)
        return path

    def diverged(self, what: str) -> guard.Diverged:
        """The one line that ends a diverged run: where, what, and the checkpoint to go back to."""
        names = guard.nonfinite_names(guard.training_tensors(self))
        found = f" (NaN/Inf in {', '.join(names)})" if names else ""
        return guard.Diverged(f"training diverged at step {self.step}: {what}{found}; stopped without "
                              f"saving; {self.last_good_text()}")

    @contextlib.contextmanager
    def writing(self, target: str | None = None):
        """A write that fails mid-run (disk full, folder removed) ends the run with one line, exit 2;
        the last good checkpoint is untouched (save_atomic renames only a complete file over it)."""
        try:
            yield
        except OSError as e:
            where = f" {e.filename or target}" if e.filename or target else f" in {self.cfg.out}"
            raise UserError(f"can't write{where} at step {self.step}: {e.strerror or e}; "
                            f"{self.last_good_text()}") from None

    def last_good_text(self) -> str:
        """Where a stopped run can go back to, for its last line."""
        if self.last_good is None:
            return "no checkpoint was written"
        return f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"

    # ---------------------------------------------------------------- outputs
    @property
    def sample_model(self) -> torch.nn.Module:
        """The generator that samples and evaluation use: the average with --ema, else G."""
        return self.ema.model if self.ema is not None else self.netG

    @torch.no_grad()
    def save_samples(self) -> str:
        """Fixed-noise grid in eval mode: BN uses running statistics, so sampling never changes the
        model's state (a resumed run stays identical to an uninterrupted one)."""
        netG = self.sample_model
        was_training = netG.training
        netG.eval()
        with self.autocast:
            fake = netG(self.fixed_noise)
        netG.train(was_training)
        path = os.path.join(self.cfg.out, "samples", f"step_{self.step:07d}.png")
        save_grid(fake, path)
        return path

    def is_milestone(self, step: int) -> bool:
        return step % self.cfg.sample_every == 0 or step in self.cfg.milestones or step == self.total_steps

    def is_eval_step(self, step: int) -> bool:
        return self.evaluator is not None and (step % self.cfg.eval_every == 0 or step == self.total_steps)

    def evaluate(self) -> dict:
        """Sample quality of the sampling generator (gan_fast.eval): its own noise, eval mode, no
        gradients, so the training run continues exactly as it would have without it."""
        return self.evaluator(self.sample_model, self.cfg.nz)

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train to total_steps; returns the exit code: 0 done, 3 diverged (guard.py), 128 + N when
        signal N stopped it (signals.py)."""
        cfg, main = self.cfg, self.dist.is_main  # under torchrun, rank 0 alone writes outputs
        metrics = None
        if main:
            prepare_out_dir(cfg.out, self.log)
            with self.writing():
                self.write_outputs_header()
                metrics = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), resume_step=self.step)
        if self.step >= self.total_steps:
            self.log(f"already at step {self.step} of {self.total_steps}; nothing to do "
                     "(raise --steps or --epochs to continue)")
            return 0
        self.log(f"training {cfg.arch} {cfg.image_size}x{cfg.image_size}x{cfg.channels} on "
                 f"{self.device} with backend {self.backend}"
                 + ("" if self.amp == "off" else f", {self.amp} autocast")
                 + (f" ({self.amp_reason})" if self.amp_reason else "")
                 + f": steps {self.step} -> {self.total_steps}, "
                 f"batch {self.global_batch}"
                 + (f" ({self.dist.world_size} ranks x {cfg.batch_size})" if self.dist.enabled else "")
                 + f", out {cfg.out}")
        export.attach_tensorboard(metrics, cfg, resume_step=self.step)  # --tensorboard: rows go there too
        if cfg.eval_every is not None and main:
            self.evaluator = build_evaluator(cfg, self.device, self.data, log=self.log)

        if self.use_cuda_graphs:  # the same step, replayed from one captured CUDA graph
            from .cuda_graphs import GraphedStep

            step_fn = GraphedStep(self)
        else:
            step_fn = self.train_step
        progress = Progress(self.step, self.total_steps, self.log, enabled=main)
        self.interval.restart_clock(self.step)
        self.run_start, self.eval_seconds, stopping = time.perf_counter(), 0.0, False
        try:
            with StopFlag() as stop:
                while self.step < self.total_steps and not stopping:
                    epoch, offset = divmod(self.step, self.steps_per_epoch)
                    for real in self.data.batches(cfg.batch_size, epoch, offset, self.dist.rank,
                                                  self.dist.world_size):
                        stats = step_fn(real)
                        if self.ema is not None:
                            self.ema.update(self.step + 1)
                        self.interval.add(stats)
                        self.step += 1
                        progress.update(self.step)
                        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                            self.log_interval(metrics, progress)
                        if main:
                            self.write_step_outputs(metrics, progress)
                        if self.step % cfg.checkpoint_every == 0:
                            self.save_checkpoint()
                        stopping = self.stop_agreed(stop.requested)
                        if self.step >= self.total_steps or stopping:
                            break
                if stopping:  # nothing of the run so far is lost: its last statistics, a grid
                    if self.interval.n:
                        self.log_interval(metrics, progress)
                    if main:
                        with self.writing():
                            self.save_samples()
                path = self.save_checkpoint()
                if main:
                    with self.writing():
                        metrics.plot(os.path.join(cfg.out, "loss.png"))
        except guard.Diverged as e:
            progress.close()
            print(f"error: {e}", file=sys.stderr, flush=True)
            return guard.EXIT_DIVERGED
        finally:
            progress.close()
        if stopping:
            self.log(f"interrupted by {stop.name} at step {self.step}: checkpoint saved to {path}; "
                     f"continue with --resume {path}")
            return stop.exit_code
        self.log(f"done: {self.step} steps; samples in {os.path.join(cfg.out, 'samples')}, "
                 f"checkpoint {path}")
        return 0

    def log_interval(self, metrics: MetricsLog | None, progress: Progress) -> None:
        """One metrics row for the steps since the last one. This is the one host sync per interval
        (and, under torchrun, one all-reduce), so the divergence check rides along: non-finite
        statistics, or NaN/Inf anywhere in the training state, stop the run here."""
        flag = guard.nonfinite_flag(guard.training_tensors(self), self.device)
        values = distributed.mean_over_ranks(torch.cat([self.interval.mean(), flag]), self.dist).tolist()
        stats, nonfinite_state = values[:-1], values[-1] > 0
        row = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
               **dict(zip(STAT_NAMES, stats)),
               "images_per_s": self.interval.images_per_s(self.step, self.global_batch)}
        if metrics is not None:
            with self.writing():
                metrics.write(row)
            progress.report(row)
        first = self.interval.first_step
        self.interval.reset(self.step)
        bad = [label for label, v in zip(STAT_LABELS, stats) if not math.isfinite(v)]
        if bad:
            raise self.diverged(f"{', '.join(bad)} not finite over steps {first}-{self.step}")
        if nonfinite_state:
            raise self.diverged("non-finite training state")

    def stop_agreed(self, requested: bool) -> bool:
        """Whether to stop after this step. Under torchrun the ranks agree every STOP_CHECK_EVERY
        steps (a Ctrl-C reaches them at different moments; a rank leaving alone would leave the
        others waiting in a collective forever)."""
        if not self.dist.enabled:
            return requested
        if self.step % STOP_CHECK_EVERY and self.step < self.total_steps:
            return False
        return distributed.any_rank(requested, self.dist, self.device)

    def write_outputs_header(self) -> None:
        """config.json (the resolved configuration) and, on a fresh run, the grid of real images."""
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        resolved = {**cfg.to_dict(), "backend_resolved": self.backend, "device_resolved": str(self.device),
                    "channels_last_resolved": self.channels_last, "amp_resolved": self.amp,
                    "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                    "world_size": self.dist.world_size, "global_batch": self.global_batch,
                    "torch": torch.__version__, "gan_fast": __version__}
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
        if self.step == 0:
            first = next(self.data.batches(min(N_FIXED_NOISE, len(self.data)), 0))
            save_grid(to_model_input(first), os.path.join(cfg.out, "real.png"))

    def write_step_outputs(self, metrics: MetricsLog, progress: Progress) -> None:
        """Evaluation, sample grids and plots due after this step (rank 0); the seconds spent
        evaluating are left out of images/s and train_s."""
        with self.writing():
            self._write_step_outputs(metrics, progress)

    def _write_step_outputs(self, metrics: MetricsLog, progress: Progress) -> None:
        cfg = self.cfg
        if self.is_eval_step(self.step):
            start = time.perf_counter()
            quality = self.evaluate()
            spent = time.perf_counter() - start
            self.eval_seconds += spent
            self.interval.exclude(spent)
            metrics.write({"step": self.step, **quality, "eval_s": spent,
                           "train_s": time.perf_counter() - self.run_start - self.eval_seconds})
            progress.note(f"[{self.step}/{self.total_steps}] {format_metrics(quality)}")
            metrics.plot(os.path.join(cfg.out, "loss.png"))
        if self.is_milestone(self.step):
            self.save_samples()
            metrics.plot(os.path.join(cfg.out, "loss.png"))


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """``module``'s parameters take no gradient inside the block, so every autograd node (ATen's and
    the fused ops', through ctx.needs_input_grad) skips their weight gradients while still passing
    the input gradient through. stylegan2-ada-pytorch's training loop toggles requires_grad per
    phase the same way. The flags are restored on the way out."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def prepare_out_dir(out: str, log=print) -> None:
    """An unwritable --out is one line before training, not a traceback at the first save; the
    temporary files of a write that a kill interrupted are removed."""
    removed = ckpt.prepare_out_dir(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) left in {out} by an interrupted write")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, state = config_from_args(args), None
    if args.resume is not None:  # the checkpoint's config, with the flags a resume may change
        state = ckpt.load_resume_state(args.resume, cfg.out)
        cfg = resumed_config(cfg, state["config"], given_flags(parser, argv))
    try:  # under torchrun: join the process group; each rank gets its device
        dist, device = distributed.init(cfg.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        if dist.enabled:
            cfg = dataclasses.replace(cfg, device=device)
        log = print if dist.is_main else _silent
        if dist.is_main:  # before loading the data: a mistake in --out costs nothing
            prepare_out_dir(cfg.out, log)
        return Trainer(cfg, state, log=log, dist=dist).run()
    finally:
        distributed.shutdown()


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0: one copy of every line is enough."""


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
