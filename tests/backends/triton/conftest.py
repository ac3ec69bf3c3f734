"""Shared setup of the Triton op tests.

tests/conftest.py switches Triton's interpreter on when there is no CUDA device.
"""
import torch

import pytest

@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN: an element a kernel fails to write fails the test."""
    from gan_fast.backends.triton import _common
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
