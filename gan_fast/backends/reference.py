"""The fused-op contract of docs/ops.md as code: the reference composition of each op and the argument
rules every backend shares. Triton-free and extension-free, so the Triton ops, the C++ extension's
Python side and the tests all import the one copy.

Each function here is the composition of torch ops a fused op must equal (same signature as the fused
op, without ``process_group``): outputs, every gradient and the running statistics. The fused
backends also use these compositions for second-order gradients (``differentiable_backward``).
"""
from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F


# ---- the reference compositions (docs/ops.md)

def conv_transpose2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                             stride, padding, training, momentum, eps):
    """ConvTranspose2d(bias=False) -> BatchNorm2d -> ReLU."""
    z = F.conv_transpose2d(x, weight, None, stride, padding)
    return F.relu(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))


def conv2d_bn_leaky_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                         stride, padding, training, momentum, eps, negative_slope):
    """Conv2d(bias=False) -> BatchNorm2d -> LeakyReLU."""
    z = F.conv2d(x, weight, None, stride, padding)
    z = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.leaky_relu(z, negative_slope)


def conv2d_leaky_relu(x, weight, bias, *, stride, padding, negative_slope):
    """Conv2d -> LeakyReLU."""
    return F.leaky_relu(F.conv2d(x, weight, bias, stride, padding), negative_slope)


def conv_transpose2d_tanh(x, weight, bias, *, stride, padding):
    """ConvTranspose2d -> Tanh."""
    return torch.tanh(F.conv_transpose2d(x, weight, bias, stride, padding))


def linear_bn_leaky_relu(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                         training, momentum, eps, negative_slope):
    """Linear -> BatchNorm1d -> LeakyReLU."""
    z = F.batch_norm(F.linear(x, weight, bias), running_mean, running_var, bn_weight, bn_bias, training,
                     momentum, eps)
    return F.leaky_relu(z, negative_slope)


def upsample_conv2d_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                            padding, training, momentum, eps):
    """Upsample(x2, nearest) -> Conv2d(bias=False, stride 1) -> BatchNorm2d -> ReLU."""
    z = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, None, 1, padding)
    return F.relu(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))


def d_head_bce_with_logits(x, weight, target):
    """Conv2d(C -> 1, kernel = x's spatial size) -> BCE-with-logits (mean); returns (loss, logits)."""
    logits = F.conv2d(x, weight).view(-1)
    return bce_with_logits(logits, target.expand(logits.shape)), logits.detach()


def bce_with_logits(logits, target):
    """binary_cross_entropy_with_logits, mean reduction; the loss is float32 for 16-bit logits, as
    autocast computes it (the op is on autocast's float32 list), float64 when either is float64."""
    acc = loss_dtype(logits.dtype, target.dtype)
    return F.binary_cross_entropy_with_logits(logits.to(acc), target.to(acc))


def loss_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any input is float64: the dtype of a loss under autocast."""
    acc = torch.float32
    for d in dtypes:
        acc = torch.promote_types(acc, d)
    return acc


OPS = ("bce_with_logits", "conv2d_bn_leaky_relu", "conv2d_leaky_relu", "conv_transpose2d_bn_relu",
       "conv_transpose2d_tanh", "d_head_bce_with_logits", "linear_bn_leaky_relu", "upsample_conv2d_bn_relu")


# ---- argument rules every backend applies the same way

def check_momentum(momentum) -> float:
    """The effective BatchNorm momentum as a float.

    nn.BatchNorm's momentum=None (cumulative moving average) needs num_batches_tracked, which a
    functional op never sees: the caller passes 1 / num_batches_tracked after incrementing it, as
    nn.BatchNorm does before calling F.batch_norm and as gan_fast.fuse does. Treating None as 0 would
    silently freeze the running statistics."""
    if momentum is None:
        raise ValueError("momentum=None (nn.BatchNorm's cumulative moving average) must be resolved by the "
                         "caller: pass the effective momentum, 1 / num_batches_tracked after incrementing it, "
                         "as gan_fast.fuse does (see docs/ops.md)")
    if isinstance(momentum, bool) or not isinstance(momentum, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    return momentum


def check_eps(eps) -> float:
    """BatchNorm's eps as a float > 0 (F.batch_norm refuses eps <= 0 in training; 0 would divide by a
    zero variance)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return float(eps)


def check_slope(negative_slope) -> float:
    """LeakyReLU's slope as a float >= 0: both backends take the backward's mask from the forward's
    output (as torch's in-place LeakyReLU does), which identifies the negative inputs only when the
    slope is >= 0."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")
    slope = float(negative_slope)
    if not slope >= 0:  # NaN too
        raise ValueError(f"negative_slope must be >= 0, got {slope}")
    return slope


def check_batch_chunks(batch_chunks, batch: int, op: str) -> int:
    """The number of equal batches stacked in a batch of ``batch`` samples (ext's conv2d_bn_leaky_relu,
    fuse.discriminator_loss): a positive int dividing it."""
    if isinstance(batch_chunks, bool) or not isinstance(batch_chunks, int) or batch_chunks < 1 or batch % batch_chunks:
        raise ValueError(f"{op}: batch_chunks must be a positive int dividing the batch ({batch}), "
                         f"got {batch_chunks!r}")
    return batch_chunks


# Activation codes every backend uses for the epilogue activation (a tl.constexpr in the Triton
# kernels, an int argument of the C++ ops; csrc/common.h's enum Act mirrors these numbers).
ACT_NONE, ACT_RELU, ACT_LEAKY_RELU, ACT_TANH = 0, 1, 2, 3


def _is_int(v) -> bool:
    # bool is an int subclass, but stride=True is a bug, not a stride of 1
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints >= minimum (stride 1, padding 0), as a tuple of two.

    Checked here because int(1.5) would silently turn stride=1.5 into 1, and a float reaching the C++
    schema's int[2] fails with an unhelpful "'float' object is not iterable"."""
    both = (value, value) if _is_int(value) else value
    if not isinstance(both, (tuple, list, torch.Size)) or len(both) != 2 or not all(_is_int(v) for v in both):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in both):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(both)}")
    return both[0], both[1]


def conv2d_output_hw(hw, kernel_hw, stride, padding, dilation=(1, 1)) -> tuple[int, int]:
    """nn.Conv2d's output height and width (its docs' formula)."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel_hw[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def conv_transpose2d_output_hw(hw, kernel_hw, stride, padding, dilation=(1, 1),
                               output_padding=(0, 0)) -> tuple[int, int]:
    """nn.ConvTranspose2d's output height and width (its docs' formula)."""
    return tuple((hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel_hw[i] - 1)
                 + output_padding[i] + 1 for i in range(2))


# Runs an op's kernel below the Autograd dispatch key (inside an autograd.Function's forward or backward,
# which records the graph itself, or records none); a no-op context where this torch lacks the private guard.
below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


# ---- second-order gradients

def differentiable_backward(reference, inputs, grad_outputs, needs_input_grad):
    """The input gradients of ``reference(*inputs)`` against ``grad_outputs``, themselves differentiable.

    A fused op's backward kernels are not differentiable. When autograd runs a backward with
    create_graph=True (a gradient penalty such as R1 or WGAN-GP differentiates D's input gradient),
    the fused backward computes the gradients through the reference composition instead, so the
    penalty's own gradient is exact rather than silently missing (the same idea as stylegan2-ada's
    bias_act, whose backward is itself built from differentiable ops). ``inputs`` are the forward's
    tensor arguments as saved by the Function (they keep their autograd identity), None for
    non-tensor arguments; returns one gradient or None per input."""
    live = [i for i, (t, need) in enumerate(zip(inputs, needs_input_grad))
            if need and isinstance(t, torch.Tensor)]
    with torch.enable_grad():
        outputs = reference(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in live], [g for _, g in pairs],
                              create_graph=True, allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(live, got):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


def refuse_double_backward_of_sync_bn(backend: str) -> None:
    """SyncBatchNorm's statistics come from a collective the reference composition can't replay."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"gan_fast {backend}: second-order gradients (create_graph=True, e.g. an R1 or "
                           "gradient penalty) through a synchronised BatchNorm (--sync-bn) are not "
                           "supported; use backend='reference' for this model")
