"""The analytic FLOP counts of gan_fast.flops against torch.utils.flop_counter.FlopCounterMode, which
counts what the reference modules actually dispatch. Not a benchmark: ``pytest bench/test_flops.py``
(``--benchmark-only`` skips it)."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gan_fast.bench.cases import SETTINGS, build_model, op_cases, step_case
from gan_fast.bench.runners import DHeadLoss
from gan_fast.config import TrainConfig
from gan_fast.flops import train_step_flops
from gan_fast.train import Trainer


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_train_step_flops_match_the_flop_counter(arch):
    cfg = TrainConfig(arch=arch, image_size=16, nz=8, ngf=4, ndf=4, batch_size=8, device="cpu", workers=0)
    trainer = Trainer(cfg.validate(), log=lambda *a, **k: None)
    real = next(trainer.data.batches(cfg.batch_size, 0))
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(real)
    expected = train_step_flops(trainer.netG, trainer.netD, cfg.batch_size, cfg.nz)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("case", op_cases("tiny", 8) + op_cases("digits", 4),
                         ids=lambda c: c.id)
def test_op_case_flops_match_the_flop_counter(case):
    net = build_model(case.model, SETTINGS[case.setting])
    run = nn.Sequential(*list(net.main)[case.layer:case.layer + case.span])
    x = torch.randn(case.in_shape, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        if case.op == "d_head_bce_with_logits":
            DHeadLoss(run[0])(x, torch.ones(case.batch)).backward()
        else:
            y = run(x)
            y.backward(torch.randn_like(y))
    assert counter.get_total_flops() == case.flops


@pytest.mark.parametrize("setting,batch", [("tiny", 8), ("digits", 4)])
def test_step_case_flops_match_the_flop_counter(setting, batch):
    # The step case's FLOPs against what a real Trainer.train_step of that setting dispatches (not
    # against train_step_flops, which step_case itself calls: that comparison could not fail).
    s = SETTINGS[setting]
    case = step_case(setting, batch)
    cfg = TrainConfig(arch="dcgan", image_size=s.image_size, channels=s.channels, nz=s.nz, ngf=s.ngf,
                      ndf=s.ndf, batch_size=batch, device="cpu", workers=0)
    trainer = Trainer(cfg.validate(), log=lambda *a, **k: None)
    real = next(trainer.data.batches(cfg.batch_size, 0))
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(real)
    assert case.flops == counter.get_total_flops() > 0
