"""The offline digits metric, for runs on the embedded digits: features and class predictions of the
small digit classifier shipped in gan_fast/assets (gan_fast.classifier), against its 359 held-out
digits. ``digits_fd`` is FID's formula with the classifier in Inception's place; ``digits_coverage``
and ``digits_confidence`` catch mode collapse and blurry samples (docs/quality.md)."""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..classifier import digits_split, load_digit_classifier
from ..datasets import load_digits, to_model_input
from .distances import feature_stats, frechet_distance


def class_coverage(probs) -> float:
    """Entropy of the histogram of predicted classes, normalized by ln(K) to [0, 1]: 1 when every class
    is predicted equally often, 0 when one class takes all (mode collapse)."""
    probs = np.asarray(probs)
    counts = np.bincount(probs.argmax(1), minlength=probs.shape[1]).astype(np.float64)
    p = counts / counts.sum()
    p = p[p > 0]
    return float(max(0.0, -(p * np.log(p)).sum() / math.log(probs.shape[1])))  # no -0.0


class DigitsMetric:
    """digits FD, class coverage and confidence of samples, against the classifier's held-out digits.

    Applies to the embedded digits at any size and channel count: samples are averaged to one channel
    (the digits are gray, so their channels are equal) and resized to the classifier's 32x32."""

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 500):
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
