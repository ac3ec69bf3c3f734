import pytest
import torch

from gan_fast.models import build_models
from gan_fast.summary import layer_output_shape, summarize

from .conftest import run_module


@pytest.mark.parametrize("arch,up,size", [("dcgan", False, 16), ("dcgan", False, 64), ("dcgan", True, 32),
                                          ("mlp", False, 32)])
def test_formula_shapes_match_forward(arch, up, size):
    netG, netD = build_models(arch, 6, 3, 3, 3, size, g_upsample=up)
    rows = summarize(netG, (2, 6, 1, 1))
    assert rows[-1][2][-2:] == ((size, size) if arch == "dcgan" else (2, 3 * size * size)[-2:])
    assert sum(r[3] for r in rows) == sum(p.numel() for p in netG.parameters())
    rows = summarize(netD, (2, 3, size, size))
    assert sum(r[3] for r in rows) == sum(p.numel() for p in netD.parameters())


def test_transposed_conv_formula_with_output_padding_and_dilation():
    layer = torch.nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2)
    x = torch.randn(1, 2, 5, 7)
    assert layer_output_shape(layer, tuple(x.shape)) == tuple(layer(x).shape)
    conv = torch.nn.Conv2d(2, 3, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2))
    assert layer_output_shape(conv, tuple(x.shape)) == tuple(conv(x).shape)


def test_summary_cli(tiny_args):
    r = run_module("gan_fast.summary", "--image-size", "64", "--channels", "3", "--ngf", "64", "--ndf", "64",
                   "--nz", "100")
    assert r.returncode == 0, r.stderr
    assert "[2, 3, 64, 64]" in r.stdout and "3,576,704" in r.stdout  # pytorch/examples netG size
    r = run_module("gan_fast.summary", "--image-size", "20")
    assert r.returncode == 2 and "power of two" in r.stderr and "Traceback" not in r.stderr
