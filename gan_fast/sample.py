"""Generate images from a trained generator: ``python -m gan_fast.sample --checkpoint RUN/checkpoint.pt``.

Writes a grid PNG (--n images), optionally one PNG per image (--individual DIR) and a latent
interpolation strip (--interpolate; a .gif --interpolate-out animates it). A checkpoint trained with
--ema samples its averaged generator unless --no-ema is given. Also loads a
pytorch/examples dcgan ``netG.pth`` (keys ``main.N.weight``) given the model flags it was trained with.
"""
from __future__ import annotations

import argparse
import os

import torch

from .config import (ArgumentParser, TrainConfig, UserError, add_model_flags, given_flags, pick_device,
                     run_cli)
from .export import GENERATOR_ARGS, load_generator_file, read_generator_metadata, read_training_checkpoint
from .images import make_grid, save_grid, save_images, to_pil
from .models import build_models


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m gan_fast.sample", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gan_fast checkpoint (or a run folder holding one)")
    src.add_argument("--netG", help="a generator state_dict: a run's netG.pt (its netG.json next to it "
                                    "gives the model), or e.g. pytorch/examples' netG.pth with the "
                                    "--arch/--image-size/--channels/--nz/--ngf it was trained with")
    add_model_flags(p, discriminator=False)  # sample builds G only
    p.add_argument("--n", type=int, default=64, help="images in the grid")
    p.add_argument("--out", default="samples.png", help="grid PNG path")
    p.add_argument("--individual", metavar="DIR",
                   help="also write each image as its own PNG here (default: the grid only)")
    p.add_argument("--interpolate", type=int, metavar="STEPS", default=0,
                   help="also write a strip interpolating (spherically) between two latents in STEPS "
                        "(default: no strip)")
    p.add_argument("--interpolate-out", default="interpolation.png",
                   help="interpolation strip path; ending in .gif writes an animation")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent vectors")
    p.add_argument("--truncation", type=float, default=None,
                   help="resample latent entries with |z| above this (the truncation trick, "
                        "Brock et al. 2019 BigGAN): less variety, higher fidelity (default: off)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="sample the exponential moving average of G (default: when the checkpoint has "
                        "one, see train --ema); --no-ema samples the trained G")
    p.add_argument("--train-mode-bn", action="store_true",
                   help="normalize with batch statistics instead of the running ones")
    return p


def truncated_normal(shape, threshold: float | None, generator: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=generator)
    if threshold is None:
        return z
    if threshold <= 0:
        raise UserError("--truncation must be positive")
    for _ in range(1000):  # resampling the tail converges fast: P(|z| > 0.5) is 0.62
        outside = z.abs() > threshold
        if not outside.any():
            break
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (White 2016, "Sampling Generative Networks"): Gaussian latents
    concentrate on a sphere, and linear interpolation would cut through its low-density interior."""
    a_flat, b_flat = a.flatten(), b.flatten()
    omega = torch.arccos((a_flat / a_flat.norm()).dot(b_flat / b_flat.norm()).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return torch.stack([(1 - s) * a + s * b for s in t])
    so = torch.sin(omega)
    return torch.stack([torch.sin((1 - s) * omega) / so * a + torch.sin(s * omega) / so * b for s in t])


def _pick_weights(state: dict, ema: bool | None, path: str) -> tuple[dict, bool]:
    """The EMA generator's weights when asked for (ema=True) or, by default (None), when the
    checkpoint holds them; the trained generator's otherwise."""
    has_ema = state.get("netG_ema") is not None
    if ema and not has_ema:
        raise UserError(f"--ema: {path} holds no EMA generator (train with --ema DECAY)")
    use_ema = has_ema if ema is None else ema
    return (state["netG_ema"] if use_ema else state["netG"]), use_ema


def _build_generator(cfg: TrainConfig, weights: dict, device: torch.device) -> torch.nn.Module:
    netG, _ = build_models(cfg.arch, cfg.nz, cfg.ngf, cfg.ndf, cfg.channels, cfg.image_size,
                           cfg.g_upsample)
    try:
        netG.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"the generator weights don't match --arch {cfg.arch} --image-size "
                        f"{cfg.image_size} --channels {cfg.channels} --nz {cfg.nz} --ngf {cfg.ngf}"
                        f"{' --g-upsample' if cfg.g_upsample else ''}: {first[1].strip() if len(first) > 1 else first[0]}"
                        ) from None
    return netG.to(device)


def generator_from_checkpoint(path: str, ema: bool | None,
                              device: torch.device) -> tuple[torch.nn.Module, TrainConfig, bool, int]:
    """(generator, the run's config, whether it is the EMA generator, step) of a training checkpoint."""
    path, state = read_training_checkpoint(path)
    cfg = TrainConfig.from_dict(state["config"])
    weights, used_ema = _pick_weights(state, ema, path)
    return _build_generator(cfg, weights, device), cfg, used_ema, int(state.get("step", 0))


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return (flag if value else f"no {flag}") if isinstance(value, bool) else f"{flag} {value}"


def load_generator(args: argparse.Namespace, device: torch.device,
                   given: set[str] = frozenset()) -> tuple[torch.nn.Module, int]:
    """The generator of --checkpoint or --netG; ``given``: the flags on the command line."""
    if args.checkpoint:
        netG, cfg, used_ema, _ = generator_from_checkpoint(args.checkpoint, args.ema, device)
        if used_ema:
            print("using the EMA generator (--no-ema for the trained one)")
        return netG, cfg.nz
    if args.ema:
        raise UserError("--ema needs a gan_fast --checkpoint trained with --ema")
    model = {name: getattr(args, name) for name in GENERATOR_ARGS}
    saved = read_generator_metadata(args.netG)
    if saved is not None:  # a run's netG.pt: its netG.json says which model it is
        differ = sorted(n for n in given & set(GENERATOR_ARGS) if n in saved and model[n] != saved[n])
        if differ:
            raise UserError(f"{', '.join(_flag(n, model[n]) for n in differ)}: the generator in "
                            f"{args.netG} has {', '.join(_flag(n, saved[n]) for n in differ)} "
                            f"(its {os.path.basename(os.path.splitext(args.netG)[0])}.json); drop the flag")
        model.update(saved)
    cfg = TrainConfig(**model).validate()
    return _build_generator(cfg, load_generator_file(args.netG), device), cfg.nz


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError("--n must be at least 1")
    device = pick_device(args.device)
    netG, nz = load_generator(args, device, given_flags(parser, argv))
    netG.train(args.train_mode_bn)
    g = torch.Generator().manual_seed(args.seed)

    z = truncated_normal((args.n, nz, 1, 1), args.truncation, g).to(device)
    images = netG(z)
    save_grid(images, args.out)
    print(f"wrote {args.out} ({args.n} images)")
    if args.individual:
        paths = save_images(images, args.individual)
        print(f"wrote {len(paths)} images to {args.individual}")
    if args.interpolate:
        if args.interpolate < 2:
            raise UserError("--interpolate needs at least 2 steps")
        ends = truncated_normal((2, nz, 1, 1), args.truncation, g)
        path_z = slerp(ends[0], ends[1], torch.linspace(0, 1, args.interpolate)).to(device)
        frames = netG(path_z)
        if args.interpolate_out.lower().endswith(".gif"):
            pil = [to_pil(make_grid(f[None], nrow=1, padding=0)) for f in frames]
            pil = pil + pil[-2:0:-1]  # play forth and back
            pil[0].save(args.interpolate_out, save_all=True, append_images=pil[1:], duration=80, loop=0)
        else:
            save_grid(frames, args.interpolate_out, nrow=args.interpolate)
        print(f"wrote {args.interpolate_out} ({args.interpolate} steps)")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
