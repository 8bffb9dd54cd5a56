"""Training-side measurements: how many bytes autograd keeps alive for the backward pass.

`SavedTensorBytes` counts, while active, every distinct storage that autograd saves for backward
(through `torch.autograd.graph.saved_tensors_hooks`): a tensor saved twice, or two views of one
storage, count once, at the storage's full size. `saved_bytes_per_image` runs one training forward
at two batch sizes and splits the count into bytes per image and a batch-independent part; with
`fake=True` it runs under FakeTensorMode, so no memory is allocated and nothing is computed (shapes,
dtypes and the saved-tensor graph are still exact), which makes 224x224 measurements instant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def _storage_key(tensor):
    return tensor.untyped_storage()._cdata


class SavedTensorBytes:
    """Context manager recording the storages autograd saves for backward inside it.

    Tensors whose storage is one of `exclude`'s (the model's parameters, typically) are not counted:
    they live anyway, whatever the backward needs. Nested checkpointed regions install their own hooks,
    so what they recompute is (correctly) not seen here; the inputs they keep are.
    """

    def __init__(self, exclude=()):
        self._excluded = {_storage_key(t) for t in exclude}
        self._bytes = {}
        self._hooks = None

    def _pack(self, tensor):
        key = _storage_key(tensor)
        if key not in self._excluded:
            self._bytes[key] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info):
        self._hooks.__exit__(*exc_info)
        return False

    @property
    def nbytes(self):
        """Total bytes of the distinct saved storages."""
        return sum(self._bytes.values())

    @property
    def count(self):
        """Number of distinct saved storages."""
        return len(self._bytes)


@dataclass
class SavedBytes:
    per_image: int  # grows with the batch: activations
    constant: int  # independent of the batch (e.g. re-laid-out weights), parameters excluded


def _classification_loss(output):
    loss = output.loss if hasattr(output, "loss") else output[0]
    if loss is None:
        raise ValueError("the model returned no loss; pass labels for a model with a classification head")
    return loss


def saved_bytes(model, batch, image_size, fake=False, dtype=torch.float32):
    """Bytes saved for backward by one training forward (loss included) of `model` on a random batch."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    pixels = torch.randn(batch, model.config.num_channels, height, width, dtype=dtype)
    labels = torch.arange(batch) % model.config.num_labels
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        params = list(model.parameters())
        if fake:
            pixels = mode.from_tensor(pixels)
            # Autograd runs above the fake mode: ops save the real parameter, or a view of its memoized
            # fake copy when they save a derived tensor (Linear saves weight.t()). Exclude both; holding
            # the fake copies keeps the memo, so the forward converts to these very tensors.
            params += [mode.from_tensor(p) for p in params]
        with SavedTensorBytes(exclude=params) as meter:
            loss = _classification_loss(model(pixels, labels=labels))
        del loss
    return meter.nbytes


def saved_bytes_per_image(model, image_size, fake=False, dtype=torch.float32):
    """Bytes per image and batch-independent bytes, from training forwards at batch 1 and 2."""
    one = saved_bytes(model, 1, image_size, fake=fake, dtype=dtype)
    two = saved_bytes(model, 2, image_size, fake=fake, dtype=dtype)
    return SavedBytes(per_image=two - one, constant=2 * one - two)
