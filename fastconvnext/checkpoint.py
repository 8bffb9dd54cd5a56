"""Reading and writing ConvNeXt checkpoints.

Sources `load_pretrained` understands:
- a transformers directory: config.json with model.safetensors, sharded safetensors
  (model.safetensors.index.json), pytorch_model.bin or sharded pytorch_model.bin;
- one checkpoint file (.safetensors, .pth, .pt, .bin, .ckpt) in transformers', timm's or the original
  facebookresearch key layout, optionally wrapped as {"model": ...} or {"state_dict": ...}; the
  architecture is then read off the tensor names and shapes;
- a Hugging Face Hub id ("facebook/convnext-tiny-224"), through huggingface_hub when it is installed.

Nothing is read outside the model directory (shard names and symlinks are resolved and checked, and the
file actually opened is checked again: a regular file, inside the folder; safe_io.open_regular_file), and
the architecture is checked against the checkpoint's tensors before any parameter is allocated, so a
small hostile file cannot make the loader allocate gigabytes. Pickled files are only ever read with
`torch.load(weights_only=True)`: a file that would run code when unpickled is refused, not executed;
compressed archives (which torch.save never writes) are refused before they could inflate, pickles nested
deeper than MAX_PICKLE_NESTING are refused before unpickling (hashing a deep tuple overflows the C stack),
and tensors that overlap in memory (stride-0 or aliasing views, which let a small file declare gigabytes
of parameters) are refused after it.

A directory is read under its shared lock (safe_io.reading), so a concurrent fastconvnext save, which
commits under the exclusive lock, is seen wholly or not at all; what was read is compared with the disk
afterwards, and read again when another program changed it meanwhile. Saves stage every file and commit
them, with the removal of weights of other formats, as one journaled transaction (safe_io.StagedFiles).

Inside this module state dicts are handled in a "canonical" form: transformers' names without the
`convnext.` prefix that ForImageClassification adds to its trunk, so ConvNextModel, the classifier
and the backbone share one key space (embeddings.*, encoder.*, layernorm.*, classifier.*,
hidden_states_norms.<stage>.*).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import inspect
import io
import json
import logging
import math
import os
import pickle
import pickletools
import re
import reprlib
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from fastconvnext.configuration import CONFIG_NAME, ConvNextConfig, ConvNextV2Config
from fastconvnext import safe_io
from fastconvnext.safe_io import StagedFiles

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
V2_BASE_PREFIX = "convnextv2."  # ConvNextV2ForImageClassification's trunk
WRAPPER_KEYS = ("model", "state_dict")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_LISTED = 40
MAX_JSON_BYTES = 16 * 2**20
# Containers inside containers in a pickle: a state dict is ~5 deep, an optimizer state ~10; hashing a tuple
# nested a million deep (a 1 MB file) overflows the C stack, which no exception handler can catch.
MAX_PICKLE_NESTING = 100
# The pickles at the start of a legacy (pre-zip) torch.save file are scanned in memory, up to this size.
MAX_LEGACY_PICKLE_BYTES = 64 * 2**20
# {"model": {"state_dict": ...}}: at most this many wrappers around the state dict.
MAX_WRAPPERS = 4
# A directory changed by another program while it was read is read again, at most this many times in all.
READ_ATTEMPTS = 3
# Parameters a load may initialize rather than read (a new head, strict=False gaps): at most as many as
# the checkpoint provides, or this floor (a 21k-class head on ConvNeXt-T is 17M; on XL 45M of 350M).
# More means the config and the checkpoint describe different models, and it bounds what a tiny file
# can make the loader allocate.
MIN_NEW_PARAMETERS_ALLOWED = 2**24
# Blocks the config declares that the checkpoint has no tensor of (possible with strict=False only).
MAX_ABSENT_BLOCKS = 64
MAX_LISTED_STAGES = 64  # stages whose block counts a mismatch message lists
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# model_type -> the module whose load_checked(...) matches and builds that family's checkpoints
FAMILIES = {"dinov3_convnext": "fastconvnext.dinov3_convnext", "convnextv2": "fastconvnext.convnext_v2"}
MODEL_CLASS_NAMES = ("ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone")
V2_CLASS_NAMES = ("ConvNextV2Model", "ConvNextV2ForImageClassification", "ConvNextV2Backbone")
DINOV3_CLASS_NAMES = ("DINOv3ConvNextModel", "DINOv3ConvNextBackbone")
MISMATCH_ADVICE = (
    "pass ignore_mismatched_sizes=True to re-initialize them (fastconvnext convert/classify: "
    "--ignore-mismatched-sizes)"
)
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
# Indices are at most 9 digits: longer ones never match, so they are reported as unexpected tensors.
_STAGE_WIDTH_KEY = re.compile(
    r"^encoder\.stages\.(\d{1,9})\.(?:layers\.(\d{1,9})\.dwconv\.weight|downsampling_layer\.1\.weight)$"
)
_BLOCK_KEY = re.compile(r"^encoder\.stages\.(\d{1,9})\.layers\.(\d{1,9})\.")
# ConvNeXt V2: V1's names plus GRN. timm names it mlp.grn.weight/bias, shape [4C]; the original release
# grn.gamma/beta, shape [1, 1, 1, 4C], which is transformers' shape.
_V2_TIMM_RULES = ((r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.", _BLOCK + "grn."),) + _TIMM_RULES
_V2_ORIGINAL_RULES = (
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", _BLOCK + "grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", _BLOCK + "grn.bias"),
) + _ORIGINAL_RULES
_GRN_KEY = re.compile(r"(?:^|\.)grn\.(?:weight|bias|gamma|beta)$")
_RULES = {"timm": _TIMM_RULES, "original": _ORIGINAL_RULES}
_V2_RULES = {"timm": _V2_TIMM_RULES, "original": _V2_ORIGINAL_RULES}
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
    subfolder="",
    state_dict=None,
    output_loading_info=False,
    **kwargs,
):
    """Build `cls` with the weights at `path`, in eval mode.

    cls: the model class to build, or a mapping {class name: class} to choose from by the checkpoint's
        tensors (classifier -> ConvNextForImageClassification, stage norms only -> ConvNextBackbone,
        else ConvNextModel), as ConvNextPreTrainedModel.from_pretrained passes.
    path: a directory, a checkpoint file or a hub id; None with config= and state_dict= builds the model
        from those alone, as transformers' from_pretrained(None, config=..., state_dict=...) does.
    config: a ConvNextConfig to use instead of config.json / the one inferred from the tensors.
    map_location: the device the model ends up on (tensors are read on the CPU first).
    strict: False turns missing and unexpected tensors into a warning (wrong shapes still raise).
    dtype: "auto" takes the config's `dtype` (config.json's "dtype" or "torch_dtype") when it has one, else the
        checkpoint's floating dtype, as transformers 5 does; or a torch.dtype / its name.
    ignore_mismatched_sizes: re-initialize (and warn about) tensors whose shape differs, e.g. a new head.
    subfolder: read the model from this folder inside `path` (or inside the hub repo).
    state_dict: tensors to use instead of the weights stored at `path` (config.json is still read).
    output_loading_info: also return {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
        with the model's key names, as transformers does (mismatched: (key, checkpoint shape, model shape)).
    kwargs: config fields to change (num_labels=10, out_features=["stage2", "stage4"], ...) and, for a
        hub id, huggingface_hub's revision, cache_dir, token, local_files_only, force_download.

    The checkpoint is checked against the architecture before any parameter is allocated: block counts
    first, then every name and shape against the model built on the meta device. Tensors the target
    class has and the checkpoint lacks are an error, except a whole head part the checkpoint's class
    never had (final layernorm, classifier, a backbone stage norm): that part is initialized as
    transformers does and a warning lists it. Head parts only the checkpoint has are dropped. Any other
    missing, unexpected or mis-shaped tensor raises ValueError listing them.
    """
    hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    dtype = _checked_dtype(kwargs.pop("torch_dtype", dtype))
    device = _checked_device(map_location)
    config_overrides = _checked_overrides(kwargs)
    if path is None:
        source, given, config_dict = _source_from_arguments(config, state_dict)
    else:
        source = _resolve_source(path, hub_options, subfolder)
        given, config_dict = _read_source(source, needs_config=config is None, config_name=_config_name(cls))
        if state_dict is not None:
            given = _checked_state_dict(state_dict, "the state_dict argument")
    family = _family_module(cls, config, config_dict, given)
    if family is not None:  # another model_type (DINOv3-ConvNeXt): read as above, matched and built by its module
        model, info = family.load_checked(cls, source, given, config_dict, config, config_overrides, strict,
                                          ignore_mismatched_sizes, dtype, device)
        model.eval()
        return (model, info) if output_loading_info else model
    other_type = config_dict.get("model_type") if isinstance(config_dict, Mapping) else None
    if config is None and isinstance(other_type, str) and other_type in FAMILIES:
        raise ValueError(f"{source}: config.json has model_type {other_type!r}, not 'convnext'; load it with the "
                         f"fastconvnext classes of that model ({FAMILIES[other_type]})")
    try:
        hf_state_dict, fmt, origins = _convert(given)
        canonical, origins = _to_canonical(hf_state_dict, origins)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    _check_tensors(canonical, origins, source)
    config = _build_config(config, config_dict, canonical, fmt, config_overrides, source)
    cls = _chosen_class(cls, canonical)
    check_block_structure(config, canonical, source, strict)
    target_dtype = _target_dtype(dtype, config, canonical, source)
    model, info = _load_checked(cls, config, canonical, origins, source, strict, ignore_mismatched_sizes,
                                target_dtype, device)
    model.config.dtype = target_dtype  # transformers records the dtype the model was built in
    model.eval()
    return (model, info) if output_loading_info else model


def save_pretrained(model, save_directory, is_main_process=True, state_dict=None, push_to_hub=False,
                    max_shard_size="50GB", variant=None, token=None, save_peft_format=True,
                    save_original_format=True, distributed_checkpoint=False, safe_serialization=True, **kwargs):
    """Write config.json and model.safetensors (or pytorch_model.bin) in transformers' form, so that
    transformers' `from_pretrained` of the same class loads it with no missing or unexpected keys.

    Takes transformers' arguments. max_shard_size (bytes, or "500MB", "5GB": decimal KB/MB/GB/TB as
    transformers reads them): weights larger than it are split into model-00001-of-0000N.safetensors files
    and model.safetensors.index.json, as transformers writes them. is_main_process=False writes nothing.
    state_dict: the tensors to write instead of the model's (named as the model's state_dict names them).
    token, save_peft_format and save_original_format change nothing here (ConvNeXt has no converted or adapter
    weights to write differently); other keyword arguments only matter to transformers with push_to_hub, and
    are ignored with a warning. push_to_hub=True (use model.push_to_hub), a variant (fastconvnext's
    from_pretrained reads no variant files) and distributed_checkpoint=True are refused before anything is
    written. safe_serialization=False (fastconvnext only; transformers 5 always writes safetensors) writes
    pytorch_model.bin.

    Atomic: every file is written under a temporary name beside its target and fsynced; then, holding
    the folder's exclusive lock (so concurrent saves into one folder take turns and loads wait), they
    replace the old ones and weight files that would shadow them or be read instead of them (pytorch_model.bin
    beside a new model.safetensors, shards and indexes of another save) are removed, as one journaled
    transaction: a failure or a kill at any point leaves the previous checkpoint whole (rolled back at once,
    or by the next load or save of the folder) or the new one. A config.json whose text does not change is left
    alone. A failed write raises OSError naming the file.
    """
    _refuse_unsupported_save_options(push_to_hub, variant, distributed_checkpoint)
    shard_limit = _shard_size_bytes(max_shard_size)
    if kwargs:
        logger.warning("save_pretrained ignores %s (transformers uses them only with push_to_hub)", sorted(kwargs))
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained needs a directory, but {directory} is a file")
    if not is_main_process:
        return directory
    tensors = _plain_tensors(_tensors_to_save(model, state_dict))
    config_text = _config_json(model, tensors)
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    files = _weight_files(tensors, weights_name, shard_limit)
    index_text = None
    if len(files) > 1:
        weights_name = SAFE_WEIGHTS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME
        index_text = _shard_index_json(model, files)
    directory.mkdir(parents=True, exist_ok=True)
    stale = [name for name in DIRECTORY_WEIGHTS if name != weights_name] + list(SHARD_PATTERNS)
    with StagedFiles(directory) as staged:
        for name, part in files.items():
            _write_staged(staged, name, lambda path, part=part: _write_weights(part, path, safe_serialization))
        if index_text is not None:
            _write_staged(staged, weights_name, lambda path: path.write_text(index_text, encoding="utf-8"))
        _write_staged(staged, CONFIG_NAME, lambda path: path.write_text(config_text, encoding="utf-8"),
                      skip_if_unchanged=True)
        staged.commit(remove=stale)
    return directory


def convert_state_dict(state_dict):
    """timm / original facebookresearch keys -> transformers keys; returns (state_dict, detected_format).

    The result has ConvNextForImageClassification's names (trunk under `convnext.`) when the checkpoint
    has a classifier head, else ConvNextModel's; ConvNeXt V2 weights (GRN tensors) get ConvNextV2's names
    (`convnextv2.`) and GRN's [1, 1, 1, 4C] shape. A transformers state dict comes back unchanged (copied).
    timm's 4-D [out, in, 1, 1] MLP weights (conv_mlp variants) become Linear [out, in] weights.
    Keys no rule knows keep their name, so loading reports them as unexpected.
    """
    converted, fmt, _ = _convert(state_dict, allow_v2=True)
    return converted, fmt


def detect_format(state_dict):
    """'transformers', 'timm' or 'original', from the name of the stem convolution's weight."""
    keys = {_strip_prefix(_strip_prefix(k, BASE_PREFIX), V2_BASE_PREFIX) for k in state_dict}
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
    ConvNeXt V2 weights (GRN tensors) give a ConvNextV2Config.
    """
    detected = detect_format(state_dict)
    v2 = _grn_key(state_dict) is not None
    if detected != "transformers":
        state_dict, _, _ = _convert(state_dict, allow_v2=v2)
    canonical, _ = _to_canonical(state_dict, {}, V2_BASE_PREFIX if v2 else BASE_PREFIX)
    fields = _inferred_fields(canonical, fmt or detected)
    return ConvNextV2Config(**_v2_fields(fields)) if v2 else ConvNextConfig(**fields)


def from_transformers(hf_model, classes=None):
    """The fastconvnext twin of a transformers ConvNext, ConvNextV2 or DINOv3ConvNext model: same class, config,
    weights, train/eval mode, device and dtype.

    classes: {class name: fastconvnext class}; by default fastconvnext's public classes, looked up
    through the package's exports (this module never imports fastconvnext.modeling itself).
    """
    classes = _public_classes() if classes is None else classes
    name = type(hf_model).__name__
    if name not in classes:
        raise TypeError(f"from_transformers takes one of transformers' {sorted(classes)}, got {name}")
    target = classes[name]
    config = getattr(target, "config_class", ConvNextConfig).from_dict(hf_model.config.to_dict())
    reference = next(hf_model.parameters())
    with built_in(reference.dtype):
        model = target(config).to(device=reference.device)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    _copy_training_flags(hf_model, model)
    return model


@contextlib.contextmanager
def built_in(dtype):
    """Build modules with `dtype` as torch's default dtype, as transformers does, instead of casting a built model
    whole: parameters a module creates in a fixed dtype (xIELU's bf16 alpha_p/alpha_n/beta/eps) keep it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---- arguments ---------------------------------------------------------------------------------


def _checked_dtype(dtype):
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
    else:
        resolved = dtype
    if resolved == "auto" or resolved in LOADABLE_DTYPES:
        return resolved
    names = ", ".join(str(d).removeprefix("torch.") for d in LOADABLE_DTYPES)
    raise TypeError(f"dtype must be 'auto' or one of {names} (a torch.dtype or its name), got {dtype!r}")


def _checked_device(map_location):
    """The torch.device for map_location, refusing devices this machine does not have."""
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(
            f"map_location must be a device name like 'cpu' or 'cuda:0' or a torch.device, got "
            f"{type(map_location).__name__} {map_location!r}"
        )
    try:
        device = torch.device(map_location)
    except RuntimeError as err:
        raise ValueError(f"map_location={map_location!r} is not a device name ({err})") from None
    if device.type == "meta":
        raise ValueError("map_location='meta' would load no weights; build the model on the meta device instead")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"map_location={map_location!r} asks for CUDA, but PyTorch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"map_location={map_location!r} asks for CUDA device {device.index}, but only "
                f"{torch.cuda.device_count()} are visible"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"map_location={map_location!r} is not usable here ({err})") from None
    return device


def _checked_overrides(overrides):
    unknown = sorted(set(overrides) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown keyword arguments {unknown}: load_pretrained takes config, map_location, strict, dtype, "
            f"ignore_mismatched_sizes, subfolder, state_dict, output_loading_info, the hub options "
            f"{list(HUB_OPTIONS)} and the config fields {list(CONFIG_FIELDS)}"
        )
    return overrides


def _source_from_arguments(config, state_dict):
    if config is None or state_dict is None:
        raise TypeError(
            "from_pretrained(None, ...) builds the model from config= and state_dict= alone; pass both (got "
            f"config={type(config).__name__}, state_dict={type(state_dict).__name__})"
        )
    source = Source("the state_dict argument", None)
    return source, _checked_state_dict(state_dict, source), None


def _checked_state_dict(state_dict, where):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where}: expected a mapping of tensor names to tensors, got {type(state_dict).__name__}")
    return _unwrap(dict(state_dict), where)


def _public_classes():
    """fastconvnext's model classes by name (ConvNeXt, V2, DINOv3), through the package's lazy exports."""
    import fastconvnext

    return {name: getattr(fastconvnext, name) for name in MODEL_CLASS_NAMES + V2_CLASS_NAMES + DINOV3_CLASS_NAMES}


def _family_module(cls, config, config_dict, state_dict=None):
    """The module that matches and builds checkpoints of another model_type than "convnext" (FAMILIES), chosen by
    the target class's config class, else the config argument's or config.json's model_type, else (no class
    asked for) GRN tensors in the checkpoint (ConvNeXt V2 in timm's or the original layout); None for ConvNeXt."""
    classes = list(cls.values()) if isinstance(cls, Mapping) else [cls]
    model_type = getattr(getattr(classes[0], "config_class", None), "model_type", None) if classes else None
    if model_type is None and config is not None:
        model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(config_dict, Mapping):
        model_type = config_dict.get("model_type")
    if model_type is None and cls is None and state_dict is not None and _holds_convnext_v2(state_dict):
        model_type = ConvNextV2Config.model_type
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        return None
    return importlib.import_module(FAMILIES[model_type])


def _chosen_class(cls, canonical):
    if isinstance(cls, Mapping):
        name = _default_class_name(canonical)
        if name not in cls:
            raise TypeError(f"the checkpoint holds a {name}, which is not among the classes given: {sorted(cls)}")
        return cls[name]
    if cls is None:  # the functional API's "choose for me"
        return _public_classes()[_default_class_name(canonical)]
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a model class or a mapping of class names to classes, got {cls!r}")
    return cls


# ---- locating and reading ----------------------------------------------------------------------


class Source(NamedTuple):
    """Where a checkpoint was read from: `path` for messages, and the folder nothing may be read outside."""

    path: object
    root: Path | None

    def __str__(self):
        return str(self.path)


def _resolve_source(path, hub_options=None, subfolder=""):
    """The Source for `path` (+ subfolder), downloading a hub id; FileNotFoundError when neither works."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a path to a checkpoint file or directory, or a hub id; got {type(path).__name__}")
    if not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"subfolder must be a str, got {type(subfolder).__name__}")
    local = Path(os.path.expanduser(os.fspath(path)))
    if local.exists():
        inner = _inside_subfolder(local, subfolder)
        root = safe_io.model_root(local) if local.is_dir() else inner.resolve().parent
        return Source(inner, root)
    text = os.fspath(path)
    if not _looks_like_hub_id(text):
        raise FileNotFoundError(f"no such file or directory: {text}")
    folder, root = _download_from_hub(text, subfolder, **(hub_options or {}))
    return Source(_inside_subfolder(folder, subfolder), root)


def _inside_subfolder(folder, subfolder):
    if not os.fspath(subfolder):
        return folder
    relative = Path(subfolder)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"subfolder must be a relative path inside {folder}, got {os.fspath(subfolder)!r}")
    inner = folder / relative
    if not inner.exists():
        raise FileNotFoundError(f"no subfolder {os.fspath(subfolder)!r} in {folder}")
    _require_inside(folder.resolve(), inner, f"subfolder {os.fspath(subfolder)!r}")
    return inner


def _looks_like_hub_id(text):
    """owner/name that does not end in a checkpoint file suffix (a missing local file, not a repo)."""
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".json",)
    return bool(HUB_ID.match(text)) and not text.lower().endswith(suffixes)


def _download_from_hub(repo_id, subfolder="", **hub_options):
    """(snapshot folder, containment root): the hub cache links snapshot files to ../../blobs/<hash>."""
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
    prefix = f"{Path(subfolder).as_posix()}/" if os.fspath(subfolder) else ""
    try:
        patterns = [prefix + CONFIG_NAME, prefix + "model*.safetensors*"]
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_options))
        if not any((folder / prefix).glob("*.safetensors")):
            patterns = [prefix + CONFIG_NAME, prefix + "pytorch_model*.bin*"]
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **hub_options))
    except Exception as err:  # offline, unknown repo, gated repo, network errors: all end the same way
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or directory, and downloading it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {err}). {advice}"
        ) from err
    return folder, safe_io.model_root(folder)


def _require_inside(root, path, what):
    """Refuse `path` unless it resolves (symlinks followed) inside `root`."""
    if root is None:
        return path
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ValueError(f"{what} cannot be resolved ({err})") from None
    if not resolved.is_relative_to(root):
        raise PermissionError(f"refusing to read {what}: it resolves to {resolved}, outside the model directory {root}")
    return path


def _config_name(cls):
    """The name of the config class `cls` (a class or a {name: class} mapping) is built from, for messages."""
    classes = list(cls.values()) if isinstance(cls, Mapping) else [cls]
    config_class = getattr(classes[0], "config_class", None) if classes else None
    return getattr(config_class, "__name__", ConvNextConfig.__name__)


def _read_source(source, needs_config=True, config_name=ConvNextConfig.__name__):
    """(state dict, config.json contents or None) of a directory or a single checkpoint file."""
    if source.path.is_dir():
        return _read_directory(source, needs_config, config_name)
    return _read_file(source.path, _Reader(source.root)), None


class _Reader:
    """Opens a checkpoint's files, each only as a regular file inside `root`, and records what it opened, so that
    a directory load can tell afterwards whether another program replaced or rewrote a file meanwhile."""

    def __init__(self, root):
        self.root, self.opened = root, {}

    def open(self, path):
        file = safe_io.open_regular_file(path, self.root)
        self.opened[Path(path)] = _identity(os.fstat(file.fileno()))
        return file

    def changed(self):
        """Names of the files opened that are no longer the same file with the same size and mtime."""
        changed = []
        for path, identity in self.opened.items():
            try:
                now = _identity(os.stat(path))
            except OSError:
                now = None
            if now != identity:
                changed.append(path.name)
        return changed


def _identity(info):
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _read_directory(source, needs_config, config_name=ConvNextConfig.__name__):
    """Read under the folder's shared lock (a fastconvnext save commits under the exclusive one); if another
    program changed a file read meanwhile, read it all again, READ_ATTEMPTS times at most."""
    directory, changed = source.path, []
    for _ in range(READ_ATTEMPTS):
        with safe_io.reading(directory):
            reader = _Reader(source.root)
            try:
                weights = _directory_weights(source)
                if weights.name.endswith(".index.json"):
                    state_dict = _read_shards(weights, reader)
                else:
                    state_dict = _read_file(weights, reader)
                config_dict = _read_config_json(directory, reader, config_name) if needs_config else None
            except (ValueError, OSError):
                changed = reader.changed()
                if changed:  # a file was being written: the error is about a half-written file
                    continue
                raise
            changed = reader.changed()
            if not changed and _directory_weights(source) == weights:
                return state_dict, config_dict
    raise OSError(
        errno.EAGAIN,
        f"{directory}: {', '.join(changed) or 'its weights'} changed while being read, {READ_ATTEMPTS} times "
        f"(another program is saving into the folder?); retry once it is done",
    )


def _directory_weights(source):
    """The weights file (or index) a transformers directory is loaded from: the first of DIRECTORY_WEIGHTS."""
    directory = source.path
    for name in DIRECTORY_WEIGHTS:
        if (directory / name).is_file():
            return _require_inside(source.root, directory / name, f"{directory / name}")
    raise FileNotFoundError(
        f"{directory} holds none of {', '.join(DIRECTORY_WEIGHTS)}; expected {SUPPORTED_SOURCES}"
    )


def _read_config_json(directory, reader, config_name=ConvNextConfig.__name__):
    """config.json of a transformers directory, which must be there: guessing the architecture of a
    transformers directory would silently pick transformers' defaults (gelu, eps 1e-12). DINOv3-ConvNeXt's
    architecture cannot be read off its tensors at all (transformers' from_pretrained refuses such a folder too)."""
    config_file = directory / CONFIG_NAME
    advice = f"pass config={config_name}(...) to say which architecture the weights belong to"
    if config_name != "DINOv3ConvNextConfig":
        advice += ", or load the weights file itself to have the architecture inferred from its tensors"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory} has weights but no {CONFIG_NAME}; {advice}")
    if not config_file.is_file():
        raise IsADirectoryError(f"{config_file} is not a file; {advice}")
    _require_inside(reader.root, config_file, str(config_file))
    config_dict = _read_json(config_file, reader)
    if not isinstance(config_dict, dict):
        raise ValueError(
            f"{config_file} must hold a JSON object of ConvNextConfig fields, found {_json_kind(config_dict)}; {advice}"
        )
    return config_dict


def _read_shards(index_file, reader):
    index = _read_json(index_file, reader)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{index_file} must be a JSON object whose 'weight_map' maps tensor names to shard file names, "
            f"found {_json_kind(index) if not isinstance(index, dict) else 'weight_map ' + _json_kind(weight_map)}"
        )
    state_dict = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = _shard_path(index_file, shard_name, reader.root)
        tensors = _read_file(shard, reader)
        unlisted = sorted(k for k in tensors if weight_map.get(k) != shard_name)
        if unlisted:
            raise ValueError(
                f"shard {shard_name!r} holds tensors that {index_file} does not assign to it: {_name_list(unlisted)}"
            )
        state_dict.update(tensors)
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise ValueError(f"{index_file} lists tensors its shards do not hold: {_name_list(absent)}")
    return state_dict


def _shard_path(index_file, shard_name, root):
    """The file an index entry names, which must be a plain relative name resolving inside the model."""
    relative = Path(shard_name)
    if not shard_name or "\x00" in shard_name or relative.is_absolute() or ".." in relative.parts:
        raise PermissionError(
            f"refusing shard entry {shard_name!r} in {index_file}: expected a file name relative to the model "
            f"directory, without '..'"
        )
    shard = index_file.parent / relative
    _require_inside(root, shard, f"shard entry {shard_name!r} of {index_file}")
    if not shard.is_file():
        raise FileNotFoundError(f"shard {shard_name!r} listed in {index_file} is not a file in {index_file.parent}")
    return shard


def _name_list(names):
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    return shown + (f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _json_kind(value):
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__)


def _read_json(path, reader):
    path = Path(path)
    with reader.open(path) as file:
        data = file.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_JSON_BYTES // 2**20} MiB, which no ConvNeXt JSON file needs")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None


def _read_file(path, reader):
    """The state dict in one checkpoint file, opened through `reader` (one descriptor: one version of the file)."""
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ValueError(
            f"unsupported checkpoint file {path} (suffix {suffix or 'none'!r}); expected {SUPPORTED_SOURCES}"
        )
    with reader.open(path) as file:
        if suffix in SAFETENSORS_SUFFIXES:
            return _unwrap(_read_safetensors(path, file), path)
        return _read_pickle(path, file)


def _read_safetensors(path, file):
    """safetensors' own reader on the open file: through /proc/self/fd where there is one (the same file, mapped),
    else from its bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        reopened = safe_io.descriptor_path(file)
        return load_file(reopened, device="cpu") if reopened else load(file.read())
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"cannot read {path} as safetensors ({err}); expected {SUPPORTED_SOURCES}") from None


def _read_pickle(path, file):
    """torch.load(weights_only=True) of an open file, after checks that bound what unpickling it can cost, and
    the unwrapped state dict checked for tensors that overlap in memory."""
    unreadable = f"cannot read {path} as a PyTorch checkpoint"
    size = os.fstat(file.fileno()).st_size
    head = file.read(4)
    is_zip = head.startswith(b"PK\x03\x04")
    if not is_zip and head[:1] != b"\x80":
        raise ValueError(f"{unreadable} (neither a torch.save zip archive nor a pickle); expected {SUPPORTED_SOURCES}")
    if is_zip:
        _check_zip_is_stored(file, size, unreadable)
    _check_pickle_nesting(file, is_zip, unreadable)
    file.seek(0)
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported operand" in str(err).lower():  # a damaged pickle stream, not a forbidden object
            raise ValueError(f"{unreadable} (damaged pickle data); expected {SUPPORTED_SOURCES}") from None
        raise ValueError(
            f"refusing to load {path}: it contains code or objects that are not plain tensors, which "
            f"unpickling would execute or construct (torch.load(weights_only=True) rejected it). Only "
            f"state dicts of tensors are loaded; re-save the state dict, ideally as .safetensors."
        ) from None
    except MemoryError:
        raise ValueError(f"{unreadable}: it declares storages larger than memory") from None
    except Exception as err:  # damaged archives surface as RuntimeError, EOFError, struct.error, ...
        raise ValueError(f"{unreadable} ({type(err).__name__}: {_brief(err)}); expected {SUPPORTED_SOURCES}") from None
    state_dict = _unwrap(loaded, path)
    _check_storages(state_dict, path, size)
    return state_dict


def _check_zip_is_stored(file, size, unreadable):
    """torch.save stores its zip entries uncompressed; a compressed entry could inflate a small file into
    gigabytes (a zip bomb), so only stored entries no larger than the file itself are accepted."""
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise ValueError(f"{unreadable} (damaged zip archive: {err})") from None
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise ValueError(
            f"{unreadable}: entries {compressed[:5]} are compressed, which torch.save never does (a compressed "
            f"checkpoint can inflate to far more memory than its size); expected uncompressed entries"
        )
    declared = sum(e.file_size for e in entries)
    if declared > size:
        raise ValueError(f"{unreadable}: its entries declare {declared:,} bytes, more than the file's own size")


def _check_pickle_nesting(file, is_zip, unreadable):
    """Refuse pickles nested deeper than MAX_PICKLE_NESTING before anything unpickles them.

    The pickle torch.load will unpickle is read as torch reads it (data.pkl through torch's own zip reader; the
    five pickles at the start of a legacy file) and its opcodes are walked without building anything.
    """
    file.seek(0)
    try:
        if is_zip:
            streams = [io.BytesIO(torch._C.PyTorchFileReader(file).get_record("data.pkl"))]
            count = 1
        else:
            streams = [io.BytesIO(file.read(MAX_LEGACY_PICKLE_BYTES))]
            count = 5  # magic number, protocol version, system info, the object, its storage keys
    except Exception as err:  # torch's reader on a damaged archive: RuntimeError and others
        raise ValueError(f"{unreadable} ({type(err).__name__}: {_brief(err)}); expected {SUPPORTED_SOURCES}") from None
    for stream in streams:
        for _ in range(count):
            try:
                depth = _pickle_nesting(stream, MAX_PICKLE_NESTING)
            except _DamagedPickle as err:
                raise ValueError(f"{unreadable} (damaged pickle data: {err}); expected {SUPPORTED_SOURCES}") from None
            if depth > MAX_PICKLE_NESTING:
                raise ValueError(
                    f"{unreadable}: its pickle nests containers more than {MAX_PICKLE_NESTING} deep (a state dict "
                    f"needs about 5); unpickling it could overflow the stack"
                )


class _DamagedPickle(Exception):
    pass


_MARK = object()
_PUSHES_ATOM = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
    "BINUNICODE8", "FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID",
    "NEXT_BUFFER",
})
_PUSHES_EMPTY = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"})
_NO_STACK_EFFECT = frozenset({"PROTO", "FRAME", "READONLY_BUFFER"})
_BUILDS_FROM = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1,
                "STACK_GLOBAL": 2}
_BUILDS_FROM_MARK = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET", "INST", "OBJ"})
_ADDS_TO_TOP = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}
_ADDS_TO_TOP_FROM_MARK = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _pickle_nesting(stream, limit):
    """The deepest nesting of containers the pickle at `stream`'s position builds, walking its opcodes up to STOP
    (stops early once past `limit`). Each stack slot holds the depth of what it stands for: 0 for an atom, one
    more than the deepest item for what is built from items. The memo keeps a slot's depth when it is stored, so
    a list filled after being memoised is undercounted, but a tuple (immutable: all its items are known when it
    is built) never is, and tuples are what hashing recurses through in C. _DamagedPickle for a stream the
    unpickler would not accept either (unknown opcode, empty stack, missing mark or memo entry)."""
    stack, memo, deepest = [], {}, 0

    def pop(count):
        if len(stack) < count or any(item is _MARK for item in stack[len(stack) - count:]):
            raise _DamagedPickle("an opcode takes more items than the stack holds")
        items = stack[len(stack) - count:]
        del stack[len(stack) - count:]
        return items

    def pop_to_mark():
        for position in range(len(stack) - 1, -1, -1):
            if stack[position] is _MARK:
                items = stack[position + 1:]
                del stack[position:]
                return items
        raise _DamagedPickle("no MARK before an opcode that needs one")

    def top():
        if not stack or stack[-1] is _MARK:
            raise _DamagedPickle("an opcode needs an item on the stack")
        return stack[-1]

    try:
        for opcode, argument, _ in pickletools.genops(stream):
            name = opcode.name
            if name == "STOP":
                break
            if name in _NO_STACK_EFFECT:
                continue
            if name == "MARK":
                stack.append(_MARK)
            elif name in _PUSHES_ATOM:
                stack.append(0)
            elif name in _PUSHES_EMPTY:
                stack.append(1)
            elif name in _BUILDS_FROM:
                stack.append(1 + max(pop(_BUILDS_FROM[name])))
            elif name in _BUILDS_FROM_MARK:
                stack.append(1 + max(pop_to_mark(), default=0))
            elif name in _ADDS_TO_TOP:
                added = 1 + max(pop(_ADDS_TO_TOP[name]))
                stack[-1] = max(top(), added)
            elif name in _ADDS_TO_TOP_FROM_MARK:
                added = 1 + max(pop_to_mark(), default=0)
                stack[-1] = max(top(), added)
            elif name == "POP":
                if not stack:
                    raise _DamagedPickle("POP on an empty stack")
                stack.pop()
            elif name == "POP_MARK":
                pop_to_mark()
            elif name == "DUP":
                stack.append(top())
            elif name in _PUTS:
                memo[argument] = top()
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name in _GETS:
                if argument not in memo:
                    raise _DamagedPickle(f"{name} of memo entry {argument!r}, which was never stored")
                stack.append(memo[argument])
            else:
                raise _DamagedPickle(f"opcode {name} is not one torch.save writes")
            if stack and stack[-1] is not _MARK:
                deepest = max(deepest, stack[-1])
                if deepest > limit:
                    return deepest
        else:
            raise _DamagedPickle("the pickle ends without STOP")
    except ValueError as err:  # pickletools: truncated argument, unknown opcode byte
        raise _DamagedPickle(str(err)) from None
    return deepest


def _check_storages(state_dict, path, file_size):
    """Every tensor of a pickled state dict must be a plain CPU tensor whose elements do not overlap one another
    or another tensor's, and the storages behind them may not hold more bytes than the file.

    A pickle can make any number of tensors, of any shape, out of one small storage: stride-0 views (what
    torch.expand makes) or views of one storage under many names. Such a file is small and passes every check
    that counts elements, yet makes the loader allocate the whole model it declares. torch.save writes each
    parameter's storage once, so a real checkpoint's tensors never overlap.
    """
    spans, storage_bytes = {}, {}
    for name, tensor in state_dict.items():
        described = f"{path}: tensor {name!r}"
        if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
            raise ValueError(
                f"{described} is a {tensor.layout} tensor on {tensor.device}{' (quantized)' * tensor.is_quantized}; "
                f"expected a dense tensor with its values in the file"
            )
        if tensor.numel() == 0:
            continue
        if not _elements_are_distinct(tensor):
            raise ValueError(
                f"{described} (shape {list(tensor.shape)}, strides {list(tensor.stride())}) repeats elements in "
                f"memory (a stride-0 or overlapping view): it holds fewer values than it declares, which "
                f"torch.save never writes for a parameter; re-save it with .contiguous()"
            )
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        storage_bytes[key] = storage.nbytes()
        size = tensor.element_size()
        first = tensor.storage_offset()
        last = first + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
        spans.setdefault(key, []).append((first * size, (last + 1) * size, name))
    for regions in spans.values():
        regions.sort()
        for (_, end, earlier), (start, _, later) in zip(regions, regions[1:]):
            if start < end:
                raise ValueError(
                    f"{path}: tensors {earlier!r} and {later!r} share storage bytes (views of one storage): a "
                    f"checkpoint holds each tensor's values once, and overlapping views would let a small file "
                    f"declare far more parameters than it holds; re-save each tensor with .clone()"
                )
    held = sum(storage_bytes.values())
    if held > file_size:
        raise ValueError(f"{path}: its tensors' storages hold {held:,} bytes, more than the file's {file_size:,}")


def _elements_are_distinct(tensor):
    """Whether no two indices of `tensor` address the same element: with dims of more than one element sorted
    by stride, each stride must step past everything the smaller dims reach."""
    reach = 0
    for step, length in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n > 1):
        if step <= reach:
            return False
        reach += (length - 1) * step
    return True


def _brief(value, limit=200):
    """A bounded repr of something read from a file (reprlib: nesting and lengths cut, never a RecursionError)."""
    try:
        text = _SHORT_REPR.repr(value) if not isinstance(value, BaseException) else str(value)
    except (RecursionError, ValueError, TypeError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


def _unwrap(obj, path):
    """The {name: tensor} state dict inside a loaded file ({"model": ...} / {"state_dict": ...} too, at most
    MAX_WRAPPERS deep). Nothing from the file is formatted without a bound (_brief)."""
    for _ in range(MAX_WRAPPERS + 1):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            bad_keys = [k for k in obj if not isinstance(k, str)]
            if bad_keys:
                raise ValueError(f"{path} holds tensors under keys that are not strings: {_brief(bad_keys[:5])}")
            return _strip_ddp_prefix(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    else:
        raise ValueError(
            f"{path} nests its state dict under more than {MAX_WRAPPERS} {' / '.join(map(repr, WRAPPER_KEYS))} "
            f"wrappers; expected a state dict of tensors, directly or under one of them"
        )
    if isinstance(obj, dict):
        names = sorted(_brief(k, 60) if not isinstance(k, str) else k[:60] for k in list(obj)[:10_000])
        described = f"a dict with keys {names[:8]}"
    else:
        described = type(obj).__name__
    raise ValueError(
        f"{path} holds {described}, not a state dict of tensors (directly or under "
        f"{' / '.join(repr(k) for k in WRAPPER_KEYS)})"
    )


def _strip_ddp_prefix(state_dict):
    """Checkpoints saved from DistributedDataParallel prefix every key with 'module.'."""
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _check_tensors(canonical, origins, source):
    """Every tensor must be a dense floating tensor: ConvNeXt has no other kind of parameter."""
    for name, tensor in canonical.items():
        if tensor.layout != torch.strided or not tensor.is_floating_point() or tensor.device.type == "meta":
            raise ValueError(
                f"{source}: tensor {origins.get(name, name)!r} is {tensor.dtype} {tensor.layout} on "
                f"{tensor.device}; expected a dense floating-point tensor"
            )


# ---- key layouts ----------------------------------------------------------------------------


def _holds_convnext_v2(state_dict):
    """Whether a state dict is ConvNeXt V2's by its names alone: ConvNextV2ForImageClassification's `convnextv2.`
    prefix, or a GRN weight in every block (one per depthwise conv weight), in any layout."""
    names = list(state_dict)
    if any(name.startswith(V2_BASE_PREFIX) for name in names):
        return True
    grn = sum(1 for name in names if name.endswith(("grn.weight", "grn.gamma")) and _GRN_KEY.search(name))
    dwconv = sum(1 for name in names if name.endswith(("dwconv.weight", "conv_dw.weight")))
    return grn > 0 and grn == dwconv


def _grn_key(state_dict):
    """The first GRN tensor's name (ConvNeXt V2, in any layout), or None."""
    return next((key for key in state_dict if _GRN_KEY.search(key)), None)


def _convert(state_dict, allow_v2=False):
    """(transformers-keyed state dict, format, {new key: original key} for renamed keys). ConvNeXt V2 weights
    (GRN tensors) are refused unless allow_v2, and then get ConvNextV2's names and GRN's [1, 1, 1, 4C] shape."""
    state_dict = _strip_ddp_prefix(state_dict)
    fmt = detect_format(state_dict)
    if fmt == "transformers":  # a stray GRN tensor here is listed as unexpected by the V1 loader
        return dict(state_dict), fmt, {}
    grn = _grn_key(state_dict)
    if grn is not None and not allow_v2:
        raise ValueError(f"this is a ConvNeXt V2 checkpoint in {fmt}'s layout (GRN tensor {_brief(grn)}), not a "
                         "ConvNeXt (V1) one: load it with fastconvnext.ConvNextV2ForImageClassification / "
                         "ConvNextV2Model / ConvNextV2Backbone (or fastconvnext.from_timm)")
    rules, prefix = (_V2_RULES, V2_BASE_PREFIX) if grn is not None else (_RULES, BASE_PREFIX)
    converted, origins = {}, {}
    for key, tensor in state_dict.items():
        new_key = _rename(key, rules[fmt])
        if new_key.endswith(("pwconv1.weight", "pwconv2.weight")) and tensor.dim() == 4:
            tensor = _squeeze_1x1(key, tensor)
        if new_key.endswith((".grn.weight", ".grn.bias")) and tensor.dim() == 1:
            tensor = tensor.reshape(1, 1, 1, tensor.shape[0])  # timm's [4C] -> transformers' [1, 1, 1, 4C]
        if new_key in converted:
            first = origins.get(new_key, new_key)
            raise ValueError(f"checkpoint keys {first!r} and {key!r} both map to {new_key!r}")
        converted[new_key] = tensor
        origins[new_key] = key
    if any(k.startswith("classifier.") for k in converted):
        converted = {_with_base_prefix(k, prefix): v for k, v in converted.items()}
        origins = {_with_base_prefix(k, prefix): v for k, v in origins.items()}
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


def _with_base_prefix(key, prefix=BASE_PREFIX):
    """ForImageClassification's name for a canonical key (the trunk lives under `convnext.`, V2's `convnextv2.`)."""
    return key if key.startswith(("classifier.", prefix)) else prefix + key


def _to_canonical(state_dict, origins, prefix=BASE_PREFIX):
    canonical, canonical_origins = {}, {}
    for key, tensor in state_dict.items():
        name = _strip_prefix(key, prefix)
        if name in canonical:
            raise ValueError(f"checkpoint holds {name!r} both with and without the {prefix!r} prefix")
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


def _default_class_name(canonical):
    """The class a checkpoint was saved from, by its head tensors."""
    if any(k.startswith("classifier.") for k in canonical):
        return "ConvNextForImageClassification"
    has_stage_norms = any(k.startswith("hidden_states_norms.") for k in canonical)
    if has_stage_norms and not any(k.startswith("layernorm.") for k in canonical):
        return "ConvNextBackbone"
    return "ConvNextModel"


# ---- configuration -----------------------------------------------------------------------------


def _build_config(config, config_dict, canonical, fmt, overrides, source):
    """The given config, else config.json, else the fields read off the tensors; then the overrides."""
    if isinstance(config, ConvNextConfig) and not overrides:
        return config
    if config is not None:  # also takes a transformers ConvNextConfig
        if not callable(getattr(config, "to_dict", None)):
            raise TypeError(f"config must be a ConvNextConfig, got {type(config).__name__}")
        base, origin = config.to_dict(), "the config argument"
    elif config_dict is not None and is_timm_config(config_dict):
        origin = f"{Path(str(source)) / CONFIG_NAME} (timm's)"
        try:
            base = timm_config_fields(config_dict, _inferred_fields(canonical, fmt))
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None
    elif config_dict is not None:
        base, origin = config_dict, f"{Path(str(source)) / CONFIG_NAME}"
    else:
        origin = f"the architecture inferred from {source}"
        try:
            base = _inferred_fields(canonical, fmt)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    try:
        return ConvNextConfig.from_dict(_merge_overrides(base, overrides))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{origin}: {err}") from None
    except Exception as err:  # a field of the wrong kind failing deep in the config's constructor
        raise ValueError(f"{origin}: invalid ConvNextConfig fields ({type(err).__name__}: {err})") from None


def is_timm_config(config_dict):
    """Whether a config.json is timm's (`save_for_hf`, the timm/* hub repositories): an `architecture` name and no
    transformers `model_type`."""
    return isinstance(config_dict.get("architecture"), str) and "model_type" not in config_dict


def timm_config_fields(config_dict, inferred, v2=False):
    """ConvNextConfig (v2: ConvNextV2Config) fields for a timm directory: the architecture read off the tensors
    (`inferred`, with timm's eps 1e-6 on the final norm), labels from timm's `label_names` (a list, or a dict of
    index -> name), the head's size checked against `num_classes`."""
    architecture = config_dict["architecture"]
    if architecture.startswith("convnextv2") and not v2:
        raise ValueError(f"architecture {architecture!r} is ConvNeXt V2: load it with "
                         "fastconvnext.ConvNextV2ForImageClassification / ConvNextV2Model / ConvNextV2Backbone")
    if v2 and not architecture.startswith("convnextv2"):
        raise ValueError(f"architecture {architecture!r} is not a timm ConvNeXt V2 (convnextv2_*)")
    if not architecture.startswith("convnext"):
        raise ValueError(f"architecture {architecture!r} is not a timm ConvNeXt (convnext_*)")
    fields = dict(inferred)
    num_classes = config_dict.get("num_classes", fields.get("num_labels"))
    head = fields.get("num_labels")
    if head is not None and num_classes != head:
        raise ValueError(f"num_classes is {num_classes!r} but the weights' head has {head} outputs")
    labels = config_dict.get("label_names", (config_dict.get("pretrained_cfg") or {}).get("label_names"))
    if labels:
        if isinstance(labels, Mapping):
            id2label = {_label_index(index): str(name) for index, name in labels.items()}
        elif isinstance(labels, (list, tuple)):
            id2label = {index: str(name) for index, name in enumerate(labels)}
        else:
            raise ValueError(f"label_names must be a list or an object, got {type(labels).__name__}")
        if head is not None and sorted(id2label) != list(range(head)):
            raise ValueError(f"label_names names {len(id2label)} classes, the head has {head}")
        fields["id2label"] = id2label
    return fields


def _label_index(index):
    try:
        return int(index)
    except (TypeError, ValueError):
        raise ValueError(f"label_names keys must be class indices, got {_brief(index)}") from None


def from_timm(model_or_name_or_state_dict, classes=None):
    """The fastconvnext model holding a timm ConvNeXt's weights: a timm model (its state dict, labels from its
    pretrained_cfg, train/eval mode), a timm model name (timm.create_model(name, pretrained=True): needs timm and
    its weights), or a timm-layout state dict. The architecture is read off the tensors (timm's eps 1e-6 on the
    final norm); a head gives ConvNextForImageClassification, none ConvNextModel; ConvNeXt V2 weights (timm's
    convnextv2_*: GRN tensors) give ConvNextV2ForImageClassification / ConvNextV2Model."""
    source = model_or_name_or_state_dict
    if isinstance(source, str):
        try:
            import timm
        except ImportError:
            raise ImportError("from_timm(name) needs timm (pip install timm); or pass a timm model or state dict") \
                from None
        source = timm.create_model(source, pretrained=True)
    training, pretrained_cfg = False, {}
    if isinstance(source, torch.nn.Module):
        training, pretrained_cfg = source.training, dict(getattr(source, "pretrained_cfg", None) or {})
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"from_timm takes a timm model, a timm model name or a state dict, got {type(source).__name__}")
    state_dict = _checked_state_dict(source, "the timm state dict")
    if detect_format(state_dict) != "timm":
        raise ValueError(f"not a timm ConvNeXt state dict (its stem is laid out as {detect_format(state_dict)}'s)")
    v2 = _grn_key(state_dict) is not None
    hf_state_dict, fmt, origins = _convert(state_dict, allow_v2=v2)
    canonical, _ = _to_canonical(hf_state_dict, origins, V2_BASE_PREFIX if v2 else BASE_PREFIX)
    family = "convnextv2" if v2 else "convnext"
    timm_config = {"architecture": pretrained_cfg.get("architecture", family), "label_names":
                   pretrained_cfg.get("label_names")}
    fields = timm_config_fields(timm_config, _inferred_fields(canonical, fmt), v2)
    classes = _public_classes() if classes is None else classes
    head = "ConvNextForImageClassification" if fields.get("num_labels") else "ConvNextModel"
    if v2:
        head, config = head.replace("ConvNext", "ConvNextV2", 1), ConvNextV2Config(**_v2_fields(fields))
    else:
        config = ConvNextConfig(**fields)
    model = load_pretrained(classes[head], None, config=config, state_dict=state_dict)
    return model.train(training)


def _v2_fields(fields):
    """ConvNextV2Config's fields from those inferred for ConvNextConfig (V2 has no layer scale)."""
    return {k: v for k, v in fields.items() if k != "layer_scale_init_value"}


def v2_weights_and_config(state_dict, config_dict, config, source):
    """ConvNeXt V2 tensors under transformers' names, and the config fields to build with: the given config or
    config.json when there is one (None / config_dict unchanged), timm's config.json read as timm_config_fields
    does, else the architecture read off the tensors (timm's and the original release's eps 1e-6 on the final
    norm). timm's (mlp.grn.weight/bias [4C]) and the original release's (grn.gamma/beta [1, 1, 1, 4C]) files are
    renamed; a ConvNeXt V1 file in those layouts is refused, naming the V1 classes."""
    try:
        converted, fmt, origins = _convert(state_dict, allow_v2=True)
        if fmt != "transformers" and _grn_key(state_dict) is None:
            raise ValueError(f"this is a ConvNeXt (V1) checkpoint in {fmt}'s layout (no GRN tensors), not a "
                             "ConvNeXt V2 one: load it with fastconvnext.ConvNextForImageClassification / "
                             "ConvNextModel")
        if config is not None or (config_dict is not None and not is_timm_config(config_dict)):
            return converted, config_dict
        canonical, _ = _to_canonical(converted, origins, V2_BASE_PREFIX)
        fields = _v2_fields(_inferred_fields(canonical, fmt))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    if config_dict is not None:
        try:
            fields = timm_config_fields(config_dict, fields, v2=True)
        except ValueError as err:
            raise ValueError(f"{Path(str(source)) / CONFIG_NAME} (timm's): {err}") from None
    return converted, fields


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
    widths = {}
    for key, tensor in canonical.items():
        match = _STAGE_WIDTH_KEY.match(key)
        if match and tensor.dim() > 0:
            widths.setdefault(int(match.group(1)), int(tensor.shape[0]))
    if not widths:
        raise ValueError("cannot infer the architecture: no encoder.stages.<i>.layers.<j>.dwconv.weight tensors")
    blocks = _blocks_by_stage(canonical)
    widths.setdefault(0, stem_channels)
    num_stages = max(max(widths), max(blocks, default=0)) + 1
    if len(widths) != num_stages:  # compared by count: the largest index may be huge
        raise ValueError(
            f"cannot infer the architecture: encoder stage indices {_index_summary(set(widths) | set(blocks))} "
            f"are not 0..n-1 with a dwconv or downsampling weight for each"
        )
    for stage, indices in blocks.items():
        if indices != set(range(len(indices))):
            raise ValueError(
                f"cannot infer the architecture: stage {stage} has block indices {_index_summary(indices)}, "
                f"not 0..n-1 without gaps"
            )
    return [len(blocks.get(i, ())) for i in range(num_stages)], [widths[i] for i in range(num_stages)]


def _blocks_by_stage(canonical, block_key=_BLOCK_KEY):
    """{stage: set of block indices} of the blocks a canonical state dict holds tensors for (block_key's groups 1
    and 2 are a block's stage and index)."""
    blocks = {}
    for key in canonical:
        match = block_key.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return blocks


def _index_summary(indices):
    ordered = sorted(indices)
    return str(ordered) if len(ordered) <= 8 else f"[{', '.join(map(str, ordered[:4]))}, ..., {ordered[-1]}]"


def check_block_structure(config, canonical, source, strict, block_key=_BLOCK_KEY):
    """Compare the config's stages and blocks with the checkpoint's before building anything (every family's
    loader calls this with its block_key).

    Building a model is linear in its block count, so a config or a file declaring a million blocks
    must be refused here, from the names alone; the blocks per stage are listed for MAX_LISTED_STAGES stages at
    most (a tensor name may carry a stage index of 10^9).
    """
    blocks = _blocks_by_stage(canonical, block_key)
    stages = max(blocks, default=-1) + 1
    found = [len(blocks.get(i, ())) for i in range(min(stages, MAX_LISTED_STAGES))]
    absent = sum(  # counted without enumerating range(depth): a depth may be huge
        depth - sum(1 for j in blocks.get(stage, ()) if j < depth) for stage, depth in enumerate(config.depths)
    )
    extra = sum(
        len({j for j in indices if stage >= len(config.depths) or j >= config.depths[stage]})
        for stage, indices in blocks.items()
    )
    if not absent and not extra:
        return
    described = (
        f"checkpoint {source} does not match the architecture: the config has depths {list(config.depths)} "
        f"({sum(config.depths)} blocks) but the checkpoint holds blocks per stage {found}"
        f"{f' ... (stage indices up to {stages - 1})' if stages > len(found) else ''}"
        f" ({absent} blocks absent, {extra} unexpected)"
    )
    if strict:
        raise ValueError(described)
    if absent > MAX_ABSENT_BLOCKS:
        raise ValueError(f"{described}; strict=False initializes at most {MAX_ABSENT_BLOCKS} absent blocks")


def _config_json(model, tensors):
    """config.json's text, built (and failing) before any file is touched."""
    config_dict = model.config.to_dict()
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    config_dict.update(architectures=[type(model).__name__], model_type=getattr(model.config, "model_type", "convnext"))
    if floating:
        config_dict["dtype"] = str(floating[0]).removeprefix("torch.")
    try:
        return json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as err:
        raise TypeError(f"the config of {type(model).__name__} cannot be written as JSON ({err})") from None


def _target_dtype(dtype, config, canonical, source):
    """The dtype the model is built in: the requested one; for "auto" the config's `dtype` (config.json's "dtype"
    or "torch_dtype") when it names one, as transformers' from_pretrained(dtype="auto") does, else the
    checkpoint's."""
    if dtype != "auto":
        return dtype
    if config.dtype not in (None, "auto"):
        return config.dtype
    dtypes = {t.dtype for t in canonical.values()}
    if len(dtypes) != 1:
        return torch.float32
    (found,) = dtypes
    if found not in LOADABLE_DTYPES:
        raise ValueError(f"{source} holds {found} tensors; pass dtype= one of {LOADABLE_DTYPES} to load them")
    return found


# ---- matching a state dict to a model ----------------------------------------------------------


def _load_checked(cls, config, canonical, origins, source, strict, ignore_mismatched_sizes, dtype, device):
    """Match every name and shape against the layout of `cls(config)`, and only then build, allocate and load."""
    model_keys, expected_shapes = _expected_layout(cls, config)
    match = _KeyMatch(model_keys, expected_shapes, canonical)
    report = _MismatchReport(cls.__name__, config, source, model_keys, expected_shapes, canonical, origins)
    if match.mismatched and not ignore_mismatched_sizes:
        raise ValueError(report.describe(match.missing, match.unexpected, match.mismatched))
    if strict and (match.missing or match.unexpected):
        raise ValueError(report.describe(match.missing, match.unexpected, []))
    initialized = sorted(set(model_keys) - set(match.loadable))
    incomplete_blocks = {m.group(0) for m in map(_BLOCK_KEY.match, initialized) if m}
    if len(incomplete_blocks) > MAX_ABSENT_BLOCKS:
        raise ValueError(
            f"{report.header()}: {len(incomplete_blocks)} encoder blocks lack tensors the checkpoint does not "
            f"provide (or has in another shape); at most {MAX_ABSENT_BLOCKS} are initialized instead"
        )
    new_parameters = sum(math.prod(expected_shapes[k]) for k in initialized)
    allowed = max(MIN_NEW_PARAMETERS_ALLOWED, sum(canonical[k].numel() for k in match.loadable))
    if new_parameters > allowed:
        raise ValueError(
            f"{report.header()}: loading would initialize {new_parameters:,} parameters the checkpoint does not "
            f"provide (at most {allowed:,}: {MIN_NEW_PARAMETERS_ALLOWED:,} or as many as it provides); the "
            f"config and the checkpoint describe different models"
        )
    if match.missing or match.unexpected:
        warnings.warn(report.describe(match.missing, match.unexpected, [], strict=False), stacklevel=4)

    with torch.device("meta"), built_in(dtype):
        model = cls(config)
    if set(model.state_dict()) != set(model_keys.values()):
        raise RuntimeError(f"{cls.__name__} has other tensors than its one-block-per-stage layout predicted")
    model.to_empty(device=device)
    _initialize(model, [model_keys[k] for k in initialized])
    to_load = {model_keys[k]: canonical[k] for k in match.loadable}
    result = model.load_state_dict(to_load, strict=False)
    if {_strip_prefix(k, BASE_PREFIX) for k in result.missing_keys} != set(initialized):
        raise RuntimeError(f"{type(model).__name__}.load_state_dict did not take the matched tensors as planned")

    newly = match.new_head + (match.mismatched if ignore_mismatched_sizes else [])
    if newly:
        lines = [f"  {model_keys[k]} {list(expected_shapes[k])}" for k in newly]
        warnings.warn(
            f"{type(model).__name__} from {source}: {len(newly)} tensors are not in the checkpoint (or have "
            f"another shape) and were newly initialized; train them before use:\n" + "\n".join(lines),
            stacklevel=4,
        )
    if match.dropped_head:
        logger.info("%s from %s: ignored checkpoint head tensors %s", type(model).__name__, source, match.dropped_head)
    return model, _loading_info(match, model_keys, expected_shapes, canonical, origins)


def _expected_layout(cls, config):
    """({canonical name: model key}, {canonical name: shape}) of cls(config), without building all its blocks.

    Building a model costs time linear in its block count even on the meta device, so the layout is read
    off a model with at most one block per stage and the block names are repeated for every block; the
    full model is built only after the checkpoint has matched this layout (and so has paid for every
    block with tensors of the right shape).
    """
    small = copy.copy(config)  # not from_dict(to_dict()): that rebuilds id2label, slow for a million labels
    small.depths = [min(d, 1) for d in config.depths]
    with torch.device("meta"):
        template = cls(small).state_dict()
    model_keys, shapes = {}, {}
    for key, tensor in template.items():
        name = _strip_prefix(key, BASE_PREFIX)
        prefix = key[: len(key) - len(name)]
        match = _BLOCK_KEY.match(name)
        if match is None:
            model_keys[name], shapes[name] = key, tuple(tensor.shape)
            continue
        stage, rest = int(match.group(1)), name[match.end():]
        for block in range(config.depths[stage]):
            block_name = f"encoder.stages.{stage}.layers.{block}.{rest}"
            model_keys[block_name], shapes[block_name] = prefix + block_name, tuple(tensor.shape)
    return model_keys, shapes


def _loading_info(match, model_keys, expected_shapes, canonical, origins):
    """transformers' output_loading_info dictionary, with the model's and the file's key names."""
    return {
        "missing_keys": {model_keys[k] for k in match.missing + match.new_head},
        "unexpected_keys": {origins.get(k, k) for k in match.unexpected + match.dropped_head},
        "mismatched_keys": {
            (model_keys[k], canonical[k].shape, torch.Size(expected_shapes[k])) for k in match.mismatched
        },
        "error_msgs": [],
    }


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

    def __init__(self, class_name, config, source, model_keys, expected_shapes, canonical, origins):
        self.class_name, self.config, self.source = class_name, config, source
        self.model_keys, self.expected_shapes = model_keys, expected_shapes
        self.canonical, self.origins = canonical, origins

    def header(self):
        config = self.config
        return (
            f"checkpoint {self.source} does not match {self.class_name}(hidden_sizes={config.hidden_sizes}, "
            f"depths={config.depths}, num_labels={config.num_labels}, layer_scale={config.layer_scale_init_value > 0})"
        )

    def describe(self, missing, unexpected, mismatched, strict=True):
        sections = [self.header() + (":" if strict else "; loaded anyway (strict=False):")]
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
                f"wrong shape ({MISMATCH_ADVICE})",
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
        return "" if origin == self.model_keys[name] else f" (checkpoint key {origin!r})"

    @staticmethod
    def _section(title, lines):
        shown = lines[:MAX_LISTED]
        more = [f"    ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
        return "\n".join([f"  {title}: {len(lines)}"] + [f"    {line}" for line in shown] + more)


def _initialize(model, keys):
    """transformers' initialization for the named tensors, by the module that owns each: LayerNorm 1/0,
    layer scale its init value, other weights N(0, initializer_range) and biases 0."""
    config = model.config
    with torch.no_grad():
        for key in keys:
            owner_name, _, attribute = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            tensor = getattr(owner, attribute)
            if attribute == "layer_scale_parameter":
                tensor.fill_(config.layer_scale_init_value)
            elif isinstance(owner, torch.nn.LayerNorm):
                tensor.fill_(1.0 if attribute == "weight" else 0.0)
            elif attribute == "bias":
                tensor.zero_()
            else:
                tensor.normal_(0.0, config.initializer_range)


# ---- saving --------------------------------------------------------------------------------

# max_shard_size units, as transformers (huggingface_hub) reads them: decimal
SHARD_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _refuse_unsupported_save_options(push_to_hub, variant, distributed_checkpoint):
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: save, then call "
                                  "model.push_to_hub(repo_id) (needs huggingface_hub and the network)")
    if variant is not None:
        raise NotImplementedError(f"save_pretrained(variant={variant!r}) is not supported: fastconvnext's "
                                  f"from_pretrained reads no variant files (model.<variant>.safetensors)")
    if distributed_checkpoint:
        raise NotImplementedError("save_pretrained(distributed_checkpoint=True) is not supported: fastconvnext "
                                  "models are not FSDP/TP-sharded; save without it")


def _shard_size_bytes(max_shard_size):
    """max_shard_size as bytes: a positive int, or a number with a decimal unit ("5GB", "500 MB")."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    elif isinstance(max_shard_size, str) and max_shard_size.strip()[-2:].upper() in SHARD_SIZE_UNITS:
        text = max_shard_size.strip()
        try:
            size = int(float(text[:-2].strip()) * SHARD_SIZE_UNITS[text[-2:].upper()])
        except ValueError:
            size = None
    else:
        size = None
    if size is None or size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size such as '5GB' "
                         f"(units {', '.join(SHARD_SIZE_UNITS)}), got {max_shard_size!r}")
    return size


def _tensors_to_save(model, state_dict):
    """The model's tensors (or the given state_dict), named as the checkpoint names them: a model whose checkpoint
    names differ from its module names (DINOv3-ConvNeXt) renames them through its `_checkpoint_state_dict`."""
    saved = getattr(model, "_checkpoint_state_dict", None)
    if state_dict is None:
        return model.state_dict() if saved is None else saved()
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise TypeError(f"save_pretrained's state_dict must map names to tensors, got {type(state_dict).__name__}")
    if saved is None:
        return dict(state_dict)
    renamed = dict(zip(model.state_dict(), saved()))  # both list the model's tensors in the same order
    return {renamed.get(name, name): tensor for name, tensor in state_dict.items()}


def _weight_files(tensors, weights_name, shard_limit):
    """{file name: tensors}: one file when everything fits in shard_limit bytes, else shards filled in order as
    transformers fills them (a tensor larger than the limit alone in its shard), named model-00001-of-0000N."""
    shards, current, current_size = [], {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size > shard_limit:
            shards.append({name: tensor})
            continue
        if current and current_size + size > shard_limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {weights_name: shards[0]}
    stem, dot, extension = weights_name.rpartition(".")
    return {f"{stem}-{i:05d}-of-{len(shards):05d}{dot}{extension}": shard for i, shard in enumerate(shards, 1)}


def _shard_index_json(model, files):
    """model.safetensors.index.json's text, with the metadata transformers writes."""
    weight_map = {name: file for file, part in files.items() for name in part}
    total_size = sum(t.numel() * t.element_size() for part in files.values() for t in part.values())
    total_parameters = sum(p.numel() for p in model.parameters())
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _plain_tensors(state_dict):
    """Detached, contiguous CPU copies that share no memory (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}


def _write_staged(staged, name, write, **options):
    """Stage `name` and `write(path)` it; a failed write (a full disk, an I/O error) raises OSError naming the
    final file, whatever the writer reports it as (safetensors: SafetensorError, torch.save: RuntimeError)."""
    from safetensors import SafetensorError

    try:
        write(staged.stage(name, **options))
    except (OSError, SafetensorError, RuntimeError) as err:
        raise safe_io.write_error(staged.directory / name, err) from None


def _write_weights(tensors, path, safe_serialization):
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def _copy_training_flags(source_model, target_model):
    target_model.train(source_model.training)
    targets = dict(target_model.named_modules())
    for name, module in source_model.named_modules():
        if name in targets:
            targets[name].training = module.training
