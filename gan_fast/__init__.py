"""gan_fast: fast DCGAN and MLP GAN training with fused Triton and C++/CUDA kernels.

``import gan_fast`` never needs triton or the compiled extension; backends load on first use.
"""
from .backends import BACKENDS, is_available, resolve as resolve_backend
from .models import Discriminator, Generator, MLPDiscriminator, MLPGenerator, build_models

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Discriminator", "Generator", "MLPDiscriminator", "MLPGenerator",
           "build_models", "fuse", "is_available", "resolve_backend"]


def __getattr__(name):
    if name == "fuse":  # lazy: fuse pulls in the backend machinery only when used
        from .fuse import fuse

        return fuse
    raise AttributeError(f"module 'gan_fast' has no attribute {name!r}")
