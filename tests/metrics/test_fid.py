"""gan_fast.metrics.fid offline: a small random network in Inception's place, a stand-in for
torch-fidelity; the cache of the real set's statistics; what is said when FID can't run."""
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gan_fast.datasets import load_dataset, to_model_input
from gan_fast.eval import Evaluator
from gan_fast.metrics.fid import (INCEPTION_WEIGHTS, FIDMetric, FIDUnavailable, InceptionFeatures,
                                  cached_reference_stats, extract, inception_extractor)
from gan_fast.models import Generator


class TinyExtractor:
    """A small randomly initialised CNN standing in for Inception."""

    name = "tiny-random"

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten())
        self.calls = 0

    @torch.no_grad()
    def __call__(self, x):
        self.calls += 1
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def image_folder(path, n=40, seed=0):
    path.mkdir()
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return str(path)


def test_reference_stats_are_cached_and_reused(tmp_path):
    data = image_folder(tmp_path / "imgs")
    cache = str(tmp_path / "cache")
    ds = load_dataset(data, 16, 3, torch.device("cpu"), 0, workers=0, log=lambda *a: None)
    ext = TinyExtractor()
    quiet = lambda *a: None  # noqa: E731
    first = cached_reference_stats(ext, data, 16, 3, ds, batch_size=16, cache_dir=cache, log=quiet)
    assert ext.calls == 3 and len(os.listdir(cache)) == 1 and first.n == 40
    again = cached_reference_stats(ext, data, 16, 3, ds, cache_dir=cache, log=quiet)
    assert ext.calls == 3  # read from the .npz, not recomputed
    np.testing.assert_array_equal(first.sigma, again.sigma)
    # the statistics are those of all the images
    feats = extract(ext, [to_model_input(ds.images)])
    np.testing.assert_allclose(first.mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    # another resolution is another entry
    ds32 = load_dataset(data, 32, 3, torch.device("cpu"), 0, workers=0, log=quiet)
    cached_reference_stats(ext, data, 32, 3, ds32, cache_dir=cache, log=quiet)
    assert len(os.listdir(cache)) == 2
    # FID of the real set against itself ~0; of a generator far from it, large
    metric = FIDMetric(ext, first)
    assert metric([to_model_input(ds.images)])["fid"] < 1e-6
    torch.manual_seed(0)
    g = Evaluator([metric], n=64)(Generator(nz=8, ngf=4, nc=3, image_size=16), 8)
    assert g["fid"] > 0.01 and set(g) == {"fid", "kid", "kid_std"}


def fake_torch_fidelity():
    """What gan_fast uses of torch-fidelity, with a small random network in Inception's place."""

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert features_list == ["2048"]
            torch.load(feature_extractor_weights_path, weights_only=True)  # the path gan_fast found
            self.net = TinyExtractor().net

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return (self.net(x.float() / 127.5 - 1),)

    return types.SimpleNamespace(FeatureExtractorInceptionV3=FakeInception)


def test_missing_torch_fidelity_or_weights_say_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as when not installed
    with pytest.raises(FIDUnavailable, match=r"torch-fidelity is not installed \(pip install"):
        inception_extractor()
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake_torch_fidelity())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FIDUnavailable, match="TORCH_HOME.*--fid-weights"):
        inception_extractor()
    with pytest.raises(FIDUnavailable, match="no such file"):
        inception_extractor(str(tmp_path / "nope.pth"))
    # on disk where torch-fidelity would have downloaded it: found offline
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({}, hub / INCEPTION_WEIGHTS)
    assert isinstance(inception_extractor(), InceptionFeatures)
