"""gan_fast: fast DCGAN and MLP GAN training with fused Triton and C++/CUDA kernels.

``import gan_fast`` never needs triton or the compiled extension; backends load on first use.
"""
from .backends import BACKENDS, is_available, resolve as resolve_backend
# Imported eagerly, and bound after the submodule import on purpose: importing the submodule
# gan_fast.fuse sets the package attribute ``fuse`` to the module, so a lazy ``__getattr__`` that
# imported it on first use was overwritten by the module, and the README's second
# ``gan_fast.fuse(netD, ...)`` called a module. Binding here, once the submodule is in sys.modules,
# makes ``gan_fast.fuse`` the function whatever the user imports later (``import gan_fast.fuse`` and
# ``from gan_fast.fuse import X`` find the loaded module and leave the attribute alone). It is cheap:
# gan_fast.fuse imports only torch and .backends; triton and gan_fast._C load when a backend is used.
from .fuse import discriminator_loss, fuse
from .models import Discriminator, Generator, MLPDiscriminator, MLPGenerator, build_models

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Discriminator", "Generator", "MLPDiscriminator", "MLPGenerator",
           "build_models", "discriminator_loss", "fuse", "is_available", "resolve_backend"]
