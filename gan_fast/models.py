"""Reference GAN models: DCGAN (Radford et al. 2015, arXiv:1511.06434) and the vanilla MLP GAN
(Goodfellow et al. 2014).

The DCGAN layout follows pytorch/examples dcgan/main.py: each network is one ``nn.Sequential`` named
``main``, so a pytorch/examples ``netG.pth`` (keys ``main.N.weight``) loads into ``Generator`` at
image size 64. The discriminator ends in a logit, not a Sigmoid: the loss is BCE-with-logits, which
stays finite under autocast where Sigmoid + BCELoss saturates. Sigmoid has no parameters, so the
state_dict keys are the same as pytorch/examples'.

These modules are the reference every fused backend is judged against; ``gan_fast.fuse`` swaps runs
of their layers for fused ones that hold the same Parameters.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ARCHS = ("dcgan", "mlp")
LEAKY_SLOPE = 0.2


def check_image_size(image_size: int) -> int:
    """Number of stride-2 stages between 4x4 and ``image_size`` (log2(size) - 2); raises ValueError."""
    if image_size < 16 or image_size > 256 or image_size & (image_size - 1):
        raise ValueError(f"image size must be a power of two from 16 to 256, got {image_size}")
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    """DCGAN generator: z [N, nz, 1, 1] -> image [N, nc, S, S] in [-1, 1].

    ``upsample=True`` replaces every stride-2 ConvTranspose2d by nearest x2 upsampling followed by a
    3x3 Conv2d (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts", distill.pub): each
    output pixel then sees the same number of taps, which removes the checkerboard pattern.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64,
                 upsample: bool = False):
        super().__init__()
        stages = check_image_size(image_size)
        self.nz, self.image_size, self.nc = nz, image_size, nc
        width = ngf * 2 ** (stages - 1)
        layers: list[nn.Module] = [
            # 1x1 latent -> 4x4: a k4 s1 p0 transposed conv, i.e. a GEMM. state size: (width) x 4 x 4
            nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(stages - 1):  # each stage doubles the size and halves the width
            layers += [*_up_conv(width, width // 2, upsample), nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # state size: (ngf) x S/2 x S/2 -> (nc) x S x S
        layers += [*_up_conv(width, nc, upsample), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


def _up_conv(cin: int, cout: int, upsample: bool) -> list[nn.Module]:
    if upsample:
        return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)]


class Discriminator(nn.Module):
    """DCGAN discriminator: image [N, nc, S, S] -> logits [N]."""

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        stages = check_image_size(image_size)
        width = ndf
        layers: list[nn.Module] = [
            # no BatchNorm on D's input layer (Radford et al. sec. 3). state size: (ndf) x S/2 x S/2
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        for _ in range(stages - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            width *= 2
        # state size: (width) x 4 x 4 -> 1 x 1 x 1, the logit
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


class MLPGenerator(nn.Module):
    """Vanilla GAN generator: Linear-BatchNorm1d-LeakyReLU stacks (widths 4, 8, 16 x ngf), then
    Linear-Tanh to the flattened image."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 1, image_size: int = 32):
        super().__init__()
        check_image_size(image_size)
        self.nz, self.nc, self.image_size = nz, nc, image_size
        layers: list[nn.Module] = []
        width_in = nz
        for mult in (4, 8, 16):
            layers += [nn.Linear(width_in, ngf * mult), nn.BatchNorm1d(ngf * mult),
                       nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            width_in = ngf * mult
        layers += [nn.Linear(width_in, nc * image_size * image_size), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.reshape(z.shape[0], self.nz)).view(-1, self.nc, self.image_size, self.image_size)


class MLPDiscriminator(nn.Module):
    """Vanilla GAN discriminator: Linear-LeakyReLU stacks (widths 8, 4 x ndf) to one logit."""

    def __init__(self, ndf: int = 64, nc: int = 1, image_size: int = 32):
        super().__init__()
        check_image_size(image_size)
        self.main = nn.Sequential(
            nn.Linear(nc * image_size * image_size, ndf * 8), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Linear(ndf * 8, ndf * 4), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Linear(ndf * 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x.flatten(1)).view(-1)


def init_weights(module: nn.Module) -> None:
    """DCGAN init (Radford et al. sec. 4): weights N(0, 0.02); BatchNorm gamma N(1, 0.02), beta 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(arch: str, nz: int, ngf: int, ndf: int, channels: int, image_size: int,
                 g_upsample: bool = False) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for ``arch``, DCGAN-initialised with the current RNG."""
    if arch == "dcgan":
        netG = Generator(nz, ngf, channels, image_size, upsample=g_upsample)
        netD = Discriminator(ndf, channels, image_size)
    elif arch == "mlp":
        if g_upsample:
            raise ValueError("--g-upsample applies to --arch dcgan only")
        netG = MLPGenerator(nz, ngf, channels, image_size)
        netD = MLPDiscriminator(ndf, channels, image_size)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    netG.apply(init_weights)
    netD.apply(init_weights)
    return netG, netD
