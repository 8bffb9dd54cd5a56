"""Run transformers' own ConvNeXt models on fastconvnext's fused ops, with no change to user code.

`patch_transformers()` replaces the block class that transformers' ConvNeXt stages instantiate,
`transformers.models.convnext.modeling_convnext.ConvNextLayer`, by `FusedConvNextLayer`: a subclass
with the same sub-modules and parameters (state-dict keys unchanged) whose forward calls the two ops
of `fastconvnext.backend`. DINOv3-ConvNeXt's block (`modeling_dinov3_convnext.DINOv3ConvNextLayer`, the
same arithmetic under other names) is replaced likewise by `FusedDINOv3ConvNextLayer`, and ConvNeXt V2's
(`modeling_convnextv2.ConvNextV2Layer`) by `FusedConvNextV2Layer`, which runs the dwconv + LayerNorm op and
the MLP-with-GRN op (convnext_v2.grn_block_parts_forward), each when transformers has that model. Everything else stays transformers' code: config, from_pretrained, weight
init, pipeline(), Trainer, backbones. Models built while patched get fused blocks; `patch_model(model)`
converts a model built before. `unpatch_transformers()` puts the original class back.

    import fastconvnext
    fastconvnext.patch_transformers()            # from now on
    with fastconvnext.patch_transformers():      # or only inside the block
        classifier = pipeline("image-classification", model="facebook/convnext-tiny-224")
"""
from __future__ import annotations

import importlib
import threading

from torch import nn

from fastconvnext.modeling import _channels_last, block_forward, block_parts_forward, drop_path_scale

__all__ = [
    "FusedConvNextLayer",
    "FusedConvNextV2Layer",
    "FusedDINOv3ConvNextLayer",
    "is_patched",
    "patch_model",
    "patch_transformers",
    "unpatch_model",
    "unpatch_transformers",
]

_lock = threading.RLock()
_original_layer = None  # transformers' ConvNextLayer, remembered on first use
_fused_layer = None  # the subclass built from it
_family_built = {}  # family -> (transformers' modeling module, its block class, the fused subclass), or ()


def _convnext_module():
    try:
        from transformers.models.convnext import modeling_convnext
    except ImportError as err:
        raise ImportError("patch_transformers needs transformers (pip install 'fastconvnext[hf]')") from err
    return modeling_convnext


def _activation_names():
    """transformers activation class -> the fused op's activation name (others run transformers' forward)."""
    from transformers import activations

    return {
        activations.GELUActivation: "gelu",  # both its forms (torch and python) are the exact erf GELU
        activations.NewGELUActivation: "gelu_tanh",
        activations.GELUTanh: "gelu_tanh",
        activations.FastGELUActivation: "gelu_tanh",
        activations.AccurateGELUActivation: "gelu_tanh",  # the same tanh formula as NewGELUActivation
        nn.ReLU: "relu",
    }


def _fused_act_namer(activation_names):
    """fused_act(act): the fused op's name for a transformers activation module, None for one it lacks."""
    return lambda act: activation_names.get(type(act))


def _draw_scale(drop_path, x, dtype):
    """The drop-path scale of a transformers drop-path module (or Identity), drawn as transformers draws it."""
    return drop_path_scale(getattr(drop_path, "drop_prob", 0.0), drop_path.training, x, dtype)


def _build_fused_layer(original):
    activation_names = _activation_names()
    modeling_convnext = _convnext_module()
    layer_norm = modeling_convnext.ConvNextLayerNorm
    drop_paths = (modeling_convnext.ConvNextDropPath, nn.Identity)
    fused_act = _fused_act_namer(activation_names)

    class ConvNextLayer(original):
        """transformers' ConvNeXt block, run as fastconvnext's dwconv_layernorm + convnext_mlp ops.

        Same parameters and output as the original; the output tensor is channels-last in memory, so the
        next block reads it without a copy. A half of the block whose sub-modules are not transformers' plain
        ones (hooks, global module hooks, LoRA or other replaced layers) calls them as the original forward
        does (modeling.block_forward); activations the fused MLP lacks run the original forward.
        """

        _fastconvnext_fused = True

        def forward(self, features):
            if type(self.act) not in activation_names:
                return super().forward(features)
            return block_forward(self, _channels_last(features), layer_norm, fused_act, drop_paths, _draw_scale)

    # Keep transformers' class name (accelerate's _no_split_modules matches by name) and make the
    # class reachable as fastconvnext.patch.ConvNextLayer so pickled models load again.
    ConvNextLayer.__module__ = __name__
    ConvNextLayer.__qualname__ = "ConvNextLayer"
    globals()["ConvNextLayer"] = ConvNextLayer
    return ConvNextLayer


def _build_fused_dinov3_layer(original, modeling):
    activation_names = _activation_names()
    layer_norm = modeling.DINOv3ConvNextLayerNorm
    drop_paths = tuple(getattr(modeling, name) for name in ("Dinov3ConvnextDropPath",) if hasattr(modeling, name))
    drop_paths += (nn.Identity,)
    fused_act = _fused_act_namer(activation_names)

    class DINOv3ConvNextLayer(original):
        """transformers' DINOv3-ConvNeXt block, run as fastconvnext's dwconv_layernorm + convnext_mlp ops (the
        same arithmetic as ConvNeXt's block under other names), with the same fallback as FusedConvNextLayer."""

        _fastconvnext_fused = True

        def forward(self, features):
            if type(self.activation_fn) not in activation_names:
                return super().forward(features)
            return block_parts_forward(
                _channels_last(features), self.depthwise_conv, self.layer_norm, self.pointwise_conv1,
                self.activation_fn, self.pointwise_conv2, self.gamma, self.drop_path, layer_norm, fused_act,
                drop_paths, _draw_scale,
            )

    DINOv3ConvNextLayer.__module__ = __name__
    DINOv3ConvNextLayer.__qualname__ = "DINOv3ConvNextLayer"
    globals()["DINOv3ConvNextLayer"] = DINOv3ConvNextLayer
    return DINOv3ConvNextLayer


def _build_fused_v2_layer(original, modeling):
    from fastconvnext.convnext_v2 import grn_block_parts_forward

    activation_names = _activation_names()
    layer_norm, grn = modeling.ConvNextV2LayerNorm, modeling.ConvNextV2GRN
    drop_paths = (modeling.ConvNextV2DropPath, nn.Identity)
    fused_act = _fused_act_namer(activation_names)

    class ConvNextV2Layer(original):
        """transformers' ConvNeXt V2 block run as fastconvnext's dwconv_layernorm + convnext_v2_mlp ops (GRN inside
        the MLP op), with the same fallback as FusedConvNextLayer (convnext_v2.grn_block_parts_forward)."""

        _fastconvnext_fused = True

        def forward(self, features):
            return grn_block_parts_forward(
                _channels_last(features), self.dwconv, self.layernorm, self.pwconv1, self.act, self.grn,
                self.pwconv2, self.drop_path, layer_norm, grn, fused_act, drop_paths, _draw_scale,
            )

    ConvNextV2Layer.__module__ = __name__
    ConvNextV2Layer.__qualname__ = "ConvNextV2Layer"
    globals()["ConvNextV2Layer"] = ConvNextV2Layer
    return ConvNextV2Layer


# the other families: transformers' modeling module, its block class's name, the builder of the fused subclass
_FAMILY_LAYERS = {
    "convnextv2": ("transformers.models.convnextv2.modeling_convnextv2", "ConvNextV2Layer", _build_fused_v2_layer),
    "dinov3_convnext": ("transformers.models.dinov3_convnext.modeling_dinov3_convnext", "DINOv3ConvNextLayer",
                        _build_fused_dinov3_layer),
}


def _family_layer(family):
    """(transformers' modeling module, original block class, fused subclass) of a family, built once; () when this
    transformers lacks that model."""
    with _lock:
        if family not in _family_built:
            module_name, attribute, build = _FAMILY_LAYERS[family]
            try:
                modeling = importlib.import_module(module_name)
            except ImportError:
                _family_built[family] = ()
            else:
                current = getattr(modeling, attribute)
                original = current.__base__ if getattr(current, "_fastconvnext_fused", False) else current
                _family_built[family] = (modeling, original, build(original, modeling))
        return _family_built[family]


def _family_classes():
    """[(module, attribute, original class, fused class)] of the other families transformers has (V2, DINOv3)."""
    found = []
    for family, (_, attribute, _) in _FAMILY_LAYERS.items():
        built = _family_layer(family)
        if built:
            modeling, original, fused = built
            found.append((modeling, attribute, original, fused))
    return found


def _classes():
    """(transformers' original ConvNextLayer, the fused subclass), built once."""
    global _original_layer, _fused_layer
    with _lock:
        if _original_layer is None:
            current = _convnext_module().ConvNextLayer
            _original_layer = current.__base__ if getattr(current, "_fastconvnext_fused", False) else current
            _fused_layer = _build_fused_layer(_original_layer)
        return _original_layer, _fused_layer


def __getattr__(name):
    if name == "FusedConvNextLayer":
        return _classes()[1]
    family = {"FusedDINOv3ConvNextLayer": "dinov3_convnext", "FusedConvNextV2Layer": "convnextv2"}.get(name)
    if family is not None and _family_layer(family):
        return _family_layer(family)[2]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_patched():
    """Whether transformers' ConvNeXt currently builds fused blocks."""
    with _lock:
        return _fused_layer is not None and _convnext_module().ConvNextLayer is _fused_layer


class _Patch:
    """Returned by patch_transformers(); as a context manager it restores the state it found on exit."""

    def __init__(self, was_patched):
        self.was_patched = was_patched

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self.was_patched:
            unpatch_transformers()
        return False

    def __repr__(self):
        return f"<fastconvnext transformers patch, active={is_patched()}>"


def patch_transformers():
    """Make transformers' ConvNeXt models (built from now on) run their blocks on fastconvnext's ops.

    Idempotent. Usable as a context manager: `with patch_transformers(): ...` unpatches on exit unless
    transformers was already patched before.
    """
    with _lock:
        was_patched = is_patched()
        _, fused = _classes()
        _convnext_module().ConvNextLayer = fused
        for module, attribute, _, family_fused in _family_classes():
            setattr(module, attribute, family_fused)
        return _Patch(was_patched)


def unpatch_transformers():
    """Restore transformers' own ConvNextLayer; models built while patched keep their fused blocks."""
    with _lock:
        if _original_layer is not None:
            _convnext_module().ConvNextLayer = _original_layer
        for module, attribute, family_original, _ in _family_classes():
            setattr(module, attribute, family_original)


def _swap_layers(model, source, target):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target  # same attributes and parameters: only forward changes
            count += 1
    return count


def patch_model(model):
    """Convert the transformers ConvNeXt blocks of an already built model to fused ones, in place.

    Returns the model. Works on any module tree (a ConvNeXt backbone inside a detector too).
    """
    original, fused = _classes()
    _swap_layers(model, original, fused)
    for _, _, original, fused in _family_classes():
        _swap_layers(model, original, fused)
    return model


def unpatch_model(model):
    """Turn the fused blocks of `model` back into transformers' own ConvNextLayer, in place."""
    original, fused = _classes()
    _swap_layers(model, fused, original)
    for _, _, original, fused in _family_classes():
        _swap_layers(model, fused, original)
    return model
