import os

import pytest
import torch
from PIL import Image

from gan_fast.models import Generator
from gan_fast.sample import slerp, truncated_normal
from gan_fast.train import main as train_main

from .conftest import TINY, run_module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train_main([*TINY, "--channels", "3", "--steps", "2", "--out", out]) == 0
    return out


def test_sample_grid_individual_interpolation(run_dir, tmp_path):
    grid, ind, gif = tmp_path / "g.png", tmp_path / "ind", tmp_path / "i.gif"
    r = run_module("gan_fast.sample", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--n", "9",
                   "--out", str(grid), "--individual", str(ind), "--interpolate", "5",
                   "--interpolate-out", str(gif), "--truncation", "0.7", "--seed", "3")
    assert r.returncode == 0, r.stderr
    im = Image.open(grid)
    assert im.size == (3 * 18 + 2, 3 * 18 + 2) and im.mode == "RGB"  # 3x3 grid of 16px, 2px padding
    assert len(os.listdir(ind)) == 9 and Image.open(ind / "sample_00000.png").size == (16, 16)
    assert Image.open(gif).n_frames == 8  # 5 steps forth, 3 back
    # a run folder works as --checkpoint too, and the same seed gives the same images
    r2 = run_module("gan_fast.sample", "--checkpoint", run_dir, "--n", "9", "--out", str(tmp_path / "h.png"),
                    "--truncation", "0.7", "--seed", "3")
    assert r2.returncode == 0 and Image.open(tmp_path / "h.png").tobytes() == im.tobytes()


def test_loads_pytorch_examples_netG(tmp_path):
    # what pytorch/examples dcgan saves: torch.save(netG.state_dict(), 'netG_epoch_N.pth')
    netG = Generator(nz=100, ngf=8, nc=3, image_size=64)
    path = tmp_path / "netG.pth"
    torch.save(netG.state_dict(), path)
    r = run_module("gan_fast.sample", "--netG", str(path), "--image-size", "64", "--channels", "3",
                   "--nz", "100", "--ngf", "8", "--n", "4", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0, r.stderr
    r = run_module("gan_fast.sample", "--netG", str(path), "--image-size", "64", "--channels", "3",
                   "--nz", "100", "--ngf", "16", "--out", str(tmp_path / "s.png"))
    assert r.returncode == 2 and "don't match" in r.stderr and "Traceback" not in r.stderr


def test_sample_errors(tmp_path):
    r = run_module("gan_fast.sample", "--checkpoint", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_module("gan_fast.sample")
    assert r.returncode == 2 and "required" in r.stderr


def test_truncation_and_slerp():
    z = truncated_normal((1000,), 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    a, b = torch.randn(8), torch.randn(8)
    path = slerp(a, b, torch.linspace(0, 1, 4))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
