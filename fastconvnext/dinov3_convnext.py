"""DINOv3's ConvNeXt with transformers' class names, module tree, parameter names, config.json and outputs.

The block is ConvNeXt V1's arithmetic under other names (depthwise_conv, layer_norm, pointwise_conv1,
activation_fn, pointwise_conv2, gamma, drop_path), so it runs through the same two backend ops as V1
(modeling.block_parts_forward): fused kernels or eager ops, with the same fallback that calls the sub-modules
when hooks, global module hooks or replaced modules (adapters) are present, and the same drop path.

What differs from V1: there is no `embeddings` module (stage 0's `downsample_layers` are the stem: a 4x4/4 conv
then a channels-first LayerNorm), every LayerNorm uses config.layer_norm_eps, layer scale is always present,
the drop-path rates are float64 (numpy's linspace in transformers), hidden_states[0] is pixel_values itself,
DINOv3ConvNextModel returns tokens [pooled, patches...] through a final LayerNorm (pooler_output is the first,
the "CLS" token) and the backbone's feature maps are the stages' outputs without any norm.

The classes subclass fastconvnext's ConvNeXt base class for its conveniences (input checks, output flags,
gradient checkpointing, save_pretrained); `from_pretrained` goes through checkpoint.load_pretrained, which
reads the folder with the same guarantees as for ConvNeXt and hands the tensors to `load_checked` below
(dispatched by config model_type "dinov3_convnext").
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fastconvnext.configuration import DINOv3ConvNextConfig
from fastconvnext.family_loading import Layout, load_family_checked
from fastconvnext.modeling import (
    _DROP_PATHS,
    BackboneStages,
    ConvNextDropPath,
    ConvNextEncoder,
    ConvNextLayerNorm,
    ConvNextPreTrainedModel,
    _activation_module,
    _channels_last,
    _contiguous_nchw,
    _draw_scale,
    _fused_act_name,
    _returned,
    block_parts_forward,
)
from fastconvnext.outputs import BackboneOutput, BaseModelOutputWithPoolingAndNoAttention

__all__ = [
    "DINOv3ConvNextBackbone",
    "DINOv3ConvNextConfig",
    "DINOv3ConvNextModel",
    "DINOv3ConvNextPreTrainedModel",
]

MODEL_CLASS_NAMES = ("DINOv3ConvNextModel", "DINOv3ConvNextBackbone")
# a block's tensors, by their canonical names (the module names): groups are (stage, block)
BLOCK_KEY = re.compile(r"^model\.stages\.(\d{1,9})\.layers\.(\d{1,9})\.")
ENCODER_PREFIX = "model."


def drop_path_rates(rate, count):
    """numpy.linspace(0, rate, count).tolist() (transformers' rates, float64) without numpy: i * step, the
    last exactly `rate`."""
    if count == 1:
        return [0.0]
    step = rate / (count - 1)
    rates = [i * step for i in range(count)]
    if count > 1:
        rates[-1] = float(rate)
    return rates


class DINOv3ConvNextLayerNorm(ConvNextLayerNorm):
    """LayerNorm over channels, [N, H, W, C] ("channels_last") or [N, C, H, W] ("channels_first") input."""


class DINOv3ConvNextLayer(nn.Module):
    """One block: depthwise 7x7 -> LayerNorm -> Linear(C, 4C) -> act -> Linear(4C, C) -> x gamma -> drop path
    -> + input, run as V1's two backend ops (block_parts_forward)."""

    def __init__(self, config, channels, drop_path=0.0):
        super().__init__()
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.layer_norm = DINOv3ConvNextLayerNorm(channels, eps=config.layer_norm_eps)
        self.pointwise_conv1 = nn.Linear(channels, 4 * channels)
        self.activation_fn = _activation_module(config)
        self.pointwise_conv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
        self.drop_path = ConvNextDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        return block_parts_forward(
            x, self.depthwise_conv, self.layer_norm, self.pointwise_conv1, self.activation_fn, self.pointwise_conv2,
            self.gamma, self.drop_path, DINOv3ConvNextLayerNorm, _fused_act_name, _DROP_PATHS, _draw_scale,
        )


class DINOv3ConvNextStage(nn.Module):
    """downsample_layers (stage 0: the 4x4/4 stem conv then LayerNorm; later: LayerNorm then a 2x2/2 conv),
    then the stage's blocks."""

    def __init__(self, config, stage_index, rates):
        super().__init__()
        out_channels = config.hidden_sizes[stage_index]
        eps = config.layer_norm_eps
        if stage_index == 0:
            patch = DINOv3ConvNextConfig.STEM_PATCH_SIZE
            layers = [
                nn.Conv2d(config.num_channels, out_channels, kernel_size=patch, stride=patch),
                DINOv3ConvNextLayerNorm(out_channels, eps=eps, data_format="channels_first"),
            ]
        else:
            in_channels = config.hidden_sizes[stage_index - 1]
            layers = [
                DINOv3ConvNextLayerNorm(in_channels, eps=eps, data_format="channels_first"),
                nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2),
            ]
        self.downsample_layers = nn.ModuleList(layers)
        self.layers = nn.ModuleList(DINOv3ConvNextLayer(config, out_channels, rate) for rate in rates)

    def forward(self, x):
        x = _channels_last(x)
        for module in self.downsample_layers:
            x = _channels_last(module(x))
        for layer in self.layers:
            x = layer(x)
        return x


class DINOv3ConvNextEncoder(ConvNextEncoder):
    """The stages (transformers' `model` attribute); hidden states are the input, then each stage's output.
    ConvNextEncoder's forward (gradient checkpointing per stage) over DINOv3's stages and float64 rates."""

    def __init__(self, config):
        nn.Module.__init__(self)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        self.stages = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            self.stages.append(DINOv3ConvNextStage(config, i, rates[start:start + depth]))
            start += depth
        self.gradient_checkpointing = False


class DINOv3ConvNextPreTrainedModel(ConvNextPreTrainedModel):
    config_class = DINOv3ConvNextConfig
    base_model_prefix = "model"

    def __init__(self, config):
        if not isinstance(config, DINOv3ConvNextConfig):
            raise TypeError(f"config must be a fastconvnext.DINOv3ConvNextConfig, got {type(config).__name__}")
        super().__init__(config)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DINOv3ConvNextLayer):
            nn.init.constant_(module.gamma, self.config.layer_scale_init_value)

    def _checkpoint_state_dict(self):
        """What save_pretrained writes: the encoder's tensors without `model.`, as transformers writes them."""
        return saved_state_dict(self)

    @classmethod
    def model_classes(cls):
        return DINOv3ConvNextModel, DINOv3ConvNextBackbone


class DINOv3ConvNextModel(DINOv3ConvNextPreTrainedModel):
    """last_hidden_state: [N, 1 + H*W, C] tokens (the spatial mean, then every position of the last stage) through
    the final LayerNorm; pooler_output: the first token."""

    def __init__(self, config):
        super().__init__(config)
        self.model = DINOv3ConvNextEncoder(config)
        self.layer_norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, output_attentions=None):
        """output_attentions is accepted and ignored, as in transformers (no attention)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        self._check_pixel_values(pixel_values)
        selection, return_dict = self._flags(output_hidden_states, return_dict)
        last, hidden_states = self.model(pixel_values, selection is not None)
        pooled = self.pool(last).flatten(2).transpose(1, 2)
        patches = last.flatten(2).transpose(1, 2)  # a view: last is channels-last
        tokens = self.layer_norm(torch.cat([pooled, patches], dim=1))
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=tokens, pooler_output=tokens[:, 0],
            hidden_states=_contiguous_nchw(hidden_states, selection),
        )
        return _returned(output, return_dict)


class DINOv3ConvNextBackbone(BackboneStages, DINOv3ConvNextPreTrainedModel):
    """The hidden states named in config.out_features ("stem" is pixel_values itself), without any norm, as
    transformers returns them."""

    def __init__(self, config):
        super().__init__(config)
        self.num_features = [config.num_channels] + list(config.hidden_sizes)
        self.model = DINOv3ConvNextEncoder(config)
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None, output_attentions=None):
        self._check_pixel_values(pixel_values)
        selection, return_dict = self._flags(output_hidden_states, return_dict)
        _, hidden_states = self.model(pixel_values, output_hidden_states=True)
        feature_maps = tuple(h for stage, h in zip(self.stage_names, hidden_states) if stage in self.out_features)
        output = BackboneOutput(
            feature_maps=_contiguous_nchw(feature_maps),
            hidden_states=_contiguous_nchw(hidden_states, selection) if selection is not None else None,
        )
        return _returned(output, return_dict)


# ---- loading (checkpoint.load_pretrained's entry for model_type "dinov3_convnext"): DINOv3-ConvNeXt's layout ----


def _dinov3_canonical(state_dict, source):
    """The state dict under the module names: transformers writes the encoder's tensors without the `model.`
    prefix of its attribute ("stages.0...."), and reads them with or without it."""
    renamed = {}
    for key, tensor in state_dict.items():
        name = ENCODER_PREFIX + key if key.startswith("stages.") else key
        if name in renamed:
            raise ValueError(f"{source}: checkpoint holds {name!r} both with and without the {ENCODER_PREFIX!r} prefix")
        renamed[name] = tensor
    return renamed


def saved_state_dict(model):
    """The tensors save_pretrained writes, named as transformers writes them (the encoder's without `model.`)."""
    return {key.removeprefix(ENCODER_PREFIX): tensor for key, tensor in model.state_dict().items()}


LAYOUT = Layout(
    config_class=DINOv3ConvNextConfig,
    classes={c.__name__: c for c in DINOv3ConvNextPreTrainedModel.model_classes()},
    canonical=_dinov3_canonical,
    model_key=lambda cls, name: name,
    block_key=BLOCK_KEY,
    head_part=lambda name: "layer_norm" if name.startswith("layer_norm.") else None,
    default_class=lambda canonical: (
        "DINOv3ConvNextModel" if any(k.startswith("layer_norm.") for k in canonical) else "DINOv3ConvNextBackbone"
    ),
)


def load_checked(cls, source, state_dict, config_dict, config, overrides, strict, ignore_mismatched_sizes, dtype,
                 device):
    """checkpoint.load_pretrained's entry for model_type "dinov3_convnext"."""
    return load_family_checked(LAYOUT, cls, source, state_dict, config_dict, config, overrides, strict,
                               ignore_mismatched_sizes, dtype, device)
