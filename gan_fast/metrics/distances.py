"""Distances between two sets of features, in float64 numpy: the Frechet distance (FID's formula) and
KID. They take features of any extractor, which is how the tests check them with a small network."""
from __future__ import annotations

import numpy as np

KID_SUBSETS = 100  # torch-fidelity's defaults, so KIDs compare with those reported elsewhere
KID_SUBSET_SIZE = 1000


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
    """KID of Binkowski et al. 2018 ("Demystifying MMD GANs"): the unbiased estimator of the squared
    MMD with the polynomial kernel k(x, y) = (x.y / d + coef0)^degree, averaged over ``subsets``
    random subsets of ``subset_size`` features of each set (fewer when a set is smaller). Returns
    (mean, std over subsets). Unlike FID it has no bias from the sample size: identical distributions
    give 0 on average (single estimates may be slightly negative).

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
