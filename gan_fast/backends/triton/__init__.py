"""Triton backend of the fused ops (the contract: docs/ops.md).

Each op lives in its own file with its launchers and its autograd.Function (the four BatchNorm ops
share _batchnorm.BatchNormFunction; the reference compositions are gan_fast.backends.reference's); the
implicit-GEMM conv kernels and the BatchNorm / activation pieces they share are in _conv.py,
_batchnorm.py and _activation.py, the launch and argument helpers in _common.py.
"""
from __future__ import annotations


def unavailable_reason() -> str | None:
    """None when the Triton ops can run here, else a sentence saying why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    import torch

    from ._common import INTERPRET
    if not INTERPRET and not torch.cuda.is_available():
        return ("no CUDA device is available (TRITON_INTERPRET=1, set before triton is imported, runs "
                "the kernels on the CPU, slowly, for testing)")
    return None


from .conv_transpose2d_bn_relu import conv_transpose2d_bn_relu  # noqa: E402
from .bce_with_logits import bce_with_logits  # noqa: E402
from .conv2d_bn_leaky_relu import conv2d_bn_leaky_relu  # noqa: E402
from .conv2d_leaky_relu import conv2d_leaky_relu  # noqa: E402
from .conv_transpose2d_tanh import conv_transpose2d_tanh  # noqa: E402
from .d_head_bce_with_logits import d_head_bce_with_logits  # noqa: E402
from .linear_bn_leaky_relu import linear_bn_leaky_relu  # noqa: E402
from .upsample_conv2d_bn_relu import upsample_conv2d_bn_relu  # noqa: E402

__all__ = ["bce_with_logits", "conv2d_bn_leaky_relu", "conv2d_leaky_relu", "conv_transpose2d_bn_relu",
           "conv_transpose2d_tanh", "d_head_bce_with_logits", "linear_bn_leaky_relu",
           "unavailable_reason", "upsample_conv2d_bn_relu"]
