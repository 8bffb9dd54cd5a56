"""Loading of the model families other than ConvNeXt V1 (ConvNeXt V2, DINOv3-ConvNeXt) once checkpoint.load_pretrained
has read a checkpoint under its guarantees: a family describes how its checkpoints map onto its classes (Layout),
and load_family_checked matches the tensors against that layout before allocating anything, then builds and
loads the model. convnext_v2.py and dinov3_convnext.py each define their Layout and call load_family_checked."""
from __future__ import annotations

import copy
import math
import warnings

import torch

from fastconvnext import checkpoint


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
    checkpoint.check_block_structure(config, canonical, source, strict, layout.block_key)
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
