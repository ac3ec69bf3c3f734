"""Sample quality: ``python -m gan_fast.eval --checkpoint RUN [--n 1000] [--ema] [--fid]``.

The metrics of gan_fast.metrics measured on one set of generated samples (Evaluator): the digits
metric on the embedded digits, FID and KID with --fid. Training uses the same Evaluator
(``train --eval-every``); docs/quality.md has the reference values (``--references``).
"""
from __future__ import annotations

import argparse
import json
import warnings
from typing import Iterator

import torch

from .config import ArgumentParser, UserError, pick_device, run_cli
from .datasets import load_dataset
from .metrics.digits import DigitsMetric
from .metrics.fid import FIDMetric, FIDUnavailable, cached_reference_stats, inception_extractor
from .models import build_models
from .sample import generator_from_checkpoint

EVAL_SEED = 0  # the noise of every evaluation: the same samples each time, so curves are not noisy


@torch.no_grad()
def generate(netG: torch.nn.Module, nz: int, n: int, seed: int = EVAL_SEED,
             batch_size: int = 250) -> Iterator[torch.Tensor]:
    """n samples of netG in [-1, 1], in batches, in eval mode (BatchNorm's running statistics, as the
    sample grids use: evaluation never changes the model). The noise comes from its own generator, so
    evaluating leaves the training RNG, and therefore the run, unchanged."""
    device = next(netG.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = netG.training
    netG.eval()
    try:
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), nz, 1, 1, generator=g).to(device)
            yield netG(z).float()
    finally:
        netG.train(was_training)


DIGITS_DO_NOT_APPLY = ("the digits metric applies only to the embedded digits (the default data), "
                       "not to --data {data}; FID/KID is the metric for other data (--fid)")


class Evaluator:
    """The metrics of a run, each measured on the same n generated samples."""

    def __init__(self, metrics: list, n: int = 1000, seed: int = EVAL_SEED, batch_size: int = 250):
        self.metrics, self.n, self.seed, self.batch_size = metrics, n, seed, batch_size

    def __call__(self, netG: torch.nn.Module, nz: int) -> dict:
        out = {}
        for metric in self.metrics:
            # the samples are generated again (same noise) for each metric rather than held: 1000
            # samples at 256x256x3 would be 0.8 GB, and a generator pass is cheap next to Inception
            out.update(metric(generate(netG, nz, self.n, self.seed, self.batch_size)))
        return out


def build_evaluator(cfg, device: torch.device, dataset=None, log=print) -> Evaluator | None:
    """The evaluator for a training config (digits on the embedded digits, FID/KID with cfg.fid), or
    None when no metric applies; metrics that can't run here are skipped with one warning each."""
    # Building extractors (random init before loading weights) and loading real images (DataLoader
    # seeds) draw from the global RNG; forked, so a run that evaluates trains exactly as one that
    # doesn't.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics = build_metrics(cfg, device, dataset, log=log)
    return Evaluator(metrics, n=cfg.eval_n) if metrics else None


def build_metrics(cfg, device: torch.device, dataset=None, strict: bool = False, batch_size: int = 100,
                  log=print) -> list:
    """The metrics that apply to a run's data: digits on the embedded digits, FID/KID with cfg.fid.
    One that can't run is a warning (training goes on without it), or with ``strict`` (the eval
    command, asked for it) an error."""
    def unavailable(message: str, warning: str) -> None:
        if strict:
            raise UserError(message)
        warnings.warn(warning, stacklevel=3)

    metrics: list = []
    if cfg.data is None:
        metrics.append(DigitsMetric(device))
    elif not cfg.fid:
        message = DIGITS_DO_NOT_APPLY.format(data=cfg.data)
        unavailable(message, message + "; no evaluation")
    if cfg.fid:
        try:
            extractor = inception_extractor(cfg.fid_weights, device)
        except FIDUnavailable as e:
            unavailable(f"--fid: {e}", f"FID/KID skipped: {e}")
        else:
            if dataset is None:
                dataset = load_dataset(cfg.data, cfg.image_size, cfg.channels, device, cfg.seed,
                                       cfg.workers, log=log)
            ref = cached_reference_stats(extractor, cfg.data, cfg.image_size, cfg.channels, dataset,
                                         batch_size=batch_size, log=log)
            metrics.append(FIDMetric(extractor, ref))
    return metrics


def format_metrics(m: dict) -> str:
    parts = []
    if "digits_fd" in m:
        parts.append(f"digits FD {m['digits_fd']:.2f}, coverage {m['digits_coverage']:.3f}, "
                     f"confidence {m['digits_confidence']:.3f}")
    if "fid" in m:
        parts.append(f"FID {m['fid']:.2f}, KID {m['kid']:.4f} +- {m['kid_std']:.4f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------- reference values

@torch.no_grad()
def reference_values(n: int = 1000, seed: int = EVAL_SEED) -> dict[str, dict]:
    """The digits metric of things whose quality is known, to read a run's numbers against:
    real training digits (the floor: what a perfect generator would score, sample noise included),
    uniform noise, and a DCGAN generator of the default config before any training."""
    metric = DigitsMetric()
    g = torch.Generator().manual_seed(seed)
    train = metric.real[torch.from_numpy(metric.train_idx)]
    pick = torch.randperm(len(train), generator=g)[:n]
    noise = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    torch.manual_seed(seed)
    netG, _ = build_models("dcgan", 64, 32, 32, 1, 32)  # TrainConfig's defaults
    return {
        f"held-out real vs {len(pick)} training real (the floor)": metric(metric.batches(train[pick])),
        "uniform noise": metric(metric.batches(noise)),
        "untrained DCGAN G (default config)": metric(generate(netG, 64, n, seed)),
    }


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m gan_fast.eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gan_fast checkpoint (or a run folder holding one)")
    src.add_argument("--references", action="store_true",
                     help="print the digits metric of real digits, noise and an untrained G")
    p.add_argument("--n", type=int, default=1000, help="generated samples")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the EMA generator (default: when the checkpoint has one)")
    p.add_argument("--fid", action="store_true", help="also FID and KID (needs torch-fidelity and the "
                                                      "Inception weights on disk)")
    p.add_argument("--fid-weights", metavar="PATH", help="Inception weights file for --fid (default: "
                                                          "torch-fidelity's in $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--data", help="the real images for --fid (default: the checkpoint's training data)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="noise seed of the samples")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 2:
        raise UserError("--n must be at least 2 (a covariance needs two samples)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.references:
        values = reference_values(args.n, args.seed)
        if args.json:
            print(json.dumps(values))
        else:
            for name, m in values.items():
                print(f"{name}: {format_metrics(m)}")
        return 0

    device = pick_device(args.device)
    netG, cfg, used_ema, step = generator_from_checkpoint(args.checkpoint, args.ema, device)
    if args.data is not None:
        cfg.data = args.data
    cfg.fid, cfg.fid_weights = args.fid, args.fid_weights  # what this command asks for, not the run
    metrics = build_metrics(cfg, device, strict=True, batch_size=min(args.batch_size, 100))
    result = Evaluator(metrics, args.n, args.seed, args.batch_size)(netG, cfg.nz)
    which = "EMA generator" if used_ema else "generator"
    if args.json:
        print(json.dumps({"step": step, "ema": used_ema, "n": args.n, **result}))
        return 0
    print(f"{args.checkpoint}: step {step}, {which}, {args.n} samples (seed {args.seed})")
    if "digits_fd" in result:
        print(f"  digits FD            {result['digits_fd']:9.3f}   (lower is better; docs/quality.md "
              "has reference values)")
        print(f"  class coverage       {result['digits_coverage']:9.3f}   (normalized entropy of the "
              "predicted classes: 1 = all ten digits equally often)")
        print(f"  mean confidence      {result['digits_confidence']:9.3f}   (mean top softmax probability)")
        print("  predicted classes    " + " ".join(f"{d}:{h:.2f}" for d, h in
                                                  enumerate(result["digits_histogram"])))
    if "fid" in result:
        print(f"  FID                  {result['fid']:9.3f}")
        print(f"  KID                  {result['kid']:9.5f} +- {result['kid_std']:.5f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
