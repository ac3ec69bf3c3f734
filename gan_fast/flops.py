"""Analytic FLOP counts of the GAN layers, for the benchmarks (``gan_fast.bench``, bench/).

Only Conv2d, ConvTranspose2d and Linear are counted, at 2 FLOPs per multiply-add (BatchNorm,
activations, the loss and Adam are well under 1% of these models' total). Backward is twice the
forward (input and weight gradients), less the input gradient autograd skips: the first layer of a
network whose input does not require grad. ``torch.utils.flop_counter.FlopCounterMode`` counts the
same (bench/test_flops.py) but cannot see inside the fused ops, so every backend is credited with this
count of the reference layers. Shapes come from one CPU forward pass on a batch of 2 (``trace_shapes``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

GEMM_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True)
class LayerCount:
    name: str              # the module's name in the model, e.g. "main.3"
    kind: str              # Conv2d / ConvTranspose2d / Linear
    in_shape: tuple
    out_shape: tuple
    forward_flops: int


def layer_forward_flops(module: nn.Module, in_shape, out_shape) -> int:
    """Forward FLOPs (2 * MACs) of one Conv2d / ConvTranspose2d / Linear; 0 for any other layer."""
    if isinstance(module, nn.ConvTranspose2d):
        n, c_in, h, w = in_shape
        kh, kw = module.kernel_size
        return 2 * n * c_in * h * w * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Conv2d):
        n, c_out, h, w = out_shape
        kh, kw = module.kernel_size
        return 2 * n * c_out * h * w * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        rows = math.prod(in_shape[:-1])
        return 2 * rows * module.in_features * module.out_features
    return 0


def count_layers(model: nn.Module, input_shape) -> list[LayerCount]:
    """The GEMM layers of ``model`` in call order, with their shapes and forward FLOPs for an input of
    ``input_shape``. The model itself is not touched (a CPU copy runs the shape pass)."""
    return _counts(trace_shapes(model, input_shape, GEMM_LAYERS)[0])


def _counts(trace) -> list[LayerCount]:
    return [LayerCount(name, type(module).__name__, in_shape, out_shape,
                       layer_forward_flops(module, in_shape, out_shape))
            for name, module, in_shape, out_shape in trace]


def trace_shapes(model: nn.Module, input_shape, kinds=GEMM_LAYERS, modules=None):
    """([(name, module of ``model``, input shape, output shape)] of the submodules of ``model`` of
    ``kinds`` (or the given ``modules``) in call order, output shape of ``model``) for an input of
    ``input_shape`` (batch first).

    The shapes come from a forward pass of a copy of the model on the CPU, in eval mode, with zero
    weights and an input of at most 2 samples; every shape's first dimension (the batch, for all the
    layers of these models) is then set to the real batch. Cheap for any model and batch."""
    import copy

    memo = {id(t): (nn.Parameter(torch.zeros(t.shape, dtype=t.dtype), t.requires_grad)
                    if isinstance(t, nn.Parameter) else torch.zeros(t.shape, dtype=t.dtype))
            for t in (*model.parameters(), *model.buffers())}
    probe = copy.deepcopy(model, memo).eval()
    originals = dict(zip(probe.modules(), model.modules()))
    names = {m: n for n, m in probe.named_modules()}
    wanted = ({m for m, o in originals.items() if o in set(modules)} if modules is not None
              else {m for m in probe.modules() if isinstance(m, kinds)})
    batch = input_shape[0]
    trace = []

    def real(shape):
        return (batch, *shape[1:])

    def hook(module, args, output):
        trace.append((names[module], originals[module], real(tuple(args[0].shape)), real(tuple(output.shape))))

    handles = [m.register_forward_hook(hook) for m in wanted]
    try:
        with torch.no_grad():
            out = probe(torch.zeros(min(batch, 2), *input_shape[1:]))
    finally:
        for h in handles:
            h.remove()
    return trace, real(tuple(out.shape))


def forward_backward_flops(counts: list[LayerCount], input_requires_grad: bool = True) -> int:
    """Forward + backward FLOPs of the layers: 3x forward, less the first layer's input gradient when
    the network's input does not require grad."""
    total = 3 * sum(c.forward_flops for c in counts)
    if not input_requires_grad and counts:
        total -= counts[0].forward_flops
    return total


def train_step_flops(netG: nn.Module, netD: nn.Module, batch: int, nz: int) -> int:
    """FLOPs of one ``Trainer.train_step``: D forward + backward on the real batch and on the detached
    fake batch, G forward, D forward + backward on the fake batch (through to its input) and G's
    backward. Every pass computes D's weight gradients (the G update's land in netD's .grad and are
    cleared by the next D update)."""
    g_trace, image_shape = trace_shapes(netG, (batch, nz, 1, 1))
    g = _counts(g_trace)
    d = count_layers(netD, image_shape)
    g_fwd = sum(c.forward_flops for c in g)
    return (forward_backward_flops(d, input_requires_grad=False)      # D(real)
            + g_fwd                                                   # G(z)
            + forward_backward_flops(d, input_requires_grad=False)    # D(G(z).detach())
            + forward_backward_flops(d, input_requires_grad=True)     # D(G(z)) for the G update
            + forward_backward_flops(g, input_requires_grad=False) - g_fwd)  # G's backward

