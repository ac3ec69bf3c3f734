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
import stat
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


# 16-bit grayscale as Pillow opens it: "I;16*" (a 16-bit PNG), "I" (the same in older Pillow)
GRAY_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _gray16_to_8bit(im):
    """A 16-bit grayscale image as 8-bit "L" (or "LA" when a tRNS gray value marks transparency).

    Pillow's convert("L") clips these at 255 instead of scaling them, so nearly every pixel of a 16-bit
    PNG became white. 8 -> 16 bits is v * 257 (0..255 -> 0..65535), so the inverse is round(v / 257).
    Pillow already scales 16-bit RGB(A) and gray+alpha PNGs to 8 bits (the high byte) when it opens
    them; only the single-channel modes need this."""
    from PIL import Image

    a = np.asarray(im).astype(np.float64)  # I;16B is big-endian uint16, I is int32: one float copy
    gray = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):  # a tRNS chunk names one 16-bit value as transparent
        alpha = np.where(np.asarray(im) == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (gray, Image.fromarray(alpha, "L")))
    return gray


def _open_image(data: bytes | str, image_size: int, channels: int) -> np.ndarray:
    """Decode, convert (palette, RGBA, CMYK, 16-bit all work), resize the short side and center-crop."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in GRAY_16BIT_MODES:  # before any convert(), each of which would clip to 255
            im = _gray16_to_8bit(im)
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


def _walk_once(path: str) -> list[str]:
    """Every file under ``path``, following directory symlinks but entering each real directory once.

    os.walk(followlinks=True) alone loops through a link to an ancestor (``loop -> .``) until the path
    is too long, listing every image again at each level (24 images trained as 984); two links to one
    folder would also count its images twice."""
    names, seen = [], set()
    for root, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # already listed under another name: neither its files nor its subfolders
            continue
        seen.add(real)
        dirs.sort()  # a deterministic order: the first name of a real folder is the one kept
        names += [os.path.join(root, f) for f in files]
    return names


def _not_regular_reason(path: str) -> str | None:
    """Why ``path`` is not a regular file (None when it is). Opening a named pipe blocks until a
    writer appears, forever in practice; devices and sockets are no images either."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return e.strerror or str(e)  # a dangling symlink, a file removed since the listing
    if stat.S_ISREG(mode):
        return None
    return "a named pipe, not a regular file" if stat.S_ISFIFO(mode) else "not a regular file"


def _read_regular_file(path: str) -> bytes:
    """The bytes of a regular file. Opened non-blocking and checked on the open descriptor, so a file
    replaced by a named pipe after the scan raises instead of hanging the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError("not a regular file")
        return f.read()


class ImageSource:
    """The image files of a folder (recursive) or a .zip archive.

    ``skipped`` lists (name, reason) of image files left out, found unreadable at the scan (non-regular
    files) and, for folders decoded into memory, at decoding (load_dataset adds those)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise UserError(f"--data {path}: no such file or folder")
        self.path = path
        self.is_zip = os.path.isfile(path)
        if not self.is_zip and not os.path.isdir(path):
            raise UserError(f"--data {path}: not a folder or a .zip file")
        if self.is_zip:
            if not zipfile.is_zipfile(path):
                raise UserError(f"--data {path}: a file must be a .zip of images")
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
        else:
            names = _walk_once(path)
        candidates = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                            and not os.path.basename(n).startswith("._"))  # macOS resource forks
        if not candidates:
            raise UserError(f"--data {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.skipped: list[tuple[str, str]] = []
        if self.is_zip:
            self.names = candidates
        else:
            self.names = []
            for n in candidates:
                reason = _not_regular_reason(n)
                if reason is None:
                    self.names.append(n)
                else:
                    self.skipped.append((n, reason))
        self.n_files = len(candidates)  # image files found, readable or not
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.names)

    def decode(self, i: int, image_size: int, channels: int) -> np.ndarray:
        """Image i as uint8 [C, S, S]; raises when the file can't be read or decoded."""
        if self.is_zip:
            if self._zip is None:  # opened lazily: one handle per loader worker
                self._zip = zipfile.ZipFile(self.path)
            return _open_image(self._zip.read(self.names[i]), image_size, channels)
        return _open_image(_read_regular_file(self.names[i]), image_size, channels)

    def read(self, i: int, image_size: int, channels: int) -> np.ndarray | None:
        """Image i as uint8 [C, S, S], or None when the file can't be decoded."""
        try:
            return self.decode(i, image_size, channels)
        except Exception:  # noqa: BLE001 - any decode failure means "unreadable", counted and skipped
            return None

    def read_or_reason(self, i: int, image_size: int, channels: int) -> np.ndarray | str:
        """Image i, or why it can't be read (one line, for the list of skipped files)."""
        try:
            return self.decode(i, image_size, channels)
        except Exception as e:  # noqa: BLE001 - as read(): every failure is a skipped file
            from PIL import UnidentifiedImageError

            if isinstance(e, UnidentifiedImageError):  # its text names a BytesIO object, not the file
                return "not an image Pillow can decode"
            if isinstance(e, OSError) and e.strerror:
                return e.strerror
            text = str(e).strip().splitlines()
            return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__

    def display_name(self, name: str) -> str:
        """A file's name relative to --data, as the user knows it."""
        return name if self.is_zip else os.path.relpath(name, self.path)

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


SKIPPED_FILES_NAME = "skipped_files.txt"  # in the run folder: every skipped file and why
SKIPPED_NAMED = 3  # skipped files the warning names; the rest are in the list


def load_dataset(data: str | None, image_size: int, channels: int, device: torch.device, seed: int,
                 workers: int = 2, log=print, skipped_list: str | None = None):
    """The training set for --data (None: the embedded digits). Files that can't be read are skipped
    with one warning that names the first few; ``skipped_list`` (a path in the run folder) receives
    all of them, one "name<TAB>reason" line each."""
    if data is None:
        images, _ = load_digits(image_size, channels)
        return InMemoryImages(images, device, seed)
    source = ImageSource(data)
    if not len(source):  # every image file is a pipe, a device or a dangling link
        raise UserError(f"--data {data}: none of the {source.n_files} image files could be read: "
                        + _describe_skipped(source, source.skipped))
    if len(source) * channels * image_size * image_size > IN_MEMORY_LIMIT_BYTES:
        _report_skipped(source, source.skipped, skipped_list)
        log(f"data: {len(source)} images stream from disk with {workers} workers")
        return StreamingImages(source, image_size, channels, device, seed, workers)
    decoded, failed = _decode_all(source, image_size, channels, workers)
    skipped = sorted(source.skipped + failed)
    if not decoded:
        raise UserError(f"--data {data}: none of the {source.n_files} image files could be read: "
                        + _describe_skipped(source, skipped))
    _report_skipped(source, skipped, skipped_list)
    log(f"data: {len(decoded)} images from {data}, decoded into memory")
    return InMemoryImages(torch.from_numpy(np.stack(decoded)), device, seed)


def _describe_skipped(source: ImageSource, skipped: list[tuple[str, str]]) -> str:
    named = [f"{source.display_name(n)} ({why})" for n, why in skipped[:SKIPPED_NAMED]]
    more = len(skipped) - len(named)
    return ", ".join(named) + (f" and {more} more" if more else "")


def _report_skipped(source: ImageSource, skipped: list[tuple[str, str]], skipped_list: str | None) -> None:
    """One warning naming the first few skipped files; the full list into ``skipped_list``."""
    if not skipped:
        return
    where = ""
    if skipped_list is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(skipped_list)), exist_ok=True)
            with open(skipped_list, "w") as f:
                f.writelines(f"{source.display_name(n)}\t{why}\n" for n, why in skipped)
            where = f"; all {len(skipped)} listed in {skipped_list}"
        except OSError as e:  # an unwritable run folder is reported where the run writes its outputs
            where = f"; could not write the list to {skipped_list}: {e.strerror or e}"
    warnings.warn(f"skipped {len(skipped)} of {source.n_files} image files that could not be read: "
                  f"{_describe_skipped(source, skipped)}{where}", stacklevel=3)


def _decode_all(source: ImageSource, image_size: int, channels: int,
                workers: int) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """(the decoded images in order, (name, reason) of the files that could not be decoded)."""
    if workers > 0 and len(source) >= 256:
        from concurrent.futures import ThreadPoolExecutor  # PIL decoding releases the GIL

        if source.is_zip:  # ZipFile handles are not thread-safe: one source per thread
            local = threading.local()

            def read(i):
                if not hasattr(local, "src"):
                    local.src = ImageSource.__new__(ImageSource)
                    local.src.__dict__.update(source.__getstate__())
                return local.src.read_or_reason(i, image_size, channels)
        else:
            def read(i):
                return source.read_or_reason(i, image_size, channels)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            out = list(pool.map(read, range(len(source)), chunksize=64))
    else:
        out = [source.read_or_reason(i, image_size, channels) for i in range(len(source))]
    decoded = [a for a in out if not isinstance(a, str)]
    failed = [(source.names[i], a) for i, a in enumerate(out) if isinstance(a, str)]
    return decoded, failed


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of the generator's Tanh."""
    return x.float().div_(127.5).sub_(1.0)
