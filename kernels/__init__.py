"""Fused Triton kernels for ConvNeXt, installed as `fastconvnext.kernels`.

Kernel modules import Triton, so they are loaded on first use: the eager path works without Triton,
and TRITON_INTERPRET can still be set before the first kernel import.
"""
import importlib

_OPS = {
    "dwconv_layernorm": ".dwconv_layernorm_kernel",
    "convnext_mlp": ".convnext_mlp_kernel",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
