"""Helpers shared by every Triton op: where the kernels run, launch configurations, argument checks and
output allocation in the input's memory format."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import conv2d_output_hw, conv_transpose2d_output_hw, pair

# TRITON_INTERPRET=1 runs every kernel through Triton's numpy interpreter on the CPU. It is exact but
# pays per program and per loop step, so it gets one large tile configuration and no autotuning;
# on a GPU the small config spaces below are autotuned per shape.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Compile options of every launch, chosen here rather than by Triton's version: its 3.9 warns that the
# default of FP fusion (a*b+c contracted to one FMA) flips to off in 3.10. On, as in 3.6 and before;
# compile_check compiles with the same options.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# Testing hook: when True every kernel output buffer starts as NaN, so an element a kernel forgets to
# write fails the comparison instead of passing on whatever the allocator returned.
POISON_OUTPUTS = False


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """fp32 v rounded to DTYPE (round to nearest even) and back to fp32. bfloat16 by its bits: Triton's
    interpreter truncates an fp32 -> bf16 conversion whose result stays in registers (it rounds only
    on a store), and the tests run there; on a GPU this is the same cvt.rn rounding."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        up = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (up & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r)  # NaN stays NaN (its payload could carry into the exponent)
    elif DTYPE == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def cast_rtne(v, DTYPE: tl.constexpr):
    """fp32 v converted to DTYPE rounding to nearest even, on a GPU and in the interpreter alike (see
    round_to): every 16-bit store goes through it so the tests judge what a GPU computes."""
    return round_to(v, DTYPE).to(DTYPE)


@triton.jit
def strided_offset(i, HW, W, s_a, s_h, s_w):
    """The offset of flat index i = (a * H + h) * W + w in a tensor whose (a, h, w) dims have strides
    (s_a, s_h, s_w): a row (n, h, w) of an [N, C, H, W] tensor, or a feature (c, h, w) of one sample.
    Strides, not a flat index, so NCHW, channels_last and non-contiguous tensors need no copy."""
    hw = i % HW
    return (i // HW) * s_a + (hw // W) * s_h + (hw % W) * s_w


@triton.jit
def rows_channels_tile(ROWS, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of a pointwise kernel over rows (N*H*W) x channels, launched on rows_grid:
    (rows, channels, the channels' mask, the tile's mask)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    return rows, cols, c_ok, (rows < ROWS)[:, None] & c_ok[None, :]


@triton.jit
def tile_pointers(ptr, rows, cols, HW, W, s_n, s_c, s_h, s_w):
    """Pointers to the [rows, channels] tile of an [N, C, H, W] tensor, rows being flat (n, h, w)."""
    return ptr + strided_offset(rows, HW, W, s_n, s_h, s_w)[:, None] + cols[None, :] * s_c


# The pointwise kernels' tiles: BLOCK_ROWS rows by BLOCK_CHANNELS channels.
BLOCK_ROWS, BLOCK_CHANNELS = (128, 64) if INTERPRET else (64, 32)


def rows_grid(t: torch.Tensor) -> tuple[int, int]:
    """The launch grid of a pointwise kernel over the rows x channels of a 4-D tensor."""
    N, C, H, W = t.shape
    return triton.cdiv(N * H * W, BLOCK_ROWS), triton.cdiv(C, BLOCK_CHANNELS)


def new_output(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """An output buffer for a kernel to fill (NaN-filled under POISON_OUTPUTS)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """new_output with t's shape, dtype, device and strides (t dense)."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def configs(gpu: list[tuple], interpret: dict, pre_hook=None) -> list[triton.Config]:
    """Autotune candidates: ``gpu`` as (meta-parameters, num_warps, num_stages[, maxnreg]), or the
    single interpreter config. maxnreg (PTX .maxnreg) lets ptxas use that many registers per thread:
    left to itself it picked 64-128 for some conv tiles and spilled to fit (_conv.py says which).
    ``pre_hook`` zeroes accumulation buffers before every run of every config: the autotuner
    benchmarks each config on the real arguments, so atomically accumulated outputs would otherwise
    carry the sums of the benchmark runs."""
    if INTERPRET:
        return [triton.Config(interpret, num_warps=4, num_stages=1, pre_hook=pre_hook)]
    return [triton.Config(meta, num_warps=w, num_stages=s, maxnreg=reg[0] if reg else None, pre_hook=pre_hook)
            for meta, w, s, *reg in gpu]


def zero_args(*names: str):
    """A config pre_hook that zeroes the named tensor arguments."""
    def hook(nargs):
        for name in names:
            nargs[name].zero_()
    return hook


def conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, *, transposed: bool = False,
                  upsample: int = 1):
    """(stride, padding, (OH, OW)) of a fused op's convolution: stride and padding as reference.pair
    parses them, the output size refused when not positive. ``upsample`` scales x's size first (the
    nearest-x2 upsampling before a conv)."""
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
    hw, kernel_hw = (upsample * x.shape[2], upsample * x.shape[3]), weight.shape[2:]
    if transposed:
        out_hw = conv_transpose2d_output_hw(hw, kernel_hw, stride, padding)
        if min(out_hw) <= 0:
            raise ValueError(f"transposed conv output size {out_hw[0]}x{out_hw[1]} is not positive")
    else:
        out_hw = conv2d_output_hw(hw, kernel_hw, stride, padding)
        if min(out_hw) <= 0:
            what = "upsampled input" if upsample > 1 else "input"
            raise ValueError(f"the kernel {tuple(kernel_hw)} is larger than the padded {what}")
    return stride, padding, out_hw


def check_tensor(t, name: str, dim: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, shape: tuple | None = None) -> None:
    """Raise TypeError / ValueError / RuntimeError with a message instead of launching a kernel on a
    tensor it can't handle."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the input's), got {t.dtype}")
    if device is not None and t.device != device:
        raise RuntimeError(f"{name} is on {t.device} but the input is on {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_input(x, name: str, dim: int) -> None:
    check_tensor(x, name, dim=dim)
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the triton ops run on CUDA tensors, {name} is on {x.device} "
                           "(set TRITON_INTERPRET=1 before importing triton to run them on the CPU)")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


def check_bn(x: torch.Tensor, channels: int, bn_weight, bn_bias, running_mean, running_var,
             training: bool, count: int) -> None:
    """The BatchNorm arguments of a fused op, as torch.nn.functional.batch_norm would check them."""
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            check_tensor(t, name, dim=1, device=x.device, shape=(channels,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False normalizes with the running statistics, which are None")
    if training and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} "
                         "(batch x spatial size)")


def empty_like_format(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An uninitialised 4-D tensor of ``shape`` in ``x``'s memory format (channels_last stays
    channels_last; anything else becomes NCHW-contiguous)."""
    fmt = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    return new_output(shape, dtype or x.dtype, x.device, fmt)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def check_weight(x: torch.Tensor, weight, in_channels_dim: int, name: str = "weight",
                 dim: int = 4) -> None:
    """weight has x's device and dtype, ``dim`` dims, and x's channel count along in_channels_dim
    (0 for a ConvTranspose2d weight [Cin, Cout, kh, kw], 1 for a Conv2d / Linear weight)."""
    check_tensor(weight, name, dim=dim, device=x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {weight.dtype} but the input has {x.dtype}; cast both to one "
                        "dtype (the fused modules do this under autocast)")
    if weight.shape[in_channels_dim] != x.shape[1]:
        raise ValueError(f"the input has {x.shape[1]} channels but {name} of shape {tuple(weight.shape)} "
                         f"expects {weight.shape[in_channels_dim]}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)})")


def check_bias(x: torch.Tensor, bias, channels: int, name: str = "bias") -> None:
    """A conv / linear bias: [channels], x's device and dtype (as F.conv2d and F.linear require)."""
    if bias is not None:
        check_tensor(bias, name, dim=1, device=x.device, shape=(channels,))
        if bias.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {bias.dtype} but the input has {x.dtype}")


def grad_of(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """An fp32 gradient buffer returned in its parameter's dtype."""
    if grad is None or like is None:
        return None
    return grad.to(like.dtype)
