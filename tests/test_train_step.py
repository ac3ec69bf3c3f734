"""Trainer.train_step's work, counted rather than timed: the G update computes no weight gradient of
D (issue #16 item 3) and leaves the losses and parameters as they were; the fused CPU step keeps one
activation layout end to end (issue #16 item 1)."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan_fast import train
from gan_fast.config import TrainConfig
from gan_fast.train import Trainer

from .conftest import needs_ext

# ngf != ndf: no weight of G has the shape of one of D's
TINY = dict(image_size=16, nz=8, ngf=4, ndf=6, batch_size=8, device="cpu", workers=0)
BACKENDS = ["reference", pytest.param("ext", marks=needs_ext)]


def _trainer(tmp_path, backend, **kw) -> Trainer:
    cfg = TrainConfig(**{**TINY, **kw}, backend=backend, out=str(tmp_path / backend))
    return Trainer(cfg, log=lambda *a: None)


def _run(trainer: Trainer, steps: int):
    """(the steps' statistics, G's and D's state_dicts after them)."""
    batches = trainer.data.batches(trainer.cfg.batch_size, 0, 0)
    stats = torch.stack([trainer.train_step(real) for real in itertools.islice(batches, steps)])
    return stats, {**{"G." + k: v.clone() for k, v in trainer.netG.state_dict().items()},
                   **{"D." + k: v.clone() for k, v in trainer.netD.state_dict().items()}}


# The ops that compute a convolution's weight gradient, and where their weight and output_mask are.
WEIGHT_GRAD_OPS = {"aten::convolution_backward": (2, 10), "gan_fast::conv_act_backward": (3, 10),
                   "gan_fast::d_head_bce_backward": (2, 5)}


class WeightGradients(TorchDispatchMode):
    """Counts, per weight (by storage), the backward calls that compute its gradient."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = WEIGHT_GRAD_OPS.get(func._schema.name)
        if where is not None and args[where[1]][1]:
            ptr = args[where[0]].untyped_storage().data_ptr()
            self.counts[ptr] = self.counts.get(ptr, 0) + 1
        return func(*args, **(kwargs or {}))

    def of(self, module: torch.nn.Module) -> list[int]:
        return [self.counts.get(p.untyped_storage().data_ptr(), 0) for p in module.parameters() if p.dim() == 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_g_update_computes_no_weight_gradient_of_d(backend, tmp_path):
    trainer = _trainer(tmp_path, backend)
    real = next(trainer.data.batches(trainer.cfg.batch_size, 0, 0))
    trainer.train_step(real)  # the optimizers' state exists: only the step's own work is counted
    with WeightGradients() as seen:
        trainer.train_step(real)
    # 16x16 images: three convolutions in each network
    assert seen.of(trainer.netG) == [1] * 3
    # D's weights get their gradient from the real and the fake batch, not from G's update
    assert seen.of(trainer.netD) == [2] * 3
    assert all(p.requires_grad for p in trainer.netD.parameters())  # restored after the G update


@pytest.mark.parametrize("backend", BACKENDS)
def test_freezing_d_changes_no_loss_and_no_parameter(backend, tmp_path, monkeypatch):
    """The step as it was before D was frozen for the G update (D's weight gradients computed and
    thrown away) gives the same statistics and parameters, bit for bit."""
    new = _run(_trainer(tmp_path / "new", backend), 4)
    monkeypatch.setattr(train, "frozen", contextlib.nullcontext)
    old = _run(_trainer(tmp_path / "old", backend), 4)
    assert torch.equal(new[0], old[0])
    assert new[1].keys() == old[1].keys()
    for k in new[1]:
        assert torch.equal(new[1][k], old[1][k]), k


def test_freezing_d_changes_nothing_with_triton(tmp_path, monkeypatch):
    from gan_fast import backends

    reason = backends.unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)
    tiny = dict(image_size=16, nz=4, ngf=2, ndf=2, batch_size=4)
    new = _run(_trainer(tmp_path / "new", "triton", **tiny), 2)
    monkeypatch.setattr(train, "frozen", contextlib.nullcontext)
    old = _run(_trainer(tmp_path / "old", "triton", **tiny), 2)
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=1e-6)
    for k in new[1]:
        torch.testing.assert_close(new[1][k], old[1][k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_frozen_restores_only_what_it_froze():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[1].bias.requires_grad_(False)  # frozen by the user: stays frozen
    with train.frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]
    with pytest.raises(RuntimeError), train.frozen(net):
        raise RuntimeError
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]
