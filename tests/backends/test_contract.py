"""The contract suite: every fused backend (docs/ops.md) held to the same checks against the one
reference (gan_fast.backends.reference), with every kernel output poisoned with NaN before it is written.

Per backend and op: output, every gradient and the running statistics on awkward shapes and every
layout, training then eval; float64 gradcheck where the backend takes float64 (Triton refuses it
clearly); inf / NaN inputs give the reference's exact non-finite pattern; zero-size and invalid
arguments give a clear exception or the reference's behaviour; momentum=None; second-order gradients
(R1 / gradient penalties); variance that survives a mean 1e5 times the spread; 16-bit BatchNorm
that normalizes the very values its statistics came from. Each defect of issue #12 has its
reproducer here. The seeded random-input sweep is tests/backends/test_contract_fuzz.py.
"""
from __future__ import annotations

import pytest
import torch

import gan_fast.backends.reference as reference
from gan_fast import backends

from ..conftest import DEVICE, needs_ext
from .contract import BN_OPS, Case, invalid_variants, make_case, poison, run_case

OPS = ("conv_transpose2d_bn_relu", "conv2d_bn_leaky_relu", "conv2d_leaky_relu", "conv_transpose2d_tanh",
       "linear_bn_leaky_relu", "upsample_conv2d_bn_relu", "d_head_bce_with_logits", "bce_with_logits")


def _backend(name):
    if name == "ext":
        return pytest.param(name, marks=needs_ext)
    reason = backends.unavailable_reason(name, DEVICE)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [_backend("ext"), _backend("triton")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test, with its kernel outputs NaN-poisoned for the whole test."""
    poison(request.param, True)
    yield request.param
    poison(request.param, False)


def _case(op, seed, **kw):
    return make_case(op, torch.Generator().manual_seed(seed), device=DEVICE, **kw)


def _expect(backend, case, allowed=("match",), **kw):
    got, detail = run_case(backend, case, **kw)
    assert got in allowed, f"{backend} {case}: {got} ({detail})"
    return got, detail


# ---- the reference, on awkward shapes and every layout, training then eval

SHAPES = {  # (n, cin, cout, size, k, stride, padding)
    "conv_transpose2d_bn_relu": [(1, 37, 63, 1, 4, 1, 0), (3, 3, 37, 4, 4, 2, 1), (2, 63, 3, 3, 3, 1, 1)],
    "conv2d_bn_leaky_relu": [(2, 3, 37, 8, 4, 2, 1), (1, 37, 63, 6, 4, 2, 1), (3, 63, 1, 5, 3, 1, 1)],
    "conv2d_leaky_relu": [(1, 3, 37, 8, 4, 2, 1), (3, 1, 63, 7, 3, 1, 0)],
    "conv_transpose2d_tanh": [(2, 37, 3, 4, 4, 2, 1), (1, 3, 1, 5, 3, 1, 1)],
    "linear_bn_leaky_relu": [(2, 37, 63, 1, 1, 1, 0), (9, 3, 70, 1, 1, 1, 0)],
    "upsample_conv2d_bn_relu": [(1, 37, 3, 3, 3, 1, 1), (3, 3, 37, 2, 3, 1, 0)],
    "d_head_bce_with_logits": [(1, 63, 1, 4, 4, 1, 0), (3, 37, 1, 3, 3, 1, 0)],
    "bce_with_logits": [(1, 1, 1, 1, 1, 1, 0), (9, 37, 1, 1, 1, 1, 0)],
}


@pytest.mark.parametrize("op", OPS)
def test_matches_reference_every_layout_train_then_eval(backend, op):
    kinds = ("contiguous", "channels_last", "strided")
    for i, (n, cin, cout, size, k, stride, padding) in enumerate(SHAPES[op]):
        # the Triton interpreter pays ~0.1-1 s per conv call: one layout per shape there, in turn
        for kind in (kinds if backend != "triton" else kinds[i % 3:i % 3 + 1]):
            for training in ((True, False) if op in BN_OPS else (True,)):
                case = _case(op, 100 * i + len(kind), n=n, cin=cin, cout=cout, size=size, k=k, stride=stride,
                             padding=padding, kind=kind, training=training, affine=(i % 2 == 0),
                             bias=(i % 2 == 0))
                _expect(backend, case)


@pytest.mark.parametrize("op", BN_OPS)
def test_running_statistics_over_steps(backend, op):
    """Three training steps then eval on the same module state: the running statistics carried from
    step to step match the reference's."""
    n, cin, cout, size, k, stride, padding = SHAPES[op][0]
    case = _case(op, 7, n=max(n, 2), cin=cin, cout=cout, size=size, k=k, stride=stride, padding=padding)
    rm, rv = (case.args[i] for i in case.running)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    fused, ref = getattr(backends.ops_for(backend), op), getattr(reference, op)
    gen = torch.Generator().manual_seed(3)
    for training in (True, True, True, False):
        x = torch.randn(case.args[0].shape, generator=gen).to(DEVICE)
        kw = dict(case.kwargs, training=training)
        y = fused(x, *case.args[1:case.running[0]], rm, rv, **kw)
        y_ref = ref(x, *case.args[1:case.running[0]], rm_ref, rv_ref, **kw)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm, rm_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv, rv_ref, rtol=1e-5, atol=1e-6)


# ---- float64

@pytest.mark.parametrize("op", OPS)
def test_float64_gradcheck_or_a_clear_refusal(backend, op):
    n, cin, cout, size, k, stride, padding = SHAPES[op][-1]
    case = _case(op, 11, n=max(n, 2), cin=min(cin, 3), cout=min(cout, 3), size=min(size, 3), k=min(k, 3),
                 stride=stride, padding=min(padding, 1), dtype=torch.float64)
    if backend == "triton":  # the Triton kernels compute in fp32 at most: float64 is refused, clearly
        _expect(backend, case, ("clear_error",))
        return
    _expect(backend, case)
    fused = getattr(backends.ops_for(backend), op)
    args = [a.detach().clone().requires_grad_(i in case.grad_args) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(case.args)]
    rs = case.running

    def f(*live):
        full = list(args)
        for i, t in zip([i for i in case.grad_args if args[i] is not None], live):
            full[i] = t
        for i in rs:  # running statistics are updated in place: a fresh copy per evaluation
            full[i] = args[i].detach().clone()
        out = fused(*full, **case.kwargs)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(f, [args[i] for i in case.grad_args if args[i] is not None])


# ---- non-finite, zero-size and invalid inputs

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_gives_the_references_pattern(backend, op, value):
    n, cin, cout, size, k, stride, padding = SHAPES[op][0]
    for training in ((True, False) if op in BN_OPS else (True,)):
        case = _case(op, 5, n=max(n, 2), cin=cin, cout=cout, size=size, k=k, stride=stride, padding=padding,
                     training=training)
        x = case.args[0].clone()
        x.view(-1)[::7] = value
        case.args[0] = x
        _expect(backend, case)


@pytest.mark.parametrize("training", [True, False])
def test_relu_of_minus_inf_is_zero(backend, training):
    """Issue #12 defect 2: an fp16 conv that overflows to -inf, then BatchNorm and ReLU; ext gave NaN
    (slope 0 * -inf), the reference 0."""
    x = torch.full((1, 4, 1, 1), 60000.0, dtype=torch.float16, device=DEVICE)
    w = -torch.ones(4, 1, 1, 1, dtype=torch.float16, device=DEVICE)
    rm, rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    kw = dict(stride=1, padding=0, training=training, momentum=0.1, eps=1e-5)
    xs = x
    if training:  # more than one value per channel: a second sample whose conv output is finite (-4)
        xs = torch.cat([x, torch.ones_like(x)])
    case = Case("conv_transpose2d_bn_relu", [xs, w, None, None, rm, rv], kw, (), (4, 5))
    _expect(backend, case)
    if not training:
        z = torch.nn.functional.conv_transpose2d(x, w)
        assert z.item() == float("-inf")  # the repro: the fp16 conv overflows
        y = getattr(backends.ops_for(backend), "conv_transpose2d_bn_relu")(x, w, None, None, rm, rv, **kw)
        assert y.item() == 0.0


@pytest.mark.parametrize("op", OPS)
def test_zero_size_input_is_refused_or_matches(backend, op):
    n, cin, cout, size, k, stride, padding = SHAPES[op][0]
    case = _case(op, 9, n=0, cin=cin, cout=cout, size=size, k=k, stride=stride, padding=padding)
    _expect(backend, case, ("match", "both_raise", "clear_error"))


@pytest.mark.parametrize("op", OPS)
def test_invalid_arguments_are_refused_clearly(backend, op):
    n, cin, cout, size, k, stride, padding = SHAPES[op][0]
    base = _case(op, 13, n=max(n, 2), cin=min(cin, 5), cout=min(cout, 5), size=size, k=k, stride=stride,
                 padding=padding)
    for case in invalid_variants(op, base):
        got, detail = run_case(backend, case, check_grads=False)
        assert got in ("both_raise", "clear_error", "match"), f"{backend} {case}: {got} ({detail})"


@pytest.mark.parametrize("op", BN_OPS)
def test_momentum_none_is_an_error(backend, op):
    """Issue #12 defect 4: triton took momentum=None as 0 and never updated the running statistics."""
    case = _case(op, 17, n=2)
    fused = getattr(backends.ops_for(backend), op)
    with pytest.raises(ValueError, match="momentum=None"):
        fused(*case.args, **dict(case.kwargs, momentum=None))


# ---- second-order gradients (R1 / gradient penalties)

@pytest.mark.parametrize("op", OPS)
def test_second_order_gradients_match_the_reference(backend, op):
    """Issue #12 defect 6: a penalty on the input gradient (create_graph=True) through a fused op gets
    its own gradients right (triton used to drop them, ext to compute them wrongly)."""
    n, cin, cout, size, k, stride, padding = SHAPES[op][-1]
    for training in ((True, False) if op in BN_OPS else (True,)):
        case = _case(op, 19, n=max(n, 2), cin=min(cin, 5), cout=min(cout, 5), size=size, k=k, stride=stride,
                     padding=padding, training=training)
        results = []
        for fn in (getattr(backends.ops_for(backend), op), getattr(reference, op)):
            args = [a.detach().clone().requires_grad_(i in case.grad_args) if isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(case.args)]
            out = fn(*args, **case.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            dy = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
            (gx,) = torch.autograd.grad(out, args[0], dy, create_graph=True)
            penalty = (gx.float() ** 2).sum()
            params = [args[i] for i in case.grad_args[1:] if args[i] is not None]
            results.append([gx.detach(), *torch.autograd.grad(penalty, params, allow_unused=True)])
        for got, want in zip(*results):
            assert (got is None) == (want is None)
            if want is not None:
                scale = want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(scale, 1e-6))


# ---- statistics

@pytest.mark.parametrize("op", BN_OPS)
def test_variance_with_mean_1e4_times_the_spread(backend, op):
    """Batch statistics of values whose mean dwarfs their spread. The inputs are multiples of 1/64
    near 1000, so the conv / linear output is exact in fp32 and any error is the statistics'. The
    same check fails the naive E[z^2] - E[z]^2 in fp32 (asserted below on the same z): it proves the
    fused statistics are computed stably, as Chan et al.'s merge or a two-pass variance does."""
    gen = torch.Generator().manual_seed(23)
    n, c = 8, 3
    x = (1000.0 + torch.randint(-8, 9, (n, c, 3, 3), generator=gen) / 64.0).to(DEVICE)
    if op == "linear_bn_leaky_relu":
        x = x[:, :, 0, 0].contiguous()
        w = torch.ones(2, c, device=DEVICE)
        extra, kw = [torch.full((2,), 3.0, device=DEVICE)], {"negative_slope": 0.2}
    elif op == "conv_transpose2d_bn_relu":
        w, extra, kw = torch.ones(c, 2, 1, 1, device=DEVICE), [], {"stride": 1, "padding": 0}
    elif op == "upsample_conv2d_bn_relu":
        w, extra, kw = torch.ones(2, c, 1, 1, device=DEVICE), [], {"padding": 0}
    else:
        w, extra, kw = torch.ones(2, c, 1, 1, device=DEVICE), [], {"stride": 1, "padding": 0, "negative_slope": 0.2}
    gamma, beta = torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    kw.update(training=True, momentum=1.0, eps=1e-5)
    rm, rv = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    y = getattr(backends.ops_for(backend), op)(x, w, *extra, gamma, beta, rm, rv, **kw)
    rm64, rv64 = torch.zeros(2, dtype=torch.float64, device=DEVICE), torch.ones(2, dtype=torch.float64, device=DEVICE)
    y64 = getattr(reference, op)(x.double(), w.double(), *[e.double() for e in extra], gamma.double(),
                                 beta.double(), rm64, rv64, **kw)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-2)  # outputs are O(1)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-2, atol=0)
    # the naive one-pass formula on the same (exact) fp32 values is far off:
    z = (x @ w.t() + extra[0])[:, 0] if extra else x.sum(1).reshape(-1)
    naive = (z * z).mean() - z.mean() ** 2
    exact = z.double().var(unbiased=False).item()
    assert abs(naive.item() - exact) > 0.5 * exact, (naive.item(), exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_batchnorm_normalizes_the_values_its_statistics_saw(backend, dtype):
    """Issue #12 defect 3: statistics from the fp32 accumulator normalizing the 16-bit rounded z
    turned every sample of this channel into -23.75; the reference gives ~0."""
    x = torch.tensor([[1.0], [1.0078125], [0.9921875], [1.0]], dtype=dtype, device=DEVICE)
    w = torch.tensor([[0.5]], dtype=dtype, device=DEVICE)
    b = torch.tensor([1000.0], dtype=dtype, device=DEVICE)
    rm, rv = torch.zeros(1, device=DEVICE), torch.ones(1, device=DEVICE)
    kw = dict(training=True, momentum=0.1, eps=1e-5, negative_slope=0.2)
    y = backends.ops_for(backend).linear_bn_leaky_relu(x, w, b, None, None, rm.clone(), rv.clone(), **kw)
    y_ref = reference.linear_bn_leaky_relu(x, w, b, None, None, rm.clone(), rv.clone(), **kw)
    assert y.abs().max().item() < 0.1, y
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0.01)
    # the conv ops: a channel with a large mean and a small spread, against the reference
    gen = torch.Generator().manual_seed(29)
    x4 = (1.0 + 0.01 * torch.randn(4, 2, 3, 3, generator=gen)).to(DEVICE, dtype)
    for op, wshape, extra in (("conv2d_bn_leaky_relu", (3, 2, 1, 1), dict(stride=1, padding=0, negative_slope=0.2)),
                              ("conv_transpose2d_bn_relu", (2, 3, 1, 1), dict(stride=1, padding=0)),
                              ("upsample_conv2d_bn_relu", (3, 2, 1, 1), dict(padding=0))):
        wt = torch.full(wshape, 300.0, dtype=dtype, device=DEVICE)
        args = [wt, None, None, rm.expand(3).clone(), rv.expand(3).clone()]
        kw = dict(extra, training=True, momentum=0.1, eps=1e-5)
        got = getattr(backends.ops_for(backend), op)(x4, *args, **kw)
        want = getattr(reference, op)(x4, *[a.clone() if a is not None else None for a in args], **kw)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.1, msg=lambda m, op=op: f"{op}: {m}")


# ---- activations and losses at the edges

def test_tanh_keeps_relative_precision_for_small_outputs(backend):
    """Issue #12 defect 5: (1 - e) / (1 + e) gave tanh(1e-7) = 5.96e-8."""
    x = torch.tensor([1e-7, -3e-6, 2e-4, 0.01, 0.3, 0.6, 0.7, 2.0, -9.0]).view(1, 9, 1, 1).to(DEVICE)
    w = torch.eye(9, device=DEVICE).view(9, 9, 1, 1)
    y = backends.ops_for(backend).conv_transpose2d_tanh(x, w, None, stride=1, padding=0)
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs()).max().item()
    assert rel < 5e-7, rel


def test_bce_with_infinite_logits_gives_the_references_values(backend):
    """Issue #12 defect 7 (second half): +inf logit, target 0 is a loss of +inf, not NaN."""
    inf = float("inf")
    for logits, target in (([inf], [0.0]), ([inf, 1.0], [0.0, 1.0]), ([-inf], [1.0]), ([inf], [1.0]),
                           ([-inf], [0.0]), ([float("nan")], [0.5])):
        lg = torch.tensor(logits, device=DEVICE)
        tg = torch.tensor(target, device=DEVICE)
        _expect(backend, Case("bce_with_logits", [lg, tg], {}, (0,)))
        x = lg.view(-1, 1, 1, 1)
        _expect(backend, Case("d_head_bce_with_logits", [x, torch.ones(1, 1, 1, 1, device=DEVICE), tg], {}, (1,)))


def test_d_head_refuses_inputs_without_features(backend):
    """Issue #12 defect 7: ext returned log(2) for zero channels or an empty spatial size."""
    fn = backends.ops_for(backend).d_head_bce_with_logits
    target = torch.ones(2, device=DEVICE)
    for shape in ((2, 0, 4, 4), (2, 3, 0, 0)):
        x = torch.randn(shape, device=DEVICE)
        with pytest.raises((ValueError, RuntimeError)):
            fn(x, torch.randn(1, *shape[1:], device=DEVICE), target)
