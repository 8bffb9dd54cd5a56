"""Fused Triton kernels for ConvNeXt: the package `fastconvnext.kernels`, whose modules live in the
repository's top-level `kernels/` folder.

That folder has no `__init__.py` on purpose. With one, it would be a regular top-level package named
`kernels` whenever the repository root is on sys.path (`python -m pytest`, `python -c`, a notebook started
there) and would shadow Hugging Face's `kernels`, which transformers imports. Without one, a top-level
`import kernels` passes over it to any installed regular package of that name.

This module is the package's `__init__`: it makes itself a package by pointing `__path__` at the folder,
  - `fastconvnext/kernels/` beside it in a wheel install (pyproject.toml maps the folder there; a module
    file wins over a folder without `__init__.py` of the same name, so this file is still what loads),
  - `<root>/kernels/` in a source tree, on PYTHONPATH or installed in editable mode.

Kernel modules import Triton, so they are loaded on first use: the eager path works without Triton, and
TRITON_INTERPRET can still be set before the first kernel import.
"""
import importlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _module_folder() -> str:
    for folder in (_HERE / "kernels", _HERE.parent / "kernels"):
        if (folder / "convnext_mlp_kernel.py").is_file():
            return str(folder)
    raise ImportError(f"fastconvnext.kernels: no kernels/ folder beside {_HERE} or above it: "
                      "the installation is incomplete (reinstall fastconvnext)")


__path__ = [_module_folder()]
if __spec__ is not None:
    __spec__.submodule_search_locations = list(__path__)

_OPS = {
    "dwconv_layernorm": ".dwconv_layernorm_kernel",
    "convnext_mlp": ".convnext_mlp_kernel",
    "convnext_v2_mlp": ".convnext_v2_mlp_kernel",
}

__all__ = list(_OPS)


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
