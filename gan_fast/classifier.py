"""The digit classifier behind the offline sample-quality metric (``gan_fast.eval``).

A tiny CNN (39k parameters; an 81 KB weights file in fp16) trained by
``tools/train_digit_classifier.py`` on a fixed 80/20 split of the embedded digits. Its 64-d
penultimate features play the role Inception's pool3 features play in FID (Heusel et al. 2017): an
embedding in which real digits form a compact distribution, so the Frechet distance between real and
generated features measures sample quality without a download. Its class predictions give the
coverage of the ten digit classes (mode collapse) and its confidence (how recognisable the samples
are).
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

WEIGHTS_NAME = "digit_classifier.pt"
FEATURE_DIM = 64
N_CLASSES = 10
# The split is a permutation of the 1,797 indices from numpy's legacy RandomState, whose stream numpy
# guarantees never to change: the held-out set is the same on every machine and numpy version.
SPLIT_SEED = 1797
HELDOUT_FRACTION = 0.2


class DigitClassifier(nn.Module):
    """32x32 one-channel images in [-1, 1] (the generator's range) -> 10 logits.

    Three conv + ReLU + 2x2 max-pool stages (32 -> 16 -> 8 -> 4), then a 64-unit hidden layer whose
    activations are the features of the Frechet distance, then the class layer.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 8 x 16 x 16
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 8 x 8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate activations [N, 64]: the metric's features, logits [N, 10])."""
        h = self.body(x)
        return h, self.head(h)


def digits_split(n: int = 1797) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of the embedded digits: the fixed seeded 80/20 split the
    classifier was trained on. Only the held-out 20% are a fair reference for its features."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_heldout = int(round(n * HELDOUT_FRACTION))
    return np.sort(perm[n_heldout:]), np.sort(perm[:n_heldout])


def load_digit_classifier(device: torch.device | str = "cpu") -> DigitClassifier:
    """The shipped classifier (weights stored in fp16 to keep the package small, computed in fp32),
    in eval mode with gradients off."""
    with resources.files("gan_fast.assets").joinpath(WEIGHTS_NAME).open("rb") as f:
        saved = torch.load(f, map_location="cpu", weights_only=True)
    # built on the meta device and given the saved tensors: no random initialisation, which would draw
    # from the global RNG and so change a training run that evaluates as it goes
    with torch.device("meta"):
        model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()}, assign=True)
    model.heldout_accuracy = float(saved.get("heldout_accuracy", float("nan")))
    model.requires_grad_(False)
    return model.eval().to(device)
