"""FID and KID (``--fid``, any data): Inception-v3 pool3 features through torch-fidelity (only its
feature extractor is used; the distances are gan_fast.metrics.distances), against the real set's
statistics, computed once and cached."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from .. import files
from ..datasets import InMemoryImages, to_model_input
from ..images import quantize
from .distances import RunningStats, feature_stats, frechet_distance, kernel_inception_distance

KID_REAL_MAX = 2000  # real features kept for KID (its kernel matrices grow with the square)
STATS_VERSION = 1  # part of the cache key: bump when the way statistics are computed changes
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


# ---------------------------------------------------------------------------------- feature extractors

class FeatureExtractor(Protocol):
    """Images [N, C, H, W] in [-1, 1] -> features [N, D]. ``name`` keys the cache of real statistics."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """Inception-v3 pool3 (2048-d) features of torch-fidelity's TF-compatible network (the one FID is
    defined with); gray images are repeated to three channels, everything is resized to 299 inside."""

    name = "inception-v3-2048"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        u8 = quantize(images)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        out = self.model(u8)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()


class FIDUnavailable(RuntimeError):
    """FID can't be computed here; the message says why and how to fix it."""


def find_inception_weights(path: str | None = None) -> str:
    """--fid-weights PATH, else torch-fidelity's file in torch.hub's checkpoints folder
    ($TORCH_HOME/hub/checkpoints, where torch-fidelity itself downloads it); FIDUnavailable if absent.
    Never downloads: a run must not hang on a network that isn't there."""
    if path is not None:
        if not os.path.isfile(path):
            raise FIDUnavailable(f"--fid-weights {path}: no such file")
        return path
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    if os.path.isfile(hub):
        return hub
    raise FIDUnavailable(f"the Inception weights are not on disk (looked for {hub}; TORCH_HOME sets that "
                         f"folder): download {INCEPTION_URL} there, or pass --fid-weights PATH")


def inception_extractor(weights: str | None = None, device: torch.device | str = "cpu") -> InceptionFeatures:
    try:
        import torch_fidelity
    except ImportError:
        raise FIDUnavailable("torch-fidelity is not installed (pip install 'gan_fast[fid]')") from None
    path = find_inception_weights(weights)
    try:
        model = torch_fidelity.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    except Exception as e:  # noqa: BLE001 - a wrong or corrupt weights file, an incompatible version
        raise FIDUnavailable(f"can't load the Inception weights {path}: {e}") from None
    return InceptionFeatures(model.to(device).eval())


@torch.no_grad()
def extract(extractor: Callable, batches: Iterable[torch.Tensor]) -> np.ndarray:
    return np.concatenate([extractor(x).detach().float().cpu().numpy() for x in batches])


# ------------------------------------------------------------------------- the real set's statistics

def real_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Every image of a training set (gan_fast.datasets), in file order, in [-1, 1]."""
    if isinstance(data, InMemoryImages):
        for start in range(0, len(data), batch_size):
            yield to_model_input(data.images[start:start + batch_size])
        return
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, num_workers=data.workers)
    for x, ok in loader:
        if bool(ok.any()):
            yield to_model_input(x[ok].to(data.device))


@dataclass
class ReferenceStats:
    """What FID and KID need of the real set: its feature mean and covariance, and a fixed random
    subset of its features (KID works on the features themselves)."""

    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray
    n: int


def compute_reference_stats(extractor: Callable, batches: Iterable[torch.Tensor], n_total: int,
                            kid_max: int = KID_REAL_MAX, seed: int = 0) -> ReferenceStats:
    """One pass over the real images: streaming mean/covariance, plus the features of kid_max images
    chosen by a seeded permutation of their positions."""
    keep = np.zeros(max(n_total, 1), dtype=bool)
    keep[np.random.RandomState(seed).permutation(n_total)[:kid_max]] = True
    stats, kid, position = RunningStats(), [], 0
    with torch.no_grad():
        for x in batches:
            f = extractor(x).detach().float().cpu().numpy().astype(np.float64)
            stats.add(f)
            kid.append(f[keep[position:position + len(f)]])
            position += len(f)
    mu, sigma = stats.result()
    return ReferenceStats(mu, sigma, np.concatenate(kid).astype(np.float32), stats.n)


def default_cache_dir() -> str:
    """$GAN_FAST_CACHE, else $XDG_CACHE_HOME/gan_fast, else ~/.cache/gan_fast."""
    if os.environ.get("GAN_FAST_CACHE"):
        return os.environ["GAN_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gan_fast")


def stats_cache_path(data: str | None, image_size: int, channels: int, extractor_name: str, n_images: int,
                     cache_dir: str | None = None) -> tuple[str, str]:
    """(cache file, key) for a real set's statistics. The key names everything the statistics depend
    on: the data (absolute path, and the number of images it holds, so adding or removing files
    invalidates it), the resolution and channels it is loaded at, and the feature extractor."""
    source = "embedded-digits" if data is None else os.path.abspath(data)
    key = json.dumps({"data": source, "image_size": image_size, "channels": channels, "n": n_images,
                      "extractor": extractor_name, "version": STATS_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = "digits" if data is None else (os.path.basename(os.path.normpath(data)) or "data")
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    name = f"{stem}-{image_size}px-{channels}ch-{extractor_name}-{digest}.npz"
    return os.path.join(cache_dir or os.path.join(default_cache_dir(), "fid_stats"), name), key


def cached_reference_stats(extractor: FeatureExtractor, data_path: str | None, image_size: int,
                           channels: int, dataset, batch_size: int = 100, cache_dir: str | None = None,
                           log=print) -> ReferenceStats:
    """The real set's ReferenceStats, from the cache when it holds them (computed once per data set,
    resolution, channel count and extractor), else computed and written atomically."""
    path, key = stats_cache_path(data_path, image_size, channels, extractor.name, len(dataset), cache_dir)
    if os.path.isfile(path):
        try:
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return ReferenceStats(z["mu"], z["sigma"], z["kid_features"], int(z["n"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable (a crash mid-write of an older version, a foreign file): recompute
    log(f"eval: computing the {extractor.name} statistics of the real images ({len(dataset)}), once; "
        f"cached in {path}")
    stats = compute_reference_stats(extractor, real_batches(dataset, batch_size), len(dataset))
    # durable=False: a cache file lost to a power cut (or left unreadable) is computed again
    files.write_atomic(path, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma,
                                                kid_features=stats.kid_features, n=stats.n,
                                                key=np.array(key)), durable=False)
    return stats


class FIDMetric:
    """FID and KID of samples against a real set's ReferenceStats, with any feature extractor."""

    def __init__(self, extractor: Callable, reference: ReferenceStats):
        self.extractor, self.reference = extractor, reference

    def __call__(self, batches: Iterable[torch.Tensor]) -> dict:
        feats = extract(self.extractor, batches).astype(np.float64)
        ref = self.reference
        kid, kid_std = kernel_inception_distance(ref.kid_features, feats)
        return {"fid": frechet_distance(ref.mu, ref.sigma, *feature_stats(feats)), "kid": kid,
                "kid_std": kid_std}
