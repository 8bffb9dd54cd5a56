"""The dwconv + LayerNorm forward's tiling: the tile kernel's channel chunks and the strip kernel's channel block
leave no lane idle at ConvNeXt widths, and tiles of several output rows whose edges (last row tile, last strip, neighbouring images) read only the
pixels of their own image.

Oracle: kernels/reference.py in float64 (R) and in the tested dtype (E), judged by tests/tolerance.py's
rule; the LayerNorm statistics against the same conv computed in float64.
"""
import pytest
import torch
import torch.nn.functional as F

from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module
from fastconvnext.kernels._triton_compat import config_choice
from fastconvnext.kernels.dwconv_layernorm_kernel import dwconv_layernorm_fwd
from fastconvnext.kernels.reference import dwconv_layernorm_reference
from tolerance import assert_within_rule

TILE_WIDTHS = (96, 192, 384, 768, 1536)  # ConvNeXt-T/S/L stages (3 * 2^k): the tile kernel
STRIP_WIDTHS = (128, 256, 512, 1024)  # ConvNeXt-B stages (2^k): the strip kernel


def test_the_tile_kernel_runs_exactly_three_power_of_two_chunks():
    for c in range(1, kernel_module.MAX_CHANNELS + 1):
        config = kernel_module._forward_config(c)
        chunk = c // 3
        if c % 3 or chunk & (chunk - 1) or not 32 <= chunk <= 512:
            assert config is None, c
            continue
        consts, warps = config
        assert (consts["CHUNK"], consts["NCHUNK"], consts["STRIDE_C"]) == (chunk, 3, c) and warps == chunk // 32, c
        accumulators = consts["TILE_H"] * consts["TILE_W"] * 3  # registers a thread, spill-free up to these
        assert consts["TILE_H"] >= 2 and accumulators <= (40 if warps > 8 else 48 if warps in (2, 4) else 72), c
        # fp32 x: up to 72 (except at 16 warps on Triton 3.4/3.5: _triton_compat cuts its budget to 24)
        if not (warps > 8 and config_choice("dwconv.fwd_accumulators_16_warps_fp32_x") < 40):
            assert kernel_module._forward_config(c, 4)[0]["TILE_H"] >= consts["TILE_H"], c


@pytest.mark.parametrize("c", TILE_WIDTHS + STRIP_WIDTHS)
def test_convnext_widths_leave_no_lane_idle(c):
    config = kernel_module._forward_config(c)
    if c in TILE_WIDTHS:
        consts, warps = config
        assert consts["STRIDE_C"] == c == consts["NCHUNK"] * consts["CHUNK"] == 3 * 32 * warps
    else:
        block_c = kernel_module._block_c(c)
        _, warps = kernel_module._strip_forward_config(block_c)
        assert config is None and block_c == c == 32 * kernel_module.CHANNELS_PER_THREAD * warps


def test_every_forward_config_is_a_compile_target():
    """compile_check compiles what a launch at any C uses: the tile kernel at C = 3 * 2^k (compiled with that
    C), the strip kernel otherwise."""
    labels = {t.label for t in kernel_module.compile_targets() if t.dtype == "bf16"}
    for c in (*TILE_WIDTHS, *STRIP_WIDTHS, 5, 24, 70, 600, 1030, 2048):
        config = kernel_module._forward_config(c)
        if config is not None:
            target = kernel_module._forward_target("bf16", "bf16", 7, *config)
        else:
            target = kernel_module._strip_forward_target("bf16", "bf16", 7, kernel_module._block_c(c))
        assert target.label in labels, target.label


def _case(n, h, w, c, k, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rand(n, c, h, w).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return x, [rand(c, 1, k, k) * 0.3, rand(c), 1.0 + 0.3 * rand(c), 0.3 * rand(c)]


def _fused_forward(x, params):
    weight, bias, ln_w, ln_b = params
    c, k = x.shape[-1], weight.shape[-1]
    taps = weight.reshape(c, k * k).t().float().contiguous()
    return dwconv_layernorm_fwd(x, taps, bias.float(), ln_w.float(), ln_b.float(), 1e-6)


def _conv64(x, params):
    weight, bias = params[0], params[1]
    z = F.conv2d(x.permute(0, 3, 1, 2).double(), weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[-1])
    return z.permute(0, 2, 3, 1)


# (N, H, W, C, K, dtype): H = 5 and 3 with 3-row tiles (a tail tile; tiles whose windows reach into the
# neighbouring images), W = 9 with 8-wide strips (a 1-pixel tail strip); C = 96 (3 chunks of 32), 192 (3 chunks
# of 64, 2-row tiles with 16-bit x), 64 (power of two) and 80 (not 3 * 2^k): the strip kernel.
CASES = [
    (1, 5, 9, 96, 7, torch.float32),
    (2, 3, 9, 96, 7, torch.bfloat16),
    (1, 5, 9, 192, 5, torch.float16),
    (1, 6, 9, 64, 5, torch.float16),
    (1, 5, 10, 80, 3, torch.float32),
    (2, 13, 3, 96, 3, torch.float32),  # 5 row tiles: 2 programs of 3 tiles a column, the last tile past the image
]


def test_a_program_runs_several_row_tiles_and_skips_the_one_past_the_image():
    consts, _ = kernel_module._forward_config(96, 4)
    (programs,), tiles = kernel_module._forward_grid(2, 13, 3, consts)
    # 3-row tiles: 5 row tiles, 2 groups of 3; Triton < 3.9 takes 2-row tiles at C = 96 (_triton_compat,
    # "dwconv.fwd_accumulators_1_warp"): 7 row tiles, 2 groups of 4. Either way the last group has one tile past the image
    assert (consts["TILE_H"], tiles) == ((3, 3) if config_choice("dwconv.fwd_accumulators_1_warp") >= 72 else (2, 4))
    assert programs == 2 * 2  # 2 images x 2 groups x 1 strip


@pytest.mark.parametrize("n,h,w,c,k,dtype", CASES)
def test_forward_tiles_against_the_reference(n, h, w, c, k, dtype):
    x, params = _case(n, h, w, c, k, seed=c + h)
    y, mean, rstd = _fused_forward(x.to(dtype), params)
    exact = dwconv_layernorm_reference(x, *params)
    eager = dwconv_layernorm_reference(x.to(dtype), *[p.to(dtype) for p in params])
    assert y.dtype == dtype
    assert_within_rule(y, eager, exact, dtype, "output")
    z = _conv64(x.to(dtype).double(), params)
    var, mean64 = torch.var_mean(z, dim=-1, unbiased=False)
    # statistics are fp32 whatever x's dtype: within fp32 rounding of the float64 values of the same input
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-6), rtol=1e-5, atol=1e-5)
