"""--cuda-graphs: the captured step replays what the eager step computes, and a resumed run keeps
the checkpoint's optimizer state whatever the device and --cuda-graphs of either run."""
import json
import os

import pytest
import torch

from gan_fast import backends
from gan_fast import checkpoint as ckpt
from gan_fast.config import TrainConfig
from gan_fast.cuda_graphs import warm_up
from gan_fast.train import Trainer, main

from .conftest import TINY, run_module

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _resumed_trainer(out, **overrides):
    """A Trainer resumed from OUT/checkpoint.pt, as --resume builds it; returns it and the state."""
    state = ckpt.load(os.path.join(out, ckpt.CHECKPOINT_NAME))
    cfg = TrainConfig.from_dict({**state["config"], "workers": 0, **overrides})
    return Trainer(cfg, state, log=lambda *a: None), state


def _assert_optimizer_state_equal(opt, saved):
    now = opt.state_dict()["state"]
    assert now.keys() == saved["state"].keys() and now
    for p, state in saved["state"].items():
        assert now[p].keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(now[p][k].cpu(), v.cpu()), (p, k)


def test_cuda_graphs_on_without_cuda_is_a_clear_error(tmp_path):
    r = run_module("gan_fast.train", *TINY, "--steps", "1", "--device", "cpu", "--cuda-graphs", "on",
                   "--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--cuda-graphs on: CUDA graphs need a CUDA device" in r.stderr


def test_auto_stays_eager_on_cpu(tmp_path):
    cfg = TrainConfig(image_size=16, nz=8, ngf=4, ndf=4, batch_size=8, steps=2, device="cpu",
                      out=str(tmp_path), workers=0)
    assert not Trainer(cfg, log=lambda *a: None).use_cuda_graphs


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("backend", ["reference", "triton", "ext"])
def test_graphed_steps_match_eager_steps(backend, tmp_path):
    reason = backends.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)

    def losses(graphs):
        cfg = TrainConfig(image_size=32, nz=16, ngf=8, ndf=8, batch_size=16, steps=6, device="cuda",
                          backend=backend, cuda_graphs=graphs, out=str(tmp_path / graphs), workers=0)
        trainer = Trainer(cfg, log=lambda *a: None)
        assert trainer.use_cuda_graphs == (graphs == "on")
        from gan_fast.cuda_graphs import GraphedStep
        step = GraphedStep(trainer) if graphs == "on" else trainer.train_step
        torch.manual_seed(0)
        batches = trainer.data.batches(cfg.batch_size, 0, 0)
        return torch.stack([step(next(batches)) for _ in range(6)]).cpu()

    eager, graphed = losses("off"), losses("on")
    # the noise comes from the same CUDA generator in both; capture changes no arithmetic
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-4)


def test_warm_up_leaves_a_resumed_trainer_exactly_as_the_checkpoint(tmp_path):
    """The capture's warm-up runs real steps and must put back everything: on a resumed run, Adam's
    moments and step counts of the checkpoint (the graphed path used to reset them to zeros)."""
    out = str(tmp_path)
    assert main([*TINY, "--steps", "3", "--out", out]) == 0
    trainer, state = _resumed_trainer(out)
    batch = next(trainer.data.batches(trainer.cfg.batch_size, 0, 3))
    warm_up(trainer, batch)
    _assert_optimizer_state_equal(trainer.optG, state["optG"])
    _assert_optimizer_state_equal(trainer.optD, state["optD"])
    for name, net in (("netG", trainer.netG), ("netD", trainer.netD)):
        for k, v in net.state_dict().items():
            assert torch.equal(v, state[name][k]), (name, k)
    # and it goes on exactly as a trainer that never warmed up (same noise, same updates)
    warmed = torch.stack([trainer.train_step(batch) for _ in range(2)])
    fresh, _ = _resumed_trainer(out)
    assert torch.equal(warmed, torch.stack([fresh.train_step(batch) for _ in range(2)]))


def test_warm_up_of_a_new_run_leaves_a_fresh_optimizer(tmp_path):
    cfg = TrainConfig(image_size=16, nz=8, ngf=4, ndf=4, batch_size=8, steps=2, device="cpu",
                      out=str(tmp_path), workers=0)
    trainer = Trainer(cfg, log=lambda *a: None)
    batch = next(trainer.data.batches(cfg.batch_size, 0))
    torch.manual_seed(0)
    warm_up(trainer, batch)
    warmed = torch.stack([trainer.train_step(batch) for _ in range(2)])
    fresh = Trainer(cfg, log=lambda *a: None)
    torch.manual_seed(0)
    assert torch.equal(warmed, torch.stack([fresh.train_step(batch) for _ in range(2)]))


def test_checkpoint_of_a_graphed_run_resumes_on_cpu(tmp_path):
    """A graphed CUDA run's optimizers are Adam(capturable=True), not fused, and load_state_dict brings
    the flags back: on a CPU capturable was an AssertionError in Adam, and the CPU's fused Adam was
    lost. Built here on the CPU by setting the flags."""
    common = [*TINY, "--log-every", "1", "--checkpoint-every", "100"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main([*common, "--steps", "4", "--out", full]) == 0
    assert main([*common, "--steps", "2", "--out", part]) == 0
    path = os.path.join(part, ckpt.CHECKPOINT_NAME)
    state = ckpt.load(path)
    for name in ("optG", "optD"):
        for group in state[name]["param_groups"]:
            group["capturable"], group["fused"] = True, None
    ckpt.save_checkpoint(state, path)
    assert main(["--resume", "--out", part, "--steps", "4", "--log-every", "1"]) == 0
    assert [r["loss_g"] for r in _rows(full)] == [r["loss_g"] for r in _rows(part)]
    resumed = ckpt.load(path)
    assert not any(g["capturable"] for n in ("optG", "optD") for g in resumed[n]["param_groups"])
    assert all(g["fused"] for n in ("optG", "optD") for g in resumed[n]["param_groups"])


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--channels-last"], ["--cuda-graphs", "off"],
                                   ["--backend", "ext"], ["--device", "cpu"]])
def test_execution_flags_may_change_on_resume(tmp_path, flags):
    if flags[:2] == ["--backend", "ext"] and backends.unavailable_reason("ext", "cpu"):
        pytest.skip(backends.unavailable_reason("ext", "cpu"))
    out = str(tmp_path)
    assert main([*TINY, "--steps", "2", "--out", out]) == 0
    assert main(["--resume", "--out", out, "--steps", "4", *flags]) == 0
    trainer, state = _resumed_trainer(out)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["netG"].values() if v.is_floating_point())


@pytest.mark.gpu
@CUDA
def test_graphed_resume_keeps_the_checkpoints_optimizer_state(tmp_path):
    """The GPU half of the warm-up test: capture on a resumed trainer leaves Adam's state as the
    checkpoint has it, and the replayed steps match eager steps from the same checkpoint."""
    out = str(tmp_path)
    assert main([*TINY, "--steps", "3", "--device", "cuda", "--cuda-graphs", "off", "--out", out]) == 0
    from gan_fast.cuda_graphs import GraphedStep

    trainer, state = _resumed_trainer(out, device="cuda", cuda_graphs="on")
    assert trainer.use_cuda_graphs
    batch = next(trainer.data.batches(trainer.cfg.batch_size, 0, 3))
    step = GraphedStep(trainer)
    torch.manual_seed(0)
    step._capture(batch)
    torch.cuda.synchronize()
    _assert_optimizer_state_equal(trainer.optG, state["optG"])
    _assert_optimizer_state_equal(trainer.optD, state["optD"])
    graphed = torch.stack([step(batch) for _ in range(4)]).cpu()
    eager, _ = _resumed_trainer(out, device="cuda", cuda_graphs="off")
    torch.manual_seed(0)
    eager_stats = torch.stack([eager.train_step(batch) for _ in range(4)]).cpu()
    torch.testing.assert_close(graphed, eager_stats, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@CUDA
def test_resume_across_devices_and_cuda_graphs(tmp_path):
    """Execution flags may change on resume: a graphed CUDA checkpoint (Adam capturable, step counts
    on the GPU) continues on the CPU, and a CPU checkpoint continues graphed on CUDA."""
    graphed, cpu = str(tmp_path / "graphed"), str(tmp_path / "cpu")
    assert main([*TINY, "--steps", "2", "--device", "cuda", "--cuda-graphs", "on", "--out", graphed]) == 0
    assert main(["--resume", "--out", graphed, "--steps", "4", "--device", "cpu", "--cuda-graphs", "off"]) == 0
    assert main([*TINY, "--steps", "2", "--device", "cpu", "--out", cpu]) == 0
    assert main(["--resume", "--out", cpu, "--steps", "4", "--device", "cuda", "--cuda-graphs", "on"]) == 0
    for out in (graphed, cpu):
        assert ckpt.load(os.path.join(out, ckpt.CHECKPOINT_NAME))["step"] == 4
