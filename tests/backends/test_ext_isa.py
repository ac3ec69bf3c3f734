"""Each ISA build of the ext backend's CPU kernels (csrc/cpu/bn_cpu.cpp: baseline, AVX2, AVX-512, and
AVX-512 with AVX512_BF16 for bfloat16), each forced in a subprocess, against the reference and against
each other: BatchNorm + activation forward and backward, the float -> bfloat16 rounding, the fused D
head, the image convolution. A CPU test (test_ext_ops.py has the ops on every device)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gan_fast.backends import ext, reference

from ..conftest import ROOT, needs_ext


# ------------------------------------------------------------------------------------------------
# Each ISA build of the CPU BatchNorm kernels (csrc/cpu/bn_cpu.cpp): baseline, AVX2, AVX-512, and
# AVX-512 with AVX512_BF16's conversion instruction for bfloat16. A process runs one build per
# dtype, so each is forced in a subprocess by the environment of ext.CPU_ISA_ENV:
# ATEN_CPU_CAPABILITY=default / avx2 / avx512 caps ATen and gan_fast alike;
# GAN_FAST_CPU_NO_AVX512_BF16=1 keeps bfloat16 off AVX512_BF16 (what a CPU without it runs). A build
# this CPU cannot run is left out (the subprocess reports the one it ran).

def _isa_inputs() -> dict:
    """The inputs every build runs on, drawn once here: torch.randn itself rounds differently under
    each ATEN_CPU_CAPABILITY (its vectorized Box-Muller), so a subprocess must not draw its own.
    bn_act + LeakyReLU forward and backward (training) over channels 3 / 37 / 63, batch 1-3, NCHW and
    channels_last, fp32, bf16 and fp64 (5x7 planes: whole and partial vectors of every width); then a
    bias holding float values that stress the float -> bfloat16 rounding (ties, subnormals, overflow,
    NaN), 63 channels: 16 + 16 + 16 + 15 lanes."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pdt = torch.float64 if dtype == torch.float64 else torch.float32  # BN parameters: fp32 under autocast
        for c in (3, 37, 63):
            for n in (1, 2, 3):
                for layout in ("contiguous", "channels_last"):
                    x = torch.randn((n, c, 5, 7), generator=gen).to(dtype)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    cases.append(dict(dtype=dtype, c=c, n=n, layout=layout, x=x,
                                      g=(torch.rand(c, generator=gen) + 0.5).to(pdt),
                                      b=torch.randn(c, generator=gen).to(pdt),
                                      dy=torch.randn((n, c, 5, 7), generator=gen).to(dtype)))
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x00008000,
            0x00018000, 0x007FFFFF, 0x807FFFFF, 0x80008000, 0x00800000, 0x7F800000, 0xFF800000, 0x7FC00001,
            0xFFA00000, 0x7F800001, 0x00000000, 0x3EAAAAAB, 0xBEAAAAAB, 0x3F7FFFFF]
    bits += torch.randint(0, 2 ** 32, (63 - len(bits),), generator=gen).tolist()
    bias = torch.tensor([v - 2 ** 32 if v >= 2 ** 31 else v for v in bits], dtype=torch.int32).view(torch.float32)
    # the fused D head (also compiled per ISA): 37 x 4 x 4 features, both layouts
    heads = [dict(x=torch.randn((3, 37, 4, 4), generator=gen).to(dtype).contiguous(memory_format=layout),
                  w=(torch.randn((1, 37, 4, 4), generator=gen) * 0.05).to(dtype), t=torch.rand(3, generator=gen))
             for dtype in (torch.float32, torch.bfloat16) for layout in (torch.contiguous_format, torch.channels_last)]
    # the image convolution kernels (csrc/cpu/image_conv_kernels.h, fp32): 3 -> 37 channels with a bias
    # (a 5-lane tail), 1 -> 63 stride 1 without one; channels_last memory
    images = []
    for (n, c, cout, h, w, k, s, p, bias_, slope) in [(2, 3, 37, 11, 9, 4, 2, 1, True, 0.2),
                                                     (3, 1, 63, 8, 8, 3, 1, 1, False, 0.0)]:
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        images.append(dict(x=torch.randn((n, h, w, c), generator=gen).permute(0, 3, 1, 2),
                           w=torch.randn((cout, c, k, k), generator=gen) * 0.3,
                           b=torch.randn(cout, generator=gen) if bias_ else None,
                           dy=torch.randn((n, oh, ow, cout), generator=gen).permute(0, 3, 1, 2),
                           s=[s, s], p=[p, p], slope=slope))
    return {"cases": cases, "bias": bias, "heads": heads, "images": images}


# Run in each subprocess on _isa_inputs(): every case's output and gradients, and eval-mode bf16
# outputs of zeros plus the rounding bias (y = bias exactly before the rounding).
_ISA_CODE = """
import sys, torch
import gan_fast.backends.ext as ext
inputs = torch.load(sys.argv[1], weights_only=False)
out = {"isa": {str(d): ext.cpu_kernel_isa(d) for d in (torch.float32, torch.bfloat16)}, "cases": []}
for k in inputs["cases"]:
    rm, rv = torch.zeros_like(k["g"]), torch.ones_like(k["g"])
    xg, gg, bg = (k[t].clone().requires_grad_() for t in ("x", "g", "b"))
    y = ext._bn_act(xg, gg, bg, rm, rv, True, 0.1, 1e-5, ext.ACT_LEAKY_RELU, 0.2)
    grads = torch.autograd.grad(y, [xg, gg, bg], k["dy"])
    out["cases"].append(dict(k, y=y.detach(), dx=grads[0], dg=grads[1], db=grads[2], rm=rm, rv=rv))
bias = inputs["bias"]
c = bias.numel()
for layout in ("contiguous", "channels_last"):
    x = torch.zeros((2, c, 5, 7), dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    # running_var + eps == 1 exactly: invstd 1, so z = (0 - 0) * 1 + bias = bias
    y = ext._bn_act(x, torch.ones(c), bias, torch.zeros(c), torch.full((c,), 0.75), False, 0.1, 0.25, 0, 0.0)
    out["round_" + layout] = (bias, y)
out["heads"] = []
for k in inputs["heads"]:
    x, w = k["x"].clone().requires_grad_(), k["w"].clone().requires_grad_()
    loss, logits = ext.d_head_bce_with_logits(x, w, k["t"])
    out["heads"].append((loss, logits, *torch.autograd.grad(loss, [x, w])))
out["images"] = []
for k in inputs["images"]:
    y = torch.ops.gan_fast.conv_act(k["x"], k["w"], k["b"], k["s"], k["p"], False, 2, k["slope"])
    out["images"].append((y, *torch.ops.gan_fast.conv_act_backward(
        k["dy"], y, k["x"], k["w"], k["b"] is not None, k["s"], k["p"], False, 2, k["slope"], [True, True, True])))
torch.save(out, sys.argv[2])
"""


def _bf16_bits_c10(v: torch.Tensor) -> torch.Tensor:
    """c10::BFloat16's float -> bfloat16 (round_to_nearest_even, every NaN 0x7FC0), as int64 bits."""
    u = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return torch.where(torch.isnan(v), torch.full_like(r, 0x7FC0), r)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (NaN payloads included), as int64."""
    t = t.detach().contiguous()
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).to(torch.int64) & (
        0xFFFF if t.dtype == torch.bfloat16 else 0xFFFFFFFF)


@pytest.fixture(scope="module")
def isa_runs(tmp_path_factory):
    """name -> the subprocess's results, for each build this CPU runs."""
    runs = {}
    folder = tmp_path_factory.mktemp("isa")
    torch.save(_isa_inputs(), folder / "inputs.pt")
    for name, env in ext.CPU_ISA_ENV.items():
        path = folder / f"{name}.pt"
        r = subprocess.run([sys.executable, "-c", _ISA_CODE, str(folder / "inputs.pt"), str(path)],
                           capture_output=True, text=True,
                           timeout=600, env={**os.environ, "PYTHONPATH": ROOT + os.pathsep +
                                             os.environ.get("PYTHONPATH", ""), **env})
        assert r.returncode == 0, (name, r.stderr[-3000:])
        out = torch.load(path, weights_only=False)
        if out["isa"][str(torch.bfloat16)] == name:
            runs[name] = out
    return runs


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@needs_ext
def test_each_isa_build_is_picked_where_the_cpu_has_it(isa_runs):
    cap = torch.backends.cpu.get_cpu_capability()  # ATen's own pick for this CPU
    want = {"default"} | ({"avx2"} if cap in ("AVX2", "AVX512") else set()) | ({"avx512"} if cap == "AVX512"
                                                                             else set())
    if cap == "AVX512" and "avx512_bf16" in _cpu_flags():
        want.add("avx512_bf16")
    assert set(isa_runs) == want
    for name, out in isa_runs.items():  # fp32 runs the same build, less the bfloat16-only one
        assert out["isa"][str(torch.float32)] == ("avx512" if name == "avx512_bf16" else name)


@needs_ext
def test_each_isa_build_of_the_cpu_kernels_matches_the_reference(isa_runs):
    from .contract import _agree

    for name, out in isa_runs.items():
        for k in out["cases"]:
            dtype, where = k["dtype"], (name, str(k["dtype"]), k["c"], k["n"], k["layout"])
            ref = {}
            for rdt in (dtype, torch.float64):
                pdt = torch.float64 if rdt == torch.float64 else torch.float32  # BN parameters: fp32 under autocast
                x, g, b = (k[t].detach().to(d).requires_grad_() for t, d in (("x", rdt), ("g", pdt), ("b", pdt)))
                rm, rv = torch.zeros(k["c"], dtype=pdt), torch.ones(k["c"], dtype=pdt)
                y = F.leaky_relu(F.batch_norm(x, rm, rv, g, b, True, 0.1, 1e-5), 0.2)
                ref[rdt] = (y, *torch.autograd.grad(y, [x, g, b], k["dy"].to(rdt)), rm, rv)
            for i, label in enumerate(("y", "dx", "dg", "db", "rm", "rv")):
                why = _agree(k[label], ref[dtype][i].to(k[label].dtype), ref[torch.float64][i], dtype)
                assert why is None, (where, label, why)
        for k, got in zip(_isa_inputs()["heads"], out["heads"]):
            dtype = k["x"].dtype
            ref = {}
            for rdt in (dtype, torch.float64):
                x, w = k["x"].to(rdt).requires_grad_(), k["w"].to(rdt).requires_grad_()
                loss, logits = reference.d_head_bce_with_logits(x, w, k["t"].to(rdt))
                ref[rdt] = (loss, logits, *torch.autograd.grad(loss, [x, w]))
            for i, label in enumerate(("loss", "logits", "dx", "dw")):
                why = _agree(got[i], ref[dtype][i].to(got[i].dtype), ref[torch.float64][i], dtype)
                assert why is None, (name, "d_head", str(dtype), label, why)
        for k, got in zip(_isa_inputs()["images"], out["images"]):
            ref = {}
            for rdt in (torch.float32, torch.float64):
                x, w = k["x"].to(rdt).requires_grad_(), k["w"].to(rdt).requires_grad_()
                b = k["b"].to(rdt).requires_grad_() if k["b"] is not None else None
                y = F.leaky_relu(F.conv2d(x, w, b, k["s"], k["p"]), k["slope"])
                ref[rdt] = (y, *torch.autograd.grad(y, [x, w] + ([b] if b is not None else []), k["dy"].to(rdt)))
            for i, label in enumerate(("y", "dx", "dw", "db")[:len(ref[torch.float64])]):
                why = _agree(got[i], ref[torch.float32][i], ref[torch.float64][i], torch.float32)
                assert why is None, (name, "image conv", tuple(k["x"].shape), label, why)


@needs_ext
def test_the_isa_builds_agree_with_each_other(isa_runs):
    # Every output and gradient of every build against the baseline build's: within the contract's
    # floor (a rounding of the last bit: AVX2 / AVX-512 contract a * b + c into one FMA where the
    # baseline rounds twice, and AVX-512 sums in W = 16 lanes where the others sum in 8). Bit for bit
    # where the arithmetic is the same: the baseline's and AVX2's plain sums (same W = 8 order, no
    # product to contract: grad_bias = sum(dz) and the mean, hence running_mean); AVX-512 with and
    # without AVX512_BF16 (only the float -> bfloat16 instruction differs); every build's rounding of
    # the same float to bfloat16 (c10's, computed here).
    from .contract import FLOOR

    base = isa_runs["default"]
    for name, out in isa_runs.items():
        for k, k0 in zip(out["cases"], base["cases"]):
            for label in ("y", "dx", "dg", "db", "rm", "rv"):
                got, want = k[label].double(), k0[label].double()
                err = (got - want).abs().max().item()
                tol = 2 * FLOOR[k["dtype"]] * want.abs().max().item()
                assert err <= tol, (name, str(k["dtype"]), k["c"], k["n"], k["layout"], label, err, tol)
                if name == "avx2" and label in ("db", "rm"):
                    assert torch.equal(_bits(k[label]), _bits(k0[label])), (str(k["dtype"]), k["c"], k["n"], label)
        for got, want in zip(out["images"], base["images"]):  # the image convolution's y, dx, dw, db
            for g, w in zip(got, want):
                tol = 2 * FLOOR[torch.float32] * (w.abs().max().item() if w.numel() else 0.0)
                assert g.shape == w.shape and (w.numel() == 0 or (g - w).abs().max().item() <= tol), name
        for layout in ("contiguous", "channels_last"):
            bias, y = out["round_" + layout]
            want = _bf16_bits_c10(bias).view(1, -1, 1, 1).expand(y.shape)
            assert torch.equal(_bits(y), want), (name, layout, "float -> bfloat16 rounding differs from c10's")
    if "avx512_bf16" in isa_runs and "avx512" in isa_runs:
        for k, k1 in zip(isa_runs["avx512_bf16"]["cases"], isa_runs["avx512"]["cases"]):
            for label in ("y", "dx", "dg", "db", "rm", "rv"):
                assert torch.equal(_bits(k[label]), _bits(k1[label])), (str(k["dtype"]), k["c"], k["n"], label)
