"""gan_fast.fuse: pattern matching, state_dict identity, parity of fused models with the reference
modules (outputs, every gradient, running statistics, train and eval), and 10 training steps."""
import copy

import pytest
import torch
from torch import nn

from gan_fast import backends
from gan_fast.fuse import (FoldedBatchNorm, FusedConv2dBatchNormLeakyReLU, FusedConv2dLeakyReLU,
                           FusedConvTranspose2dBatchNormReLU, FusedConvTranspose2dTanh, FusedDHead,
                           FusedLinearBatchNormLeakyReLU, FusedUpsampleConv2dBatchNormReLU,
                           can_stack_batches, discriminator_loss, fuse, fused_modules)
from gan_fast.models import build_models

from .conftest import DEVICE, needs_ext


def _backend_param(name):
    if name == "ext":  # a missing extension fails these, unless GAN_FAST_NO_EXT=1: tests/conftest.py
        return pytest.param(name, marks=needs_ext)
    reason = backends.unavailable_reason(name, DEVICE)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [_backend_param("triton"), _backend_param("ext")]
RTOL = 1e-4  # the Triton interpreter and oneDNN sum in different orders; fp32 throughout


class ExamplesGenerator(nn.Module):
    """pytorch/examples dcgan/main.py's Generator layout (widths scaled down), written out here so
    the test does not depend on gan_fast.models."""

    def __init__(self, nz=6, ngf=4, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


class ExamplesDiscriminator(nn.Module):
    def __init__(self, ndf=4, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False))

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def _randomize(model):
    """Random BatchNorm affine parameters and running statistics (never the defaults 1 and 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.to(DEVICE)


def _close(got, want, name, min_scale=1e-6):
    scale = max(want.detach().abs().max().item(), min_scale)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"{name}: {m}")


def _compare_models(reference, fused, make_input, steps=2, loss=None):
    """Train-mode steps then one eval step; after each, outputs, every parameter gradient and every
    buffer must agree."""
    for training in [True] * steps + [False]:
        reference.train(training)
        fused.train(training)
        x = make_input()
        x_ref = x.detach().clone().requires_grad_()
        x_fused = x.detach().clone().requires_grad_()
        y_ref, y_fused = reference(x_ref), fused(x_fused)
        _close(y_fused, y_ref, f"output (training={training})")
        dy = torch.randn_like(y_ref)
        (y_ref * dy).sum().backward()
        (y_fused * dy).sum().backward()
        _close(x_fused.grad, x_ref.grad, "input grad")
        ref_grads = {name: p.grad for name, p in reference.named_parameters()}
        for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
            # A Linear bias before training-mode BatchNorm has an exact gradient of 0, so both sides
            # hold only the rounding of a sum of the pre-BN gradients, which the layer's weight
            # gradient also sums (times inputs of order 1): that magnitude is the scale to judge by.
            sibling = ref_grads.get(name[:-len("bias")] + "weight") if name.endswith("bias") else None
            min_scale = sibling.abs().max().item() if sibling is not None else 1e-6
            _close(p_fused.grad, p_ref.grad, f"d {name} (training={training})", min_scale)
            p_ref.grad = p_fused.grad = None
        for (name, b_ref), b_fused in zip(reference.named_buffers(), fused.buffers()):
            _close(b_fused.float(), b_ref.float(), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_models_state_dict_and_parity(backend):
    torch.manual_seed(0)
    netG, netD = _randomize(ExamplesGenerator()), _randomize(ExamplesDiscriminator())
    for net, make_input in ((netG, lambda: torch.randn(3, 6, 1, 1, device=DEVICE)),
                            (netD, lambda: torch.randn(2, 3, 16, 16, device=DEVICE))):
        params_before = dict(net.named_parameters())
        buffers_before = dict(net.named_buffers())
        keys_before = list(net.state_dict())
        reference = copy.deepcopy(net)
        assert fuse(net, backend) is net
        # the same keys and the very same tensor objects
        assert list(net.state_dict()) == keys_before
        assert all(p is params_before[n] for n, p in net.named_parameters())
        assert all(b is buffers_before[n] for n, b in net.named_buffers())
        assert len(list(net.parameters())) == len(params_before)
        _compare_models(reference, net, make_input)
    kinds = [type(m) for m in fused_modules(netG)] + [type(m) for m in fused_modules(netD)]
    assert kinds == [FusedConvTranspose2dBatchNormReLU] * 3 + [FusedConvTranspose2dTanh,
                                                               FusedConv2dLeakyReLU,
                                                               FusedConv2dBatchNormLeakyReLU, FusedDHead]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch, upsample", [("dcgan", True), ("mlp", False)])
def test_gan_fast_models_parity(backend, arch, upsample):
    torch.manual_seed(1)
    netG, netD = build_models(arch, 5, 4, 4, 3 if arch == "dcgan" else 1, 16, g_upsample=upsample)
    netG, netD = _randomize(netG), _randomize(netD)
    refG, refD = copy.deepcopy(netG), copy.deepcopy(netD)
    fuse(netG, backend)
    fuse(netD, backend)
    expected = {FusedUpsampleConv2dBatchNormReLU} if upsample else {FusedLinearBatchNormLeakyReLU}
    assert expected <= {type(m) for m in fused_modules(netG)}
    _compare_models(refG, netG, lambda: torch.randn(3, 5, 1, 1, device=DEVICE))
    _compare_models(refD, netD, lambda: torch.randn(2, netD_channels(arch), 16, 16, device=DEVICE))


def netD_channels(arch):
    return 3 if arch == "dcgan" else 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_discriminator_loss_uses_the_fused_head(backend):
    torch.manual_seed(2)
    net = _randomize(ExamplesDiscriminator())
    reference = copy.deepcopy(net)
    fuse(net, backend)
    x = torch.randn(3, 3, 16, 16, device=DEVICE)
    for target in (torch.ones(3, device=DEVICE), torch.tensor([0.9, 0.1, 0.5], device=DEVICE)):
        loss, logits = discriminator_loss(net, x, target)
        loss_ref, logits_ref = discriminator_loss(reference, x, target)
        _close(loss, loss_ref, "loss")
        _close(logits.float(), logits_ref, "logits")
        loss.backward()
        loss_ref.backward()
        for (name, p_ref), p in zip(reference.named_parameters(), net.parameters()):
            _close(p.grad, p_ref.grad, f"d {name}")
            p.grad = p_ref.grad = None


@needs_ext
def test_discriminator_loss_on_stacked_batches_is_one_call_per_batch():
    # issue #16: D's update on the real and the fake batch in one pass (batch_chunks=2) normalizes each
    # batch with its own statistics and updates the running ones once per batch, in order; the loss is
    # the mean over both and its gradient the mean of the two calls' (whole-batch statistics would fail)
    torch.manual_seed(5)
    net = fuse(_randomize(ExamplesDiscriminator(ndf=5)), "ext")
    twin = copy.deepcopy(net)
    assert can_stack_batches(net)
    a, b = torch.randn(3, 3, 16, 16, device=DEVICE) * 2 + 1, torch.randn(3, 3, 16, 16, device=DEVICE)
    ta, tb = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    for _ in range(2):  # the running statistics of the second pass start from the first's
        loss, logits = discriminator_loss(net, torch.cat([a, b]), torch.cat([ta, tb]), batch_chunks=2)
        loss.backward()
        (la, logits_a), (lb, logits_b) = discriminator_loss(twin, a, ta), discriminator_loss(twin, b, tb)
        ((la + lb) / 2).backward()
        _close(loss, (la + lb) / 2, "loss")
        _close(logits, torch.cat([logits_a, logits_b]), "logits")
        for (name, p_twin), p in zip(twin.named_parameters(), net.parameters()):
            _close(p.grad, p_twin.grad, f"d {name}")
        for (name, b_twin), b_net in zip(twin.named_buffers(), net.buffers()):
            _close(b_net.float(), b_twin.float(), name)
    assert all(m.batch_chunks == 1 for m in fused_modules(net) if isinstance(m, FusedConv2dBatchNormLeakyReLU))


@needs_ext
def test_only_discriminators_without_batch_mixing_layers_stack_batches():
    def fused_d(**bn):
        net = ExamplesDiscriminator()
        net.main[3] = nn.BatchNorm2d(8, **bn)
        return fuse(net, "ext")

    assert not can_stack_batches(ExamplesDiscriminator())  # unfused: no fused head
    assert can_stack_batches(fused_d())
    assert not can_stack_batches(fused_d(momentum=None))  # a cumulative average counts calls
    dropout = fused_d()
    dropout.main.insert(2, nn.Dropout(0.1))
    assert not can_stack_batches(dropout)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError, match="batch_chunks > 1 needs a discriminator"):
        discriminator_loss(fused_d(momentum=None), x, torch.ones(4), batch_chunks=2)
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="batch_chunks must be a positive int dividing the batch"):
            discriminator_loss(fused_d(), x, torch.ones(4), batch_chunks=bad)
    with pytest.raises(ValueError, match="batch_chunks must be a positive int dividing the batch"):
        fused_d().main[2].ops.conv2d_bn_leaky_relu(
            x, torch.randn(8, 3, 4, 4), None, None, None, None, stride=2, padding=1, training=True,
            momentum=0.1, eps=1e-5, negative_slope=0.2, batch_chunks=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_and_checkpoints_survive_fuse(backend):
    torch.manual_seed(3)
    net = _randomize(ExamplesGenerator())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)  # built before fuse
    reference_state = copy.deepcopy(net.state_dict())
    fuse(net, backend)
    z = torch.randn(4, 6, 1, 1, device=DEVICE)
    before = net(z).detach()
    net(z).square().mean().backward()
    opt.step()
    assert not torch.equal(net(z).detach(), before), "the optimizer no longer moves the fused weights"
    # a fused model's checkpoint loads into the reference model and back
    plain = _randomize(ExamplesGenerator())
    plain.load_state_dict(net.state_dict())
    net.eval()
    plain.eval()
    _close(net(z), plain(z), "reference loaded from fused")
    net.load_state_dict(reference_state)
    assert torch.equal(net.main[1].running_mean, reference_state["main.1.running_mean"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_bookkeeping(backend):
    """momentum=None (cumulative average), track_running_stats=False and num_batches_tracked behave
    as in nn.BatchNorm2d."""
    torch.manual_seed(4)
    for bn_kwargs in ({"momentum": None}, {"track_running_stats": False}, {"affine": False}):
        net = nn.Sequential(nn.Conv2d(3, 5, 3, 1, 1, bias=False), nn.BatchNorm2d(5, **bn_kwargs),
                            nn.LeakyReLU(0.1)).to(DEVICE)
        reference = copy.deepcopy(net)
        fuse(net, backend)
        assert isinstance(net[0], FusedConv2dBatchNormLeakyReLU) and isinstance(net[1], FoldedBatchNorm)
        for training in (True, True, True, False):
            net.train(training)
            reference.train(training)
            x = torch.randn(2, 3, 5, 5, device=DEVICE)
            _close(net(x), reference(x), f"{bn_kwargs} output")
            for (name, b_ref), b in zip(reference.named_buffers(), net.buffers()):
                _close(b.float(), b_ref.float(), f"{bn_kwargs} {name}")


def test_layers_that_match_no_pattern_stay():
    layers = [nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),  # bias before BN
              nn.Conv2d(4, 4, 3, dilation=2), nn.LeakyReLU(0.2),                   # dilated
              nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),         # not in the op set
              nn.Conv2d(4, 4, 3), nn.LeakyReLU(-0.1),                              # negative slope
              nn.Conv2d(4, 1, 3, padding=1)]                                       # padded last conv
    net = nn.Sequential(*layers)
    backend = "ext" if backends.is_available("ext") else "triton"
    if not backends.is_available(backend, DEVICE):
        pytest.skip("no fused backend available here")
    fuse(net, backend)
    assert list(net) == layers


def test_fuse_argument_errors():
    with pytest.raises(ValueError, match="triton, ext or auto"):
        fuse(nn.Sequential(), "reference")
    with pytest.raises(ValueError, match="triton, ext or auto"):
        fuse(nn.Sequential(), "cudnn")


def test_fuse_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device="cpu": (
        None if name == "reference" else f"{name} is broken"))
    with pytest.raises(backends.BackendUnavailable, match="ext is broken"):
        fuse(ExamplesGenerator(), "ext")
    with pytest.warns(UserWarning, match="ext is broken"):
        net = fuse(ExamplesGenerator(), "auto")
    assert not fused_modules(net)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_match_reference(backend, tmp_path):
    """The trainer's own step (D on real and fake, G through D, both Adam steps) for several steps from
    one seed: the fused backend's losses follow the reference's. Triton runs 5 steps, the others 10: its
    CPU interpreter takes ~13 s a step, which CI's 30 minutes can't spare."""
    from gan_fast.config import TrainConfig
    from gan_fast.train import Trainer

    def losses(name):
        cfg = TrainConfig(image_size=16, nz=8, ngf=4, ndf=4, batch_size=8, steps=steps, device=DEVICE,
                          backend=name, out=str(tmp_path / name), workers=0, amp="off")  # fp32 both
        trainer = Trainer(cfg, log=lambda *a: None)
        assert (trainer.backend == name) and (name == "reference" or fused_modules(trainer.netD))
        rows = []
        for real in trainer.data.batches(cfg.batch_size, 0, 0):
            rows.append(trainer.train_step(real))
            if len(rows) == steps:
                break
        return torch.stack(rows).cpu()

    steps = 5 if backend == "triton" and DEVICE == "cpu" else 10
    reference, fused = losses("reference"), losses(backend)
    # early steps agree to float rounding; GAN training amplifies differences step by step, so the
    # whole trajectory is held to a looser (still tight) bound
    torch.testing.assert_close(fused[:3], reference[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, reference, rtol=2e-3, atol=1e-4)
