"""Model outputs: dataclasses that also index like tuples, as transformers' ModelOutput does.

Integer and slice indexing walk the fields that are not None, in declaration order; string indexing
reads a field by name; iteration, keys(), values(), items(), get(), item assignment and `in` behave
like transformers' (dict-like), and every output class is a pytree node.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from torch.utils import _pytree as pytree


def _flatten(output):
    return output.values(), output.keys()


def _flatten_with_keys(output):
    return [(pytree.MappingKey(name), value) for name, value in output.items()], output.keys()


def _unflatten(values, names, output_type):
    return output_type(**dict(zip(names, values)))


class ModelOutput:
    def __init_subclass__(cls, **kwargs):
        """Each output class is a pytree node (over its fields that are not None), as transformers' are, so
        torch.export, torch.func and DDP's static graph see the tensors inside."""
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls, _flatten, functools.partial(_unflatten, output_type=cls),
            serialized_type_name=f"{cls.__module__}.{cls.__name__}", flatten_with_keys_fn=_flatten_with_keys,
        )

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

    def get(self, key, default=None):
        return dict(self.items()).get(key, default)

    def __setitem__(self, key, value):
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; its fields: {[f.name for f in fields(self)]}")
        setattr(self, key, value)

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
