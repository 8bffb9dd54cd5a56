"""fastconvnext: ConvNeXt on fused Triton kernels, a drop-in replacement for transformers' ConvNextModel.

Every public name is loaded on first use, so `import fastconvnext` (and `fastconvnext --help`) does
not import torch, PIL or Triton until something needs them.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConvNextBackbone": "fastconvnext.modeling",
    "ConvNextConfig": "fastconvnext.configuration",
    "ConvNextForImageClassification": "fastconvnext.modeling",
    "ConvNextImageProcessor": "fastconvnext.image_processing",
    "ConvNextModel": "fastconvnext.modeling",
    "ConvNextPreTrainedModel": "fastconvnext.modeling",
    "ConvNextV2Backbone": "fastconvnext.convnext_v2",
    "ConvNextV2Config": "fastconvnext.configuration",
    "ConvNextV2ForImageClassification": "fastconvnext.convnext_v2",
    "ConvNextV2Model": "fastconvnext.convnext_v2",
    "ConvNextV2PreTrainedModel": "fastconvnext.convnext_v2",
    "DINOv3ConvNextBackbone": "fastconvnext.dinov3_convnext",
    "DINOv3ConvNextConfig": "fastconvnext.configuration",
    "DINOv3ConvNextModel": "fastconvnext.dinov3_convnext",
    "DINOv3ConvNextPreTrainedModel": "fastconvnext.dinov3_convnext",
    "from_timm": "fastconvnext.checkpoint",
    "from_transformers": "fastconvnext.checkpoint",
    "get_backend": "fastconvnext.backend",
    "patch_transformers": "fastconvnext.patch",
    "set_backend": "fastconvnext.backend",
    "tune": "fastconvnext.tuning",
    "unpatch_transformers": "fastconvnext.patch",
    "use_backend": "fastconvnext.backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastconvnext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
