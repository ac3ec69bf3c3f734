"""gan_fast.metrics.distances: the Frechet distance against closed forms and scipy, the streaming
statistics, KID's unbiased estimator."""
import numpy as np
import pytest

from gan_fast.metrics.distances import (RunningStats, feature_stats, frechet_distance, frechet_distance_features,
                                        kernel_inception_distance)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = np.random.RandomState(0).randn(500, 16) * 3 + 1
    assert frechet_distance_features(f, f) < 1e-8
    # fewer samples than dimensions: a singular covariance, still finite and ~0
    g = np.random.RandomState(1).randn(10, 64)
    assert frechet_distance_features(g, g) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.5], [[4.0]], [2.0], [[9.0]]) == pytest.approx(1.5 ** 2 + 1.0, rel=1e-12)
    # non-commuting covariances, in closed form without any matrix square root: for 2x2 matrices whose
    # product has eigenvalues l1, l2 >= 0, tr((S1 S2)^1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(S1 S2) + 2 sqrt(det(S1) det(S2)))
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.6], [-0.6, 3.0]])
    tr_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    m1, m2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    general = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(general, rel=1e-10)
    # and from samples of the two Gaussians, the estimate converges to the closed form
    rng = np.random.RandomState(2)
    fa = rng.randn(40000, 3) * np.sqrt(a) + mu1
    fb = rng.randn(40000, 3) * np.sqrt(b) + mu2
    assert frechet_distance_features(fa, fb) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_matches_scipy_sqrtm():
    # A separate test, so that a missing scipy skips only this comparison, not the closed forms above.
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.0, 0.0]), np.array([1.0, 1.0, 0.5, 0.0, 0.0])
    rng = np.random.RandomState(2)
    x, y = rng.randn(5, 5), rng.randn(5, 5)
    s1, s2 = x @ x.T + 0.1 * np.eye(5), y @ y.T + 0.1 * np.eye(5)
    r1 = linalg.sqrtm(s1)
    general = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(general, rel=1e-8)


def test_running_stats_match_the_batch_formula():
    f = np.random.RandomState(3).randn(300, 7)
    rs = RunningStats()
    for chunk in np.array_split(f, 7):
        rs.add(chunk)
    mu, sigma = rs.result()
    mu2, sigma2 = feature_stats(f)
    np.testing.assert_allclose(mu, mu2, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma2, atol=1e-12)


def test_kid_is_zero_for_identical_sets_and_positive_for_shifted_ones():
    rng = np.random.RandomState(4)
    x = rng.randn(600, 32)
    same, same_std = kernel_inception_distance(x, x, subsets=50, subset_size=300)
    other, _ = kernel_inception_distance(x, rng.randn(600, 32), subsets=50, subset_size=300)
    shifted, shifted_std = kernel_inception_distance(x, x + 0.5, subsets=50, subset_size=300)
    # unbiased: ~0 for two samples of one distribution
    assert abs(other) < 0.01 and shifted > 5 * shifted_std and shifted > 50 * abs(other)
    # a set against itself: ~0 too, up to an O(1/m) negative term (subsets drawn from both sides share
    # points, whose large k(x, x) enter the cross term)
    assert -0.05 * shifted < same <= 0
    # the unbiased estimator by its definition, on one subset of the full sets
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    a, b = x[:50], x[50:100] + 0.5
    m = 50
    by_hand = ((k(a, a).sum() - np.trace(k(a, a))) / (m * (m - 1))
               + (k(b, b).sum() - np.trace(k(b, b))) / (m * (m - 1)) - 2 * k(a, b).mean())
    assert kernel_inception_distance(a, b, subsets=3, subset_size=50)[0] == pytest.approx(by_hand)
