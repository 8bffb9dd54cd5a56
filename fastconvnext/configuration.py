"""ConvNextConfig: the fields, defaults, generic flags and config.json form of transformers' ConvNextConfig.

Every field is checked when the config is built (and again by `validate()`, which the models call):
a value of the wrong kind raises TypeError, a value out of range ValueError, each naming the field,
what was expected and what was found. Architecture fields have upper bounds (ARCH_LIMITS,
MAX_PARAMETERS) far above any published ConvNeXt, so that a hostile or mistyped config.json fails
here instead of reaching the allocator.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

from fastconvnext.safe_io import model_root, open_regular_file, write_text_atomically

CONFIG_NAME = "config.json"
# config.json is read up to this size (the largest, a 100,000-label head, is a few MB).
MAX_CONFIG_BYTES = 16 * 2**20

# transformers' hidden_act names (every parameter-free ACT2FN entry of transformers 5.23) -> the
# activation name of the ops (kernels/reference.py ACTIVATIONS). Mathematically equal forms share a name.
HIDDEN_ACTS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_10": "gelu_10",
    "laplace": "laplace",
    "relu": "relu",
    "relu2": "relu2",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
    "mish": "mish",
    "sqrtsoftplus": "sqrtsoftplus",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "hardswish": "hardswish",
    "linear": "linear",
}
# ACT2FN entries that carry learnable parameters (one set per block, under the block's `act.`): their
# blocks run the MLP eagerly.
PARAMETRIC_ACTS = ("prelu", "xielu")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Upper bounds on the architecture. The largest published ConvNeXt (ConvNeXt-XXLarge, ~850M parameters)
# has hidden_sizes up to 3072, 30 blocks in a stage, 4 stages, patch_size 4 (isotropic variants: 16).
ARCH_LIMITS = {
    "num_channels": 1024,  # hyperspectral inputs included
    "patch_size": 64,
    "num_stages": 16,
    "hidden_sizes": 16384,
    "depths": 512,
    "num_labels": 100_000,  # ImageNet-22k has 21,841; 1e6 labels alone cost ~700 MB of label dicts
}
MAX_PARAMETERS = 4_000_000_000  # about 4.7x ConvNeXt-XXLarge; 16 GB in fp32

# PretrainedConfig's generic flags: stored, written to config.json and readable, as in transformers.
GENERIC_FLAGS = {
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "architectures": None,
}
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
# Keys transformers writes that are derived or only describe the writer; accepted and dropped on read.
_DERIVED_KEYS = {"transformers_version", "model_type", "stage_names", "use_return_dict"}
_ALIASES = {"torch_dtype": "dtype", "num_hidden_layers": "num_stages", "name_or_path": "_name_or_path"}


def _kind(value):
    return "null" if value is None else type(value).__name__


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name, value, low, high):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {_kind(value)} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")


def _check_int_list(name, values, low, high, length):
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of {length} ints, got {_kind(values)} {values!r}")
    if len(values) != length:
        raise ValueError(f"{name} must have num_stages={length} entries, got {len(values)}: {list(values)}")
    for value in values:
        _check_int(f"every entry of {name}", value, low, high)


def _check_real(name, value, low=-math.inf, high=math.inf):
    if not _is_real(value):
        raise TypeError(f"{name} must be a number in [{low}, {high}], got {_kind(value)} {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {_kind(value)} {value!r}")


def _check_hidden_act(value):
    names = sorted(HIDDEN_ACTS) + list(PARAMETRIC_ACTS)
    if not isinstance(value, str):
        raise TypeError(f"hidden_act must be a string, one of {names}, got {_kind(value)} {value!r}")
    if value not in HIDDEN_ACTS and value not in PARAMETRIC_ACTS:
        raise ValueError(f"hidden_act must be one of {names}, got {value!r}")


def _checked_image_size(value):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"image_size must be an int or a pair [height, width], got {list(value)}")
        for side in value:
            _check_int("every entry of image_size", side, 1, 2**20)
    else:
        _check_int("image_size", value, 1, 2**20)


def _dtype_name(value):
    """config.dtype as transformers writes it to config.json (a name such as "float32") or None."""
    if value is None:
        return None
    name = value if isinstance(value, str) else str(value)
    name = name.removeprefix("torch.")
    if name not in _DTYPE_NAMES + ("auto",):
        raise ValueError(f"dtype must be None, 'auto' or one of {_DTYPE_NAMES} (or a torch.dtype), got {value!r}")
    return name


def estimated_parameters(config):
    """Parameter count of ConvNextForImageClassification for this config (the largest of the classes)."""
    sizes, total = config.hidden_sizes, 0
    total += config.num_channels * sizes[0] * config.patch_size**2 + 3 * sizes[0]
    for i, (width, depth) in enumerate(zip(sizes, config.depths)):
        if i > 0:
            total += 2 * sizes[i - 1] + 4 * sizes[i - 1] * width + width
        total += depth * (8 * width * width + 58 * width)
    return total + 2 * sizes[-1] + (sizes[-1] + 1) * config.num_labels


class ConvNextConfig:
    """Configuration of a ConvNeXt model, field for field the same as transformers' ConvNextConfig.

    Besides the ConvNeXt fields it keeps transformers' generic flags (return_dict, output_hidden_states,
    output_attentions, dtype, ...), which the models honour, and any unknown key (readable as an
    attribute and written back to config.json).
    """

    model_type = "convnext"
    attribute_map = {"num_hidden_layers": "num_stages"}

    def __init__(
        self,
        num_channels=3,
        patch_size=4,
        num_stages=4,
        hidden_sizes=None,
        depths=None,
        hidden_act="gelu",
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
        image_size=224,
        out_features=None,
        out_indices=None,
        num_labels=None,
        id2label=None,
        label2id=None,
        problem_type=None,
        return_dict=True,
        output_hidden_states=False,
        output_attentions=False,
        dtype=None,
        **kwargs,
    ):
        kwargs = {_ALIASES.get(k, k): v for k, v in kwargs.items()}
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.num_stages = num_stages
        self.hidden_sizes = list(hidden_sizes) if isinstance(hidden_sizes, tuple) else hidden_sizes
        self.depths = list(depths) if isinstance(depths, tuple) else depths
        if hidden_sizes is None:
            self.hidden_sizes = [96, 192, 384, 768]
        if depths is None:
            self.depths = [3, 3, 9, 3]
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.image_size = image_size
        self.problem_type = problem_type
        self.return_dict = return_dict
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.dtype = kwargs.pop("dtype", dtype)
        self.num_stages = kwargs.pop("num_stages", self.num_stages)
        self.name_or_path = kwargs.pop("_name_or_path", "")
        for name in ("chunk_size_feed_forward", "is_encoder_decoder", "architectures"):
            setattr(self, name, kwargs.pop(name, GENERIC_FLAGS[name]))
        self._set_labels(num_labels, id2label, label2id)
        self._validate_fields()
        self.set_out_features(out_features, out_indices)
        self.extra = {k: v for k, v in kwargs.items() if k not in _DERIVED_KEYS}

    # ---- unknown keys and aliases read as attributes, as transformers' configs do ------------------
    def __getattr__(self, name):
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def num_hidden_layers(self):
        return self.num_stages

    @property
    def dtype(self):
        """The weights' dtype recorded in config.json, as a torch.dtype (or None / "auto")."""
        if self._dtype in (None, "auto"):
            return self._dtype
        import torch

        return getattr(torch, self._dtype)

    @dtype.setter
    def dtype(self, value):
        self._dtype = _dtype_name(value)

    @property
    def torch_dtype(self):
        """Old name of `dtype` (transformers keeps it as an alias)."""
        return self.dtype

    @property
    def use_return_dict(self):
        return self.return_dict

    # ---- labels -------------------------------------------------------------------------------
    def _set_labels(self, num_labels, id2label, label2id):
        if id2label is not None:
            id2label = self._checked_id2label(id2label)
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        else:
            count = 2 if num_labels is None else num_labels
            _check_int("num_labels", count, 0, ARCH_LIMITS["num_labels"])
            id2label = {i: f"LABEL_{i}" for i in range(count)}
        if label2id is not None and not isinstance(label2id, Mapping):
            raise TypeError(f"label2id must be a mapping from label to index, got {_kind(label2id)}")
        if label2id:
            try:
                label2id = {k: int(v) for k, v in label2id.items()}
            except (TypeError, ValueError, OverflowError):
                shown = ", ".join(f"{k!r:.40}: {_kind(v)} {v!r:.40}" for k, v in list(label2id.items())[:3])
                raise ValueError(f"label2id must map labels to int indices, got {{{shown}{', ...' * (len(label2id) > 3)}}}") \
                    from None
        else:
            label2id = {v: k for k, v in id2label.items()}
        self.id2label, self.label2id = id2label, label2id

    @staticmethod
    def _checked_id2label(id2label):
        if not isinstance(id2label, Mapping):
            raise TypeError(f"id2label must be a mapping from index to label, got {_kind(id2label)} {id2label!r}")
        if len(id2label) > ARCH_LIMITS["num_labels"]:
            raise ValueError(f"id2label must have at most {ARCH_LIMITS['num_labels']:,} entries, got {len(id2label):,}")
        try:
            checked = {int(k): v for k, v in id2label.items()}
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"id2label keys must be int indices, got {[f'{k!r:.40}' for k in list(id2label)[:5]]}") \
                from None
        for index, label in checked.items():
            if not isinstance(label, Hashable):
                raise TypeError(
                    f"id2label values must be labels (strings), got {_kind(label)} {label!r:.60} for index {index}"
                )
        return checked

    @property
    def num_labels(self):
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value):
        """A new count resets the labels to LABEL_i; the same count keeps them (as in transformers)."""
        if value != self.num_labels:
            self._set_labels(value, None, None)

    # ---- stages / backbone outputs ------------------------------------------------------------
    @property
    def stage_names(self):
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def out_features(self):
        return self._out_features

    @out_features.setter
    def out_features(self, value):
        """Setting out_features re-derives out_indices (transformers' backbone configs do the same)."""
        self.set_out_features(value, None)

    @property
    def out_indices(self):
        return self._out_indices

    @out_indices.setter
    def out_indices(self, value):
        self.set_out_features(None, value)

    def set_out_features(self, out_features=None, out_indices=None):
        """Align out_features and out_indices over stage_names, as transformers' backbones do (negative
        out_indices are kept as given, and count from the end)."""
        names = self.stage_names
        positions = None
        if out_indices is not None:
            if not isinstance(out_indices, (list, tuple)):
                raise TypeError(f"out_indices must be a list of ints, got {_kind(out_indices)} {out_indices!r}")
            if not all(_is_int(i) and -len(names) <= i < len(names) for i in out_indices):
                raise ValueError(f"out_indices must index stage_names {names}, got {list(out_indices)}")
            positions = [i % len(names) for i in out_indices]
        if out_features is not None:
            if not isinstance(out_features, (list, tuple)):
                raise TypeError(
                    f"out_features must be a list of stage names, got {_kind(out_features)} {out_features!r}"
                )
            bad = [f for f in out_features if f not in names]
            if bad:
                raise ValueError(f"out_features must be a subset of stage_names {names}, got unknown {bad}")
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_indices is None:
            out_indices = [names.index(f) for f in out_features]
        elif out_features is None:
            out_features = [names[i] for i in positions]
        elif list(out_features) != [names[i] for i in positions]:
            raise ValueError(
                f"out_features {list(out_features)} and out_indices {list(out_indices)} name different stages"
            )
        positions = [names.index(f) for f in out_features]
        if len(set(positions)) != len(positions) or positions != sorted(positions):
            raise ValueError(f"out_features must be unique and in stage order {names}, got {list(out_features)}")
        self._out_features, self._out_indices = list(out_features), list(out_indices)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self):
        """Check every field again (after attribute edits); the models call this when built."""
        self._set_labels(self.num_labels, self.id2label, self.label2id)
        self._validate_fields()
        self.set_out_features(self.out_features, self.out_indices)

    def _validate_fields(self):
        _check_int("num_channels", self.num_channels, 1, ARCH_LIMITS["num_channels"])
        if isinstance(self.patch_size, (list, tuple)):
            raise ValueError(f"patch_size must be one int (square patches), got {list(self.patch_size)}")
        _check_int("patch_size", self.patch_size, 1, ARCH_LIMITS["patch_size"])
        _check_int("num_stages", self.num_stages, 1, ARCH_LIMITS["num_stages"])
        _check_int_list("hidden_sizes", self.hidden_sizes, 1, ARCH_LIMITS["hidden_sizes"], self.num_stages)
        _check_int_list("depths", self.depths, 0, ARCH_LIMITS["depths"], self.num_stages)
        _check_hidden_act(self.hidden_act)
        _check_real("initializer_range", self.initializer_range, 0.0)
        _check_real("layer_norm_eps", self.layer_norm_eps, 0.0)
        _check_real("layer_scale_init_value", self.layer_scale_init_value)
        _check_real("drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        _checked_image_size(self.image_size)
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError(
                'problem_type="single_label_classification" needs num_labels > 1, got num_labels=1 (the loss would '
                'always be 0): use num_labels=2 for binary classification or problem_type="regression"'
            )
        for name in ("return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder"):
            _check_bool(name, getattr(self, name))
        _check_int("chunk_size_feed_forward", self.chunk_size_feed_forward, 0, 2**31)
        parameters = estimated_parameters(self)
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"the config describes a model of {parameters:,} parameters (hidden_sizes {list(self.hidden_sizes)}, "
                f"depths {list(self.depths)}); fastconvnext builds at most {MAX_PARAMETERS:,}"
            )

    # ---- serialization ------------------------------------------------------------------------
    def to_dict(self):
        """The dictionary transformers writes to config.json (keys sorted as it does)."""
        data = {
            "num_channels": self.num_channels,
            "patch_size": self.patch_size,
            "num_stages": self.num_stages,
            "hidden_sizes": list(self.hidden_sizes),
            "depths": list(self.depths),
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "layer_scale_init_value": self.layer_scale_init_value,
            "drop_path_rate": self.drop_path_rate,
            "image_size": self.image_size,
            "out_features": list(self.out_features),
            "out_indices": list(self.out_indices),
            "stage_names": self.stage_names,
            "id2label": {str(k): v for k, v in self.id2label.items()},
            "label2id": dict(self.label2id),
            "problem_type": self.problem_type,
            "model_type": self.model_type,
            "_name_or_path": self.name_or_path,
            "return_dict": self.return_dict,
            "output_hidden_states": self.output_hidden_states,
            "output_attentions": self.output_attentions,
            "dtype": self._dtype,
            "chunk_size_feed_forward": self.chunk_size_feed_forward,
            "is_encoder_decoder": self.is_encoder_decoder,
            "architectures": copy.deepcopy(self.architectures),
            **copy.deepcopy(self.extra),
        }
        return dict(sorted(data.items()))

    def update(self, values):
        """Set the given fields (a dict), then check the whole config again."""
        if not isinstance(values, Mapping):
            raise TypeError(f"update takes a dict of config fields, got {_kind(values)}")
        for key, value in values.items():
            key = {"torch_dtype": "dtype", "_name_or_path": "name_or_path", **self.attribute_map}.get(key, key)
            if key in ("out_features", "out_indices", "num_labels") or hasattr(type(self), key):
                setattr(self, key, value)
            elif key in self.__dict__:
                self.__dict__[key] = value
            else:
                self.extra[key] = value
        self.validate()

    @classmethod
    def from_dict(cls, data, **overrides):
        if not isinstance(data, Mapping):
            raise TypeError(f"a ConvNextConfig is built from a JSON object of fields, got {_kind(data)} {data!r:.80}")
        data = {**data, **overrides}
        if data.get("model_type", "convnext") != "convnext":
            raise ValueError(f"expected a config with model_type 'convnext', got {data['model_type']!r}")
        return cls(**data)

    def to_diff_dict(self):
        """to_dict without the generic flags that hold their defaults, as transformers' to_diff_dict."""
        data = self.to_dict()
        defaults = {**GENERIC_FLAGS, "_name_or_path": "", "problem_type": None}
        for key, default in defaults.items():
            if data[key] == default:
                del data[key]
        if self.id2label == {0: "LABEL_0", 1: "LABEL_1"} and self.label2id == {"LABEL_0": 0, "LABEL_1": 1}:
            del data["id2label"], data["label2id"]
        return data

    def to_json_string(self, use_diff=False):
        """config.json's text: every field (use_diff=True: as transformers writes by default, without the
        generic flags that hold their defaults; both read back to the same config)."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2) + "\n"

    def to_json_file(self, path, use_diff=False):
        """Write config.json's text to `path` atomically: a failed write (a full disk) leaves the old file whole."""
        write_text_atomically(path, self.to_json_string(use_diff))

    @classmethod
    def from_json_file(cls, path, **overrides):
        """A config from a JSON file: a regular file (not a FIFO or device) of at most MAX_CONFIG_BYTES."""
        return cls._from_file(path, None, overrides)

    @classmethod
    def _from_file(cls, path, root, overrides):
        with open_regular_file(path, root) as file:
            text = file.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB, which no config.json needs")
        try:
            data = json.loads(text.decode("utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text: {err}") from None
        except RecursionError:
            raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
        if not isinstance(data, Mapping):
            raise TypeError(f"{path} must hold a JSON object of ConvNextConfig fields, found {_kind(data)}")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from None

    def save_pretrained(self, directory):
        """Write `directory/config.json` atomically, under the folder's lock (as a model's save_pretrained)."""
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(Path(directory) / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path, subfolder="", **overrides):
        """Read config.json from a directory (or `directory/subfolder`) or a JSON file. The config.json of a
        directory must be a regular file inside it (a symlink may point within it, or, in a Hugging Face cache
        snapshot, to the cache's blobs), as checkpoint.load_pretrained requires."""
        root = Path(path)
        if subfolder:
            folder = (root / subfolder).resolve()
            if not folder.is_relative_to(root.resolve()):
                raise ValueError(f"subfolder {subfolder!r} points outside {root}")
            root = folder
        file = root / CONFIG_NAME if root.is_dir() else root
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {root}")
        return cls._from_file(file, model_root(Path(path)) if root.is_dir() else None, overrides)

    @property
    def activation(self):
        """The op-level activation name (kernels/reference.py) for hidden_act; for the activations with
        learnable parameters (PARAMETRIC_ACTS), hidden_act itself."""
        return HIDDEN_ACTS.get(self.hidden_act, self.hidden_act)

    def __eq__(self, other):
        return isinstance(other, ConvNextConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"ConvNextConfig {self.to_json_string()}"


class DINOv3ConvNextConfig(ConvNextConfig):
    """Configuration of DINOv3's ConvNeXt, field for field the same as transformers' DINOv3ConvNextConfig
    (model_type "dinov3_convnext").

    A subclass of ConvNextConfig so that it shares ConvNextConfig's field checks and architecture bounds
    (a hostile config.json fails here, before anything is allocated), labels, generic flags, out_features /
    out_indices alignment and the bounded config.json reader. What differs from ConvNeXt's: the stem is
    fixed (a 4x4 conv with stride 4; there is no patch_size field), num_stages is len(hidden_sizes) (a
    read-only property in transformers, so it is never written to config.json), layer_norm_eps defaults to
    1e-6 and is also the eps of every block, stem and downsampling LayerNorm, and layer scale (gamma) is
    always a parameter.
    """

    model_type = "dinov3_convnext"
    STEM_PATCH_SIZE = 4

    def __init__(
        self,
        num_channels=3,
        hidden_sizes=None,
        depths=None,
        hidden_act="gelu",
        initializer_range=0.02,
        layer_norm_eps=1e-6,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
        image_size=224,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        kwargs = {_ALIASES.get(k, k): v for k, v in kwargs.items()}
        if hidden_sizes is None:
            hidden_sizes = [96, 192, 384, 768]
        stages = len(hidden_sizes) if isinstance(hidden_sizes, (list, tuple)) else None
        declared = kwargs.pop("num_stages", stages)
        if stages is not None and declared != stages:
            raise ValueError(
                f"num_stages is len(hidden_sizes)={stages} for DINOv3-ConvNeXt, got num_stages={declared!r}"
            )
        patch_size = kwargs.pop("patch_size", self.STEM_PATCH_SIZE)
        if patch_size != self.STEM_PATCH_SIZE:
            raise ValueError(
                f"DINOv3-ConvNeXt's stem is a {self.STEM_PATCH_SIZE}x{self.STEM_PATCH_SIZE} conv with stride "
                f"{self.STEM_PATCH_SIZE} (it has no patch_size field), got patch_size={patch_size!r}"
            )
        super().__init__(
            num_channels=num_channels, patch_size=self.STEM_PATCH_SIZE, num_stages=stages or 1,
            hidden_sizes=hidden_sizes, depths=depths, hidden_act=hidden_act, initializer_range=initializer_range,
            layer_norm_eps=layer_norm_eps, layer_scale_init_value=layer_scale_init_value,
            drop_path_rate=drop_path_rate, image_size=image_size, out_features=out_features,
            out_indices=out_indices, **kwargs,
        )

    @property
    def num_stages(self):
        """len(hidden_sizes), as in transformers (not a stored field)."""
        sizes = self.__dict__.get("hidden_sizes")
        return len(sizes) if isinstance(sizes, (list, tuple)) else 1

    @num_stages.setter
    def num_stages(self, value):
        """ConvNextConfig's constructor assigns it; the value is always derived from hidden_sizes."""

    def to_dict(self):
        """The dictionary transformers writes to config.json: ConvNextConfig's without patch_size and
        num_stages, which transformers' DINOv3ConvNextConfig does not have (a stored num_stages would even
        fail to load there: its num_stages is a read-only property)."""
        data = super().to_dict()
        del data["patch_size"], data["num_stages"]
        return data

    @classmethod
    def from_dict(cls, data, **overrides):
        if not isinstance(data, Mapping):
            raise TypeError(
                f"a {cls.__name__} is built from a JSON object of fields, got {_kind(data)} {data!r:.80}"
            )
        data = {**data, **overrides}
        if data.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"expected a config with model_type {cls.model_type!r}, got {data['model_type']!r}")
        return cls(**data)

    def __repr__(self):
        return f"DINOv3ConvNextConfig {self.to_json_string()}"


class ConvNextV2Config(ConvNextConfig):
    """Configuration of ConvNeXt V2, field for field the same as transformers' ConvNextV2Config (model_type
    "convnextv2"): ConvNextConfig's fields without layer_scale_init_value (V2 blocks have no layer scale; GRN
    takes its place). A subclass for the same checks, bounds, labels, flags and config.json reader."""

    model_type = "convnextv2"

    def __init__(self, *args, **kwargs):
        scale = kwargs.pop("layer_scale_init_value", 0.0)
        if scale not in (0, 0.0, None):
            raise ValueError(f"ConvNeXt V2 has no layer scale (GRN instead); got layer_scale_init_value={scale!r}")
        super().__init__(*args, layer_scale_init_value=0.0, **kwargs)

    def to_dict(self):
        """ConvNextConfig's config.json without layer_scale_init_value, which transformers' ConvNextV2Config lacks."""
        data = super().to_dict()
        del data["layer_scale_init_value"]
        return data

    from_dict = DINOv3ConvNextConfig.__dict__["from_dict"]

    def __repr__(self):
        return f"ConvNextV2Config {self.to_json_string()}"
