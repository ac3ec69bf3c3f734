"""Image grids and files from generator outputs in [-1, 1] (no torchvision dependency)."""
from __future__ import annotations

import math
import os

import numpy as np
import torch


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 on x's device and in x's shape: the values a PNG of the sample holds (and that
    real images have), which is also what the FID feature extractor is given."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]."""
    return quantize(x).cpu().permute(0, 2, 3, 1).numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch into one uint8 [H, W, C] image, ``nrow`` images per row (default: square)."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = im
    return grid


def to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(x: torch.Tensor, path: str, nrow: int | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_pil(make_grid(x, nrow)).save(path)


def save_images(x: torch.Tensor, folder: str, prefix: str = "sample") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(to_uint8(x)):
        path = os.path.join(folder, f"{prefix}_{i:05d}.png")
        to_pil(im).save(path)
        paths.append(path)
    return paths
