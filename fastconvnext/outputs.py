"""Model outputs: dataclasses that also index like tuples, as transformers' ModelOutput does.

Integer and slice indexing walk the fields that are not None, in declaration order; string indexing
reads a field by name; iteration, keys(), values() and `in` behave like transformers' (dict-like).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class ModelOutput:
    def to_tuple(self):
        return tuple(value for _, value in self.items())

    def keys(self):
        return [name for name, _ in self.items()]

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def values(self):
        return list(self.to_tuple())

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key):
        return key in self.keys()

    def __len__(self):
        return len(self.to_tuple())


@dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BackboneOutput(ModelOutput):
    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None  # always None: ConvNeXt has no attention
