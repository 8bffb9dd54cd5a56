"""Bytes each op implementation saves for backward, counted with torch.autograd.graph.saved_tensors_hooks.

The forward runs under FakeTensorMode: shapes, dtypes and the saved-tensor graph are exact, nothing is
computed or allocated, so real stage shapes (batch 64, 56x56) cost nothing on a CPU. The fused ops are
represented by their registered fake implementations, with the same autograd setup_context as on a GPU.
The kernels accept CPU tensors only when TRITON_INTERPRET=1 was set before they were imported, so the
count runs in a child process with that variable set (`python -m fastconvnext.tooling.bench.memory`); no
kernel is launched there, fake or otherwise.

Two numbers per implementation: `saved` = every distinct storage kept for backward (a tensor saved
twice, or two views of one storage, counted once); `extra` = those that are not one of the op's inputs
or parameters, i.e. what the op adds to the memory a training step must hold.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from fastconvnext.tooling.roofline import StageShape


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SavedBytes:
    saved: int
    extra: int


def _storage_key(tensor):
    return tensor.untyped_storage()._cdata


def count_saved(fn, inputs):
    """SavedBytes of one forward of fn(**inputs) (autograd enabled)."""
    input_keys = {_storage_key(t) for t in inputs.values() if isinstance(t, torch.Tensor)}
    seen = {}

    def pack(tensor):
        seen[_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(**inputs)
    extra = sum(nbytes for key, nbytes in seen.items() if key not in input_keys)
    return SavedBytes(sum(seen.values()), extra)


def _input_shapes(op, impl, shape):
    from fastconvnext.tooling.roofline import KERNEL_SIZE, MLP_RATIO

    n, h, w, c = shape.dims
    if op == "dwconv_layernorm":
        return {"x": (n, c, h, w) if impl == "eager_nchw" else (n, h, w, c),
                "dw_weight": (c, 1, KERNEL_SIZE, KERNEL_SIZE), "dw_bias": (c,), "ln_weight": (c,), "ln_bias": (c,)}
    d = MLP_RATIO * c
    return {"x": (n, h, w, c), "residual": (n, h, w, c), "fc1_weight": (d, c), "fc1_bias": (d,),
            "fc2_weight": (c, d), "fc2_bias": (c,), "gamma": (c,)}


def measure_in_this_process(requests):
    """requests: [(op, impl, StageShape, dtype)] -> [SavedBytes]; needs TRITON_INTERPRET=1 for fused ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastconvnext.tooling.bench.cases import op_function

    out = []
    for op, impl, shape, dtype in requests:
        fn = op_function(op, impl)
        with FakeTensorMode():
            inputs = {name: torch.empty(size, dtype=_DTYPES[dtype]).requires_grad_()
                      for name, size in _input_shapes(op, impl, shape).items()}
            out.append(count_saved(fn, inputs))
    return out



def measure(requests, timeout=300):
    """Count in a child process (TRITON_INTERPRET=1, no GPU touched); returns [SavedBytes] in order."""
    payload = [
        {"op": op, "impl": impl, "dtype": dtype,
         "shape": [shape.model, shape.stage, shape.batch, shape.size, shape.channels]}
        for op, impl, shape, dtype in requests
    ]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-m", "fastconvnext.tooling.bench.memory"], input=json.dumps(payload), capture_output=True,
        text=True, env=env, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"counting saved tensors failed:\n{done.stderr[-3000:]}")
    return [SavedBytes(**item) for item in json.loads(done.stdout.strip().splitlines()[-1])]


def main():
    requests = [
        (item["op"], item["impl"], StageShape(*item["shape"]), item["dtype"]) for item in json.loads(sys.stdin.read())
    ]
    results = measure_in_this_process(requests)
    print(json.dumps([{"saved": r.saved, "extra": r.extra} for r in results]))


if __name__ == "__main__":
    main()
