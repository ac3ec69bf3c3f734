"""Trainer.train_step's work, counted rather than timed: the G update computes no weight gradient of
D (issue #16 item 3) and leaves the losses and parameters as they were; the fused CPU step keeps one
activation layout end to end (issue #16 item 1)."""
from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan_fast import train
from gan_fast.config import TrainConfig
from gan_fast.train import Trainer

from .conftest import needs_ext

# ngf != ndf: no weight of G has the shape of one of D's. fp32 (amp off; auto would be bf16 for ext on
# a CPU with native bf16): the counts below follow the parameters' own storage, which autocast casts
TINY = dict(image_size=16, nz=8, ngf=4, ndf=6, batch_size=8, device="cpu", workers=0, amp="off")
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
    # 16x16 images: three convolutions in each network; ext computes G's first block (from the 1x1
    # latent) as a matrix product on the CPU, whose weight gradient is an aten::mm, not counted here
    assert seen.of(trainer.netG) == ([0, 1, 1] if backend == "ext" else [1] * 3)
    assert all(p.grad is not None for p in trainer.netG.parameters())
    # D's weights get their gradient from the real and the fake batch (one pass over both where the
    # update is stacked: ext on a CPU), not from G's update
    assert seen.of(trainer.netD) == [1 if trainer.stacked_d_update else 2] * 3
    assert trainer.stacked_d_update == (backend == "ext")  # TINY runs on the CPU
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


# ---------------------------------------------------------------- one layout end to end (#16 item 1)

def _copies_of_a_step(trainer: Trainer) -> list[tuple]:
    """The shapes copied by aten::copy_ in one training step, outside optimizer.step."""
    real = next(trainer.data.batches(trainer.cfg.batch_size, 0, 0))
    trainer.train_step(real)  # the optimizers' state exists: only the step's own work is counted
    with torch.profiler.profile(record_shapes=True) as prof:
        trainer.train_step(real)

    def in_optimizer(e):
        while e is not None and not e.name.startswith("Optimizer.step"):
            e = e.cpu_parent
        return e is not None

    return [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::copy_" and not in_optimizer(e)]


def _activation_copies(trainer: Trainer, copies: list[tuple]) -> list[tuple]:
    """The copies that are none of: a 0-dim scalar (ATen's wrapped numbers), the real batch's one
    conversion from uint8, a weight-sized copy (a weight gradient put in its weight's layout)."""
    cfg = trainer.cfg
    real = (cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    weights = {tuple(p.shape) for p in (*trainer.netG.parameters(), *trainer.netD.parameters())}
    rest = [s for s in copies if s and s not in weights]
    assert real in rest, "the real batch is converted to float once"
    rest.remove(real)
    return rest


# batch 10: no activation has the shape of a weight
LAYOUT = dict(image_size=16, nz=8, ngf=4, ndf=6, batch_size=10)


@needs_ext
def test_fused_cpu_step_copies_no_activation(tmp_path):
    trainer = _trainer(tmp_path, "ext", channels=3, **LAYOUT)
    assert trainer.channels_last and all(p.is_contiguous(memory_format=torch.channels_last)
                                         for p in trainer.netD.parameters() if p.dim() == 4)
    copies = _copies_of_a_step(trainer)
    assert _activation_copies(trainer, copies) == []
    # what remains: the real batch's conversion, 5 scalars, and the weight-gradient copies inside
    # ATen's convolution_backward (one per weight gradient: 3 of G, 2 x 2 of D's convs) and
    # gan_fast::d_head_bce_backward (2, then AccumulateGrad's into the channels_last weight)
    assert len(copies) <= 16, copies


@needs_ext
def test_fused_cpu_step_copies_no_activation_with_one_channel(tmp_path):
    trainer = _trainer(tmp_path, "ext", channels=1, **LAYOUT)
    assert _activation_copies(trainer, _copies_of_a_step(trainer)) == []


def test_reference_step_keeps_nchw(tmp_path):
    """The default path is as it was: NCHW parameters and batches unless --channels-last."""
    trainer = _trainer(tmp_path, "reference", channels=3, **LAYOUT)
    seen = []
    trainer.netD.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    assert not trainer.channels_last
    assert all(p.is_contiguous() for p in (*trainer.netG.parameters(), *trainer.netD.parameters()))
    trainer.train_step(next(trainer.data.batches(trainer.cfg.batch_size, 0, 0)))
    assert seen == [True] * 3


def test_fused_dcgan_runs_in_the_layout_its_convolutions_compute_in():
    from gan_fast.train import computes_in_channels_last

    assert computes_in_channels_last("ext", "cpu", "dcgan")  # oneDNN
    assert computes_in_channels_last("triton", "cuda", "dcgan")  # the launchers would copy NCHW each call
    assert not computes_in_channels_last("reference", "cuda", "dcgan")  # eager stays what users chose
    assert not computes_in_channels_last("triton", "cpu", "dcgan")  # the interpreter: tests keep NCHW
    assert not computes_in_channels_last("ext", "cpu", "mlp")  # no convolutions


def test_cpu_trainer_steps_with_one_fused_adam_kernel_per_model(tmp_path):
    """On a CPU the optimizers are torch's fused Adam (issue #16: 7 ops per parameter tensor were
    ~15% of a DCGAN-64 step): one _fused_adam_ call per model and step, no per-tensor lerp_ /
    addcdiv_; the parameters move as the default Adam moves them, up to rounding."""
    trainer = _trainer(tmp_path, "reference")
    assert all(g["fused"] for opt in (trainer.optG, trainer.optD) for g in opt.param_groups)
    plain = _trainer(tmp_path, "reference")
    for opt_name, net in (("optG", plain.netG), ("optD", plain.netD)):
        setattr(plain, opt_name, torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    before = {**{"G." + k: v.clone() for k, v in plain.netG.state_dict().items()},
              **{"D." + k: v.clone() for k, v in plain.netD.state_dict().items()}}

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(1)
    with Calls() as calls:
        _, fused = _run(trainer, 1)
    assert calls.names.count("aten::_fused_adam_") == 2, calls.names
    assert "aten::addcdiv_" not in calls.names and "aten::lerp_" not in calls.names
    torch.manual_seed(1)
    _, default = _run(plain, 1)
    moved = [name for name, value in fused.items() if not torch.equal(value, before[name])]
    assert "G.main.0.weight" in moved and "D.main.0.weight" in moved, moved
    for name, value in fused.items():
        torch.testing.assert_close(value, default[name], rtol=1e-5, atol=1e-7, msg=name)


@needs_ext
def test_a_reference_checkpoint_resumed_with_ext_steps_as_the_plain_adam_does(tmp_path):
    # a CPU reference run keeps G and D in NCHW, an ext run in channels_last: resuming the first with
    # --backend ext loads NCHW Adam moments beside channels_last weights, where torch 2.13's fused CPU
    # Adam moved the weights wrongly (gan_fast.optim); the trainer's step must be the for-loop Adam's
    writer = _trainer(tmp_path, "reference")
    _run(writer, 2)
    state = writer.state_dict()
    results = []
    for fused in (True, False):
        trainer = _trainer(tmp_path / str(fused), "ext")
        assert trainer.channels_last and not writer.channels_last
        trainer._load_state(copy.deepcopy(state))  # as from disk: nothing shared between the runs
        for opt in (trainer.optG, trainer.optD):
            for group in opt.param_groups:
                group.update(fused=fused or None, foreach=False)
        torch.manual_seed(5)
        results.append(_run(trainer, 1)[1])
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@needs_ext
def test_stacked_d_update_steps_as_the_sequential_one(tmp_path):
    # issue #16: ext on a CPU (fp32 and bf16) runs D's update on the real and the fake batch in one pass
    # (fuse.discriminator_loss, batch_chunks=2). In fp32 one step must give the sequential step's
    # statistics, every gradient (Adam's first moment after one step) and D's running statistics
    assert _trainer(tmp_path / "bf16", "ext", amp="bf16").stacked_d_update
    assert not _trainer(tmp_path / "ref", "reference", amp="bf16").stacked_d_update
    sequential, stacked = _trainer(tmp_path / "a", "ext", amp="off"), _trainer(tmp_path / "b", "ext", amp="off")
    assert stacked.stacked_d_update
    sequential.stacked_d_update = False
    torch.manual_seed(7)
    stats_a, state_a = _run(sequential, 1)
    torch.manual_seed(7)
    stats_b, state_b = _run(stacked, 1)
    torch.testing.assert_close(stats_b, stats_a, rtol=1e-5, atol=1e-6)
    for name in state_a:
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-5, atol=1e-6, msg=name)
    for opt_a, opt_b in ((sequential.optD, stacked.optD), (sequential.optG, stacked.optG)):
        for p_a, p_b in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
            m_a, m_b = opt_a.state[p_a]["exp_avg"], opt_b.state[p_b]["exp_avg"]
            torch.testing.assert_close(m_b, m_a, rtol=1e-4, atol=1e-5 * m_a.abs().max().item())
