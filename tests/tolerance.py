"""DESIGN.md's tolerance rule for a fused op in a low-precision dtype.

R: fp32 reference, E: the eager op in the same dtype, F: the fused result.
Require max|F - R| <= 2 * max|E - R| + atol(dtype).
"""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def max_abs_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(fused, eager, reference, dtype, what="output"):
    assert fused.shape == reference.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(reference.shape)}"
    err_fused = max_abs_diff(fused, reference)
    err_eager = max_abs_diff(eager, reference)
    bound = 2 * err_eager + ATOL[dtype]
    assert err_fused <= bound, (
        f"{what} ({dtype}): max|F-R| = {err_fused:.3e} exceeds 2*max|E-R| + atol = {bound:.3e}"
    )
