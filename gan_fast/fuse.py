"""``fuse(model, backend)``: swap runs of nn layers for fused modules, in place, keeping every tensor.

The walk visits every ``nn.Sequential`` inside ``model`` (the DCGAN and MLP models of gan_fast and of
pytorch/examples are Sequentials named ``main``) and replaces each run of consecutive children that
matches a pattern:

=============================================  ======================================
run of layers                                  fused module (op of docs/ops.md)
=============================================  ======================================
ConvTranspose2d -> BatchNorm2d -> ReLU         FusedConvTranspose2dBatchNormReLU
Conv2d -> BatchNorm2d -> LeakyReLU             FusedConv2dBatchNormLeakyReLU
Upsample(x2) -> Conv2d -> BatchNorm2d -> ReLU  FusedUpsampleConv2dBatchNormReLU
Linear -> BatchNorm1d -> LeakyReLU             FusedLinearBatchNormLeakyReLU
Conv2d -> LeakyReLU                            FusedConv2dLeakyReLU
ConvTranspose2d -> Tanh                        FusedConvTranspose2dTanh
Conv2d(C -> 1, stride 1, no padding), last     FusedDHead (with ``discriminator_loss``)
=============================================  ======================================

How the state_dict stays identical: the fused module takes the first layer's place and registers that
layer's Parameter objects under the same names; the BatchNorm's place is taken by a ``FoldedBatchNorm``
that registers the BatchNorm's own Parameter and buffer objects under their names and passes its input
through; the activation's place (no state) becomes a ``FoldedLayer`` (an identity). So ``main.1.running_mean`` is the
same tensor before and after, checkpoints load both ways, and an optimizer built before ``fuse`` keeps
updating the tensors the fused kernels read. Layers that match no pattern (a conv with a bias before
BatchNorm, dilation, groups, other activations) stay as they are. Only Sequentials are searched: the
order in which a custom ``forward`` calls its children is not known from the module tree.

The fused modules apply nn.BatchNorm's bookkeeping (num_batches_tracked, momentum=None as a cumulative
average, track_running_stats=False) before calling the op, and under autocast cast the input and the
conv / linear weight to the autocast dtype (BatchNorm parameters stay fp32), as autocast does for the
reference layers.
"""
from __future__ import annotations

import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from .backends import BACKENDS, ops_for, resolve
from .backends.reference import check_batch_chunks

__all__ = ["FoldedBatchNorm", "FoldedLayer", "FusedConv2dBatchNormLeakyReLU", "FusedConv2dLeakyReLU",
           "FusedConvTranspose2dBatchNormReLU", "FusedConvTranspose2dTanh", "FusedDHead",
           "FusedLinearBatchNormLeakyReLU", "FusedUpsampleConv2dBatchNormReLU", "can_stack_batches",
           "discriminator_loss", "fuse", "fused_modules", "match_run"]


# ------------------------------------------------------------------------------------ state holders

def _adopt(dst: nn.Module, src: nn.Module) -> None:
    """Register src's own Parameter and buffer objects on dst under the same names (None entries,
    such as a missing bias, stay None and stay out of the state_dict, as in src)."""
    for name, p in src._parameters.items():
        dst.register_parameter(name, p)
    for name, b in src._buffers.items():
        dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)


class FoldedBatchNorm(nn.Module):
    """The place of a BatchNorm whose work a fused module now does: it holds the BatchNorm's Parameter
    and buffer objects under their original names (so state_dict keys and values are unchanged) and
    passes its input through. The fused module reads the statistics and hyper-parameters from here."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        _adopt(self, bn)
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.kind = type(bn).__name__
        self.training = bn.training
        self.sync = isinstance(bn, nn.SyncBatchNorm)
        self.process_group = getattr(bn, "process_group", None)

    def forward(self, x):
        return x

    def extra_repr(self) -> str:
        return (f"{self.kind}({self.num_features}, eps={self.eps}, momentum={self.momentum}) folded into the "
                "fused layer")

    def batch_norm_args(self, training: bool):
        """(running_mean, running_var, use_batch_stats, momentum) for this call, with nn.BatchNorm's
        bookkeeping (torch/nn/modules/batchnorm.py _BatchNorm.forward) done first."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = training or (self.running_mean is None and self.running_var is None)
        track = not training or self.track_running_stats
        return (self.running_mean if track else None, self.running_var if track else None,
                use_batch_stats, momentum)

    def sync_group(self, use_batch_stats: bool):
        """The process group to synchronise batch statistics over, or None: as nn.SyncBatchNorm, only
        in training with torch.distributed initialised and more than one rank."""
        import torch.distributed as dist

        if not (self.sync and use_batch_stats and self.training and dist.is_available()
                and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


class FoldedLayer(nn.Identity):
    """The place of a stateless layer (activation, upsampling) whose work a fused module now does."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer_repr = repr(layer)

    def extra_repr(self) -> str:
        return f"{self.layer_repr} folded into the fused layer"


def _autocast(x: torch.Tensor, *tensors):
    """x and the given weight tensors in the autocast dtype when autocast is on for x's device."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


class _Fused(nn.Module):
    """Base of the fused modules: holds the first layer's Parameters under their names, the backend,
    and (unregistered, so its tensors are not counted twice) the FoldedBatchNorm it reads."""

    op_name = ""

    def __init__(self, first: nn.Module, backend: str, bn: FoldedBatchNorm | None = None):
        super().__init__()
        _adopt(self, first)
        self.backend = backend
        self.source = type(first).__name__
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "in_features",
                     "out_features"):
            if hasattr(first, attr):
                setattr(self, attr, getattr(first, attr))
        object.__setattr__(self, "folded_bn", bn)  # not a submodule: its place in the Sequential owns it

    @property
    def ops(self):
        return ops_for(self.backend)

    def bn_kwargs(self, batches: int = 1):
        """((weight, bias, running_mean, running_var), keyword arguments) of the folded BatchNorm for a
        call normalizing ``batches`` stacked batches (nn.BatchNorm's bookkeeping once for each)."""
        bn = self.folded_bn
        for _ in range(batches - 1):
            bn.batch_norm_args(self.training)
        running_mean, running_var, use_batch_stats, momentum = bn.batch_norm_args(self.training)
        kwargs = dict(training=use_batch_stats, momentum=momentum, eps=bn.eps)
        group = bn.sync_group(use_batch_stats)
        if group is not None:  # SyncBatchNorm: statistics over every rank's batch
            kwargs["process_group"] = group
        return (bn.weight, bn.bias, running_mean, running_var), kwargs

    def extra_repr(self) -> str:
        shape = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                 f"stride={self.stride}, padding={self.padding}" if hasattr(self, "in_channels")
                 else f"in_features={self.in_features}, out_features={self.out_features}")
        return f"{shape}, backend={self.backend}"


class FusedConvTranspose2dBatchNormReLU(_Fused):
    def forward(self, x):
        x, w = _autocast(x, self.weight)
        bn, kw = self.bn_kwargs()
        return self.ops.conv_transpose2d_bn_relu(x, w, *bn, stride=self.stride, padding=self.padding, **kw)


class FusedConv2dBatchNormLeakyReLU(_Fused):
    # > 1 inside discriminator_loss(..., batch_chunks): the input is that many batches stacked, each
    # normalized with its own statistics (the ext backend's blocks)
    batch_chunks = 1

    def __init__(self, first, backend, bn, negative_slope):
        super().__init__(first, backend, bn)
        self.negative_slope = negative_slope

    def forward(self, x):
        x, w = _autocast(x, self.weight)
        bn, kw = self.bn_kwargs(self.batch_chunks)
        if self.batch_chunks > 1:
            kw["batch_chunks"] = self.batch_chunks
        return self.ops.conv2d_bn_leaky_relu(x, w, *bn, stride=self.stride, padding=self.padding,
                                             negative_slope=self.negative_slope, **kw)


class FusedUpsampleConv2dBatchNormReLU(_Fused):
    def forward(self, x):
        x, w = _autocast(x, self.weight)
        bn, kw = self.bn_kwargs()
        return self.ops.upsample_conv2d_bn_relu(x, w, *bn, padding=self.padding, **kw)


class FusedLinearBatchNormLeakyReLU(_Fused):
    def __init__(self, first, backend, bn, negative_slope):
        super().__init__(first, backend, bn)
        self.negative_slope = negative_slope

    def forward(self, x):
        x, w, b = _autocast(x, self.weight, self.bias)
        bn, kw = self.bn_kwargs()
        return self.ops.linear_bn_leaky_relu(x, w, b, *bn, negative_slope=self.negative_slope, **kw)


class FusedConv2dLeakyReLU(_Fused):
    def __init__(self, first, backend, negative_slope):
        super().__init__(first, backend)
        self.negative_slope = negative_slope

    def forward(self, x):
        x, w, b = _autocast(x, self.weight, self.bias)
        return self.ops.conv2d_leaky_relu(x, w, b, stride=self.stride, padding=self.padding,
                                          negative_slope=self.negative_slope)


class FusedConvTranspose2dTanh(_Fused):
    def forward(self, x):
        x, w, b = _autocast(x, self.weight, self.bias)
        return self.ops.conv_transpose2d_tanh(x, w, b, stride=self.stride, padding=self.padding)


class FusedDHead(_Fused):
    """The discriminator's last conv (C -> 1 logit per sample). As a layer it returns the logits like
    the Conv2d it replaces; ``loss(features, target)`` runs the fused conv + BCE-with-logits op, which
    ``discriminator_loss`` uses so D's logit never makes a round trip through memory on its own."""

    def forward(self, x):
        x, w = _autocast(x, self.weight)
        return F.conv2d(x, w)

    def loss(self, x, target):
        """(mean BCE-with-logits loss, logits [N]) of this head on features x."""
        x, w = _autocast(x, self.weight)
        if tuple(x.shape[2:]) != tuple(w.shape[2:]):
            # more than one logit per sample: what the reference D does (flatten, then the loss)
            logits = F.conv2d(x, w).view(-1)
            return self.ops.bce_with_logits(logits.float(), target), logits.detach()
        return self.ops.d_head_bce_with_logits(x, w, target)


# ------------------------------------------------------------------------------------ pattern matching

def _plain_conv(m: nn.Module, cls, bias_ok: bool) -> bool:
    if type(m) is not cls:
        return False
    if isinstance(m.padding, str) or m.groups != 1 or tuple(m.dilation) != (1, 1):
        return False
    if m.padding_mode != "zeros" or (not bias_ok and m.bias is not None):
        return False
    return cls is not nn.ConvTranspose2d or tuple(m.output_padding) == (0, 0)


def _bn(m: nn.Module, cls, features: int) -> bool:
    # SyncBatchNorm (after nn.SyncBatchNorm.convert_sync_batchnorm) stands in for either dimension
    return type(m) in (cls, nn.SyncBatchNorm) and m.num_features == features


def _leaky(m: nn.Module) -> bool:
    # the fused backward takes LeakyReLU's mask from its output, which needs a slope >= 0
    return type(m) is nn.LeakyReLU and m.negative_slope >= 0


def _nearest_x2(m: nn.Module) -> bool:
    if type(m) is not nn.Upsample or m.mode != "nearest" or m.size is not None:
        return False
    s = m.scale_factor
    return all(float(v) == 2.0 for v in (s if isinstance(s, tuple) else (s,)))


def match_run(layers: list[nn.Module], i: int, backend: str, last: bool):
    """(fused module, number of layers it replaces) for the run starting at layers[i], or None.
    ``last``: layers[i] is the Sequential's last layer (where a D head may sit). Public so tools (the
    benchmarks) find the fusable runs of a model exactly as fuse() does."""
    a, b, c, d = (layers + [None] * 4)[i:i + 4]
    if _plain_conv(a, nn.ConvTranspose2d, False) and _bn(b, nn.BatchNorm2d, a.out_channels) and type(c) is nn.ReLU:
        return FusedConvTranspose2dBatchNormReLU(a, backend, FoldedBatchNorm(b)), 3
    if _plain_conv(a, nn.Conv2d, False) and _bn(b, nn.BatchNorm2d, a.out_channels) and _leaky(c):
        return FusedConv2dBatchNormLeakyReLU(a, backend, FoldedBatchNorm(b), c.negative_slope), 3
    if (_nearest_x2(a) and _plain_conv(b, nn.Conv2d, False) and tuple(b.stride) == (1, 1)
            and _bn(c, nn.BatchNorm2d, b.out_channels) and type(d) is nn.ReLU):
        return FusedUpsampleConv2dBatchNormReLU(b, backend, FoldedBatchNorm(c)), 4
    if type(a) is nn.Linear and _bn(b, nn.BatchNorm1d, a.out_features) and _leaky(c):
        return FusedLinearBatchNormLeakyReLU(a, backend, FoldedBatchNorm(b), c.negative_slope), 3
    if _plain_conv(a, nn.Conv2d, True) and _leaky(b):
        return FusedConv2dLeakyReLU(a, backend, b.negative_slope), 2
    if _plain_conv(a, nn.ConvTranspose2d, True) and type(b) is nn.Tanh:
        return FusedConvTranspose2dTanh(a, backend), 2
    if (last and _plain_conv(a, nn.Conv2d, False) and a.out_channels == 1 and tuple(a.stride) == (1, 1)
            and tuple(a.padding) == (0, 0)):
        return FusedDHead(a, backend), 1
    return None


def _fuse_sequential(seq: nn.Sequential, backend: str) -> int:
    names = list(seq._modules)
    layers = [seq._modules[n] for n in names]
    i = fused = 0
    while i < len(layers):
        hit = match_run(layers, i, backend, last=i == len(layers) - 1)
        if hit is None:
            i += 1
            continue
        module, span = hit
        first = 1 if isinstance(module, FusedUpsampleConv2dBatchNormReLU) else 0  # the conv's place
        for j in range(span):
            old = layers[i + j]
            if j == first:
                new = module
            elif isinstance(old, nn.modules.batchnorm._BatchNorm):
                new = module.folded_bn
            else:
                new = FoldedLayer(old)  # the activation / upsample: no state
            new.train(old.training)
            seq._modules[names[i + j]] = new
        fused += 1
        i += span
    return fused


def fuse(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every matching run of layers in ``model`` (in place) by fused modules running on
    ``backend`` ("triton", "ext" or "auto": the fastest available for the model's device). The
    state_dict (keys, values, tensor objects) is unchanged. Returns ``model``. Calling it again on a
    fused model moves the fused modules to the new backend.

    With "auto" and no fused backend available the model is returned unchanged, with one warning.
    """
    if backend not in (*BACKENDS, "auto") or backend == "reference":
        raise ValueError(f"fuse: backend must be one of triton, ext or auto, got {backend!r}")
    tensor = next(iter(model.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    backend = resolve(backend, device)  # raises BackendUnavailable with the reason
    if backend == "reference":
        return model
    for m in fused_modules(model):  # fusing again switches the backend of what is already fused
        m.backend = backend
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential):
            _fuse_sequential(m, backend)
    return model


def fused_modules(model: nn.Module) -> list[nn.Module]:
    """The fused modules inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _Fused)]


def _fused_head_main(netD: nn.Module) -> nn.Sequential | None:
    """netD's Sequential ``main`` when it ends in a fused D head (gan_fast / pytorch/examples style)."""
    main = getattr(netD, "main", None)
    ok = isinstance(main, nn.Sequential) and len(main) > 1 and isinstance(main[-1], FusedDHead)
    return main if ok else None


# What may sit in a D whose batches are stacked: nothing that mixes samples or draws random numbers
# but the BatchNorms, which discriminator_loss normalizes per batch.
_STACKABLE = (nn.Sequential, nn.Conv2d, nn.LeakyReLU, FoldedLayer, FoldedBatchNorm, FusedConv2dLeakyReLU,
              FusedConv2dBatchNormLeakyReLU, FusedDHead)


def can_stack_batches(netD: nn.Module) -> bool:
    """Whether ``discriminator_loss(netD, ..., batch_chunks=k)`` may run k stacked batches in one pass
    as k separate passes would: a fused-head D of conv layers whose BatchNorms are ext conv blocks with a
    fixed momentum (momentum=None averages over the number of calls) and no SyncBatchNorm."""
    main = _fused_head_main(netD)
    if main is None or list(netD.children()) != [main] or not all(isinstance(m, _STACKABLE) for m in main.modules()):
        return False
    return all(m.backend == "ext" and m.folded_bn.momentum is not None and not m.folded_bn.sync
               for m in main if isinstance(m, FusedConv2dBatchNormLeakyReLU))


def discriminator_loss(netD: nn.Module, x: torch.Tensor, target: torch.Tensor, bce=None, batch_chunks: int = 1):
    """(loss, logits) of discriminator ``netD`` on ``x``: mean BCE-with-logits against ``target``.

    When ``netD`` is a gan_fast / pytorch/examples-style discriminator (a Sequential ``main`` whose
    last layer is a fused D head) the head's conv and the loss run as one fused op; otherwise
    ``bce(netD(x), target)`` (default: torch's binary_cross_entropy_with_logits).

    ``batch_chunks`` > 1 (where ``can_stack_batches(netD)``): ``x`` is that many equal batches stacked,
    e.g. real and fake; each BatchNorm normalizes each with its own statistics and updates its running
    statistics once per batch, in order, as that many calls would; the convolutions run once over all
    (issue #16: half the calls of D's update). The loss is the mean over all of them.
    """
    main = _fused_head_main(netD)
    check_batch_chunks(batch_chunks, x.shape[0], "discriminator_loss")
    if batch_chunks != 1 and not can_stack_batches(netD):
        raise ValueError("discriminator_loss: batch_chunks > 1 needs a discriminator can_stack_batches() accepts")
    if main is not None:
        blocks = [m for m in main if isinstance(m, FusedConv2dBatchNormLeakyReLU)] if batch_chunks != 1 else []
        for m in blocks:
            m.batch_chunks = batch_chunks
        try:
            features = x
            for layer in list(main)[:-1]:
                features = layer(features)
        finally:
            for m in blocks:
                del m.batch_chunks  # back to the class's 1
        return main[-1].loss(features, target)
    logits = netD(x)
    bce = bce or F.binary_cross_entropy_with_logits
    return bce(logits.float(), target), logits


# ``gan_fast.fuse`` names both this module and, in the README, the function: ``gan_fast.fuse(netG,
# "ext")``. Python sets the package attribute ``gan_fast.fuse`` to this module whenever it is
# imported, and ``import gan_fast.fuse as m`` reads that attribute, so binding the function there
# instead breaks either the README's call or the deep imports (``m.fuse``, ``m.discriminator_loss``),
# depending on the import order. The module itself is made callable as ``fuse``, so every spelling
# works in every order.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> nn.Module:
        return fuse(*args, **kwargs)  # passed on as given: a wrong call's TypeError then names fuse()


__signature__ = inspect.signature(fuse)  # what inspect.signature / help show for gan_fast.fuse(...)
sys.modules[__name__].__class__ = _CallableModule
