"""The forward's 2-D tiles (BLOCK_H rows x BLOCK_W pixels) in Triton's interpreter.

Oracle: the float64 eager reference (kernels/reference.py) under CONTRIBUTING's tolerance rule, and
bitwise equality between tile shapes: every output sums its taps in the same order whatever the tile,
which is what lets the autotuner pick a tile without changing the bits.
"""
import os

import pytest
import torch

from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module
from fastconvnext.kernels.reference import dwconv_layernorm_reference
from tolerance import assert_within_rule

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must enable Triton's interpreter"


def make_inputs(n, h, w, c, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last)
    x = x.permute(0, 2, 3, 1)
    weight = torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64) * 0.3
    bias, ln_w, ln_b = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(3))
    return x.to(dtype), weight, bias, 1 + 0.3 * ln_w, 0.3 * ln_b


def fused_forward(x, weight, bias, ln_w, ln_b):
    k = weight.shape[-1]
    taps = weight.reshape(x.shape[-1], k * k).t().float().contiguous()
    return kernel_module._forward(x, taps, bias.float(), ln_w.float(), ln_b.float(), 1e-6, x.dtype)


def reference(x, weight, bias, ln_w, ln_b, dtype):
    return dwconv_layernorm_reference(x.to(dtype), weight.to(dtype), bias.to(dtype), ln_w.to(dtype),
                                      ln_b.to(dtype), 1e-6)


# The listed tiles plus shapes no launch uses today (3 rows; 4 pixels): the kernel takes any BLOCK_H/BLOCK_W.
TILES = list(kernel_module.FWD_TILES) + [(3, 4, 4), (1, 8, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tile_gives_the_same_bits_and_matches_the_reference(monkeypatch, dtype):
    """H=5 and W=9 leave tail tiles in both directions (rows past the image are computed, not stored);
    N=2 checks that a tile never reads the next image's rows."""
    inputs = make_inputs(2, 5, 9, 24, 5, dtype, seed=7)
    exact = reference(*inputs, torch.float64)
    eager = reference(*inputs, dtype)
    results = []
    for tile in TILES:
        monkeypatch.setattr(kernel_module, "FWD_TILES", (tile,))
        y, mean, rstd = fused_forward(*inputs)
        assert_within_rule(y, eager, exact, dtype, f"output, tile {tile}")
        results.append((tile, y, mean, rstd))
    first_tile, *first = results[0]
    for tile, *other in results[1:]:
        for name, a, b in zip(("y", "mean", "rstd"), first, other):
            assert torch.equal(a, b), f"{name}: tile {tile} differs from tile {first_tile}"


def test_forward_stats_match_the_reference():
    """mean/rstd (saved for the backward) are those of the conv output, per pixel."""
    x, weight, bias, ln_w, ln_b = make_inputs(1, 4, 7, 40, 7, torch.float32, seed=8)
    _, mean, rstd = fused_forward(x, weight, bias, ln_w, ln_b)
    z = torch.nn.functional.conv2d(x.double().permute(0, 3, 1, 2), weight, bias, padding=3, groups=40)
    z = z.permute(0, 2, 3, 1)
    torch.testing.assert_close(mean.double(), z.mean(-1), rtol=0, atol=1e-5)
    expected_rstd = torch.rsqrt(z.var(-1, unbiased=False) + 1e-6)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-5, atol=0)


def test_tile_rows_fed_by_one_input_row_plan():
    """launch_plans counts the tile's input rows: BLOCK_H + K - 1 per tile, clipped at the image."""
    assert kernel_module._tile_input_rows(5, 5, 1) == kernel_module._valid_taps(5, 5)
    # H=5, K=5, 2-row tiles at h0 = 0, 2, 4: rows [-2, 4) -> 4, [0, 6) -> 5, [2, 8) -> 3
    assert kernel_module._tile_input_rows(5, 5, 2) == 4 + 5 + 3
