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

import copy
import math
import re
import warnings

import torch
import torch.utils.checkpoint
from torch import nn

from fastconvnext import backend
from fastconvnext.configuration import DINOv3ConvNextConfig
from fastconvnext.modeling import (
    _DROP_PATHS,
    ConvNextDropPath,
    ConvNextLayerNorm,
    ConvNextPreTrainedModel,
    _activation_module,
    _channels_last,
    _contiguous_nchw,
    _draw_scale,
    _fused_act_name,
    _returned,
    _run_under_backend,
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
_BLOCK_KEY = re.compile(r"^model\.stages\.(\d{1,9})\.layers\.(\d{1,9})\.")
ENCODER_PREFIX = "model."
_HEAD_PREFIX = "layer_norm."  # the only part one class has and the other lacks (the model's final norm)


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


class DINOv3ConvNextEncoder(nn.Module):
    """The stages (transformers' `model` attribute); hidden states are the input, then each stage's output."""

    def __init__(self, config):
        super().__init__()
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        self.stages = nn.ModuleList()
        start = 0
        for i, depth in enumerate(config.depths):
            self.stages.append(DINOv3ConvNextStage(config, i, rates[start:start + depth]))
            start += depth
        self.gradient_checkpointing = False

    def forward(self, x, output_hidden_states=False):
        hidden_states = [x] if output_hidden_states else None
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                scoped = None if torch.compiler.is_compiling() else backend.scoped_backend()
                if scoped is None:
                    x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
                else:
                    x = torch.utils.checkpoint.checkpoint(_run_under_backend, scoped, stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states


class DINOv3ConvNextPreTrainedModel(ConvNextPreTrainedModel):
    config_class = DINOv3ConvNextConfig
    base_model_prefix = "model"

    def __init__(self, config):
        if not isinstance(config, DINOv3ConvNextConfig):
            raise TypeError(f"config must be a fastconvnext.DINOv3ConvNextConfig, got {type(config).__name__}")
        super().__init__(config)

    @property
    def base_model(self):
        return self

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DINOv3ConvNextLayer):
            nn.init.constant_(module.gamma, self.config.layer_scale_init_value)

    def _set_gradient_checkpointing(self, enabled):
        for module in self.modules():
            if isinstance(module, DINOv3ConvNextEncoder):
                module.gradient_checkpointing = enabled

    @property
    def is_gradient_checkpointing(self):
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, DINOv3ConvNextEncoder))

    def _checkpoint_state_dict(self):
        """What save_pretrained writes: the encoder's tensors without `model.`, as transformers writes them."""
        return saved_state_dict(self)

    @classmethod
    def from_pretrained(cls, path, *, config=None, state_dict=None, **kwargs):
        """Load a transformers DINOv3-ConvNeXt directory (config.json model_type "dinov3_convnext") or hub id;
        options as checkpoint.load_pretrained. Called on DINOv3ConvNextPreTrainedModel itself, the class is
        chosen by the tensors (final layer_norm: the model, else the backbone)."""
        from fastconvnext import checkpoint

        target = cls
        if cls is DINOv3ConvNextPreTrainedModel:
            target = {c.__name__: c for c in (DINOv3ConvNextModel, DINOv3ConvNextBackbone)}
        return checkpoint.load_pretrained(target, path, config=config, state_dict=state_dict, **kwargs)


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


class DINOv3ConvNextBackbone(DINOv3ConvNextPreTrainedModel):
    """The hidden states named in config.out_features ("stem" is pixel_values itself), without any norm, as
    transformers returns them."""

    has_attentions = False

    def __init__(self, config):
        super().__init__(config)
        self.num_features = [config.num_channels] + list(config.hidden_sizes)
        self.model = DINOv3ConvNextEncoder(config)
        self.post_init()

    stage_names = property(lambda self: self.config.stage_names)
    out_feature_channels = property(lambda self: dict(zip(self.stage_names, self.num_features)))
    channels = property(lambda self: [self.out_feature_channels[s] for s in self.out_features])

    @property
    def out_features(self):
        return self.config.out_features

    @out_features.setter
    def out_features(self, value):
        self.config.out_features = value

    @property
    def out_indices(self):
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, value):
        self.config.out_indices = value

    def forward_with_filtered_kwargs(self, *args, **kwargs):
        kwargs.pop("output_attentions", None)
        return self(*args, **kwargs)

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


# ---- loading (called by checkpoint.load_pretrained for model_type "dinov3_convnext") ---------------------


def load_checked(cls, source, state_dict, config_dict, config, overrides, strict, ignore_mismatched_sizes, dtype,
                 device):
    """(model, loading info) of `cls` (or a {name: class} mapping to choose from) with `state_dict`, read by
    checkpoint.load_pretrained from `source`. Every name and shape is matched against the layout of cls(config),
    built on the meta device with at most one block per stage, before any parameter is allocated: the block
    counts first (a config declaring huge depths is refused from the names alone), then the tensors."""
    from fastconvnext import checkpoint

    state_dict = _with_model_prefix(checkpoint._strip_ddp_prefix(state_dict), source)
    checkpoint._check_tensors(state_dict, {}, source)
    config = _build_config(config, config_dict, overrides, source)
    if cls is None:  # the functional API's "choose for me"
        cls = {c.__name__: c for c in (DINOv3ConvNextModel, DINOv3ConvNextBackbone)}
    if isinstance(cls, dict):
        name = "DINOv3ConvNextModel" if any(k.startswith(_HEAD_PREFIX) for k in state_dict) else "DINOv3ConvNextBackbone"
        if name not in cls:
            raise TypeError(f"the checkpoint holds a {name}, which is not among the classes given: {sorted(cls)}")
        cls = cls[name]
    _check_blocks(config, state_dict, source, strict)
    expected = _expected_layout(cls, config)
    wanted, given = set(expected), set(state_dict)
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    new_head = [k for k in missing if k.startswith(_HEAD_PREFIX) and not any(g.startswith(_HEAD_PREFIX) for g in given)]
    dropped_head = [k for k in unexpected if k.startswith(_HEAD_PREFIX) and not any(w.startswith(_HEAD_PREFIX) for w in wanted)]
    missing = [k for k in missing if k not in new_head]
    unexpected = [k for k in unexpected if k not in dropped_head]
    mismatched = sorted(k for k in wanted & given if tuple(state_dict[k].shape) != expected[k])
    header = (f"checkpoint {source} does not match {cls.__name__}(hidden_sizes={config.hidden_sizes}, "
              f"depths={config.depths})")
    problems = _describe(missing, unexpected, mismatched, expected, state_dict)
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(f"{header}:\n{problems}")
    if strict and (missing or unexpected):
        raise ValueError(f"{header}:\n{problems}")
    loadable = sorted(wanted & given - set(mismatched))
    initialized = sorted(wanted - set(loadable))
    new_parameters = sum(math.prod(expected[k]) for k in initialized)
    allowed = max(checkpoint.MIN_NEW_PARAMETERS_ALLOWED, sum(state_dict[k].numel() for k in loadable))
    if new_parameters > allowed:
        raise ValueError(f"{header}: loading would initialize {new_parameters:,} parameters the checkpoint does not "
                         f"provide (at most {allowed:,}); the config and the checkpoint describe different models")
    if missing or unexpected:
        warnings.warn(f"{header}; loaded anyway (strict=False):\n{problems}", stacklevel=4)
    target_dtype = checkpoint._target_dtype(dtype, config, state_dict, source)
    with torch.device("meta"), checkpoint.built_in(target_dtype):
        model = cls(config)
    if set(model.state_dict()) != wanted:
        raise RuntimeError(f"{cls.__name__} has other tensors than its one-block-per-stage layout predicted")
    model.to_empty(device=device)
    _initialize(model, initialized)
    model.load_state_dict({k: state_dict[k] for k in loadable}, strict=False)
    newly = new_head + (mismatched if ignore_mismatched_sizes else [])
    if newly:
        warnings.warn(f"{cls.__name__} from {source}: {len(newly)} tensors are not in the checkpoint (or have "
                      f"another shape) and were newly initialized: {newly}", stacklevel=4)
    model.config.dtype = target_dtype
    info = {
        "missing_keys": set(missing + new_head), "unexpected_keys": set(unexpected + dropped_head),
        "mismatched_keys": {(k, state_dict[k].shape, torch.Size(expected[k])) for k in mismatched}, "error_msgs": [],
    }
    return model, info


def _with_model_prefix(state_dict, source):
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


def _build_config(config, config_dict, overrides, source):
    from fastconvnext import checkpoint

    if isinstance(config, DINOv3ConvNextConfig) and not overrides:
        return config
    if config is not None:  # also a transformers DINOv3ConvNextConfig
        if not callable(getattr(config, "to_dict", None)):
            raise TypeError(f"config must be a DINOv3ConvNextConfig, got {type(config).__name__}")
        base, origin = config.to_dict(), "the config argument"
    elif config_dict is not None:
        base, origin = config_dict, f"{source}/config.json"
    else:
        raise ValueError(f"{source}: a DINOv3-ConvNeXt checkpoint file needs config=DINOv3ConvNextConfig(...) (only "
                         f"transformers directories, with their config.json, are read without one)")
    try:
        return DINOv3ConvNextConfig.from_dict(checkpoint._merge_overrides(base, overrides))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{origin}: {err}") from None
    except Exception as err:  # a field of the wrong kind failing deep in the constructor
        raise ValueError(f"{origin}: invalid DINOv3ConvNextConfig fields ({type(err).__name__}: {err})") from None


def _blocks_by_stage(state_dict):
    blocks = {}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return blocks


def _check_blocks(config, state_dict, source, strict):
    """The config's blocks against the checkpoint's, from the names alone, before anything is built."""
    from fastconvnext import checkpoint

    blocks = _blocks_by_stage(state_dict)
    absent = sum(depth - sum(1 for j in blocks.get(stage, ()) if j < depth) for stage, depth in enumerate(config.depths))
    extra = sum(len({j for j in indices if stage >= len(config.depths) or j >= config.depths[stage]})
                for stage, indices in blocks.items())
    if not absent and not extra:
        return
    found = [len(blocks.get(i, ())) for i in range(min(max(blocks, default=-1) + 1, 64))]
    described = (f"checkpoint {source} does not match the architecture: the config has depths {list(config.depths)} "
                 f"but the checkpoint holds blocks per stage {found} ({absent} blocks absent, {extra} unexpected)")
    if strict or absent > checkpoint.MAX_ABSENT_BLOCKS:
        raise ValueError(described)


def _expected_layout(cls, config):
    """{key: shape} of cls(config), read off a meta-device model with at most one block per stage."""
    small = copy.copy(config)
    small.depths = [min(d, 1) for d in config.depths]
    with torch.device("meta"):
        template = cls(small).state_dict()
    shapes = {}
    for key, tensor in template.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            shapes[key] = tuple(tensor.shape)
            continue
        stage, rest = int(match.group(1)), key[match.end():]
        for block in range(config.depths[stage]):
            shapes[f"model.stages.{stage}.layers.{block}.{rest}"] = tuple(tensor.shape)
    return shapes


def _describe(missing, unexpected, mismatched, expected, state_dict, limit=40):
    lines = [f"  missing: {k} {list(expected[k])}" for k in missing]
    lines += [f"  unexpected: {k} {list(state_dict[k].shape)}" for k in unexpected]
    lines += [f"  wrong shape: {k} expected {list(expected[k])}, given {list(state_dict[k].shape)}" for k in mismatched]
    return "\n".join(lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []))


def _initialize(model, keys):
    """transformers' initialization of the named tensors: gamma its init value, LayerNorm 1/0, biases 0, other
    weights N(0, initializer_range)."""
    config = model.config
    with torch.no_grad():
        for key in keys:
            owner_name, _, attribute = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = getattr(owner, attribute)
            if attribute == "gamma":
                tensor.fill_(config.layer_scale_init_value)
            elif isinstance(owner, nn.LayerNorm):
                tensor.fill_(1.0 if attribute == "weight" else 0.0)
            elif attribute == "bias":
                tensor.zero_()
            else:
                tensor.normal_(0.0, config.initializer_range)
