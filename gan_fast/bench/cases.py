"""The benchmark's cases and providers: what ``python -m gan_fast.bench`` and ``pytest bench/`` run.

- ``op/<setting>-b<batch>/<model>.<layer>/<op>``: one fused op of docs/ops.md, forward + backward, at
  the shape where a model of ``<setting>`` runs it (found by ``gan_fast.fuse``'s own pattern matcher).
- ``step/<setting>-b<batch>[-bf16]``: the whole training step (D on real and fake, G through D, both
  Adam steps) on batches already in device memory.

docs/performance.md describes every provider.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..flops import count_layers, forward_backward_flops, trace_shapes, train_step_flops

PROVIDERS = ("tutorial", "reference", "eager-best", "reference+graphs", "compile-default",
             "compile-max-autotune-no-cudagraphs", "compile-reduce-overhead", "triton", "ext")
COMPILE_MODES = {"compile-default": "default",
                 "compile-max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
                 "compile-reduce-overhead": "reduce-overhead"}
EAGER = "reference"
# step cases only: pytorch/examples' DCGAN step (fp32, NCHW), and the fastest eager variant of the case
TUTORIAL, EAGER_BEST = "tutorial", "eager-best"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Setting:
    """Model hyper-parameters of a benchmark setting (TrainConfig's names)."""
    image_size: int
    channels: int
    nz: int
    ngf: int
    ndf: int


SETTINGS = {
    # pytorch/examples dcgan/main.py (CelebA / LSUN at 64x64)
    "dcgan64": Setting(image_size=64, channels=3, nz=100, ngf=64, ndf=64),
    # gan_fast's defaults: TrainConfig() on the embedded digits
    "digits": Setting(image_size=32, channels=1, nz=64, ngf=32, ndf=32),
    # --quick: the smallest model, for smoke tests
    "tiny": Setting(image_size=16, channels=1, nz=8, ngf=8, ndf=8),
}

# The networks whose fused runs become op cases. Gmlp brings linear_bn_leaky_relu, Gup the
# upsample_conv2d_bn_relu of --g-upsample; the MLP discriminator has no fused run.
MODELS = ("G", "D", "Gup", "Gmlp")

# The one op case --quick compiles (the D block: conv, BatchNorm statistics, LeakyReLU).
QUICK_COMPILE_OP = "conv2d_bn_leaky_relu"

# Batch of the DCGAN-64 op cases on a CPU: at batch 128 the CPU run would take far more than its
# 10-minute budget on 2 cores.
CPU_DCGAN64_OP_BATCH = 16
CPU_DCGAN64_STEP_BATCH = 16  # the whole step at batch 16: a few seconds a step on 2 cores

_OP_OF_FUSED = {
    "FusedConvTranspose2dBatchNormReLU": "conv_transpose2d_bn_relu",
    "FusedConv2dBatchNormLeakyReLU": "conv2d_bn_leaky_relu",
    "FusedUpsampleConv2dBatchNormReLU": "upsample_conv2d_bn_relu",
    "FusedLinearBatchNormLeakyReLU": "linear_bn_leaky_relu",
    "FusedConv2dLeakyReLU": "conv2d_leaky_relu",
    "FusedConvTranspose2dTanh": "conv_transpose2d_tanh",
    "FusedDHead": "d_head_bce_with_logits",
}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str              # "op" or "step"
    setting: str           # a key of SETTINGS
    batch: int
    dtype: str             # "fp32" or "bf16" (autocast for steps)
    flops: int             # analytic FLOPs of one call (gan_fast.flops)
    math: str = "conv"     # "conv" or "linear": which TF32 switch applies to fp32 on CUDA
    # op cases only
    model: str = ""        # a key of MODELS
    layer: int = -1        # index of the run's first layer in model.main
    span: int = 0          # number of layers of the run
    op: str = ""
    in_shape: tuple = ()
    out_shape: tuple = ()
    # False: the compile providers skip this case (--quick compiles one case only: compiling is most
    # of a smoke run's time, about 10 s per op and a minute for the step on 2 CPU cores)
    compile: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def build_model(model: str, setting: Setting) -> nn.Module:
    """The network ``model`` of ``setting``, DCGAN-initialised from seed 0 (the same on every call)."""
    from ..models import Discriminator, Generator, MLPGenerator, init_weights

    s = setting
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = {"G": lambda: Generator(s.nz, s.ngf, s.channels, s.image_size),
               "Gup": lambda: Generator(s.nz, s.ngf, s.channels, s.image_size, upsample=True),
               "D": lambda: Discriminator(s.ndf, s.channels, s.image_size),
               "Gmlp": lambda: MLPGenerator(s.nz, s.ngf, s.channels, s.image_size)}[model]()
        net.apply(init_weights)
    return net


def _input_shape(model: str, setting: Setting, batch: int) -> tuple:
    if model == "D":
        return (batch, setting.channels, setting.image_size, setting.image_size)
    return (batch, setting.nz, 1, 1)


def _main_input_shapes(net: nn.Module, input_shape) -> list[tuple]:
    """(input shape, output shape) of every child of ``net.main``, in order."""
    trace, _ = trace_shapes(net, input_shape, modules=list(net.main))
    return [(i, o) for _, _, i, o in trace]


def op_cases(setting_name: str, batch: int, dtype: str = "fp32") -> list[Case]:
    """One case per fused run of the models of ``setting_name`` (duplicate shapes once)."""
    return list(_op_cases(setting_name, batch, dtype))


@functools.lru_cache(maxsize=None)
def _op_cases(setting_name: str, batch: int, dtype: str) -> tuple[Case, ...]:
    from ..fuse import match_run

    setting = SETTINGS[setting_name]
    cases, seen = [], set()
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    for model in MODELS:
        net = build_model(model, setting)
        layers = list(net.main)
        shapes = _main_input_shapes(net, _input_shape(model, setting, batch))
        i = 0
        while i < len(layers):
            # fuse's own matcher says what fuse() would fuse; it wraps the layers in a fused module
            # without changing them, and only stores the backend name, so this runs on any machine
            hit = match_run(layers, i, "ext", last=i == len(layers) - 1)
            if hit is None:
                i += 1
                continue
            fused, span = hit
            op = _OP_OF_FUSED[type(fused).__name__]
            run = layers[i:i + span]
            gemm = next(m for m in run if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))
            in_shape, out_shape = shapes[i][0], shapes[i + span - 1][1]
            key = (op, in_shape, tuple(gemm.weight.shape), str(gemm))
            if key not in seen:
                seen.add(key)
                counts = count_layers(nn.Sequential(*run), in_shape)
                cases.append(Case(
                    id=f"op/{setting_name}-b{batch}{suffix}/{model}.{i}/{op}", kind="op",
                    setting=setting_name, batch=batch, dtype=dtype,
                    flops=forward_backward_flops(counts, input_requires_grad=True),
                    math="linear" if isinstance(gemm, nn.Linear) else "conv", model=model, layer=i,
                    span=span, op=op, in_shape=in_shape,
                    out_shape=() if op == "d_head_bce_with_logits" else out_shape))
            i += span
    return tuple(cases)


@functools.lru_cache(maxsize=None)
def step_case(setting_name: str, batch: int, dtype: str = "fp32") -> Case:
    from ..models import build_models

    s = SETTINGS[setting_name]
    netG, netD = build_models("dcgan", s.nz, s.ngf, s.ndf, s.channels, s.image_size)
    flops = train_step_flops(netG, netD, batch, s.nz)
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    return Case(id=f"step/{setting_name}-b{batch}{suffix}", kind="step", setting=setting_name,
                batch=batch, dtype=dtype, flops=flops)


def default_cases(device: torch.device | str, quick: bool = False) -> list[Case]:
    """The benchmark's cases on ``device`` (``quick``: tiny shapes, for smoke tests)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if quick:
        ops = _one_per_op(op_cases("tiny", 8))
        steps = [step_case("tiny", 8)] + ([step_case("tiny", 8, "bf16")] if cuda else [])
        return [c if c.op == QUICK_COMPILE_OP else dataclasses.replace(c, compile=False)
                for c in ops + steps]
    if cuda:
        ops = op_cases("dcgan64", 128) + op_cases("digits", 64)
        steps = [step_case("dcgan64", 128), step_case("dcgan64", 128, "bf16"),
                 step_case("dcgan64", 1024, "bf16"), step_case("digits", 64)]
    else:
        ops = op_cases("digits", 64) + op_cases("dcgan64", CPU_DCGAN64_OP_BATCH)
        # issue #16's CPU targets: the digits default and DCGAN-64 at batch 16, in fp32 and bf16
        steps = [step_case("digits", 64), step_case("digits", 64, "bf16"),
                 step_case("dcgan64", CPU_DCGAN64_STEP_BATCH), step_case("dcgan64", CPU_DCGAN64_STEP_BATCH, "bf16")]
    return ops + steps


def _one_per_op(cases: list[Case]) -> list[Case]:
    seen, out = set(), []
    for c in cases:
        if c.op not in seen:
            seen.add(c.op)
            out.append(c)
    return out


def select_cases(cases: list[Case], kinds=None, match=None) -> list[Case]:
    """``kinds``: subset of {"op", "step"} (also "ops", "steps"); ``match``: substrings of case ids."""
    if kinds:
        kinds = {k.rstrip("s") for k in kinds}
        cases = [c for c in cases if c.kind in kinds]
    if match:
        cases = [c for c in cases if any(m in c.id for m in match)]
    return cases


def unavailable_reason(case: Case, provider: str, device: torch.device | str) -> str | None:
    """None when ``provider`` can run ``case`` on ``device``, else why not (a pytest.skip reason)."""
    from .. import backends

    device = torch.device(device)
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}"
    if provider in (TUTORIAL, EAGER_BEST) and case.kind != "step":
        return f"{provider} is a baseline of the whole training step"
    if provider == "reference+graphs":
        if case.kind != "step":
            return "the CUDA-graph capture of the reference (--cuda-graphs on) applies to the whole step"
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        return None
    if provider in COMPILE_MODES:
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if COMPILE_MODES[provider] == "reduce-overhead" and device.type != "cuda":
            return "mode reduce-overhead records CUDA graphs, which need a CUDA device"
        if not case.compile:
            return "--quick runs torch.compile on one op case only (compiling takes most of a smoke run)"
        return None
    if provider in ("triton", "ext"):
        reason = backends.unavailable_reason(provider, device)
        if reason is not None:
            return reason
        if provider == "triton" and device.type != "cuda":
            return ("the Triton interpreter (TRITON_INTERPRET=1) runs the triton backend on the CPU for "
                    "testing only; it is never benchmarked")
    return None

