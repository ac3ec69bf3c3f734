import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from gan_fast.config import UserError
from gan_fast.datasets import (ImageSource, InMemoryImages, StreamingImages, epoch_permutation,
                               load_dataset, load_digits)

from .conftest import TINY, run_module


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
    assert messages == [f"skipped 2 of {n + 2} image files that could not be read"]
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
    for a, b in zip(stream.batches(2, epoch=1, start=1), memory.batches(2, epoch=1, start=1)):
        assert torch.equal(a, b)
