import os
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from gan_fast.config import UserError
from gan_fast.datasets import (ImageSource, InMemoryImages, StreamingImages, epoch_permutation,
                               load_dataset, load_digits)

from .conftest import ROOT, TINY, run_module


def _write_mixed_folder(root):
    """Every mode and format a user's folder may hold, in nested folders."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "a" / "b")
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), "RGB")
    rgb.save(root / "rgb.jpg")
    rgb.convert("L").save(root / "a" / "gray.png")
    rgb.convert("RGBA").save(root / "a" / "rgba.webp")
    rgb.convert("CMYK").save(root / "a" / "b" / "cmyk.jpg")
    rgb.convert("P").save(root / "a" / "b" / "palette.gif")
    rgb.save(root / "a" / "b" / "plain.BMP")
    (root / "notes.txt").write_text("not an image")
    return 6


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_every_mode_and_format(tmp_path, channels):
    n = _write_mixed_folder(tmp_path)
    data = load_dataset(str(tmp_path), 16, channels, torch.device("cpu"), seed=0, log=lambda *a: None)
    assert isinstance(data, InMemoryImages)
    assert data.images.shape == (n, channels, 16, 16) and data.images.dtype == torch.uint8
    assert data.images.float().std() > 10  # real content, not blanks


def test_zip_of_images(tmp_path):
    folder = tmp_path / "imgs"
    n = _write_mixed_folder(folder)
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                z.write(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), folder))
    from_zip = load_dataset(str(zpath), 16, 3, torch.device("cpu"), 0, log=lambda *a: None)
    from_folder = load_dataset(str(folder), 16, 3, torch.device("cpu"), 0, log=lambda *a: None)
    assert torch.equal(from_zip.images, from_folder.images)
    assert len(from_zip) == n


def test_resize_short_side_then_center_crop(tmp_path):
    # a 20x40 (h x w) image: left quarter black, middle white, right quarter black -> after resizing
    # the short side to 10 (10x20) and center-cropping 10x10, only the white middle is left
    a = np.zeros((20, 40), np.uint8)
    a[:, 10:30] = 255
    Image.fromarray(a).save(tmp_path / "x.png")
    data = load_dataset(str(tmp_path), 16, 1, torch.device("cpu"), 0, log=lambda *a: None)
    img = data.images[0, 0].float()
    assert img.shape == (16, 16)
    assert img[:, 3:13].min() > 200  # the white band fills the crop's middle


def test_unreadable_files_skipped_with_one_warning(tmp_path):
    n = _write_mixed_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(str(tmp_path), 16, 3, torch.device("cpu"), 0, log=lambda *a: None)
    messages = [str(w.message) for w in caught if "could not be read" in str(w.message)]
    assert messages == [f"skipped 2 of {n + 2} image files that could not be read: "
                        f"{os.path.join('a', 'empty.jpg')} (not an image Pillow can decode), "
                        f"broken.png (not an image Pillow can decode)"]
    assert len(data) == n


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "not_zip"])
def test_bad_data_is_a_clear_error_exit_2(tmp_path, case):
    if case == "missing":
        path = tmp_path / "nope"
        expected = "no such file or folder"
    elif case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
        expected = "no image files"
    elif case == "unreadable":
        path = tmp_path / "bad"
        path.mkdir()
        (path / "a.png").write_bytes(b"not a png")
        expected = "none of the 1 image files could be read"
    else:
        path = tmp_path / "data.tar"
        path.write_bytes(b"x" * 100)
        expected = "must be a .zip"
    with pytest.raises(UserError, match=expected):
        load_dataset(str(path), 16, 1, torch.device("cpu"), 0, log=lambda *a: None)
    r = run_module("gan_fast.train", "--data", str(path), "--steps", "1", "--out", str(tmp_path / "o"), *TINY)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_digits_embedded():
    images, labels = load_digits(32, 1)
    assert images.shape == (1797, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images.max() == 255 and images.min() == 0
    rgb, _ = load_digits(64, 3)
    assert rgb.shape == (1797, 3, 64, 64) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_permutation(100, 1, 3), epoch_permutation(100, 1, 3))
    assert not torch.equal(epoch_permutation(100, 1, 3), epoch_permutation(100, 1, 4))
    data = InMemoryImages(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1), torch.device("cpu"), 0)
    full = list(data.batches(4, epoch=2))
    assert len(full) == 5
    assert [b.flatten().tolist() for b in data.batches(4, epoch=2, start=3)] == \
        [b.flatten().tolist() for b in full[3:]]
    assert sorted(torch.cat(full).flatten().tolist()) == list(range(20))


def test_streaming_matches_in_memory(tmp_path):
    _write_mixed_folder(tmp_path)
    source = ImageSource(str(tmp_path))
    stream = StreamingImages(source, 16, 3, torch.device("cpu"), seed=5, workers=0)
    memory = load_dataset(str(tmp_path), 16, 3, torch.device("cpu"), 5, log=lambda *a: None)
    # whole lists, not zip(): zip of two generators stops at the shorter, and passes when both are empty
    streamed = list(stream.batches(2, epoch=1, start=1))
    in_memory = list(memory.batches(2, epoch=1, start=1))
    assert len(streamed) == len(in_memory) > 0
    for a, b in zip(streamed, in_memory):
        assert torch.equal(a, b)


def _png16(path, array: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grayscale only): color type 0 gray,
    2 RGB, 6 RGBA; ``array`` is uint16 [H, W] or [H, W, C]."""
    import zlib

    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))  # filter 0 rows

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _gradient16(size=16) -> np.ndarray:
    # every 16-bit level from black to white across the image, so a clip at 255 shows as white
    return np.linspace(0, 65535, size * size).round().astype(np.uint16).reshape(size, size)


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path, channels):
    a = _gradient16()
    Image.fromarray(a).save(tmp_path / "gray16.png")  # Pillow opens it as mode I;16
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    data = load_dataset(str(tmp_path), 16, channels, torch.device("cpu"), 0, log=lambda *a: None)
    expected = torch.from_numpy(np.rint(a / 257.0).astype(np.uint8))
    for c in range(channels):  # same size: no resampling, so exact
        assert torch.equal(data.images[0, c], expected)


def test_16bit_grayscale_png_transparency_composites_on_white(tmp_path):
    a = _gradient16()
    a[:4] = 1234  # the rows that a tRNS gray value of 1234 makes transparent
    Image.fromarray(a).save(tmp_path / "t.png", transparency=1234)
    data = load_dataset(str(tmp_path), 16, 1, torch.device("cpu"), 0, log=lambda *a: None)
    img = data.images[0, 0]
    assert (img[:4] == 255).all()  # transparent -> white background
    assert torch.equal(img[4:], torch.from_numpy(np.rint(a[4:] / 257.0).astype(np.uint8)))


def test_16bit_rgb_png_keeps_its_levels(tmp_path):
    # Pillow opens 16-bit RGB as 8-bit RGB (the high byte); guard that this path stays right
    g = _gradient16()
    _png16(tmp_path / "rgb16.png", np.stack([g, 65535 - g, g // 2], -1), color_type=2)
    data = load_dataset(str(tmp_path), 16, 3, torch.device("cpu"), 0, log=lambda *a: None)
    for c, plane in enumerate((g, 65535 - g, g // 2)):
        assert (data.images[0, c].int() - torch.from_numpy(plane / 257.0).round().int()).abs().max() <= 1


def _write_pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(folder / f"{i:02d}.png")


@pytest.mark.parametrize("links", ["loop_to_self", "loop_to_parent", "one_folder_two_names"])
def test_directory_symlinks_followed_once(tmp_path, links):
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _write_pngs(data_dir, 24)
    _write_pngs(elsewhere, 3)
    (data_dir / "sub").mkdir()
    if links == "loop_to_self":
        os.symlink(".", data_dir / "loop")  # the reproducer: 24 images trained as 984
    elif links == "loop_to_parent":
        os.symlink("..", data_dir / "sub" / "up")
    else:
        os.symlink(str(elsewhere), data_dir / "more")  # a real folder elsewhere: followed, once
        os.symlink(str(elsewhere), data_dir / "sub" / "more_again")  # the same folder, a second name
    expected = 24 + 3 * (links == "one_folder_two_names")
    source = ImageSource(str(data_dir))  # the scan alone: without the fix a loop lists ~40 copies
    assert len(source) == expected
    assert len({os.path.realpath(n) for n in source.names}) == expected
    data = load_dataset(str(data_dir), 16, 1, torch.device("cpu"), 0, log=lambda *a: None)
    assert len(data) == expected


def _run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in a child so that a hang fails the test (TimeoutExpired) instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_named_pipe_is_skipped_not_read(tmp_path):
    _write_pngs(tmp_path, 4)
    os.mkfifo(tmp_path / "pipe.png")  # no writer ever comes: opening it for reading would block
    r = _run_python(
        "import warnings, torch\n"
        "from gan_fast.datasets import load_dataset\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    d = load_dataset({str(tmp_path)!r}, 16, 1, torch.device('cpu'), 0, log=lambda *a: None)\n"
        "print(len(d)); print([str(x.message) for x in w])\n", timeout=60)
    assert r.returncode == 0, r.stderr
    count, messages = r.stdout.splitlines()
    assert count == "4"
    assert "skipped 1 of 5 image files that could not be read: pipe.png (a named pipe, not a regular file)" \
        in messages


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_file_turned_named_pipe_after_the_scan_does_not_hang(tmp_path):
    # the streaming loader reads files long after the scan: one replaced by a pipe meanwhile is unreadable
    _write_pngs(tmp_path, 2)
    r = _run_python(
        "import os\n"
        "from gan_fast.datasets import ImageSource\n"
        f"s = ImageSource({str(tmp_path)!r})\n"
        "os.unlink(s.names[0]); os.mkfifo(s.names[0])\n"
        "print(s.read(0, 16, 1) is None, s.read(1, 16, 1).shape)\n", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "True (1, 16, 16)"


def test_skipped_files_named_and_listed_in_the_run_folder(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "run"
    _write_pngs(data_dir, 16)
    bad = [f"bad{i}.png" for i in range(5)]
    for name in bad:
        (data_dir / name).write_bytes(b"not a png")
    r = run_module("gan_fast.train", "--data", str(data_dir), "--steps", "1", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    listing = str(out / "skipped_files.txt")
    warning = [line for line in r.stderr.splitlines() if "could not be read" in line]
    assert warning == [f"warning: skipped 5 of 21 image files that could not be read: "
                       f"bad0.png (not an image Pillow can decode), bad1.png (not an image Pillow can "
                       f"decode), bad2.png (not an image Pillow can decode) and 2 more; all 5 listed in "
                       f"{listing}"], r.stderr
    with open(listing) as f:
        assert f.read().splitlines() == [f"{name}\tnot an image Pillow can decode" for name in bad]
