"""gan_fast.optim.Adam: torch's fused Adam fed channels_last tensors as flat views (issue #16): the same
update as torch's Adam, in every layout the trainer meets, without copying a channels_last tensor."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan_fast.optim import Adam

CL = torch.channels_last


class _Copies(TorchDispatchMode):
    """The shapes of the 4-D tensors copied (clone / copy_ / contiguous) while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::clone", "aten::copy_", "aten::_to_copy") and args[0].dim() == 4:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(6, 5, 4, 4, generator=g).contiguous(memory_format=CL)),  # conv weight
            torch.nn.Parameter(torch.randn(5, 7, 3, 3, generator=g)),  # an NCHW one beside it
            torch.nn.Parameter(torch.randn(5, generator=g))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).contiguous(
            memory_format=CL if p.is_contiguous(memory_format=CL) and p.dim() == 4 else torch.contiguous_format)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_same_update_as_torch_adam_without_copies(amsgrad, weight_decay):
    hyper = dict(lr=0.05, betas=(0.5, 0.999), amsgrad=amsgrad, weight_decay=weight_decay)
    ours, theirs = _params(0), _params(0)
    opt, reference = Adam(ours, fused=True, **hyper), torch.optim.Adam(theirs, foreach=False, **hyper)
    for step in range(3):
        _grads(ours, step)
        _grads(theirs, step)
        with _Copies() as copies:
            opt.step()
        reference.step()
        assert copies.shapes == [], copies.shapes  # torch's fused Adam clones the channels_last tensors
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            assert p.stride() == q.stride() and p.grad.stride() == q.grad.stride()
            for key, value in reference.state[q].items():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-7, msg=key)
                assert opt.state[p][key].stride() == value.stride(), key


def test_state_dict_round_trip_and_a_moment_in_another_layout():
    # a checkpoint written by an NCHW run (moments contiguous) resumed by a channels_last one: torch's
    # fused kernel moves such a parameter wrongly (below); here the moments are put in the parameter's
    # layout and the update is the for-loop Adam's
    nchw = [torch.nn.Parameter(p.detach().contiguous()) for p in _params(1)]
    writer = torch.optim.Adam(nchw, lr=0.05, fused=True)
    _grads(nchw, 0)
    writer.step()
    saved = writer.state_dict()
    results = {}
    for name, cls, fused in (("ours", Adam, True), ("torch fused", torch.optim.Adam, True),
                             ("for-loop", torch.optim.Adam, False)):
        params = _params(1)
        with torch.no_grad():
            for p, r in zip(params, nchw):
                p.copy_(r)
        opt = cls(params, lr=0.05)
        opt.load_state_dict(copy.deepcopy(saved))  # load_state_dict restores the writer's fused=True
        for group in opt.param_groups:
            group.update(fused=fused or None, foreach=False)
        assert not opt.state[params[0]]["exp_avg"].is_contiguous(memory_format=CL)  # as loaded
        _grads(params, 1)
        opt.step()
        results[name] = (params, opt)
    (ours, opt), (plain, _) = results["ours"], results["for-loop"]
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # what the flat views avoid: torch 2.13's own fused step is off here (a newer torch may mend it)
    if torch.__version__.startswith("2.13"):
        assert not torch.allclose(results["torch fused"][0][0], plain[0], rtol=1e-4)
    assert opt.state[ours[0]]["exp_avg"].shape == ours[0].shape
    assert opt.state[ours[0]]["exp_avg"].is_contiguous(memory_format=CL)
    state = opt.state_dict()["state"]
    assert all(state[i]["exp_avg"].shape == p.shape for i, p in enumerate(ours))


def test_a_failing_step_leaves_every_tensor_in_its_shape():
    params = _params(2)
    opt = Adam(params, lr=0.05, fused=True)
    _grads(params, 0)
    opt.step()
    def closure():  # runs inside torch's step, after the views are made
        assert params[0].dim() == 1
        raise RuntimeError("a closure that fails")

    with pytest.raises(RuntimeError, match="a closure that fails"):
        opt.step(closure)
    assert params[0].shape == (6, 5, 4, 4) and params[0].is_contiguous(memory_format=CL)
    assert params[0].grad.shape == (6, 5, 4, 4) and params[0].grad.is_contiguous(memory_format=CL)
    assert opt.state[params[0]]["exp_avg"].shape == (6, 5, 4, 4)


def test_grad_scaler_unscales_and_skips_as_with_torch_adam():
    # --amp fp16 steps through GradScaler, which hands a fused optimizer its scale and inf flag
    results = []
    for cls, fused in ((Adam, True), (torch.optim.Adam, False)):
        params = _params(3)
        opt = cls(params, lr=0.05, fused=fused or None)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            loss = sum((p ** 2).sum() * (i + 1) for i, p in enumerate(params))
            opt.zero_grad()
            scaler.scale(loss).backward()
            if step == 1:
                params[2].grad[0] = float("inf")  # this step is skipped and the scale halves
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == 512.0
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.stride() == q.stride()
