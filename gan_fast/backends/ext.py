"""The ``ext`` backend: the fused ops of docs/ops.md on the C++/CUDA extension ``gan_fast._C``.

``gan_fast._C`` (csrc/) registers a small operator library ``torch.ops.gan_fast`` with CPU kernels
(at::parallel_for + at::vec; the BatchNorm ones built for the baseline ISA, AVX2 and AVX-512, picked
at run time like ATen's own; ``cpu_kernel_isa`` names the pick) and CUDA kernels:

- ``bn_act`` / ``bn_act_backward``: BatchNorm (training: batch statistics; eval: running statistics)
  fused with ReLU / LeakyReLU / nothing; the backward is one reduction pass (sum dz, sum dz * xhat)
  and one elementwise pass that also applies the activation's mask. ``bn_update_stats_`` updates
  the running statistics in place (separate because autograd needs functional ops); ``bn_act_eager``
  is bn_act with its autograd formula in C++ (csrc/bn_act_autograd.cpp), for eager mode;
- ``conv_act`` / ``conv_act_backward``: an ATen convolution (oneDNN / cuDNN) with LeakyReLU or Tanh
  applied in place in one pass (on the CPU, ATen's in-place kernel); the backward takes the
  activation's derivative from the output;
- ``bce_with_logits`` and ``d_head_bce`` (the D head's full-size Conv2d as a GEMV + the loss), each
  one pass forward and one backward;
- ``col2im`` (CPU): the GEMM + col2im convolutions' second half (ext_conv.py).

This module registers their fake (meta) kernels and autograd formulas through ``torch.library``
(the pytorch/extension-cpp layout), so they work under autograd, torch.compile and CUDA-graph
capture, and composes them into the blocks of docs/ops.md. The blocks' convolutions and Linear
layers are ATen's (on a CPU, GEMM forms where they measured faster: ext_conv.py); the BatchNorm,
activation and loss parts are the extension's. In eager mode on a CPU, conv_act runs as the blocks'
convolution + an in-place activation; in eager mode bn_act runs as bn_act_eager and d_head_bce
through a plain autograd.Function: torch.library's Python autograd layer cost more than the ops at
small sizes (issue #16).

Importing this module never raises: without a loadable ``gan_fast._C``, ``unavailable_reason()``
says why and the ops raise BackendUnavailable.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ext_conv, reference
from .reference import (ACT_LEAKY_RELU, ACT_RELU, ACT_TANH, below_autograd, check_batch_chunks, check_momentum,
                        check_slope, conv2d_output_hw, conv_transpose2d_output_hw, differentiable_backward, loss_dtype,
                        pair)

__all__ = ["bce_with_logits", "conv2d_bn_leaky_relu", "conv2d_leaky_relu", "conv_transpose2d_bn_relu",
           "conv_transpose2d_tanh", "d_head_bce_with_logits", "linear_bn_leaky_relu", "unavailable_reason",
           "upsample_conv2d_bn_relu"]

OPS = ("bn_act", "bn_act_backward", "bn_act_eager", "bn_update_stats_", "conv_act", "conv_act_backward",
       "bce_with_logits", "bce_with_logits_backward", "d_head_bce", "d_head_bce_backward", "col2im",
       "set_poison_outputs", "cpu_kernel_isa", "cpu_threads_used")

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .`"
# Where setup.py writes each build's full output, compiler errors included (pip hides it; a failed
# compile does not fail the install). This path holds for the source checkout of an editable install.
BUILD_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "build",
                         "gan_fast_ext_build.log")


def _how_to_fix() -> str:
    if os.path.isfile(BUILD_LOG):
        log = f"the last build's output (compiler errors included) is in {BUILD_LOG}"
    else:
        log = (f"there is no build log at {BUILD_LOG} (installed with GAN_FAST_NO_EXT=1, or not from "
               "this source tree?)")
    return f"{log}; {_REBUILD}, or set GAN_FAST_EXT_REQUIRED=1 to make a failed compile fail the install"


def _load() -> str | None:
    try:
        from .. import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)
    except (ImportError, OSError) as e:
        return f"the C++/CUDA extension gan_fast._C is not built or can't be loaded ({e}); {_how_to_fix()}"
    missing = [name for name in OPS if not hasattr(torch.ops.gan_fast, name)]
    if missing:
        return f"gan_fast._C is stale (it lacks {', '.join(missing)}); {_how_to_fix()}"
    return None


_LOAD_ERROR = _load()


def unavailable_reason() -> str | None:
    """None when the compiled extension loaded, else why not and how to rebuild it."""
    return _LOAD_ERROR


def _ops():
    if _LOAD_ERROR is not None:
        from . import BackendUnavailable

        raise BackendUnavailable(f"backend 'ext' is unavailable: {_LOAD_ERROR}")
    return torch.ops.gan_fast


def _check_input(x, dim: int, op: str, what: str) -> None:
    # F.conv2d / F.linear accept unbatched [C, H, W] / [*, in] inputs, whose outputs the BatchNorm
    # would then read as [N, C, L] with the wrong axis as channels and silently normalize the wrong
    # way (nn.BatchNorm2d / BatchNorm1d reject those ranks); the blocks of docs/ops.md are batched.
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{op}: x must be {dim}-D {what}, got shape {tuple(x.shape)}")


def set_poison_outputs(enabled: bool) -> None:
    """Testing hook: while enabled, every buffer an extension kernel is to fill starts as NaN, so an
    element a kernel forgets to write fails a comparison instead of passing on stale memory."""
    _ops().set_poison_outputs(bool(enabled))


# Each build of the CPU BatchNorm kernels (cpu_kernel_isa's names) -> the environment that makes a
# process run it where the CPU has it (csrc/cpu/bn_cpu.cpp): ATEN_CPU_CAPABILITY caps ATen and
# gan_fast alike; GAN_FAST_CPU_NO_AVX512_BF16=1 keeps bfloat16 off AVX512_BF16's instruction.
CPU_ISA_ENV = {"default": {"ATEN_CPU_CAPABILITY": "default"},
               "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
               "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "GAN_FAST_CPU_NO_AVX512_BF16": "1"},
               "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512"}}


def cpu_kernel_isa(dtype: torch.dtype) -> str:
    """Which build of the CPU BatchNorm kernels ``dtype`` runs in this process: "default", "avx2",
    "avx512" or "avx512_bf16" (csrc/cpu/bn_cpu.cpp, which also says how to force each)."""
    return _ops().cpu_kernel_isa(dtype)


def _as_target(target, like: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        return torch.as_tensor(target, dtype=torch.float32, device=like.device)
    # Integer / bool labels are rejected, as torch's binary_cross_entropy_with_logits and the triton
    # backend reject them: converting silently would make ext accept what the reference refuses.
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor (hard 0/1 or soft labels), got {target.dtype}; "
                        "convert it with target.float()")
    return target


# --------------------------------------------------------------------------------------------------
# The blocks of docs/ops.md.

def _bn_act(x: Tensor, bn_weight, bn_bias, running_mean, running_var, training: bool, momentum: float,
            eps: float, act: int, negative_slope: float = 0.0, process_group=None, chunks: int = 1) -> Tensor:
    """bn_act, and the running statistics' update; ``chunks`` (training, no process group): the batch is
    that many equal batches, each normalized with its own statistics, whose updates run in order."""
    momentum = check_momentum(momentum)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
    ops = _ops()
    if training and process_group is not None:
        from .ext_sync_bn import SyncBatchNormAct  # imports this module: loaded on first use

        return SyncBatchNormAct.apply(x, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                                      act, negative_slope, process_group)
    bn_act = ops.bn_act if torch.compiler.is_compiling() else ops.bn_act_eager
    y, mean, var = bn_act(x, bn_weight, bn_bias, None if training else running_mean,
                          None if training else running_var, training, eps, act, negative_slope, chunks)
    if training and running_mean is not None:
        count = x.numel() // x.shape[1] // chunks
        for m, v in ((mean, var),) if chunks == 1 else zip(mean, var):
            ops.bn_update_stats_(running_mean, running_var, m, v, momentum, count)
    return y


def conv_transpose2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                             stride, padding, training, momentum, eps, process_group=None) -> Tensor:
    """ConvTranspose2d(bias=False) -> BatchNorm2d -> ReLU (the DCGAN generator blocks)."""
    _check_input(x, 4, "conv_transpose2d_bn_relu", "[N, C, H, W]")
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
    if (x.device.type == "cpu" and tuple(x.shape[2:]) == (1, 1) and padding == (0, 0) and weight.dim() == 4
            and x.shape[1] == weight.shape[0] and x.dtype == weight.dtype and x.numel() > 0):
        y = ext_conv.conv_transpose2d_of_a_point(x, weight)  # the stride of a 1x1 input changes nothing
    else:
        y = ext_conv.conv(x, weight, stride, padding, transposed=True)
    return _bn_act(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, ACT_RELU,
                   process_group=process_group)


def conv2d_bn_leaky_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                         stride, padding, training, momentum, eps, negative_slope,
                         process_group=None, batch_chunks: int = 1) -> Tensor:
    """Conv2d(bias=False) -> BatchNorm2d -> LeakyReLU (the DCGAN discriminator blocks).

    ``batch_chunks`` (ext only): the batch is that many equal batches stacked (D's real and fake ones
    in one pass, gan_fast.fuse.discriminator_loss): one convolution over all, then BatchNorm with each
    chunk's own statistics and running-statistics update, in order, as separate calls would do."""
    _check_input(x, 4, "conv2d_bn_leaky_relu", "[N, C, H, W]")
    check_batch_chunks(batch_chunks, x.shape[0], "conv2d_bn_leaky_relu")
    y = ext_conv.conv(x, weight, pair(stride, "stride", 1), pair(padding, "padding", 0), transposed=False)
    slope = check_slope(negative_slope)
    if batch_chunks > 1 and not training:  # the same statistics for every chunk: one call
        batch_chunks = 1
    if batch_chunks > 1 and process_group is not None:  # SyncBatchNorm: a call per chunk
        return torch.cat([_bn_act(part, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                                  ACT_LEAKY_RELU, slope, process_group) for part in y.chunk(batch_chunks)])
    return _bn_act(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, ACT_LEAKY_RELU, slope,
                   process_group, batch_chunks)


def conv2d_leaky_relu(x, weight, bias, *, stride, padding, negative_slope) -> Tensor:
    """Conv2d -> LeakyReLU (D's first layer); bias may be None."""
    return _conv_act(x, weight, bias, pair(stride, "stride", 1), pair(padding, "padding", 0), False,
                     ACT_LEAKY_RELU, check_slope(negative_slope))


def conv_transpose2d_tanh(x, weight, bias, *, stride, padding) -> Tensor:
    """ConvTranspose2d -> Tanh (G's last layer); bias may be None."""
    return _conv_act(x, weight, bias, pair(stride, "stride", 1), pair(padding, "padding", 0), True, ACT_TANH, 0.0)


def _image_conv_applies(x, weight, bias, transposed, act, out_channels) -> bool:
    """Whether conv_act's CPU op computes this call with its own kernels (csrc/cpu/image_conv.h: D's first
    layer, a conv2d of a channels_last fp32 image of at most 4 channels, then LeakyReLU), which measured
    faster there than oneDNN and the separate activation pass (issue #16). The op decides again: where
    this says yes and it says no, it runs ATen's convolution, the same numbers."""
    return (not transposed and act == ACT_LEAKY_RELU and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and x.dim() == 4 and weight.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and 0 < x.shape[1] <= ext_conv._IMAGE_MAX_CHANNELS and x.shape[1] == weight.shape[1] and x.numel() > 0
            and weight.device == x.device and _conv_format(x) == torch.channels_last
            and (bias is None or (bias.dtype == torch.float32 and bias.device == x.device
                                  and tuple(bias.shape) == (out_channels,))))



def _conv_act(x, weight, bias, stride, padding, transposed, act, slope) -> Tensor:
    """The conv_act op. In eager mode on a CPU: D's first layer (_image_conv_applies) through the op under
    _ConvActFunction, whose CPU kernels are its own there; any other well-formed call as ext_conv.conv and
    the activation in place under autograd, since for those the op's CPU kernels are ATen's calls
    (csrc/common.h) and its torch.library autograd layer cost 200-300 us per forward + backward at the
    digits size (issue #16). Any other call (CUDA, torch.compile, a malformed one: the op's messages)
    goes through the op."""
    ops = _ops()  # BackendUnavailable first, where the extension is missing
    out_channels = weight.shape[1 if transposed else 0] if weight.dim() == 4 else -1
    if _image_conv_applies(x, weight, bias, transposed, act, out_channels):
        return _ConvActFunction.apply(x, weight, bias, stride, padding, transposed, act, slope)
    if (x.device.type == "cpu" and not torch.compiler.is_compiling() and x.dim() == 4 and weight.dim() == 4
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.device == x.device and x.shape[1] == weight.shape[0 if transposed else 1]
            and (bias is None or (bias.dtype == x.dtype and bias.device == x.device
                                  and tuple(bias.shape) == (out_channels,)))
            and min(_conv_out_shape(x, weight, stride, padding, transposed)) > 0):
        z = ext_conv.conv(x, weight, stride, padding, transposed, bias)
        z = z.contiguous(memory_format=_conv_format(x))  # the op's layout rule; a no-op but for 1 channel
        inplace = not z._is_view()  # a GEMM form's permuted product may not change in place (autograd)
        return (torch.tanh_ if inplace else torch.tanh)(z) if act == ACT_TANH else F.leaky_relu(z, slope, inplace)
    return ops.conv_act(x, weight, bias, stride, padding, transposed, act, slope)


def linear_bn_leaky_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                         training, momentum, eps, negative_slope, process_group=None) -> Tensor:
    """Linear -> BatchNorm1d -> LeakyReLU (the MLP generator); x [N, in]; bias may be None."""
    _check_input(x, 2, "linear_bn_leaky_relu", "[N, in_features]")
    y = F.linear(x, weight, bias)
    return _bn_act(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                   ACT_LEAKY_RELU, check_slope(negative_slope), process_group)


# Nearest x2 upsampling then a 3x3 stride-1 pad-1 convolution is exactly a 4x4 stride-2 pad-1
# transposed convolution whose taps are sums of the 3x3 taps: along each axis the output row 2i
# reads input rows (i-1, i, i) and row 2i+1 reads (i, i, i+1), so the transposed kernel's four
# taps are (w2, w1 + w2, w0 + w1, w0). The transposed form never materialises the 4x larger
# upsampled tensor and does 16 instead of 36 multiply-adds per input pixel and channel pair (the
# sub-pixel view of resize-convolution: Odena et al. 2016, "Deconvolution and Checkerboard
# Artifacts"; Shi et al. 2016, arXiv:1609.07009).
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def _upsample3x3_as_transposed(weight: Tensor) -> Tensor:
    """Conv2d weight [C_out, C_in, 3, 3] -> ConvTranspose2d weight [C_in, C_out, 4, 4]."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    taps = torch.tensor(_UPSAMPLE_TAPS, dtype=acc, device=weight.device)
    return torch.einsum("ka,lb,oiab->iokl", taps, taps, weight.to(acc)).to(weight.dtype)


def upsample_conv2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                            padding, training, momentum, eps, process_group=None) -> Tensor:
    """Upsample(x2, nearest) -> Conv2d(bias=False, stride 1) -> BatchNorm2d -> ReLU."""
    _check_input(x, 4, "upsample_conv2d_bn_relu", "[N, C, H, W]")
    padding = pair(padding, "padding", 0)
    # The folded form multiplies each input pixel by sums of taps, so it runs only where that changes
    # nothing: in fp32 / fp64 (a 16-bit sum of taps is rounded: in fp16 the conv output then errs
    # several times more than the reference's, flipping ReLU masks) and on finite values (inf * (w1 + w2)
    # where the reference computes inf * w1 + inf * w2, NaN for taps of opposite signs), which a CPU
    # tensor tells without a device sync. Elsewhere the direct form is the reference's own.
    if (weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and padding == (1, 1) and x.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.float64)
            and bool(torch.isfinite(x).all()) and bool(torch.isfinite(weight).all())):
        y = F.conv_transpose2d(x, _upsample3x3_as_transposed(weight), None, 2, 1)
    else:
        y = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, None, 1, padding)
    return _bn_act(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, ACT_RELU,
                   process_group=process_group)


def d_head_bce_with_logits(x, weight, target) -> tuple[Tensor, Tensor]:
    """Conv2d(C -> 1, kernel = x's spatial size, no bias) then BCE-with-logits, mean over the batch.

    Returns (loss, logits [N]); logits carry no gradient. The loss is float32 for half / bfloat16
    inputs (float64 for float64), as autocast computes binary_cross_entropy_with_logits.
    """
    target = _as_target(target, x)
    ops = _ops()  # BackendUnavailable first, where the extension is missing
    d_head_bce = ops.d_head_bce if torch.compiler.is_compiling() else _DHeadFunction.apply
    loss, logits = d_head_bce(x, weight, target)
    return loss.to(loss_dtype(x.dtype, target.dtype)), logits


def bce_with_logits(logits, target) -> Tensor:
    """binary_cross_entropy_with_logits(logits, target), mean reduction; stable for large |logit|.

    The loss is float32 for half / bfloat16 logits (float64 for float64), as under autocast.
    """
    target = _as_target(target, logits)
    return _ops().bce_with_logits(logits, target).to(loss_dtype(logits.dtype, target.dtype))


# --------------------------------------------------------------------------------------------------
# Fake kernels (shapes, dtypes and strides for torch.compile / FakeTensor) and autograd formulas.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_like(x: Tensor) -> Tensor:
    """The layout the C++ ops compute in and return (csrc/common.h dense_input)."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 4 and x.stride(1) == 1:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _conv_format(x: Tensor) -> torch.memory_format:
    """csrc/common.h conv_format."""
    if x.is_contiguous():
        one_channel_nhwc = x.shape[1] == 1 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1
        return torch.channels_last if one_channel_nhwc else torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def _conv_out_shape(x: Tensor, weight: Tensor, stride, padding, transposed: bool) -> list:
    output_hw = conv_transpose2d_output_hw if transposed else conv2d_output_hw
    channels = weight.shape[1] if transposed else weight.shape[0]
    return [x.shape[0], channels, *output_hw(x.shape[2:], weight.shape[2:], stride, padding)]


def _sum_to(grad: Tensor, target: Tensor) -> Tensor:
    return grad.sum_to_size(target.shape).to(target.dtype)


def _check_devices(op: str, x: Tensor, ref: str = "the input", **tensors) -> None:
    """The C++ kernels' check_same_device, for the fake kernels.

    A call mixing a meta tensor with real ones dispatches to the Meta key, i.e. to these fake kernels,
    which would otherwise return an uninitialized tensor on x's device as if the op had run; under
    torch.compile the same check reports a device mismatch at trace time instead of inside the graph."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == x.device,
                         lambda: f"gan_fast::{op}: {name} is on {t.device} but {ref} is on {x.device}")


def _bn_act_reference(x, weight, bias, mean, var, training, eps, act, slope, chunks=1):
    """bn_act's output as torch ops (for second-order gradients): training normalizes with the batch's
    own statistics (each chunk's), eval with the saved running ones."""
    y = torch.cat([F.batch_norm(part, None if training else mean, None if training else var, weight, bias, training,
                                0.0, eps) for part in x.chunk(chunks)])
    if act == ACT_RELU:
        return F.relu(y)
    return F.leaky_relu(y, slope) if act == ACT_LEAKY_RELU else y


def _bn_setup(ctx, inputs, output):
    x, weight, bias, _rm, _rv, training, eps, act, slope, chunks = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.args = (training, eps, act, slope, chunks)


def _bn_backward(ctx, grad_y, _grad_mean, _grad_var):
    """bn_act's gradients (torch.library's autograd formula; csrc/bn_act_autograd.cpp is the same in C++
    for bn_act_eager)."""
    x, weight, bias, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return (*differentiable_backward(lambda *t: _bn_act_reference(*t, mean, var, *ctx.args),
                                         (x, weight, bias), (grad_y,), ctx.needs_input_grad[:3]),
                None, None, None, None, None, None, None)
    gx, gw, gb = torch.ops.gan_fast.bn_act_backward(grad_y, x, weight, bias, mean, var, *ctx.args)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gw.to(weight.dtype) if need[1] else None,
            gb.to(bias.dtype) if need[2] else None, None, None, None, None, None, None, None)


def _head_setup(ctx, inputs, output):
    x, weight, target = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, target, output[1])


def _head_backward(ctx, grad_loss, _grad_logits):
    """d_head_bce's gradients (torch.library's autograd formula, and _DHeadFunction's backward)."""
    x, weight, target, logits = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_loss is None:  # not materialized (_DHeadFunction): the loss got no gradient
        return None, None, None
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return tuple(differentiable_backward(reference.d_head_bce_with_logits, (x, weight, target),
                                             (grad_loss, None), need))
    gx = gw = gt = None
    if need[0] or need[1]:
        gx, gw = torch.ops.gan_fast.d_head_bce_backward(grad_loss, x, weight, target, logits, [need[0], need[1]])
    if need[2]:
        gt = _sum_to(logits.to(grad_loss.dtype) * (-grad_loss / logits.numel()), target)
    return (gx if need[0] else None), (gw if need[1] else None), gt


class _DHeadFunction(torch.autograd.Function):
    """d_head_bce under autograd in eager mode (as bn_act_eager is for bn_act): the op's kernels and
    formula without torch.library's Python autograd layer (three calls per DCGAN step)."""

    @staticmethod
    def forward(ctx, x, weight, target):
        with below_autograd():
            output = torch.ops.gan_fast.d_head_bce(x, weight, target)
        _head_setup(ctx, (x, weight, target), output)
        ctx.set_materialize_grads(False)  # the logits get no gradient: no zero tensor for them
        return output

    backward = staticmethod(_head_backward)


def _conv_act_reference(x, weight, bias, stride, padding, transposed, act, slope):
    """conv_act's output as torch ops (for second-order gradients)."""
    conv = F.conv_transpose2d if transposed else F.conv2d
    z = conv(x, weight, bias, stride, padding)
    return torch.tanh(z) if act == ACT_TANH else F.leaky_relu(z, slope)


def _conv_act_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, transposed, act, slope = inputs
    ctx.save_for_backward(x, weight, bias, output)
    ctx.args = (bias is not None, stride, padding, transposed, act, slope)


def _conv_act_backward(ctx, grad_y):
    """conv_act's gradients (torch.library's autograd formula, and _ConvActFunction's backward)."""
    x, weight, bias, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return (*differentiable_backward(lambda *t: _conv_act_reference(*t, *ctx.args[1:]),
                                         (x, weight, bias), (grad_y,), need[:3]),
                None, None, None, None, None)
    gx, gw, gb = torch.ops.gan_fast.conv_act_backward(grad_y, out, x, weight, *ctx.args, list(need[:3]))
    return (gx if need[0] else None, gw if need[1] else None, gb if need[2] else None,
            None, None, None, None, None)


class _ConvActFunction(torch.autograd.Function):
    """conv_act under autograd in eager mode on a CPU, for the few-channel images whose convolution
    the op computes with its own kernels (_image_conv_applies): the op's kernels and formula without
    torch.library's Python autograd layer, as _DHeadFunction."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, transposed, act, slope):
        with below_autograd():
            output = torch.ops.gan_fast.conv_act(x, weight, bias, stride, padding, transposed, act, slope)
        _conv_act_setup(ctx, (x, weight, bias, stride, padding, transposed, act, slope), output)
        return output

    backward = staticmethod(_conv_act_backward)


def _register() -> None:
    lib = "gan_fast::"

    # ---- BatchNorm + activation
    @torch.library.register_fake(lib + "bn_act")
    def _(x, weight, bias, running_mean, running_var, training, eps, act, negative_slope, chunks=1):
        torch._check(x.dim() in (2, 3, 4), lambda: f"gan_fast::bn_act: input must be 2-D to 4-D, got {x.dim()}-D")
        _check_devices("bn_act", x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
        stat = (x.shape[1],) if chunks == 1 else (chunks, x.shape[1])
        acc = _acc_dtype(x.dtype)
        return torch.empty_like(_dense_like(x)), x.new_empty(stat, dtype=acc), x.new_empty(stat, dtype=acc)

    @torch.library.register_fake(lib + "bn_act_backward")
    def _(grad_out, x, weight, bias, mean, var, training, eps, act, negative_slope, chunks=1):
        _check_devices("bn_act_backward", x, grad_out=grad_out, weight=weight, bias=bias, mean=mean, var=var)
        c = x.shape[1]
        acc = _acc_dtype(x.dtype)
        return torch.empty_like(_dense_like(x)), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

    @torch.library.register_fake(lib + "bn_update_stats_")
    def _(running_mean, running_var, mean, var, momentum, count):
        _check_devices("bn_update_stats_", running_mean, "running_mean", running_var=running_var, mean=mean, var=var)
        return None

    torch.library.register_autograd(lib + "bn_act", _bn_backward, setup_context=_bn_setup)

    # ---- Convolution + activation
    @torch.library.register_fake(lib + "conv_act")
    def _(x, weight, bias, stride, padding, transposed, act, negative_slope):
        torch._check(x.dim() == 4, lambda: f"gan_fast::conv_act: input must be 4-D, got {x.dim()}-D")
        _check_devices("conv_act", x, weight=weight, bias=bias)
        shape = _conv_out_shape(x, weight, stride, padding, transposed)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x))

    @torch.library.register_fake(lib + "conv_act_backward")
    def _(grad_out, out, x, weight, has_bias, stride, padding, transposed, act, negative_slope, output_mask):
        _check_devices("conv_act_backward", x, grad_out=grad_out, out=out, weight=weight)
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(x))
        gw = torch.empty(weight.shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(weight))
        gb = x.new_empty((weight.shape[1] if transposed else weight.shape[0],))
        # One fresh [0] tensor per skipped gradient, as the C++ op returns: a shared one would make
        # the outputs alias each other, which the real op's never do (opcheck's test_faketensor).
        return (gx if output_mask[0] else x.new_empty((0,)), gw if output_mask[1] else x.new_empty((0,)),
                gb if has_bias and output_mask[2] else x.new_empty((0,)))

    torch.library.register_autograd(lib + "conv_act", _conv_act_backward, setup_context=_conv_act_setup)

    # ---- BCE with logits
    @torch.library.register_fake(lib + "bce_with_logits")
    def _(logits, target):
        _check_devices("bce_with_logits", logits, target=target)
        return logits.new_empty((), dtype=_acc_dtype(logits.dtype))

    @torch.library.register_fake(lib + "bce_with_logits_backward")
    def _(grad_loss, logits, target):
        _check_devices("bce_with_logits_backward", logits, grad_loss=grad_loss, target=target)
        return logits.new_empty(logits.shape)

    def bce_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def bce_backward(ctx, grad):
        logits, target = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return tuple(differentiable_backward(reference.bce_with_logits, (logits, target), (grad,), need))
        gl = torch.ops.gan_fast.bce_with_logits_backward(grad, logits, target) if need[0] else None
        # d loss / d target = -logit / numel (per element, before broadcasting).
        gt = _sum_to(logits.to(grad.dtype) * (-grad / logits.numel()), target) if need[1] else None
        return gl, gt

    torch.library.register_autograd(lib + "bce_with_logits", bce_backward, setup_context=bce_setup)

    # ---- D head: GEMV + BCE
    @torch.library.register_fake(lib + "d_head_bce")
    def _(x, weight, target):
        torch._check(x.dim() == 4, lambda: f"gan_fast::d_head_bce: input must be 4-D, got {x.dim()}-D")
        torch._check(x.shape[1] * x.shape[2] * x.shape[3] > 0,
                     lambda: f"gan_fast::d_head_bce: the input has no features per sample (shape {tuple(x.shape)})")
        _check_devices("d_head_bce", x, weight=weight, target=target)
        return x.new_empty((), dtype=_acc_dtype(x.dtype)), x.new_empty((x.shape[0],))

    @torch.library.register_fake(lib + "d_head_bce_backward")
    def _(grad_loss, x, weight, target, logits, output_mask):
        _check_devices("d_head_bce_backward", x, grad_loss=grad_loss, weight=weight, target=target, logits=logits)
        return (torch.empty_like(_dense_like(x)) if output_mask[0] else x.new_empty((0,)),  # never one shared
                torch.empty(weight.shape, dtype=x.dtype, device=x.device, memory_format=_conv_format(weight))
                if output_mask[1] else x.new_empty((0,)))  # never one shared [0]: see conv_act_backward

    torch.library.register_autograd(lib + "d_head_bce", _head_backward, setup_context=_head_setup)

    @torch.library.register_fake(lib + "col2im")  # ext_conv's GEMM + col2im forms
    def _(cols, image_hw, stride, padding):
        return torch.empty((cols.shape[0], cols.shape[5], *image_hw), dtype=cols.dtype, device=cols.device,
                           memory_format=torch.channels_last)


if _LOAD_ERROR is None:
    _register()
