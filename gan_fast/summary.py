"""Per-layer output shapes and parameter counts of G and D: ``python -m gan_fast.summary [model flags]``
or ``--checkpoint RUN``.

Shapes come from the convolution size formulas (PyTorch's Conv2d / ConvTranspose2d docs), then are
checked against a real forward pass, so the table can't drift from the models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .backends.reference import conv2d_output_hw, conv_transpose2d_output_hw, pair
from .config import (ArgumentParser, TrainConfig, UserError, add_model_flags, config_from_args, given_flags,
                     run_cli)
from .export import read_training_checkpoint
from .models import build_models


def layer_output_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of ``layer`` for an input of ``shape``, computed without running it."""
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        n, _, h, w = shape
        geometry = [pair(getattr(layer, name), name, minimum)
                    for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1))]
        if isinstance(layer, nn.ConvTranspose2d):
            out_hw = conv_transpose2d_output_hw((h, w), *geometry, pair(layer.output_padding, "output_padding", 0))
        else:
            out_hw = conv2d_output_hw((h, w), *geometry)
        return (n, layer.out_channels, *out_hw)
    if isinstance(layer, nn.Upsample):
        n, c, h, w = shape
        factors = layer.scale_factor if isinstance(layer.scale_factor, tuple) else (layer.scale_factor,) * 2
        sh, sw = (int(f) for f in factors)
        return (n, c, h * sh, w * sw)
    if isinstance(layer, nn.Linear):
        return (*shape[:-1], layer.out_features)
    return shape  # BatchNorm, activations, Identity: elementwise


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str, tuple, int]]:
    """Rows (name, layer, output shape, parameter count) of ``model.main``, checked against a
    forward pass on ``input_shape``."""
    layers = list(model.main.named_children())
    shape = input_shape
    if isinstance(layers[0][1], nn.Linear):
        shape = (input_shape[0], math.prod(input_shape[1:]))  # the MLPs flatten their input
    rows = []
    for name, layer in layers:
        shape = layer_output_shape(layer, shape)
        rows.append((f"main.{name}", _describe(layer), shape,
                     sum(p.numel() for p in layer.parameters(recurse=True))))

    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for _, layer in layers]
    was_training = model.training
    model.eval()  # a forward with running statistics: the summary must not change the model
    try:
        with torch.no_grad():
            model(torch.randn(input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for (name, _, shape, _), actual in zip(rows, seen):
        if shape != actual:
            raise AssertionError(f"{name}: computed shape {shape} but the forward pass gave {actual}")
    return rows


def _describe(layer: nn.Module) -> str:
    text = repr(layer)
    return text if len(text) <= 60 else text[:57] + "..."


def format_table(title: str, input_shape: tuple, rows) -> str:
    lines = [f"{title}  input {list(input_shape)}",
             f"  {'layer':<9} {'module':<62} {'output shape':<20} {'params':>10}"]
    for name, desc, shape, params in rows:
        lines.append(f"  {name:<9} {desc:<62} {str(list(shape)):<20} {params:>10,}")
    total = sum(r[3] for r in rows)
    lines.append(f"  {'total':<9} {'':<62} {'':<20} {total:>10,}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m gan_fast.summary",
                       description="Layer shapes and parameter counts of G and D, from the model flags "
                                   "or from a training checkpoint.")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a gan_fast checkpoint (or a run folder holding one): its models and step "
                        "(default: the models of the flags below)")
    add_model_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    state = None
    if args.checkpoint is not None:
        given = given_flags(parser, argv) - {"checkpoint"}
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in sorted(given))
            raise UserError(f"--checkpoint brings its own model: drop {flags}")
        path, state = read_training_checkpoint(args.checkpoint)
        cfg = TrainConfig.from_dict(state["config"])
    else:
        cfg = config_from_args(args)
    netG, netD = build_models(cfg.arch, cfg.nz, cfg.ngf, cfg.ndf, cfg.channels, cfg.image_size,
                              cfg.g_upsample)
    if state is not None:
        try:  # the table describes the checkpoint's models only if its weights fit them
            netG.load_state_dict(state["netG"])
            netD.load_state_dict(state["netD"])
        except (KeyError, RuntimeError) as e:
            raise UserError(f"{path}: the weights don't match its own config: "
                            f"{str(e).strip().splitlines()[0]}") from None
        print(f"{path}: step {int(state.get('step', 0))}"
              + (", with an EMA generator" if state.get("netG_ema") is not None else ""))
        print()
    batch = 2  # the smallest batch BatchNorm accepts; shapes are per batch anyway
    g_in = (batch, cfg.nz, 1, 1)
    d_in = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    print(format_table(f"Generator ({cfg.arch}{', upsample+conv' if cfg.g_upsample else ''})",
                       g_in, summarize(netG, g_in)))
    print()
    print(format_table(f"Discriminator ({cfg.arch})", d_in, summarize(netD, d_in)))
    return 0


if __name__ == "__main__":
    run_cli(main)
