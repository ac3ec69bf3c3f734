"""Sample quality: ``python -m gan_fast.eval --checkpoint RUN [--n 1000] [--ema] [--fid]``.

Two families of metrics over features of real and generated images:

- **digits** (offline, for runs on the embedded digits): the features are the 64-d penultimate layer
  of the small digit classifier shipped in gan_fast/assets (``gan_fast.classifier``), the real set is
  its 359 held-out digits. Reported: the Frechet distance between the two feature distributions
  (``digits_fd``, FID's formula with the classifier in Inception's place), the class coverage
  (``digits_coverage``: the entropy of the histogram of predicted classes divided by ln 10, so 1 means
  all ten digits equally often and 0 one digit only, i.e. mode collapse) and the mean classifier
  confidence (``digits_confidence``: the mean of the largest softmax probability; low for blurry or
  ambiguous samples).
- **FID and KID** (``--fid``, any data): Inception-v3 pool3 features through torch-fidelity (only its
  feature extractor is used; the distances are computed here). FID is the Frechet distance of
  Heusel et al. 2017 ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"); KID the unbiased polynomial-kernel MMD^2 of Binkowski et al. 2018 ("Demystifying MMD
  GANs"), averaged over random subsets. The real set's statistics are computed once and cached.

The distances are plain numpy over features from any callable that maps images in [-1, 1] to an
[N, D] tensor (``FeatureExtractor``), which is how the tests check them with a small random network.
Reference values of the digits metric are in docs/quality.md (``python -m gan_fast.eval --references``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .config import ArgumentParser, UserError, run_cli
from .images import quantize

DIGITS_KEYS = ("digits_fd", "digits_coverage", "digits_confidence")
FID_KEYS = ("fid", "kid", "kid_std")
EVAL_SEED = 0  # the noise of every evaluation: the same samples each time, so curves are not noisy
KID_SUBSETS = 100  # torch-fidelity's defaults, so KIDs compare with those reported elsewhere
KID_SUBSET_SIZE = 1000
KID_REAL_MAX = 2000  # real features kept for KID (its kernel matrices grow with the square)
STATS_VERSION = 1  # part of the cache key: bump when the way statistics are computed changes
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


# ------------------------------------------------------------------------------------------ the math

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


class RunningStats:
    """Mean and covariance accumulated batch by batch (float64 sums), for real sets too large to hold
    all their features at once."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def add(self, features) -> None:
        f = np.asarray(features, dtype=np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("need at least 2 feature vectors")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the 2-Wasserstein distance between two
    Gaussians (Dowson and Landau 1982) that FID applies to Inception features (Heusel et al. 2017).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same eigenvalues as S1 S2): a symmetric eigendecomposition is
    stable for singular covariances (fewer samples than dimensions, dead ReLU units), where the
    general matrix square root of scipy.linalg.sqrtm needs an epsilon fudge and can go complex.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    root1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def frechet_distance_features(f1, f2) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def kernel_inception_distance(f1, f2, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                              degree: int = 3, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """KID of Binkowski et al. 2018: the unbiased estimator of the squared MMD with the polynomial
    kernel k(x, y) = (x.y / d + coef0)^degree, averaged over ``subsets`` random subsets of
    ``subset_size`` features of each set (fewer when a set is smaller). Returns (mean, std over
    subsets). Unlike FID it has no bias from the sample size: identical distributions give 0 on
    average (single estimates may be slightly negative).

    The kernel matrices are computed once over all features and the subsets index into them: the same
    numbers as recomputing them per subset, at a fraction of the cost.
    """
    x, y = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        i = rng.choice(len(x), m, replace=False)
        j = rng.choice(len(y), m, replace=False)
        a, b = kxx[np.ix_(i, i)], kyy[np.ix_(j, j)]
        # the unbiased estimator leaves out the diagonals k(x_i, x_i) and k(y_j, y_j)
        values[s] = ((a.sum() - np.trace(a)) / (m * (m - 1)) + (b.sum() - np.trace(b)) / (m * (m - 1))
                     - 2 * kxy[np.ix_(i, j)].mean())
    return float(values.mean()), float(values.std())


def class_coverage(probs) -> float:
    """Entropy of the histogram of predicted classes, normalized by ln(K) to [0, 1]: 1 when every class
    is predicted equally often, 0 when one class takes all (mode collapse)."""
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1]).astype(np.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(max(0.0, -(p * np.log(p)).sum() / math.log(probs.shape[1])))  # no -0.0


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


# ------------------------------------------------------------------------------------ image sources

@torch.no_grad()
def generate(netG: torch.nn.Module, nz: int, n: int, seed: int = EVAL_SEED,
             batch_size: int = 250) -> Iterator[torch.Tensor]:
    """n samples of netG in [-1, 1], in batches, in eval mode (BatchNorm's running statistics, as the
    sample grids use: evaluation never changes the model). The noise comes from its own generator, so
    evaluating leaves the training RNG, and therefore the run, unchanged."""
    device = next(netG.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = netG.training
    netG.eval()
    try:
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), nz, 1, 1, generator=g).to(device)
            yield netG(z).float()
    finally:
        netG.train(was_training)


def real_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Every image of a training set (gan_fast.datasets), in file order, in [-1, 1]."""
    from .datasets import InMemoryImages, to_model_input

    if isinstance(data, InMemoryImages):
        for start in range(0, len(data), batch_size):
            yield to_model_input(data.images[start:start + batch_size])
        return
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=batch_size, num_workers=data.workers)
    for x, ok in loader:
        if bool(ok.any()):
            yield to_model_input(x[ok].to(data.device))


# ------------------------------------------------------------------------------------------- digits

class DigitsMetric:
    """digits FD, class coverage and confidence of samples, against the classifier's held-out digits.

    Applies to the embedded digits at any size and channel count: samples are averaged to one channel
    (the digits are gray, so their channels are equal) and resized to the classifier's 32x32."""

    keys = DIGITS_KEYS

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 500):
        from .classifier import digits_split, load_digit_classifier
        from .datasets import load_digits, to_model_input

        self.device, self.batch_size = torch.device(device), batch_size
        self.classifier = load_digit_classifier(self.device)
        images, labels = load_digits(32, 1)
        self.train_idx, self.heldout_idx = digits_split(len(labels))
        self.real = to_model_input(images)
        feats, _ = self.features(self.batches(self.real[torch.from_numpy(self.heldout_idx)]))
        self.mu, self.sigma = feature_stats(feats)

    def batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(images), self.batch_size):
            yield images[start:start + self.batch_size]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().to(self.device)
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def features(self, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(penultimate features [N, 64], class probabilities [N, 10])."""
        feats, probs = [], []
        for x in batches:
            h, logits = self.classifier.features_and_logits(self.prepare(x))
            feats.append(h.cpu().double().numpy())
            probs.append(torch.softmax(logits.double(), 1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)

    def score(self, feats: np.ndarray, probs: np.ndarray) -> dict:
        hist = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
        return {"digits_fd": frechet_distance(self.mu, self.sigma, *feature_stats(feats)),
                "digits_coverage": class_coverage(probs),
                "digits_confidence": float(probs.max(1).mean()),
                "digits_histogram": [round(float(h), 4) for h in hist]}

    def __call__(self, batches: Iterable[torch.Tensor]) -> dict:
        return self.score(*self.features(batches))


# ------------------------------------------------------------------------------------------ FID, KID

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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, kid_features=stats.kid_features, n=stats.n,
                     key=np.array(key))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return stats


class FIDMetric:
    """FID and KID of samples against a real set's ReferenceStats, with any feature extractor."""

    keys = FID_KEYS

    def __init__(self, extractor: Callable, reference: ReferenceStats):
        self.extractor, self.reference = extractor, reference

    def __call__(self, batches: Iterable[torch.Tensor]) -> dict:
        feats = extract(self.extractor, batches).astype(np.float64)
        ref = self.reference
        kid, kid_std = kernel_inception_distance(ref.kid_features, feats)
        return {"fid": frechet_distance(ref.mu, ref.sigma, *feature_stats(feats)), "kid": kid,
                "kid_std": kid_std}


# ------------------------------------------------------------------------------------- the evaluator

DIGITS_DO_NOT_APPLY = ("the digits metric applies only to the embedded digits (the default data), "
                       "not to --data {data}; FID/KID is the metric for other data (--fid)")


class Evaluator:
    """The metrics of a run, each measured on the same n generated samples."""

    def __init__(self, metrics: list, n: int = 1000, seed: int = EVAL_SEED, batch_size: int = 250):
        self.metrics, self.n, self.seed, self.batch_size = metrics, n, seed, batch_size

    def __call__(self, netG: torch.nn.Module, nz: int) -> dict:
        out = {}
        for metric in self.metrics:
            # the samples are generated again (same noise) for each metric rather than held: 1000
            # samples at 256x256x3 would be 0.8 GB, and a generator pass is cheap next to Inception
            out.update(metric(generate(netG, nz, self.n, self.seed, self.batch_size)))
        return out


def build_evaluator(cfg, device: torch.device, dataset=None, log=print) -> Evaluator | None:
    """The evaluator for a training config (digits on the embedded digits, FID/KID with cfg.fid), or
    None when no metric applies; metrics that can't run here are skipped with one warning each."""
    # Building extractors (random init before loading weights) and loading real images (DataLoader
    # seeds) draw from the global RNG; forked, so a run that evaluates trains exactly as one that
    # doesn't.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _build_evaluator(cfg, device, dataset, log)


def _build_evaluator(cfg, device: torch.device, dataset, log) -> Evaluator | None:
    metrics: list = []
    if cfg.data is None:
        metrics.append(DigitsMetric(device))
    elif not cfg.fid:
        warnings.warn(DIGITS_DO_NOT_APPLY.format(data=cfg.data) + "; no evaluation", stacklevel=2)
    if cfg.fid:
        try:
            extractor = inception_extractor(cfg.fid_weights, device)
        except FIDUnavailable as e:
            warnings.warn(f"FID/KID skipped: {e}", stacklevel=2)
        else:
            if dataset is None:
                from .datasets import load_dataset

                dataset = load_dataset(cfg.data, cfg.image_size, cfg.channels, device, cfg.seed,
                                       cfg.workers, log=log)
            ref = cached_reference_stats(extractor, cfg.data, cfg.image_size, cfg.channels, dataset,
                                         log=log)
            metrics.append(FIDMetric(extractor, ref))
    return Evaluator(metrics, n=cfg.eval_n) if metrics else None


def format_metrics(m: dict) -> str:
    parts = []
    if "digits_fd" in m:
        parts.append(f"digits FD {m['digits_fd']:.2f}, coverage {m['digits_coverage']:.3f}, "
                     f"confidence {m['digits_confidence']:.3f}")
    if "fid" in m:
        parts.append(f"FID {m['fid']:.2f}, KID {m['kid']:.4f} +- {m['kid_std']:.4f}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------- reference values

@torch.no_grad()
def reference_values(n: int = 1000, seed: int = EVAL_SEED) -> dict[str, dict]:
    """The digits metric of things whose quality is known, to read a run's numbers against:
    real training digits (the floor: what a perfect generator would score, sample noise included),
    uniform noise, and a DCGAN generator of the default config before any training."""
    from .models import build_models

    metric = DigitsMetric()
    g = torch.Generator().manual_seed(seed)
    train = metric.real[torch.from_numpy(metric.train_idx)]
    pick = torch.randperm(len(train), generator=g)[:n]
    noise = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1
    torch.manual_seed(seed)
    netG, _ = build_models("dcgan", 64, 32, 32, 1, 32)  # TrainConfig's defaults
    return {
        f"held-out real vs {len(pick)} training real (the floor)": metric(metric.batches(train[pick])),
        "uniform noise": metric(metric.batches(noise)),
        "untrained DCGAN G (default config)": metric(generate(netG, 64, n, seed)),
    }


# --------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m gan_fast.eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gan_fast checkpoint (or a run folder holding one)")
    src.add_argument("--references", action="store_true",
                     help="print the digits metric of real digits, noise and an untrained G")
    p.add_argument("--n", type=int, default=1000, help="generated samples")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the EMA generator (default: when the checkpoint has one)")
    p.add_argument("--fid", action="store_true", help="also FID and KID (needs torch-fidelity and the "
                                                      "Inception weights on disk)")
    p.add_argument("--fid-weights", metavar="PATH", help="Inception weights file for --fid (default: "
                                                          "torch-fidelity's in $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--data", help="the real images for --fid (default: the checkpoint's training data)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="noise seed of the samples")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 2:
        raise UserError("--n must be at least 2 (a covariance needs two samples)")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.references:
        values = reference_values(args.n, args.seed)
        if args.json:
            print(json.dumps(values))
        else:
            for name, m in values.items():
                print(f"{name}: {format_metrics(m)}")
        return 0

    from .datasets import load_dataset
    from .sample import generator_from_checkpoint
    from .config import pick_device

    device = pick_device(args.device)
    netG, cfg, used_ema, step = generator_from_checkpoint(args.checkpoint, args.ema, device)
    if args.data is not None:
        cfg.data = args.data
    metrics: list = []
    if cfg.data is None:
        metrics.append(DigitsMetric(device))
    elif not args.fid:
        raise UserError(DIGITS_DO_NOT_APPLY.format(data=cfg.data))
    if args.fid:
        try:
            extractor = inception_extractor(args.fid_weights, device)
        except FIDUnavailable as e:
            raise UserError(f"--fid: {e}") from None
        dataset = load_dataset(cfg.data, cfg.image_size, cfg.channels, device, cfg.seed, cfg.workers)
        ref = cached_reference_stats(extractor, cfg.data, cfg.image_size, cfg.channels, dataset,
                                     batch_size=min(args.batch_size, 100))
        metrics.append(FIDMetric(extractor, ref))
    result = Evaluator(metrics, args.n, args.seed, args.batch_size)(netG, cfg.nz)
    which = "EMA generator" if used_ema else "generator"
    if args.json:
        print(json.dumps({"step": step, "ema": used_ema, "n": args.n, **result}))
        return 0
    print(f"{args.checkpoint}: step {step}, {which}, {args.n} samples (seed {args.seed})")
    if "digits_fd" in result:
        print(f"  digits FD            {result['digits_fd']:9.3f}   (lower is better; docs/quality.md "
              "has reference values)")
        print(f"  class coverage       {result['digits_coverage']:9.3f}   (normalized entropy of the "
              "predicted classes: 1 = all ten digits equally often)")
        print(f"  mean confidence      {result['digits_confidence']:9.3f}   (mean top softmax probability)")
        print("  predicted classes    " + " ".join(f"{d}:{h:.2f}" for d, h in
                                                  enumerate(result["digits_histogram"])))
    if "fid" in result:
        print(f"  FID                  {result['fid']:9.3f}")
        print(f"  KID                  {result['kid']:9.5f} +- {result['kid_std']:.5f}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
