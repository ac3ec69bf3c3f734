"""The run configuration: one dataclass, the command-line flags built from it, and the error type
that the command-line entry points turn into a message and exit code 2 (never a traceback)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .models import ARCHS, check_image_size

BACKEND_CHOICES = ("reference", "triton", "ext", "auto")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
MILESTONES = (100, 1000, 5000, 10000, 20000, 50000)  # sample grids of the seed's training log


class UserError(Exception):
    """A mistake in the user's input (flags, paths, data): reported as one line, exit code 2."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None
    image_size: int = 32
    channels: int = 1
    # model
    arch: str = "dcgan"
    nz: int = 64
    ngf: int = 32
    ndf: int = 32
    g_upsample: bool = False
    # optimisation
    batch_size: int = 64
    steps: int | None = None
    epochs: int | None = None
    lr: float = 2e-4
    beta1: float = 0.5
    seed: int = 0
    # execution
    device: str = "auto"
    backend: str = "reference"
    amp: str = "auto"  # auto: bf16 for ext on a CPU with native bf16, else off (train.resolve_amp)
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: str = "auto"
    sync_bn: bool = False
    workers: int = 2
    # outputs
    out: str = "runs/dcgan"
    resume: str | None = None
    sample_every: int = 500
    checkpoint_every: int = 1000
    log_every: int = 50
    keep_checkpoints: int = 0  # numbered snapshots of the last K saves (gan_fast/export.py); 0: none
    tensorboard: bool = False  # also write the metrics.jsonl scalars as TensorBoard events
    milestones: tuple = field(default=MILESTONES)
    # evaluation (gan_fast.eval) and the averaged generator (gan_fast.ema)
    ema: float | None = None
    eval_every: int | None = None
    eval_n: int = 1000
    fid: bool = False
    fid_weights: str | None = None

    DEFAULT_STEPS = 1500

    def validate(self) -> "TrainConfig":
        try:
            check_image_size(self.image_size)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.arch not in ARCHS:
            raise UserError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.arch == "mlp" and self.g_upsample:
            raise UserError("--g-upsample applies to --arch dcgan only")
        if self.channels not in (1, 3):
            raise UserError(f"--channels must be 1 or 3, got {self.channels}")
        for name in ("nz", "ngf", "ndf", "batch_size", "sample_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError("--batch-size must be at least 2: BatchNorm needs two samples per batch")
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise UserError("--steps and --epochs must be at least 1")
        if self.amp not in AMP_CHOICES:
            raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise UserError(f"--cuda-graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.lr <= 0 or not 0 <= self.beta1 < 1:
            raise UserError("--lr must be positive and --beta1 in [0, 1)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UserError(f"--ema is a decay in (0, 1), e.g. 0.999; got {self.ema}")
        if self.keep_checkpoints < 0:
            raise UserError(f"--keep-checkpoints must be 0 or more, got {self.keep_checkpoints}")
        if self.eval_every is not None and self.eval_every < 1:
            raise UserError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.eval_n < 2:
            raise UserError(f"--eval-n must be at least 2 (a covariance needs two), got {self.eval_n}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "milestones" in kw:
            kw["milestones"] = tuple(kw["milestones"])
        return cls(**kw)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default: "(default: X)" is appended to each flag that takes a value,
    unless its help already says what happens by default (the flags whose default is None describe
    it in words, "(default: None)" would tell nothing). On/off switches default to off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.nargs == 0 or "default" in text or default is None or default is False
                or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action: argparse.Action) -> str:
        if (not (action.help or "").strip() and action.nargs != 0 and action.default is not None
                and action.default != argparse.SUPPRESS):
            # argparse prints no help column, so no default, for a flag without help text
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every gan_fast command: a mistake is one line and exit code 2 (argparse prints
    the whole usage, 19 lines for train, above its message); --help shows the defaults; no
    abbreviated flags (summary's old parser took --checkpoint as --checkpoint-every)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Names (dest) of the flags that appear on the command line, as opposed to defaults. The command
    line is parsed again into a namespace holding a marker for every name: argparse fills in only the
    defaults a namespace lacks, so the names still holding the marker are those not given."""
    unset = object()
    names = vars(parser.parse_args(argv))
    marked = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(marked).items() if value is not unset}


# Flags that may change when a run is resumed; every other setting comes from the checkpoint.
RESUMABLE_OVERRIDES = ("steps", "epochs", "out", "device", "backend", "amp", "compile", "cuda_graphs",
                       "channels_last", "sample_every", "checkpoint_every", "log_every", "workers", "data",
                       "ema", "eval_every", "eval_n", "fid", "fid_weights", "keep_checkpoints", "tensorboard")


def resumed_config(cfg: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's (``saved``), with the RESUMABLE_OVERRIDES among
    the ``given`` flags taken from ``cfg`` (the command line's); any other flag given with a value the
    checkpoint's run did not have is an error."""
    resumed = TrainConfig.from_dict(saved)
    conflicts = [name for name in given - set(RESUMABLE_OVERRIDES) - {"resume", "fused"}
                 if getattr(cfg, name, None) != getattr(resumed, name, None)]
    if conflicts:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(conflicts))
        one = len(conflicts) == 1
        raise UserError(f"--resume: {flags} {'differs' if one else 'differ'} from the checkpoint's run; "
                        f"drop {'it' if one else 'them'} to continue it")
    for name in RESUMABLE_OVERRIDES:
        if name in given or (name == "backend" and "fused" in given):
            setattr(resumed, name, getattr(cfg, name))
    if "steps" in given:
        resumed.epochs = None
    if "epochs" in given:
        resumed.steps = None
    return resumed.validate()


def add_model_flags(p: argparse.ArgumentParser, discriminator: bool = True) -> None:
    """The flags that build G and D (gan_fast.models); ``discriminator=False``: G's only (sample)."""
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default=d.arch, help="DCGAN or the vanilla MLP GAN")
    g.add_argument("--image-size", type=int, default=d.image_size, help="power of two, 16..256")
    g.add_argument("--channels", type=int, choices=(1, 3), default=d.channels,
                   help="image channels; input images are converted (grayscale or RGB)")
    g.add_argument("--nz", type=int, default=d.nz, help="latent size")
    g.add_argument("--ngf", type=int, default=d.ngf, help="generator width")
    if discriminator:
        g.add_argument("--ndf", type=int, default=d.ndf, help="discriminator width")
    g.add_argument("--g-upsample", action="store_true",
                   help="generator upsamples (nearest) then convolves instead of ConvTranspose2d")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="folder of images (searched recursively) or a .zip of them; "
                        "default: the embedded 8x8 UCI digits upscaled to 32x32")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="loader processes, used only when the data set does not fit in memory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step (per rank under torchrun)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help=f"number of G updates (default: {TrainConfig.DEFAULT_STEPS}, unless --epochs)")
    length.add_argument("--epochs", type=int, default=None,
                        help="passes over the data instead of --steps (default: --steps decides)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of G and D")
    g.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the weights, the noise and the data order")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="op implementation: reference nn modules, fused triton or ext kernels, or auto "
                        "(default: reference)")
    g.add_argument("--fused", action="store_true", help="same as --backend auto")
    g.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                   help="autocast dtype; auto: bf16 for the ext backend (what --fused picks on a CPU) on a CPU "
                        "that computes bf16 natively (AVX512_BF16 or AMX; the run's first line says so), off "
                        "(fp32) otherwise")
    g.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout (on by itself for a fused DCGAN where its convolutions compute "
                        "in NHWC: ext on a CPU, triton on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile both networks (a baseline)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (every rank's)")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default=d.cuda_graphs,
                   help="capture the whole training step (both updates, both Adam steps) in a CUDA graph; "
                        "auto: on with a fused backend on CUDA")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=d.out, help="run directory: grids, metrics, plots, checkpoints")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="PATH",
                   help="continue from PATH, or from the last checkpoint in --out when no PATH is given "
                        "(default: a fresh run)")
    g.add_argument("--sample-every", type=int, default=d.sample_every,
                   help="steps between fixed-noise sample grids (also at the milestone steps)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (also at the end and on an interrupt)")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between statistics lines and metrics.jsonl rows")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="K",
                   help="also keep numbered snapshots checkpoint_STEP.pt and netG_STEP.pt of the last K "
                        "saves (0: only checkpoint.pt and netG.pt, rewritten at each save)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics.jsonl scalars to TensorBoard, in OUT/tensorboard "
                        "(pip install 'gan_fast[tensorboard]')")
    g = p.add_argument_group("evaluation")
    g.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of G (e.g. 0.999) for samples and eval "
                        "(default: off)")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="measure sample quality every N steps and at the end: the digits metric on the "
                        "embedded digits (FD, class coverage, confidence), FID/KID with --fid "
                        "(default: off)")
    g.add_argument("--eval-n", type=int, default=d.eval_n, help="generated samples per evaluation")
    g.add_argument("--fid", action="store_true",
                   help="also FID and KID (Inception features through torch-fidelity; pip install "
                        "'gan_fast[fid]'); the real set's statistics are cached")
    g.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="Inception weights file (default: torch-fidelity's in $TORCH_HOME/hub/checkpoints)")


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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed flags; flags a parser lacks keep their defaults."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if getattr(args, "fused", False):
        if getattr(args, "backend", None) not in (None, "auto"):
            raise UserError(f"--fused means --backend auto; it conflicts with --backend {args.backend}")
        kw["backend"] = "auto"
    return TrainConfig(**kw).validate()


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry point: user mistakes print one line and exit 2, Ctrl-C exits 130, no tracebacks."""
    # warnings are messages to the user here: one line, without the source line that emitted them
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        code = 0
    sys.exit(code)
