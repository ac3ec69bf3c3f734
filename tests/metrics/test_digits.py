"""gan_fast.metrics.digits and the classifier behind it: the shipped weights, the published reference
values, samples of any size and channel count."""
import math
import os

import numpy as np
import pytest
import torch

from gan_fast import classifier
from gan_fast.classifier import WEIGHTS_NAME, digits_split, load_digit_classifier
from gan_fast.datasets import load_digits, to_model_input
from gan_fast.eval import reference_values
from gan_fast.metrics.digits import DigitsMetric, class_coverage


def test_class_coverage():
    eye = np.eye(10)
    assert class_coverage(np.tile(eye, (5, 1))) == pytest.approx(1.0)
    assert class_coverage(np.tile(eye[3], (50, 1))) == 0.0
    two = np.concatenate([np.tile(eye[0], (5, 1)), np.tile(eye[1], (5, 1))])
    assert class_coverage(two) == pytest.approx(math.log(2) / math.log(10))


def test_shipped_classifier_is_small_and_accurate():
    path = os.path.join(os.path.dirname(classifier.__file__), "assets", WEIGHTS_NAME)
    assert os.path.getsize(path) < 200 * 1024
    train_idx, heldout_idx = digits_split()
    assert len(heldout_idx) == 359 and len(train_idx) == 1438
    assert not set(train_idx) & set(heldout_idx)
    np.testing.assert_array_equal(digits_split()[1], heldout_idx)  # fixed, not drawn per call
    model = load_digit_classifier()
    images, labels = load_digits(32, 1)
    x, y = to_model_input(images[heldout_idx]), labels[heldout_idx]
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.98
    assert accuracy == pytest.approx(model.heldout_accuracy, abs=1e-6)  # what the README records


@pytest.fixture(scope="module")
def digits_metric():
    return DigitsMetric()


def test_reference_values_match_the_published_ones(digits_metric):
    values = reference_values(1000)
    floor, noise, untrained = values.values()
    # docs/quality.md and gan_fast/assets/README.md publish these (python -m gan_fast.eval --references)
    assert floor["digits_fd"] == pytest.approx(19.22, abs=0.05)
    assert noise["digits_fd"] == pytest.approx(2232.0, rel=0.001)
    assert untrained["digits_fd"] == pytest.approx(3721.9, rel=0.001)
    assert floor["digits_coverage"] > 0.99 and floor["digits_confidence"] > 0.98
    assert untrained["digits_coverage"] < 0.05


def test_digits_metric_takes_any_size_and_channels(digits_metric):
    images, _ = load_digits(16, 3)
    x = to_model_input(images[torch.from_numpy(digits_split()[1])])
    m = digits_metric([x[:200], x[200:]])
    # the held-out digits themselves, through a 16px 3-channel round trip: close to the real set
    assert m["digits_fd"] < 40 and m["digits_coverage"] > 0.95
    assert sum(m["digits_histogram"]) == pytest.approx(1.0, abs=1e-3)
