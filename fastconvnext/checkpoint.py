"""Reading and writing ConvNeXt checkpoints.

Sources `load_pretrained` understands:
- a transformers directory: config.json with model.safetensors, sharded safetensors
  (model.safetensors.index.json), pytorch_model.bin or sharded pytorch_model.bin;
- one checkpoint file (.safetensors, .pth, .pt, .bin, .ckpt) in transformers', timm's or the original
  facebookresearch key layout, optionally wrapped as {"model": ...} or {"state_dict": ...}; the
  architecture is then read off the tensor names and shapes;
- a Hugging Face Hub id ("facebook/convnext-tiny-224"), through huggingface_hub when it is installed.

Pickled files are only ever read with `torch.load(weights_only=True)`: a file that would run code
when unpickled is refused, not executed.

Inside this module state dicts are handled in a "canonical" form: transformers' names without the
`convnext.` prefix that ForImageClassification adds to its trunk, so ConvNextModel, the classifier
and the backbone share one key space (embeddings.*, encoder.*, layernorm.*, classifier.*,
hidden_states_norms.<stage>.*).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from fastconvnext.configuration import CONFIG_NAME, ConvNextConfig

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
DIRECTORY_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED_SOURCES = (
    "a transformers directory (config.json + model.safetensors, sharded model.safetensors.index.json, "
    "pytorch_model.bin or pytorch_model.bin.index.json), a checkpoint file "
    f"({', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}) in transformers', timm's or the original "
    "facebookresearch layout, or a Hugging Face Hub id like 'facebook/convnext-tiny-224'"
)

FORMATS = ("transformers", "timm", "original")
# timm and the original code put eps 1e-6 on the final norm; transformers' default is 1e-12.
FINAL_NORM_EPS = {"timm": 1e-6, "original": 1e-6}
BASE_PREFIX = "convnext."
WRAPPER_KEYS = ("model", "state_dict")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_LISTED = 40
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
CONFIG_FIELDS = tuple(
    name for name, param in inspect.signature(ConvNextConfig.__init__).parameters.items()
    if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
)

_BLOCK = r"encoder.stages.\1.layers.\2."
_TIMM_RULES = (
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.([01])\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", _BLOCK + "dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", _BLOCK + "layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", _BLOCK + "pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", _BLOCK + "pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", _BLOCK + "layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
    (r"^head\.fc\.", "classifier."),
)
_ORIGINAL_RULES = (
    (r"^downsample_layers\.0\.0\.", "embeddings.patch_embeddings."),
    (r"^downsample_layers\.0\.1\.", "embeddings.layernorm."),
    (r"^downsample_layers\.(\d+)\.([01])\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", _BLOCK + "dwconv."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", _BLOCK + "layernorm."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", _BLOCK + "pwconv1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", _BLOCK + "pwconv2."),
    (r"^stages\.(\d+)\.(\d+)\.gamma$", _BLOCK + "layer_scale_parameter"),
    (r"^norm\.", "layernorm."),
    (r"^head\.", "classifier."),
)
_STAGE_WIDTH_KEY = re.compile(
    r"^encoder\.stages\.(\d+)\.(?:layers\.(\d+)\.dwconv\.weight|downsampling_layer\.1\.weight)$"
)
_RULES = {"timm": _TIMM_RULES, "original": _ORIGINAL_RULES}
_FORMAT_MARKERS = (
    ("transformers", "embeddings.patch_embeddings.weight"),
    ("timm", "stem.0.weight"),
    ("original", "downsample_layers.0.0.weight"),
)


# ---- public API --------------------------------------------------------------------------------


def load_pretrained(
    cls,
    path,
    *,
    config=None,
    map_location="cpu",
    strict=True,
    dtype="auto",
    ignore_mismatched_sizes=False,
    **kwargs,
):
    """Build `cls` (ConvNextModel, ConvNextForImageClassification or ConvNextBackbone; None: chosen from
    the checkpoint) with the weights at `path`, in eval mode.

    config: a ConvNextConfig to use instead of config.json / the one inferred from the tensors.
    map_location: the device the model ends up on (tensors are read on the CPU first).
    strict: False turns missing and unexpected tensors into a warning (wrong shapes still raise).
    dtype: "auto" keeps the checkpoint's floating dtype, as transformers 5 does; or a torch.dtype / its name.
    ignore_mismatched_sizes: re-initialize (and warn about) tensors whose shape differs, e.g. a new head.
    kwargs: config fields to change (num_labels=10, out_features=["stage2", "stage4"], ...) and, for a
        hub id, huggingface_hub's revision, cache_dir, token, local_files_only, force_download.

    Tensors the target class has and the checkpoint lacks are an error, except a whole head part the
    checkpoint's class never had (final layernorm, classifier, a backbone stage norm): that part is
    initialized as transformers does and a warning lists it. Head parts only the checkpoint has are
    dropped. Any other missing, unexpected or mis-shaped tensor raises ValueError listing them.
    """
    hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    dtype = _checked_dtype(kwargs.pop("torch_dtype", dtype))
    config_overrides = _checked_overrides(kwargs)
    source = _resolve_source(path, hub_options)
    state_dict, config_dict = _read_source(source)
    hf_state_dict, fmt, origins = _convert(state_dict)
    canonical, origins = _to_canonical(hf_state_dict, origins)
    config = _build_config(config, config_dict, canonical, fmt, config_overrides)
    if cls is None:
        cls = _default_class(canonical)
    model = cls(config)
    _load_canonical(model, canonical, origins, source, strict, ignore_mismatched_sizes)
    target_dtype = _checkpoint_dtype(canonical) if dtype == "auto" else dtype
    if target_dtype is not None:
        model.to(dtype=target_dtype)
    model.to(device=torch.device(map_location))
    return model.eval()


def save_pretrained(model, directory, safe_serialization=True):
    """Write config.json and model.safetensors (or pytorch_model.bin) in transformers' form, so that
    transformers' `from_pretrained` of the same class loads it with no missing or unexpected keys."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_pretrained needs a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _plain_tensors(model.state_dict())
    _remove_stale_weights(directory)
    config_dict = _transformers_config_dict(model, tensors)
    (directory / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, str(directory / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        torch.save(tensors, directory / WEIGHTS_NAME)
    return directory


def convert_state_dict(state_dict):
    """timm / original facebookresearch keys -> transformers keys; returns (state_dict, detected_format).

    The result has ConvNextForImageClassification's names (trunk under `convnext.`) when the checkpoint
    has a classifier head, else ConvNextModel's. A transformers state dict comes back unchanged (copied).
    timm's 4-D [out, in, 1, 1] MLP weights (conv_mlp variants) become Linear [out, in] weights.
    Keys no rule knows keep their name, so loading reports them as unexpected.
    """
    converted, fmt, _ = _convert(state_dict)
    return converted, fmt


def detect_format(state_dict):
    """'transformers', 'timm' or 'original', from the name of the stem convolution's weight."""
    keys = {_strip_prefix(k, BASE_PREFIX) for k in state_dict}
    for fmt, marker in _FORMAT_MARKERS:
        if marker in keys:
            return fmt
    expected = ", ".join(f"{marker!r} ({fmt})" for fmt, marker in _FORMAT_MARKERS)
    sample = ", ".join(repr(k) for k in list(state_dict)[:6])
    raise ValueError(
        f"not a ConvNeXt checkpoint: no stem weight among its {len(state_dict)} tensors (expected one of "
        f"{expected}); its first keys are {sample or 'none'}"
    )


def infer_config(state_dict, fmt=None):
    """The ConvNextConfig a state dict was made with, read off tensor names and shapes.

    `state_dict` may be in any supported layout (converted first when it is not transformers').
    `fmt` names the layout the weights came from ("transformers", "timm", "original"; None: detected);
    timm and the original code use eps 1e-6 on the final norm, so those give layer_norm_eps=1e-6.
    """
    detected = detect_format(state_dict)
    if detected != "transformers":
        state_dict, _, _ = _convert(state_dict)
    canonical, _ = _to_canonical(state_dict, {})
    return ConvNextConfig(**_inferred_fields(canonical, fmt or detected))


def from_transformers(hf_model):
    """The fastconvnext twin of a transformers ConvNext model: same class, config, weights, train/eval
    mode, device and dtype."""
    from fastconvnext import modeling

    classes = {
        name: getattr(modeling, name)
        for name in ("ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone")
    }
    name = type(hf_model).__name__
    if name not in classes:
        raise TypeError(f"from_transformers takes one of transformers' {sorted(classes)}, got {name}")
    config = ConvNextConfig.from_dict(hf_model.config.to_dict())
    reference = next(hf_model.parameters())
    model = classes[name](config).to(device=reference.device, dtype=reference.dtype)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    _copy_training_flags(hf_model, model)
    return model


# ---- locating and reading ----------------------------------------------------------------------


def _checked_dtype(dtype):
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise TypeError(f"dtype must be 'auto', a floating torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def _checked_overrides(overrides):
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown keyword arguments {unknown}: load_pretrained takes config, map_location, strict, dtype, "
            f"ignore_mismatched_sizes, the hub options {list(HUB_OPTIONS)} and the config fields {list(CONFIG_FIELDS)}"
        )
    return overrides


def _resolve_source(path, hub_options=None):
    """A local Path for `path`, downloading a hub id; FileNotFoundError when neither works."""
    local = Path(os.path.expanduser(str(path)))
    if local.exists():
        return local
    text = str(path)
    if not _looks_like_hub_id(text):
        raise FileNotFoundError(f"no such file or directory: {text}")
    return _download_from_hub(text, **(hub_options or {}))


def _looks_like_hub_id(text):
    """owner/name that does not end in a checkpoint file suffix (a missing local file, not a repo)."""
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".json",)
    return bool(HUB_ID.match(text)) and not text.lower().endswith(suffixes)


def _download_from_hub(repo_id, **hub_options):
    advice = (
        "Download the files yourself (config.json and model.safetensors) and pass a local path: a "
        "directory or a checkpoint file."
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or directory, and loading it from the Hugging Face Hub needs "
            f"huggingface_hub (pip install huggingface_hub). {advice}"
        ) from None
    try:
        patterns = [CONFIG_NAME, "model*.safetensors*"]
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_options))
        if not any(folder.glob("*.safetensors")):
            patterns = [CONFIG_NAME, "pytorch_model*.bin*"]
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_options))
    except Exception as err:  # offline, unknown repo, gated repo, network errors: all end the same way
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or directory, and downloading it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {err}). {advice}"
        ) from err
    return folder


def _read_source(source):
    """(state dict, config.json contents or None) of a directory or a single checkpoint file."""
    if source.is_dir():
        return _read_directory(source)
    return _unwrap(_read_file(source), source), None


def _read_directory(directory):
    for name in DIRECTORY_WEIGHTS:
        if (directory / name).is_file():
            weights = directory / name
            break
    else:
        raise ValueError(
            f"{directory} holds none of {', '.join(DIRECTORY_WEIGHTS)}; expected {SUPPORTED_SOURCES}"
        )
    if weights.name.endswith(".index.json"):
        state_dict = _read_shards(weights)
    else:
        state_dict = _unwrap(_read_file(weights), weights)
    config_file = directory / CONFIG_NAME
    config_dict = _read_json(config_file) if config_file.is_file() else None
    return state_dict, config_dict


def _read_shards(index_file):
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file} has no 'weight_map' object, so its shards cannot be found")
    state_dict = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_file.parent / shard_name
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard} listed in {index_file} does not exist")
        state_dict.update(_unwrap(_read_file(shard), shard))
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise ValueError(f"{index_file} lists tensors its shards do not hold: {_name_list(absent)}")
    return state_dict


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _read_file(path):
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ValueError(f"unsupported checkpoint file {path} (suffix {suffix or 'none'!r}); expected {SUPPORTED_SOURCES}")


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as safetensors ({err}); expected {SUPPORTED_SOURCES}") from None


def _read_pickle(path):
    unreadable = f"cannot read {path} as a PyTorch checkpoint"
    if not _has_torch_magic(path):
        raise ValueError(f"{unreadable} (neither a torch.save zip archive nor a pickle); expected {SUPPORTED_SOURCES}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported operand" in str(err).lower():  # a damaged pickle stream, not a forbidden object
            raise ValueError(f"{unreadable} (damaged pickle data); expected {SUPPORTED_SOURCES}") from None
        raise ValueError(
            f"refusing to load {path}: it contains code or objects that are not plain tensors, which "
            f"unpickling would execute or construct (torch.load(weights_only=True) rejected it). Only "
            f"state dicts of tensors are loaded; re-save the state dict, ideally as .safetensors."
        ) from None
    except Exception as err:  # damaged archives surface as RuntimeError, EOFError, struct.error, ...
        raise ValueError(f"{unreadable} ({type(err).__name__}: {err}); expected {SUPPORTED_SOURCES}") from None


def _has_torch_magic(path):
    """torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)."""
    with open(path, "rb") as file:
        head = file.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _unwrap(obj, path):
    """The {name: tensor} state dict inside a loaded file ({"model": ...} / {"state_dict": ...} too)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_ddp_prefix(obj)
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    described = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"{path} holds {described}, not a state dict of tensors (directly or under "
        f"{' / '.join(repr(k) for k in WRAPPER_KEYS)})"
    )


def _strip_ddp_prefix(state_dict):
    """Checkpoints saved from DistributedDataParallel prefix every key with 'module.'."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# ---- key layouts ----------------------------------------------------------------------------


def _convert(state_dict):
    """(transformers-keyed state dict, format, {new key: original key} for renamed keys)."""
    state_dict = _strip_ddp_prefix(state_dict)
    fmt = detect_format(state_dict)
    if fmt == "transformers":
        return dict(state_dict), fmt, {}
    converted, origins = {}, {}
    for key, tensor in state_dict.items():
        new_key = _rename(key, _RULES[fmt])
        if new_key.endswith(("pwconv1.weight", "pwconv2.weight")) and tensor.dim() == 4:
            tensor = _squeeze_1x1(key, tensor)
        if new_key in converted:
            first = origins.get(new_key, new_key)
            raise ValueError(f"checkpoint keys {first!r} and {key!r} both map to {new_key!r}")
        converted[new_key] = tensor
        if new_key != key:
            origins[new_key] = key
    if any(k.startswith("classifier.") for k in converted):
        converted = {_with_base_prefix(k): v for k, v in converted.items()}
        origins = {_with_base_prefix(k): v for k, v in origins.items()}
    return converted, fmt, origins


def _rename(key, rules):
    for pattern, replacement in rules:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key


def _squeeze_1x1(key, tensor):
    if tuple(tensor.shape[2:]) != (1, 1):
        raise ValueError(f"{key}: expected a Linear or 1x1 conv weight, got shape {list(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], tensor.shape[1])


def _strip_prefix(key, prefix):
    return key[len(prefix):] if key.startswith(prefix) else key


def _with_base_prefix(key):
    """ForImageClassification's name for a canonical key (the trunk lives under `convnext.`)."""
    return key if key.startswith(("classifier.", BASE_PREFIX)) else BASE_PREFIX + key


def _to_canonical(state_dict, origins):
    canonical, canonical_origins = {}, {}
    for key, tensor in state_dict.items():
        name = _strip_prefix(key, BASE_PREFIX)
        if name in canonical:
            raise ValueError(f"checkpoint holds {name!r} both with and without the {BASE_PREFIX!r} prefix")
        canonical[name] = tensor
        canonical_origins[name] = origins.get(key, key)
    return canonical, canonical_origins


def _head_part(name):
    """The head part a canonical key belongs to, or None for the trunk (embeddings, encoder)."""
    if name.startswith(("layernorm.", "classifier.")):
        return name.split(".", 1)[0]
    if name.startswith("hidden_states_norms."):
        return ".".join(name.split(".", 2)[:2])
    return None


def _default_class(canonical):
    from fastconvnext import modeling

    if any(k.startswith("classifier.") for k in canonical):
        return modeling.ConvNextForImageClassification
    has_stage_norms = any(k.startswith("hidden_states_norms.") for k in canonical)
    if has_stage_norms and not any(k.startswith("layernorm.") for k in canonical):
        return modeling.ConvNextBackbone
    return modeling.ConvNextModel


# ---- configuration -----------------------------------------------------------------------------


def _build_config(config, config_dict, canonical, fmt, overrides):
    """The given config, else config.json, else the fields read off the tensors; then the overrides."""
    if isinstance(config, ConvNextConfig) and not overrides:
        return config
    if config is not None:  # also takes a transformers ConvNextConfig
        base = config.to_dict()
    elif config_dict is not None:
        base = config_dict
    else:
        base = _inferred_fields(canonical, fmt)
    return ConvNextConfig.from_dict(_merge_overrides(base, overrides))


def _merge_overrides(base, overrides):
    """base updated with overrides, dropping the base fields an override makes inconsistent."""
    merged = dict(base)
    if "out_features" in overrides or "out_indices" in overrides:
        merged.pop("out_features", None)
        merged.pop("out_indices", None)
    if "num_labels" in overrides and "id2label" not in overrides:
        merged.pop("id2label", None)
        merged.pop("label2id", None)
    if "id2label" in overrides and "label2id" not in overrides:
        merged.pop("label2id", None)
    merged.update(overrides)
    return merged


def _inferred_fields(canonical, fmt):
    stem = canonical.get("embeddings.patch_embeddings.weight")
    if stem is None or stem.dim() != 4:
        raise ValueError("cannot infer the architecture: no 4-D embeddings.patch_embeddings.weight (stem conv)")
    if stem.shape[2] != stem.shape[3]:
        raise ValueError(f"the stem conv is not square ({list(stem.shape)}); ConvNextConfig.patch_size is one int")
    depths, hidden_sizes = _stage_shapes(canonical, stem.shape[0])
    fields = {
        "num_channels": stem.shape[1],
        "patch_size": stem.shape[2],
        "num_stages": len(depths),
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "hidden_act": "gelu",
        "layer_scale_init_value": 1e-6 if any(k.endswith(".layer_scale_parameter") for k in canonical) else 0.0,
    }
    if fmt in FINAL_NORM_EPS:
        fields["layer_norm_eps"] = FINAL_NORM_EPS[fmt]
    classifier = canonical.get("classifier.weight")
    if classifier is not None:
        fields["num_labels"] = classifier.shape[0]
    stage_norms = sorted({k.split(".")[1] for k in canonical if k.startswith("hidden_states_norms.")})
    if stage_norms:
        fields["out_features"] = sorted(stage_norms, key=lambda s: -1 if s == "stem" else int(s.removeprefix("stage")))
    return fields


def _stage_shapes(canonical, stem_channels):
    """(depths, hidden_sizes) from encoder.stages.<i>.* tensor names and shapes."""
    layer_counts, widths = {}, {}
    for key, tensor in canonical.items():
        match = _STAGE_WIDTH_KEY.match(key)
        if match:
            stage = int(match.group(1))
            widths.setdefault(stage, tensor.shape[0])
            if match.group(2) is not None:
                layer_counts[stage] = max(layer_counts.get(stage, 0), int(match.group(2)) + 1)
    num_stages = max(widths, default=-1) + 1
    if num_stages == 0:
        raise ValueError("cannot infer the architecture: no encoder.stages.<i>.layers.<j>.dwconv.weight tensors")
    widths.setdefault(0, stem_channels)
    missing = [i for i in range(num_stages) if i not in widths]
    if missing:
        raise ValueError(f"cannot infer the architecture: no tensors for encoder stages {missing}")
    return [layer_counts.get(i, 0) for i in range(num_stages)], [widths[i] for i in range(num_stages)]


def _transformers_config_dict(model, tensors):
    config_dict = model.config.to_dict()
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    config_dict.update(architectures=[type(model).__name__], model_type="convnext")
    if floating:
        config_dict["dtype"] = str(floating[0]).removeprefix("torch.")
    return config_dict


def _checkpoint_dtype(canonical):
    dtypes = {t.dtype for t in canonical.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


# ---- matching a state dict to a model ----------------------------------------------------------


def _load_canonical(model, canonical, origins, source, strict, ignore_mismatched_sizes):
    expected = model.state_dict()
    model_keys = {_strip_prefix(k, BASE_PREFIX): k for k in expected}
    expected_shapes = {name: tuple(expected[key].shape) for name, key in model_keys.items()}
    match = _KeyMatch(model_keys, expected_shapes, canonical)
    report = _MismatchReport(model, source, model_keys, expected_shapes, canonical, origins)
    if match.mismatched and not ignore_mismatched_sizes:
        raise ValueError(report.describe(match.missing, match.unexpected, match.mismatched))
    if strict and (match.missing or match.unexpected):
        raise ValueError(report.describe(match.missing, match.unexpected, []))
    if match.missing or match.unexpected:
        warnings.warn(report.describe(match.missing, match.unexpected, [], strict=False), stacklevel=3)

    to_load = {model_keys[k]: canonical[k] for k in match.loadable}
    result = model.load_state_dict(to_load, strict=False)
    if {_strip_prefix(k, BASE_PREFIX) for k in result.missing_keys} != set(model_keys) - set(match.loadable):
        raise RuntimeError(f"{type(model).__name__}.load_state_dict did not take the matched tensors as planned")

    initialized = match.new_head + match.mismatched
    _initialize(model, [model_keys[k] for k in initialized])
    if initialized:
        lines = [f"  {model_keys[k]} {list(expected_shapes[k])}" for k in initialized]
        warnings.warn(
            f"{type(model).__name__} from {source}: {len(initialized)} tensors are not in the checkpoint (or have "
            f"another shape) and were newly initialized; train them before use:\n" + "\n".join(lines),
            stacklevel=3,
        )
    if match.dropped_head:
        logger.info("%s from %s: ignored checkpoint head tensors %s", type(model).__name__, source, match.dropped_head)


class _KeyMatch:
    """How a checkpoint's canonical keys line up with a model's.

    new_head: a head part (final norm, classifier, one backbone stage norm) the checkpoint lacks entirely.
    dropped_head: a head part only the checkpoint has. missing / unexpected: everything else that differs.
    """

    def __init__(self, model_keys, expected_shapes, canonical):
        wanted, given = set(model_keys), set(canonical)
        model_parts, given_parts = {_head_part(k) for k in wanted}, {_head_part(k) for k in given}
        missing, unexpected = sorted(wanted - given), sorted(given - wanted)
        self.new_head = [k for k in missing if _head_part(k) not in given_parts | {None}]
        self.dropped_head = [k for k in unexpected if _head_part(k) not in model_parts | {None}]
        self.missing = [k for k in missing if k not in self.new_head]
        self.unexpected = [k for k in unexpected if k not in self.dropped_head]
        self.mismatched = sorted(k for k in wanted & given if tuple(canonical[k].shape) != expected_shapes[k])
        self.loadable = sorted(wanted & given - set(self.mismatched))


class _MismatchReport:
    """Builds the message listing missing, unexpected and mis-shaped tensors with their shapes."""

    def __init__(self, model, source, model_keys, expected_shapes, canonical, origins):
        self.model, self.source = model, source
        self.model_keys, self.expected_shapes = model_keys, expected_shapes
        self.canonical, self.origins = canonical, origins

    def describe(self, missing, unexpected, mismatched, strict=True):
        config = self.model.config
        header = (
            f"checkpoint {self.source} does not match {type(self.model).__name__}(hidden_sizes={config.hidden_sizes}, "
            f"depths={config.depths}, num_labels={config.num_labels}, layer_scale={config.layer_scale_init_value > 0})"
        )
        sections = [header + (":" if strict else "; loaded anyway (strict=False):")]
        if missing:
            sections.append(self._section(
                "missing (in the model, not in the checkpoint)",
                [f"{self.model_keys[k]} expected {list(self.expected_shapes[k])}" for k in missing],
            ))
        if unexpected:
            sections.append(self._section(
                "unexpected (in the checkpoint, not in the model)",
                [f"{self._given_name(k)} given {list(self.canonical[k].shape)}" for k in unexpected],
            ))
        if mismatched:
            sections.append(self._section(
                "wrong shape (pass ignore_mismatched_sizes=True to re-initialize them)",
                [
                    f"{self.model_keys[k]}: expected {list(self.expected_shapes[k])}, given "
                    f"{list(self.canonical[k].shape)}{self._origin_note(k)}"
                    for k in mismatched
                ],
            ))
        return "\n".join(sections)

    def _given_name(self, name):
        return self.origins.get(name, name)

    def _origin_note(self, name):
        origin = self.origins.get(name, name)
        return "" if _strip_prefix(origin, BASE_PREFIX) == name else f" (checkpoint key {origin!r})"

    @staticmethod
    def _section(title, lines):
        shown = lines[:MAX_LISTED]
        more = [f"    ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
        return "\n".join([f"  {title}: {len(lines)}"] + [f"    {line}" for line in shown] + more)


def _initialize(model, keys):
    """transformers' initialization for the named tensors: norms 1/0, other weights N(0, initializer_range)."""
    config = model.config
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            tensor = params[key]
            if key.endswith("layer_scale_parameter"):
                tensor.fill_(config.layer_scale_init_value)
            elif key.endswith("bias"):
                tensor.zero_()
            elif "layernorm" in key or "norms." in key:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, config.initializer_range)


# ---- saving --------------------------------------------------------------------------------


def _plain_tensors(state_dict):
    """Detached, contiguous CPU copies that share no memory (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}


def _remove_stale_weights(directory):
    """Old weight files would shadow the new ones (loaders prefer safetensors, then the index)."""
    stale = [directory / name for name in DIRECTORY_WEIGHTS]
    for pattern in SHARD_PATTERNS:
        stale.extend(directory.glob(pattern))
    for path in stale:
        if path.is_file():
            path.unlink()


def _copy_training_flags(source_model, target_model):
    target_model.train(source_model.training)
    targets = dict(target_model.named_modules())
    for name, module in source_model.named_modules():
        if name in targets:
            targets[name].training = module.training
