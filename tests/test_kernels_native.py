"""Both fused ops run natively on a GPU at full ConvNeXt-T stage shapes (batch 8), in every dtype.

GPU mode only (FASTCONVNEXT_TEST_DEVICE=cuda: compiled kernels, real configs, the autotuner); on CPU
these are collected and reported as skipped. Oracle: the eager reference in the tested dtype (E) and in
float64 (R), under the tolerance rule (tests/tolerance.py); the fused op must also be bitwise
deterministic from one call to the next.
"""
import math

import pytest
import torch

from fastconvnext.kernels import convnext_mlp, dwconv_layernorm
from fastconvnext.kernels.reference import convnext_mlp_reference, dwconv_layernorm_reference
from helpers import CONVNEXT_T_STAGES, KERNEL_DEVICE, gpu
from tolerance import assert_within_rule

pytestmark = gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaves(inputs, cast=None):
    out = {}
    for name, t in inputs.items():
        if t is None or not t.is_floating_point():
            out[name] = t
            continue
        t = t.detach().clone() if cast is None else t.detach().to(cast)
        out[name] = t.requires_grad_(name != "sample_scale")
    return out


def _forward_backward(fn, inputs, dy, cast=None, **options):
    leaves = _leaves(inputs, cast)
    out = fn(**leaves, **options)
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dy.to(out.dtype))
    return out, dict(zip(names, grads))


def _check(fused_fn, eager_fn, inputs, dtype, **options):
    dy = torch.randn(inputs["x"].shape, device=KERNEL_DEVICE)
    fused, fused_grads = _forward_backward(fused_fn, inputs, dy, **options)
    again, again_grads = _forward_backward(fused_fn, inputs, dy, **options)
    eager, eager_grads = _forward_backward(eager_fn, inputs, dy, cast=dtype, **options)
    ref, ref_grads = _forward_backward(eager_fn, inputs, dy, cast=torch.float64, **options)
    assert_within_rule(fused, eager, ref, dtype, "out")
    assert torch.equal(fused, again), "forward not deterministic"
    for name, grad in fused_grads.items():
        assert_within_rule(grad, eager_grads[name], ref_grads[name], dtype, f"d{name}")
        assert torch.equal(grad, again_grads[name]), f"d{name} not deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONVNEXT_T_STAGES, ids=lambda s: "x".join(map(str, s)))
def test_dwconv_layernorm_at_stage_shapes(shape, dtype):
    n, h, w, c = shape
    on = dict(device=KERNEL_DEVICE)
    inputs = dict(
        x=torch.randn(n, h, w, c, **on).to(dtype),
        dw_weight=0.3 * torch.randn(c, 1, 7, 7, **on),
        dw_bias=0.1 * torch.randn(c, **on),
        ln_weight=1 + 0.1 * torch.randn(c, **on),
        ln_bias=0.1 * torch.randn(c, **on),
    )
    _check(dwconv_layernorm, dwconv_layernorm_reference, inputs, dtype, eps=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONVNEXT_T_STAGES, ids=lambda s: "x".join(map(str, s)))
def test_convnext_mlp_at_stage_shapes(shape, dtype):
    n, h, w, c = shape
    d = 4 * c
    on = dict(device=KERNEL_DEVICE)
    inputs = dict(
        x=torch.randn(n, h, w, c, **on).to(dtype),
        residual=torch.randn(n, h, w, c, **on).to(dtype),
        fc1_weight=(torch.randn(d, c, **on) / math.sqrt(c)).to(dtype),
        fc1_bias=(0.5 * torch.randn(d, **on)).to(dtype),
        fc2_weight=(torch.randn(c, d, **on) / math.sqrt(d)).to(dtype),
        fc2_bias=(0.5 * torch.randn(c, **on)).to(dtype),
        gamma=(0.5 + torch.rand(c, **on)).to(dtype),
        sample_scale=torch.tensor([1.25, 0.0] * (n // 2), **on),
    )
    _check(convnext_mlp, convnext_mlp_reference, inputs, dtype, act="gelu")
