"""fastconvnext: ConvNeXt on fused Triton kernels, a drop-in replacement for transformers' ConvNextModel."""
from fastconvnext.backend import get_backend, set_backend, use_backend
from fastconvnext.configuration import ConvNextConfig
from fastconvnext.modeling import (
    ConvNextBackbone,
    ConvNextForImageClassification,
    ConvNextModel,
    ConvNextPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "ConvNextBackbone",
    "ConvNextConfig",
    "ConvNextForImageClassification",
    "ConvNextImageProcessor",
    "ConvNextModel",
    "ConvNextPreTrainedModel",
    "from_transformers",
    "get_backend",
    "patch_transformers",
    "set_backend",
    "unpatch_transformers",
    "use_backend",
]


def __getattr__(name):
    # Loaded on first use: the processor pulls in PIL, the checkpoint code safetensors.
    if name == "ConvNextImageProcessor":
        from fastconvnext.image_processing import ConvNextImageProcessor

        return ConvNextImageProcessor
    if name == "from_transformers":
        from fastconvnext.checkpoint import from_transformers

        return from_transformers
    if name in ("patch_transformers", "unpatch_transformers"):
        from fastconvnext import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'fastconvnext' has no attribute {name!r}")
