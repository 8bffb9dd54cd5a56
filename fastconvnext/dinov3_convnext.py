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


class Layout:
    """How one model family's checkpoints map onto its classes, for load_family_checked.

    config_class: its config (with from_dict); classes: {name: class}; canonical(state_dict, source): the tensors
    under canonical names (one key space for every class of the family); model_key(cls, canonical name): the
    name in cls's state dict; block_key: a regex whose groups 1 and 2 are the stage and block of a canonical
    name; head_part(canonical name): the head part it belongs to (None for the trunk), a part one class has and
    another lacks; default_class(canonical names): the class name a checkpoint was saved from.
    """

    def __init__(self, config_class, classes, canonical, model_key, block_key, head_part, default_class):
        self.config_class, self.classes, self.canonical, self.model_key = config_class, classes, canonical, model_key
        self.block_key, self.head_part, self.default_class = block_key, head_part, default_class


def load_family_checked(layout, cls, source, state_dict, config_dict, config, overrides, strict,
                        ignore_mismatched_sizes, dtype, device):
    """(model, loading info) of `cls` (a class, a {name: class} mapping to choose from, or None: any of the
    family's) with `state_dict`, read by checkpoint.load_pretrained from `source` under its guarantees.

    Every name and shape is matched against the layout of cls(config), read off a meta-device model with at
    most one block per stage, before any parameter is allocated: block counts first, from the names alone (a
    config declaring huge depths is refused there), then every tensor. As for ConvNeXt: a whole head part the
    checkpoint lacks is initialized (with a warning) and one only the checkpoint has is dropped; anything else
    missing or unexpected raises unless strict=False, a wrong shape unless ignore_mismatched_sizes=True.
    """
    from fastconvnext import checkpoint

    canonical = layout.canonical(checkpoint._strip_ddp_prefix(state_dict), source)
    checkpoint._check_tensors(canonical, {}, source)
    config = _build_config(layout.config_class, config, config_dict, overrides, source)
    if cls is None:  # the functional API's "choose for me"
        cls = layout.classes
    if isinstance(cls, dict):
        name = layout.default_class(canonical)
        if name not in cls:
            raise TypeError(f"the checkpoint holds a {name}, which is not among the classes given: {sorted(cls)}")
        cls = cls[name]
    _check_blocks(layout, config, canonical, source, strict)
    expected, model_keys = _expected_layout(layout, cls, config)
    wanted, given = set(expected), set(canonical)
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    wanted_parts, given_parts = {layout.head_part(k) for k in wanted}, {layout.head_part(k) for k in given}
    new_head = [k for k in missing if layout.head_part(k) not in given_parts | {None}]
    dropped_head = [k for k in unexpected if layout.head_part(k) not in wanted_parts | {None}]
    missing = [k for k in missing if k not in new_head]
    unexpected = [k for k in unexpected if k not in dropped_head]
    mismatched = sorted(k for k in wanted & given if tuple(canonical[k].shape) != expected[k])
    header = (f"checkpoint {source} does not match {cls.__name__}(hidden_sizes={config.hidden_sizes}, "
              f"depths={config.depths})")
    problems = _describe(missing, unexpected, mismatched, expected, canonical)
    if (mismatched and not ignore_mismatched_sizes) or (strict and (missing or unexpected)):
        raise ValueError(f"{header}:\n{problems}")
    loadable = sorted(wanted & given - set(mismatched))
    initialized = sorted(wanted - set(loadable))
    new_parameters = sum(math.prod(expected[k]) for k in initialized)
    allowed = max(checkpoint.MIN_NEW_PARAMETERS_ALLOWED, sum(canonical[k].numel() for k in loadable))
    if new_parameters > allowed:
        raise ValueError(f"{header}: loading would initialize {new_parameters:,} parameters the checkpoint does not "
                         f"provide (at most {allowed:,}); the config and the checkpoint describe different models")
    if missing or unexpected:
        warnings.warn(f"{header}; loaded anyway (strict=False):\n{problems}", stacklevel=4)
    target_dtype = checkpoint._target_dtype(dtype, config, canonical, source)
    with torch.device("meta"), checkpoint.built_in(target_dtype):
        model = cls(config)
    if set(model.state_dict()) != set(model_keys.values()):
        raise RuntimeError(f"{cls.__name__} has other tensors than its one-block-per-stage layout predicted")
    model.to_empty(device=device)
    _initialize(model, [model_keys[k] for k in initialized])
    model.load_state_dict({model_keys[k]: canonical[k] for k in loadable}, strict=False)
    newly = new_head + (mismatched if ignore_mismatched_sizes else [])
    if newly:
        warnings.warn(f"{cls.__name__} from {source}: {len(newly)} tensors are not in the checkpoint (or have "
                      f"another shape) and were newly initialized: {[model_keys[k] for k in newly]}", stacklevel=4)
    model.config.dtype = target_dtype
    info = {
        "missing_keys": {model_keys[k] for k in missing + new_head},
        "unexpected_keys": set(unexpected + dropped_head),
        "mismatched_keys": {(model_keys[k], canonical[k].shape, torch.Size(expected[k])) for k in mismatched},
        "error_msgs": [],
    }
    return model, info


def _build_config(config_class, config, config_dict, overrides, source):
    from fastconvnext import checkpoint

    name = config_class.__name__
    if isinstance(config, config_class) and not overrides:
        return config
    if config is not None:  # also transformers' config of the same model
        if not callable(getattr(config, "to_dict", None)):
            raise TypeError(f"config must be a {name}, got {type(config).__name__}")
        base, origin = config.to_dict(), "the config argument"
    elif config_dict is not None:
        base, origin = config_dict, f"{source}/config.json"
    else:
        raise ValueError(f"{source}: a checkpoint file of this model needs config={name}(...) (only transformers "
                         f"directories, with their config.json, are read without one)")
    try:
        return config_class.from_dict(checkpoint._merge_overrides(base, overrides))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{origin}: {err}") from None
    except Exception as err:  # a field of the wrong kind failing deep in the constructor
        raise ValueError(f"{origin}: invalid {name} fields ({type(err).__name__}: {err})") from None


def _blocks_by_stage(layout, canonical):
    blocks = {}
    for key in canonical:
        match = layout.block_key.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return blocks


def _check_blocks(layout, config, canonical, source, strict):
    """The config's blocks against the checkpoint's, from the names alone, before anything is built."""
    from fastconvnext import checkpoint

    blocks = _blocks_by_stage(layout, canonical)
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


def _expected_layout(layout, cls, config):
    """({canonical name: shape}, {canonical name: model key}) of cls(config), read off a meta-device model with at
    most one block per stage (the block names repeated for every block)."""
    small = copy.copy(config)
    small.depths = [min(d, 1) for d in config.depths]
    with torch.device("meta"):
        template = cls(small).state_dict()
    shapes, model_keys = {}, {}
    for key, tensor in template.items():
        name = layout.canonical({key: None}, "the model").popitem()[0]
        match = layout.block_key.match(name)
        names = [name]
        if match is not None:
            stage, start, end = int(match.group(1)), match.start(2), match.end(2)
            names = [f"{name[:start]}{block}{name[end:]}" for block in range(config.depths[stage])]
        for canonical_name in names:
            shapes[canonical_name] = tuple(tensor.shape)
            model_keys[canonical_name] = layout.model_key(cls, canonical_name)
    return shapes, model_keys


def _describe(missing, unexpected, mismatched, expected, canonical, limit=40):
    lines = [f"  missing: {k} {list(expected[k])}" for k in missing]
    lines += [f"  unexpected: {k} {list(canonical[k].shape)}" for k in unexpected]
    lines += [f"  wrong shape: {k} expected {list(expected[k])}, given {list(canonical[k].shape)}" for k in mismatched]
    return "\n".join(lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []))


def _initialize(model, keys):
    """transformers' initialization of the modules owning the named tensors (the model's _init_weights: LayerNorm
    1/0, other weights N(0, initializer_range), biases 0, gamma its init value, GRN 0); the tensors the checkpoint
    does provide are loaded over them afterwards."""
    owners = {key.rpartition(".")[0] for key in keys}
    with torch.no_grad():
        for owner in sorted(owners):
            model._init_weights(model.get_submodule(owner))


# ---- DINOv3-ConvNeXt's layout --------------------------------------------------------------------------------


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
    classes={c.__name__: c for c in (DINOv3ConvNextModel, DINOv3ConvNextBackbone)},
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
