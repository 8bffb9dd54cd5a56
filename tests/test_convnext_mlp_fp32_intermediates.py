"""Issue 9.6: intermediates of the fused MLP that must stay fp32 in an fp16 call, tested so that rounding them
to fp16 shows beyond the tolerance rule (tests/tolerance.py).

Eager fp16 (the rule's E) rounds every tensor it materialises (pre, dh, dpre, matmul outputs) and accumulates
matmuls in fp32. The inputs below keep pre and dh exact in fp16 and make the steps in between matter, so a kernel
that rounds there fails (checked by mutation: rounding dh and act' to fp16 before multiplying in the dx kernel
fails dx by 2.2x the bound; fp16 dW accumulators fail dW1 by 3.5x):

- act'(pre) for pre in [-6, -5] lies in fp16's subnormal range (1e-8..1e-6, spacing 6e-8): rounding it before
  the multiplication by dh = 2^15 loses 2-70 % per element, whereas dh * act'(pre) ~ 1e-3 is a normal fp16.
  x = 0 makes pre = b1 exact; W1 > 0 and rows of equal sign make the errors add up in dx and db1.
- the dW accumulators run over many row tiles: fp16 partial sums lose about an ulp per tile.

R is the float64 reference on the same (fp16-valued) inputs. Shapes stay small (the interpreter runs them).
"""
import math

import pytest
import torch

from fastconvnext.kernels import convnext_mlp
from fastconvnext.kernels.reference import convnext_mlp_reference
from tolerance import assert_within_rule

DTYPE = torch.float16


def _gelu_grad(pre: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(pre / math.sqrt(2))) + pre * torch.exp(-pre * pre / 2) / math.sqrt(2 * math.pi)


def _subnormal_derivative_points(count: int) -> torch.Tensor:
    """pre values (exact in fp16) where fp16(act'(pre)) overstates |act'(pre)| the most, relatively."""
    pre = torch.arange(-6.5, -4.5, 1 / 128, dtype=torch.float64)
    slope = _gelu_grad(pre)
    excess = slope.to(DTYPE).double().abs() / slope.abs() - 1
    return pre[excess.argsort(descending=True)[:count]]


def _grads(fn, inputs, dy, names, cast):
    leaves = {k: (v.to(cast) if v is not None else None) for k, v in inputs.items()}
    for name in names:
        leaves[name].requires_grad_()
    out = fn(**leaves)
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], dy.to(out.dtype))))


def _check(inputs, dy, names):
    fused = _grads(convnext_mlp, inputs, dy, names, DTYPE)
    eager = _grads(convnext_mlp_reference, inputs, dy, names, DTYPE)
    exact = _grads(convnext_mlp_reference, inputs, dy, names, torch.float64)
    for name in names:
        assert torch.isfinite(fused[name]).all() and torch.isfinite(exact[name]).all(), name
        assert_within_rule(fused[name], eager[name], exact[name], DTYPE, f"d{name}")
    return fused, exact


@pytest.mark.parametrize("C", [8, 40])  # interpreter: fused dx kernel at C <= 32, hidden-backward + dx GEMM above
def test_activation_derivative_times_dh_is_fp32(C):
    """dpre = dh * act'(pre) formed in fp32 (then rounded once): dx and db1 of either backward path."""
    shape, D = (2, 8, 8, C), 32
    fc2_weight = torch.zeros(C, D)
    fc2_weight[:8] = 1.0  # dh = sum over 8 channels of dy = 8 * 4096 = 2^15, exact in fp16
    inputs = dict(
        x=torch.zeros(shape),
        residual=torch.zeros(shape),
        fc1_weight=torch.full((D, C), 8.0),
        fc1_bias=_subnormal_derivative_points(D).float(),
        fc2_weight=fc2_weight,
        fc2_bias=torch.zeros(C),
        gamma=torch.ones(C),
    )
    dy = torch.full(shape, 4096.0)
    fused, exact = _check(inputs, dy, ("x", "fc1_bias"))
    # the inputs do what the docstring says: the rounding of act' alone would exceed the rule's atol
    slope = _gelu_grad(inputs["fc1_bias"].double())
    rounding = (slope.to(DTYPE).double() - slope) * 2.0**15
    rows = shape[0] * shape[1] * shape[2]
    assert (8 * rounding.sum()).abs() > 0.05 and (rows * rounding).abs().max() > 0.05


def test_weight_gradients_accumulate_in_fp32_over_row_tiles():
    """dW1, dW2, db1 sum over M = 2048 rows (64 interpreter row tiles, one M segment)."""
    gen = torch.Generator().manual_seed(3)
    shape, D = (2, 32, 32, 8), 32
    C = shape[-1]

    def positive(*size):  # fp16-exact values in [0.5, 1.5)
        return (torch.rand(*size, generator=gen) + 0.5).to(DTYPE).float()

    inputs = dict(
        x=positive(*shape),
        residual=torch.zeros(shape),
        fc1_weight=positive(D, C) / C,
        fc1_bias=torch.zeros(D),
        fc2_weight=positive(C, D),
        fc2_bias=torch.zeros(C),
        gamma=torch.ones(C),
    )
    dy = positive(*shape)
    fused, exact = _check(inputs, dy, ("fc1_weight", "fc1_bias", "fc2_weight"))
    assert exact["fc2_weight"].abs().min() > 1000  # sums of ~2048 positive terms: fp16 ulp 0.5 to 2 there
