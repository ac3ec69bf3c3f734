"""Training data: the embedded UCI digits, or a user's folder / .zip of images.

Images are decoded once into one uint8 tensor [N, C, S, S] when the set fits in memory (the common
case for GAN data sets up to a few GB): a batch is then an index into a device tensor, so loading is
never the bottleneck. Larger sets stream through a DataLoader with worker processes. Either way the
order of batches is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import io
import os
import threading
import warnings
import zipfile
from importlib import resources
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IN_MEMORY_LIMIT_BYTES = 4 << 30  # decode into RAM below this; stream with workers above


def load_digits(image_size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 UCI digits as uint8 [N, C, S, S] images (bilinear upscaling) and their labels."""
    with resources.files("gan_fast.assets").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    x = torch.from_numpy(images).float().unsqueeze(1) / 16.0  # pixel counts 0..16 -> [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, channels, -1, -1).contiguous(), torch.from_numpy(labels).long()


def _open_image(data: bytes | str, image_size: int, channels: int) -> np.ndarray:
    """Decode, convert (palette, RGBA, CMYK, 16-bit all work), resize the short side and center-crop."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            # composite transparency on white rather than letting PIL drop alpha onto black
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        a = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class ImageSource:
    """The image files of a folder (recursive) or a .zip archive."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise UserError(f"--data {path}: no such file or folder")
        self.path = path
        self.is_zip = os.path.isfile(path)
        if self.is_zip:
            if not zipfile.is_zipfile(path):
                raise UserError(f"--data {path}: a file must be a .zip of images")
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
        else:
            names = []
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs.sort()
                names += [os.path.join(root, f) for f in files]
        self.names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                            and not os.path.basename(n).startswith("._"))  # macOS resource forks
        if not self.names:
            raise UserError(f"--data {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int, image_size: int, channels: int) -> np.ndarray | None:
        """Image i as uint8 [C, S, S], or None when the file can't be decoded."""
        try:
            if self.is_zip:
                if self._zip is None:  # opened lazily: one handle per loader worker
                    self._zip = zipfile.ZipFile(self.path)
                return _open_image(self._zip.read(self.names[i]), image_size, channels)
            return _open_image(self.names[i], image_size, channels)
        except Exception:  # noqa: BLE001 - any decode failure means "unreadable", counted and skipped
            return None

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, a function of (seed, epoch) only: resume needs no loader state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class InMemoryImages:
    """All images decoded into one uint8 tensor on the training device."""

    def __init__(self, images: torch.Tensor, device: torch.device, seed: int):
        self.images = images.to(device)
        self.seed = seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, batch_size: int, epoch: int, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[torch.Tensor]:
        """This rank's ``batch_size`` rows of each global batch (batch_size x world_size rows of the
        epoch's permutation), from global batch ``start`` on."""
        perm = epoch_permutation(len(self), self.seed, epoch).to(self.images.device)
        global_batch = batch_size * world_size
        for b in range(start, len(self) // global_batch):  # drop the last partial batch: static shapes
            first = b * global_batch + rank * batch_size
            yield self.images.index_select(0, perm[first:first + batch_size])


class _StreamDataset(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, image_size: int, channels: int):
        self.source, self.image_size, self.channels = source, image_size, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        a = self.source.read(i, self.image_size, self.channels)
        if a is None:  # an unreadable file found late: a blank the caller masks out
            return torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8), False
        return torch.from_numpy(a), True


class StreamingImages:
    """Images decoded on the fly by DataLoader workers, for sets larger than memory."""

    def __init__(self, source: ImageSource, image_size: int, channels: int, device: torch.device,
                 seed: int, workers: int):
        self.dataset = _StreamDataset(source, image_size, channels)
        self.device, self.seed, self.workers = device, seed, workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, epoch: int, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[torch.Tensor]:
        """As InMemoryImages.batches: this rank's rows of each global batch, decoded by workers."""
        global_batch = batch_size * world_size
        perm = epoch_permutation(len(self), self.seed, epoch)
        n_batches = len(self) // global_batch
        mine = perm[:n_batches * global_batch].view(n_batches, world_size, batch_size)[start:, rank]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=mine.reshape(-1).tolist(), drop_last=True,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        for x, ok in loader:
            if not bool(ok.all()):
                # a file that turned unreadable since the scan: fill its row with readable rows of the
                # batch, so every batch keeps its size (static shapes; every rank steps in lockstep)
                good = ok.nonzero().view(-1)
                if good.numel() == 0:
                    continue
                x = x[good[torch.arange(x.shape[0]) % good.numel()]]
            yield x.to(self.device, non_blocking=True)


def load_dataset(data: str | None, image_size: int, channels: int, device: torch.device, seed: int,
                 workers: int = 2, log=print):
    """The training set for --data (None: the embedded digits)."""
    if data is None:
        images, _ = load_digits(image_size, channels)
        return InMemoryImages(images, device, seed)
    source = ImageSource(data)
    if len(source) * channels * image_size * image_size > IN_MEMORY_LIMIT_BYTES:
        log(f"data: {len(source)} images stream from disk with {workers} workers")
        return StreamingImages(source, image_size, channels, device, seed, workers)
    decoded = _decode_all(source, image_size, channels, workers)
    bad = len(source) - len(decoded)
    if not decoded:
        raise UserError(f"--data {data}: none of the {len(source)} image files could be read")
    if bad:
        warnings.warn(f"skipped {bad} of {len(source)} image files that could not be read", stacklevel=2)
    log(f"data: {len(decoded)} images from {data}, decoded into memory")
    return InMemoryImages(torch.from_numpy(np.stack(decoded)), device, seed)


def _decode_all(source: ImageSource, image_size: int, channels: int, workers: int) -> list[np.ndarray]:
    if workers > 0 and len(source) >= 256:
        from concurrent.futures import ThreadPoolExecutor  # PIL decoding releases the GIL

        if source.is_zip:  # ZipFile handles are not thread-safe: one source per thread
            local = threading.local()

            def read(i):
                if not hasattr(local, "src"):
                    local.src = ImageSource.__new__(ImageSource)
                    local.src.__dict__.update(source.__getstate__())
                return local.src.read(i, image_size, channels)
        else:
            def read(i):
                return source.read(i, image_size, channels)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            out = list(pool.map(read, range(len(source)), chunksize=64))
    else:
        out = [source.read(i, image_size, channels) for i in range(len(source))]
    return [a for a in out if a is not None]


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's Tanh."""
    return x.float().div_(127.5).sub_(1.0)
