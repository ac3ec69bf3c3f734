import pytest
import torch
from torch import nn

from gan_fast.models import (Discriminator, Generator, MLPDiscriminator, MLPGenerator, build_models,
                             check_image_size)


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("nc", [1, 3])
def test_dcgan_shapes_every_size(size, nc):
    netG, netD = build_models("dcgan", nz=5, ngf=2, ndf=2, channels=nc, image_size=size)
    z = torch.randn(3, 5, 1, 1)
    x = netG(z)
    assert x.shape == (3, nc, size, size)
    assert x.abs().max() <= 1
    assert netD(x).shape == (3,)


def test_upsample_generator_and_mlp_shapes():
    for arch, up in [("dcgan", True), ("mlp", False)]:
        netG, netD = build_models(arch, nz=7, ngf=3, ndf=3, channels=3, image_size=32, g_upsample=up)
        x = netG(torch.randn(2, 7, 1, 1))
        assert x.shape == (2, 3, 32, 32)
        assert netD(x).shape == (2,)
    netG, _ = build_models("dcgan", 7, 3, 3, 1, 32, g_upsample=True)
    kinds = [type(m) for m in netG.main]
    assert nn.Upsample in kinds and nn.ConvTranspose2d in kinds[:1] and kinds.count(nn.ConvTranspose2d) == 1


def test_pytorch_examples_layout_and_keys():
    # pytorch/examples dcgan at 64x64: main.0 ConvT(nz, ngf*8), ..., main.12 ConvT(ngf, nc), Tanh
    netG = Generator(nz=100, ngf=64, nc=3, image_size=64)
    assert netG.main[0].weight.shape == (100, 512, 4, 4)
    assert netG.main[12].weight.shape == (64, 3, 4, 4)
    assert isinstance(netG.main[13], nn.Tanh)
    netD = Discriminator(ndf=64, nc=3, image_size=64)
    assert netD.main[0].weight.shape == (64, 3, 4, 4)
    assert isinstance(netD.main[1], nn.LeakyReLU) and netD.main[1].negative_slope == 0.2
    assert netD.main[11].weight.shape == (1, 512, 4, 4)
    assert sorted(k for k in netD.state_dict() if k.endswith("running_mean")) == \
        ["main.3.running_mean", "main.6.running_mean", "main.9.running_mean"]


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    netG, netD = build_models("dcgan", 100, 64, 64, 3, 64)
    w = torch.cat([m.weight.flatten() for m in netG.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    gamma = torch.cat([m.weight for m in netD.modules() if isinstance(m, nn.BatchNorm2d)])
    beta = torch.cat([m.bias for m in netD.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(gamma.mean() - 1) < 0.01 and abs(gamma.std() - 0.02) < 0.005
    assert torch.count_nonzero(beta) == 0


@pytest.mark.parametrize("bad", [8, 12, 48, 512])
def test_bad_image_size(bad):
    with pytest.raises(ValueError, match="power of two from 16 to 256"):
        check_image_size(bad)


def test_mlp_modules():
    netG, netD = MLPGenerator(nz=10, ngf=4, nc=1, image_size=16), MLPDiscriminator(ndf=4, nc=1, image_size=16)
    kinds = [type(m) for m in netG.main]
    assert kinds[:3] == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU]
    assert netD(netG(torch.randn(4, 10))).shape == (4,)
    with pytest.raises(ValueError, match="dcgan only"):
        build_models("mlp", 10, 4, 4, 1, 16, g_upsample=True)
