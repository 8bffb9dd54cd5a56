"""ConvNextConfig: the fields, defaults, validation and config.json form of transformers' ConvNextConfig."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

CONFIG_NAME = "config.json"

# transformers' hidden_act names -> the activation name used by the ops (kernels/reference.py).
HIDDEN_ACTS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "mish": "mish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "hardswish": "hardswish",
    "linear": "linear",
}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys transformers writes that carry no meaning for this model; accepted and dropped on read.
_IGNORED_KEYS = {
    "transformers_version", "architectures", "model_type", "stage_names", "torch_dtype", "dtype",
    "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings",
}


class ConvNextConfig:
    """Configuration of a ConvNeXt model, field for field the same as transformers' ConvNextConfig.

    Inconsistent values raise ValueError here, when the config is built, not deep inside a forward.
    """

    model_type = "convnext"

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
        **unused,
    ):
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.num_stages = num_stages
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [96, 192, 384, 768]
        self.depths = list(depths) if depths is not None else [3, 3, 9, 3]
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.image_size = image_size
        self.problem_type = problem_type
        self._set_labels(num_labels, id2label, label2id)
        self._validate()
        self.set_out_features(out_features, out_indices)
        unknown = set(unused) - _IGNORED_KEYS
        self.extra = {k: unused[k] for k in unknown}

    # ---- labels -------------------------------------------------------------------------------
    def _set_labels(self, num_labels, id2label, label2id):
        if id2label is not None:
            id2label = {int(k): v for k, v in dict(id2label).items()}
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        else:
            count = 2 if num_labels is None else num_labels
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"num_labels must be a non-negative int, got {count!r}")
            id2label = {i: f"LABEL_{i}" for i in range(count)}
        self.id2label = id2label
        self.label2id = {k: int(v) for k, v in dict(label2id).items()} if label2id else {
            v: k for k, v in id2label.items()
        }

    @property
    def num_labels(self):
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value):
        self._set_labels(value, None, None)

    # ---- stages / backbone outputs ------------------------------------------------------------
    @property
    def stage_names(self):
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    def set_out_features(self, out_features=None, out_indices=None):
        """Align out_features and out_indices over stage_names, as transformers' backbones do."""
        names = self.stage_names
        if out_indices is not None:
            out_indices = [i % len(names) if isinstance(i, int) and i < 0 else i for i in out_indices]
            bad = [i for i in out_indices if not isinstance(i, int) or not 0 <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices must index stage_names {names}, got {list(out_indices)}")
        if out_features is not None:
            bad = [f for f in out_features if f not in names]
            if bad:
                raise ValueError(f"out_features must be a subset of stage_names {names}, got unknown {bad}")
        if out_features is None and out_indices is None:
            out_features, out_indices = [names[-1]], [len(names) - 1]
        elif out_indices is None:
            out_indices = [names.index(f) for f in out_features]
        elif out_features is None:
            out_features = [names[i] for i in out_indices]
        elif list(out_features) != [names[i] for i in out_indices]:
            raise ValueError(
                f"out_features {list(out_features)} and out_indices {list(out_indices)} name different stages"
            )
        if len(set(out_indices)) != len(out_indices) or list(out_indices) != sorted(out_indices):
            raise ValueError(f"out_features must be unique and in stage order {names}, got {list(out_features)}")
        self.out_features, self.out_indices = list(out_features), list(out_indices)

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self):
        def positive_int(name, value):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        positive_int("num_channels", self.num_channels)
        positive_int("patch_size", self.patch_size)
        positive_int("num_stages", self.num_stages)
        for name in ("hidden_sizes", "depths"):
            values = getattr(self, name)
            if len(values) != self.num_stages:
                raise ValueError(f"{name} must have num_stages={self.num_stages} entries, got {len(values)}: {values}")
            for v in values:
                positive_int(f"every entry of {name}", v)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {sorted(HIDDEN_ACTS)}, got {self.hidden_act!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {PROBLEM_TYPES}, got {self.problem_type!r}")

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
            "model_type": self.model_type,
            **copy.deepcopy(self.extra),
        }
        if self.problem_type is not None:
            data["problem_type"] = self.problem_type
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data, **overrides):
        data = {**data, **overrides}
        if data.get("model_type", "convnext") != "convnext":
            raise ValueError(f"expected a config with model_type 'convnext', got {data['model_type']!r}")
        return cls(**data)

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_json_file(self, path):
        Path(path).write_text(self.to_json_string())

    @classmethod
    def from_json_file(cls, path, **overrides):
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data, **overrides)

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(Path(directory) / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        return cls.from_json_file(file, **overrides)

    @property
    def activation(self):
        """The op-level activation name (kernels/reference.py) for hidden_act."""
        return HIDDEN_ACTS[self.hidden_act]

    def __eq__(self, other):
        return isinstance(other, ConvNextConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"ConvNextConfig {self.to_json_string()}"
