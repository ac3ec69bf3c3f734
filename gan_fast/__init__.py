"""gan_fast: fast DCGAN and MLP GAN training with fused Triton and C++/CUDA kernels.

``import gan_fast`` never needs triton or the compiled extension; backends load on first use.
"""
from .backends import BACKENDS, is_available, resolve as resolve_backend
# ``gan_fast.fuse(model, backend)`` calls the submodule gan_fast.fuse, which is callable as its
# ``fuse`` function (see the end of fuse.py): a lazy ``__getattr__`` returning the function was
# replaced by the module as soon as anything imported gan_fast.fuse, and the README's second call
# then called a module. Imported eagerly because it is cheap: gan_fast.fuse imports only torch and
# .backends; triton and gan_fast._C load when a backend is first used.
from . import fuse
from .fuse import discriminator_loss
from .models import Discriminator, Generator, MLPDiscriminator, MLPGenerator, build_models

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Discriminator", "Generator", "MLPDiscriminator", "MLPGenerator",
           "build_models", "discriminator_loss", "fuse", "is_available", "resolve_backend"]
