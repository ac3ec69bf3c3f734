"""The contract every fused backend is held to (docs/ops.md), as reusable pieces for
tests/backends/test_contract.py and tests/backends/test_contract_fuzz.py.

A ``Case`` is one call of one op: its tensor arguments and keyword arguments, which arguments get
gradients, and where the running statistics are. ``run_case`` calls the backend's op and the
reference composition (gan_fast.backends.reference) on identical copies, in the case's dtype and in float64,
and classifies the outcome:

- ``match``: both returned, and the output, every gradient and the running statistics agree;
- ``kink``: the outputs agree, and some ReLU / LeakyReLU input within a rounding of 0 fell on the
  other side of the kink (both answers are correctly rounded; the gradients then differ by dy there
  and are not compared);
- ``both_raise``: both refused the call;
- ``clear_error``: the backend refused with a TypeError / ValueError / RuntimeError that carries a
  message, where the reference returned (a documented limit, e.g. float64 in Triton);
- ``mismatch``: both returned and some tensor differs (or the non-finite pattern does);
- ``accepts_invalid``: the backend returned a value where the reference refuses the call;
- ``unclear_error``: the backend failed with any other exception, or one without a message.

"Agree" means: the same shape and dtype; the same NaN / inf positions as the reference in the same
dtype; and on the finite values, error against the float64 reference at most twice the reference's
own error in this dtype, plus a floor of ``FLOOR[dtype]`` times the tensor's magnitude (1e-5 relative
in fp32, the project's rule; a couple of units in the last place for 16-bit types).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import gan_fast.backends.reference as reference
from gan_fast import backends

CLEAR_ERRORS = (TypeError, ValueError, RuntimeError, NotImplementedError)
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2 * 2.0 ** -8,
         torch.float16: 2 * 2.0 ** -11}
BN_OPS = ("conv_transpose2d_bn_relu", "conv2d_bn_leaky_relu", "linear_bn_leaky_relu", "upsample_conv2d_bn_relu")


@dataclasses.dataclass
class Case:
    op: str
    args: list            # positional arguments (tensors or None)
    kwargs: dict
    grad_args: tuple = ()  # indices of args that get gradients
    running: tuple = ()    # indices of running_mean / running_var (mutated in place)
    label: str = ""

    def __str__(self):
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in self.args]
        dtype = next((a.dtype for a in self.args if isinstance(a, torch.Tensor)), None)
        return f"{self.op}({shapes}, {str(dtype).replace('torch.', '')}, {self.kwargs}) {self.label}"


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t (values unchanged) as NCHW-contiguous, channels_last or a non-contiguous view."""
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def make_case(op: str, gen: torch.Generator, *, n=2, cin=3, cout=5, size=4, k=4, stride=2, padding=1,
              dtype=torch.float32, kind="contiguous", training=True, affine=True, bias=True,
              momentum=0.1, eps=1e-5, slope=0.2, scale=1.0, device="cpu") -> Case:
    """A random call of ``op`` (never zeros: every tensor is drawn from a seeded generator)."""
    # BatchNorm parameters and statistics stay fp32 for 16-bit activations, as under autocast
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    def bn():
        def draw(t):
            return t.to(device=device, dtype=bn_dtype)
        g = draw(torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5) if affine else None
        b = draw(torch.randn(cout, generator=gen, dtype=torch.float64) * 0.5) if affine else None
        rm = draw(torch.randn(cout, generator=gen, dtype=torch.float64) * 0.1)
        rv = draw(torch.rand(cout, generator=gen, dtype=torch.float64) + 0.5)
        return [g, b, rm, rv]

    bn_kw = dict(training=training, momentum=momentum, eps=eps)
    wscale = 1.0 / max(1, cin * k * k) ** 0.5
    if op == "linear_bn_leaky_relu":
        x = layout(rnd(n, cin, s=scale), kind if kind != "channels_last" else "contiguous")
        args = [x, rnd(cout, cin, s=1.0 / cin ** 0.5), rnd(cout) if bias else None, *bn()]
        return Case(op, args, dict(bn_kw, negative_slope=slope), (0, 1, 2, 3, 4), (5, 6))
    if op in ("conv_transpose2d_bn_relu", "conv_transpose2d_tanh"):
        x = layout(rnd(n, cin, size, size, s=scale), kind)
        w = rnd(cin, cout, k, k, s=wscale)
        if op == "conv_transpose2d_tanh":
            return Case(op, [x, w, rnd(cout) if bias else None], dict(stride=stride, padding=padding), (0, 1, 2))
        return Case(op, [x, w, *bn()], dict(bn_kw, stride=stride, padding=padding), (0, 1, 2, 3), (4, 5))
    if op in ("conv2d_bn_leaky_relu", "conv2d_leaky_relu"):
        x = layout(rnd(n, cin, size, size, s=scale), kind)
        w = rnd(cout, cin, k, k, s=wscale)
        if op == "conv2d_leaky_relu":
            return Case(op, [x, w, rnd(cout) if bias else None],
                        dict(stride=stride, padding=padding, negative_slope=slope), (0, 1, 2))
        return Case(op, [x, w, *bn()], dict(bn_kw, stride=stride, padding=padding, negative_slope=slope),
                    (0, 1, 2, 3), (4, 5))
    if op == "upsample_conv2d_bn_relu":
        x = layout(rnd(n, cin, size, size, s=scale), kind)
        return Case(op, [x, rnd(cout, cin, k, k, s=wscale), *bn()], dict(bn_kw, padding=padding),
                    (0, 1, 2, 3), (4, 5))
    if op == "d_head_bce_with_logits":
        x = layout(rnd(n, cin, size, size, s=scale), kind)
        target = torch.rand(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return Case(op, [x, rnd(1, cin, size, size, s=wscale), target], {}, (0, 1))
    if op == "bce_with_logits":
        logits = layout(rnd(n, cin, s=3 * scale), kind if kind != "channels_last" else "contiguous")
        target = torch.rand(n, cin, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return Case(op, [logits, target], {}, (0, 1))
    raise ValueError(op)


def _fresh(case: Case, dtype=None):
    """Independent copies of the case's tensors (grad-requiring leaves where the case says), cast to
    ``dtype`` when given (BatchNorm parameters and running statistics stay fp32 unless dtype is fp64,
    as under autocast)."""
    out = []
    for i, a in enumerate(case.args):
        if not isinstance(a, torch.Tensor):
            out.append(a)
            continue
        t = a.detach()
        t = t.to(dtype) if dtype is not None else t
        t = t.clone(memory_format=torch.preserve_format) if t.data_ptr() == a.data_ptr() else t
        if t.dim() and not a.is_contiguous() and t.is_contiguous() and a.dim() == t.dim():
            t = layout(t, "strided")  # a strided input stays strided in every copy
        if i in case.grad_args and t.is_floating_point():
            t.requires_grad_(True)
        out.append(t)
    return out


def _call(fn: Callable, case: Case, args, dy=None, grads=True):
    """(outputs tuple, gradients list, running stats list) or the exception raised. ``dy`` (float64,
    cast to the output's dtype) is the upstream gradient of the first output."""
    try:
        out = fn(*args, **case.kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        got = []
        live = [i for i in case.grad_args if isinstance(args[i], torch.Tensor) and args[i].requires_grad]
        if grads and live and outs[0].requires_grad:
            g = dy.to(device=outs[0].device, dtype=outs[0].dtype) if dy is not None else None
            got = list(torch.autograd.grad(outs[0], [args[i] for i in live], g, allow_unused=True))
        return outs, got, [args[i] for i in case.running if args[i] is not None]
    except Exception as e:  # noqa: BLE001 - classified by the caller
        return e


def _agree(got: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor | None, dtype,
           min_scale: float = 1e-6, any_nonfinite: bool = False, finite_only: bool = False) -> str | None:
    """None when got agrees with ref (same dtype) and ref64 (float64), else why not. ``min_scale``:
    the magnitude to judge at when ref is itself ~0 by cancellation. ``any_nonfinite``: NaN and inf
    stand for each other (running statistics of a batch holding an inf: torch's Welford update gives
    NaN where a two-pass mean gives inf; either way the statistic is lost, which is what must agree).
    ``finite_only``: compare only where both are finite (a weight gradient of an input holding an inf:
    any GEMM multiplies that inf by the zeros of padding or masked lanes, into NaN at places its
    blocking decides; oneDNN's bf16 kernels do it too, at other places)."""
    if got is None or ref is None:
        return None if got is None and ref is None else f"one side has no tensor ({got is None}, {ref is None})"
    if got.shape != ref.shape:
        return f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.dtype != ref.dtype:
        return f"dtype {got.dtype} != {ref.dtype}"
    got, ref = got.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if finite_only:
        both = fin & torch.isfinite(got)
        got, ref = torch.where(both, got, 0.0), torch.where(both, ref, 0.0)
        ref64 = torch.where(both, ref64.double(), 0.0) if ref64 is not None else None
        fin = torch.ones_like(fin)
    if any_nonfinite:
        if not torch.equal(torch.isfinite(got), fin):
            return "non-finite positions differ from the reference's"
        got, ref = got.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0)
        fin = torch.ones_like(fin)
    same_nonfinite = torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got[~fin & ~torch.isnan(ref)],
                                                                                  ref[~fin & ~torch.isnan(ref)])
    if not same_nonfinite:
        return "NaN / inf positions differ from the reference's"
    if not torch.isfinite(got[fin]).all():
        return "non-finite value where the reference is finite"
    if fin.sum() == 0:
        return None
    g, r = got[fin], ref[fin]
    scale = r.abs().max().item()
    floor = FLOOR.get(dtype, 1e-5) * max(scale, min_scale)
    err_vs_ref = (g - r).abs().max().item()
    if err_vs_ref <= floor:
        return None
    if ref64 is not None and ref64.shape == ref.shape:
        r64 = ref64.detach().double()[fin]
        if torch.isfinite(r64).all():
            err = (g - r64).abs().max().item()
            err_torch = (r - r64).abs().max().item()
            if err <= 2 * err_torch + floor:
                return None
            return f"error vs float64 {err:.3g} > 2 x the reference's {err_torch:.3g} + {floor:.3g}"
    return f"max difference {err_vs_ref:.3g} > {floor:.3g}"


def _kink_flips(got: torch.Tensor, ref: torch.Tensor, dtype) -> bool:
    """Some element is positive on one side and not on the other, with both within rounding of 0."""
    if got.shape != ref.shape or got.numel() == 0 or got.dim() == 0:
        return False
    g, r = got.detach().double(), ref.detach().double()
    scale = r.nan_to_num(0, 0, 0).abs().max().item()
    near = (g.abs() <= FLOOR.get(dtype, 1e-5) * scale) & (r.abs() <= FLOOR.get(dtype, 1e-5) * scale)
    return bool(((g > 0) != (r > 0))[near].any())


def run_case(backend: str, case: Case, *, check_grads=True, seed=0) -> tuple[str, str]:
    """(classification, detail) of one call of ``case`` on ``backend`` (see the module docstring)."""
    fused = getattr(backends.ops_for(backend), case.op)
    ref = getattr(reference, case.op)
    dtype = next(a.dtype for a in case.args if isinstance(a, torch.Tensor))
    dy = None
    if check_grads:  # one upstream gradient for every side, drawn from the reference's output shape
        probe = _call(ref, case, _fresh(case), grads=False)
        if not isinstance(probe, Exception):
            shape = probe[0][0].shape
            dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = _call(fused, case, _fresh(case), dy, check_grads)
    want = _call(ref, case, _fresh(case), dy, check_grads)
    if isinstance(got, Exception):
        if not isinstance(got, CLEAR_ERRORS) or not str(got).strip():
            return "unclear_error", f"{type(got).__name__}: {got}"
        return ("both_raise" if isinstance(want, Exception) else "clear_error"), f"{type(got).__name__}: {got}"
    if isinstance(want, Exception):
        return "accepts_invalid", f"the reference raises {type(want).__name__}: {want}"
    want64 = None
    if dtype != torch.float64:
        want64 = _call(ref, case, _fresh(case, torch.float64), dy, check_grads)
        if isinstance(want64, Exception):
            want64 = None
    if case.op not in ("bce_with_logits", "d_head_bce_with_logits", "conv_transpose2d_tanh") and _kink_flips(
            got[0][0], want[0][0], dtype):
        # A pre-activation within a rounding of 0 may land on either side of the ReLU's kink: the
        # gradient then differs by dy at that element in both rounding-correct answers. The output is
        # still compared; the gradients are not.
        why = _agree(got[0][0], want[0][0], want64[0][0] if want64 is not None else None, dtype)
        return ("mismatch", f"output0: {why}") if why else ("kink", "a ReLU input within rounding of 0")
    live = [i for i in case.grad_args if isinstance(case.args[i], torch.Tensor)][:len(want[1])]
    names = ([f"output{i}" for i in range(len(want[0]))] + [f"grad of arg {i}" for i in live]
             + ["running_mean", "running_var"])
    got_all = [*got[0], *got[1], *got[2]]
    want_all = [*want[0], *want[1], *want[2]]
    want64_all = [*want64[0], *want64[1], *want64[2]] if want64 is not None else [None] * len(want_all)
    if len(got_all) != len(want_all):
        return "mismatch", f"{len(got_all)} tensors vs the reference's {len(want_all)}"
    # A gradient much smaller than the call's largest is small by cancellation (a bias before
    # training-mode BatchNorm is exactly 0 up to rounding; a Linear weight feeding BatchNorm with one
    # input feature is ~0 as the output is invariant to its scale): it holds the rounding of sums whose
    # terms are of the call's gradient scale, which is the scale it is judged at.
    nonfinite_input = any(isinstance(a, torch.Tensor) and a.is_floating_point() and not torch.isfinite(a).all()
                          for a in case.args)
    grad_scale = max([w.detach().abs().double().nan_to_num(0, 0, 0).max().item()
                      for w in want[1] if w is not None and w.numel()] or [1e-6])
    for name, g, w, w64 in zip(names, got_all, want_all, want64_all):
        tiny = name.startswith("grad") and w is not None and w.numel() and \
            w.detach().abs().double().nan_to_num(0, 0, 0).max().item() < 0.05 * grad_scale
        why = _agree(g, w, w64 if w64 is not None and w64.shape == w.shape else None, dtype,
                     min_scale=grad_scale if tiny else 1e-6, any_nonfinite=name.startswith("running"),
                     finite_only=name.startswith("grad") and nonfinite_input)
        if why is not None:
            return "mismatch", f"{name}: {why}"
    return "match", ""


def invalid_variants(op, case):
    """(label, case) pairs of invalid calls of ``op`` derived from a valid ``case``."""
    out = []

    def var(label, args=None, **kw):
        c = Case(case.op, list(args if args is not None else case.args), dict(case.kwargs, **kw),
                 case.grad_args, case.running, label)
        out.append(c)

    x, w = case.args[0], case.args[1]
    var("3-D input", [x[0], *case.args[1:]])
    var("weight of another dtype", [x, w.double(), *case.args[2:]])
    var("channel mismatch", [x, w[:, :-1] if w.dim() > 1 and w.shape[1] > 1 else w.repeat(1, 2, *[1] * (w.dim() - 2)),
                             *case.args[2:]])
    if "stride" in case.kwargs:
        var("stride 0", stride=0)
        var("stride 1.5", stride=1.5)
        var("stride (1, 2, 3)", stride=(1, 2, 3))
    if "padding" in case.kwargs:
        var("padding -1", padding=-1)
    if "negative_slope" in case.kwargs:
        var("negative_slope -0.2", negative_slope=-0.2)
        var("negative_slope nan", negative_slope=float("nan"))
    if op in BN_OPS:
        var("momentum None", momentum=None)
        var("eps 0", eps=0.0)
        rm = case.running[0]
        var("running_mean of the wrong size", [*case.args[:rm], case.args[rm][:-1], *case.args[rm + 1:]])
        var("eval without running statistics", [*case.args[:rm], None, None], training=False)
        if case.args[rm - 2] is not None:
            var("bn_weight of the wrong size", [*case.args[:rm - 2], torch.cat([case.args[rm - 2]] * 2),
                                                *case.args[rm - 1:]])
    if op in ("d_head_bce_with_logits", "bce_with_logits"):
        var("integer target", [*case.args[:-1], case.args[-1].round().long()])
        var("target of the wrong size", [*case.args[:-1], torch.cat([case.args[-1], case.args[-1]])])
    if op == "d_head_bce_with_logits":
        var("zero channels", [x[:, :0], w[:, :0], case.args[2]])
        var("empty spatial size", [x[:, :, :0, :0], w[:, :, :0, :0], case.args[2]])
        var("weight not spanning the input", [x, w[:, :, :-1, :-1], case.args[2]])
    return out


def poison(backend: str, enabled: bool) -> None:
    """Every kernel output buffer of ``backend`` starts as NaN while enabled."""
    if backend == "triton":
        from gan_fast.backends.triton import _common
        _common.POISON_OUTPUTS = enabled
    elif backend == "ext":
        from gan_fast.backends import ext
        ext.set_poison_outputs(enabled)
