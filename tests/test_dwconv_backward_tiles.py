"""The dwconv + LayerNorm backward's tile LayerNorm kernel (C = 3 * 2^k: the conv recomputed by the forward's
tiles, g per pixel over the channel chunks): gradients, g kept in fp32, tiles past the image, the grid-stride
split of its partials, and bitwise-repeatable results.

Oracle: kernels/reference.py in float64 (R) and in the tested dtype (E), judged by tests/tolerance.py's rule;
g against the gradient of the float64 LayerNorm with respect to its input.
"""
import inspect

import pytest
import torch

from fastconvnext.kernels import dwconv_layernorm
from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module
from fastconvnext.kernels.reference import dwconv_layernorm_reference
from tolerance import assert_within_rule

NAMES = ("output", "d_x", "d_dw_weight", "d_dw_bias", "d_ln_weight", "d_ln_bias")


def _case(n, h, w, c, k, seed):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rand(n, c, h, w).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    params = [rand(c, 1, k, k) * 0.3, rand(c), 1.0 + 0.3 * rand(c), 0.3 * rand(c)]
    return x, params, rand(n, h, w, c)


def _run(fn, x, params, dy, dtype, param_dtype):
    x = x.to(dtype).requires_grad_()
    params = [p.to(param_dtype).requires_grad_() for p in params]
    y = fn(x, *params)
    return [y, *torch.autograd.grad(y, [x, *params], dy.to(y.dtype))]


def _launched(monkeypatch):
    kernels = []
    real_launch = kernel_module._launch

    def spy(kernel, grid, *args, **meta):
        kernels.append(kernel)
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(kernel_module, "_launch", spy)
    return kernels


# (N, H, W, C, K, dtype): C = 96 and 192 (3 chunks of 32 / 64, 2-row tiles), 768 (3 chunks of 256: 1-row tiles);
# H = 3 or 4 (a tail tile at some), N = 2 (windows that reach into the next image), W = 9 with 8-wide tiles (a
# 1-pixel tail strip).
CASES = [
    (1, 4, 9, 96, 7, torch.float32),
    (2, 4, 9, 96, 3, torch.bfloat16),
    (1, 3, 9, 192, 3, torch.float16),
    (2, 2, 9, 768, 3, torch.bfloat16),
]


@pytest.mark.parametrize("n,h,w,c,k,dtype", CASES)
def test_tile_backward_against_the_reference(monkeypatch, n, h, w, c, k, dtype):
    launched = _launched(monkeypatch)
    x, params, dy = _case(n, h, w, c, k, seed=c + h)
    fused = _run(dwconv_layernorm, x, params, dy, dtype, dtype)
    assert kernel_module._dwconv_ln_bwd_tile_kernel in launched
    assert kernel_module._dwconv_ln_bwd_norm_kernel not in launched
    eager = _run(dwconv_layernorm_reference, x, params, dy, dtype, dtype)
    exact = _run(dwconv_layernorm_reference, x, params, dy, torch.float64, torch.float64)
    for name, f, e, r in zip(NAMES, fused, eager, exact):
        assert f.dtype == dtype, name
        assert_within_rule(f, e, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_g_is_fp32_and_matches_the_float64_layernorm_gradient(dtype):
    """g (the conv output's gradient) straight from the tile kernel: fp32 whatever x's dtype, and within fp32
    rounding of the float64 gradient of LayerNorm at the same conv output (a bf16-rounded g is ~1e-3 off)."""
    n, h, w, c, k = 1, 4, 9, 96, 3
    x, (weight, bias, ln_w, ln_b), dy = _case(n, h, w, c, k, seed=21)
    x = x.to(dtype).contiguous()
    dy = dy.to(dtype)
    taps = weight.reshape(c, k * k).t().float().contiguous()
    args = (taps, bias.float(), ln_w.float())
    _, mean, rstd = kernel_module.dwconv_layernorm_fwd(x, *args, ln_b.float(), 1e-6)
    consts, warps = kernel_module._norm_bwd_tile_config(c, x.element_size())
    programs, per_program = kernel_module._norm_tile_grid(n, h, w, consts)
    g = torch.empty(n, h, w, c, dtype=torch.float32)
    partials = torch.empty(programs, 3, c, dtype=torch.float32)
    kernel_module._dwconv_ln_bwd_tile_kernel[(programs,)](
        x, *args, dy, mean, rstd, g, partials, n, h, w, per_program, K=k, **consts, num_warps=warps, num_stages=1)
    z = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).double(), weight, bias, padding=k // 2, groups=c)
    z = z.permute(0, 2, 3, 1).detach().requires_grad_()
    y = torch.nn.functional.layer_norm(z, (c,), ln_w, ln_b, 1e-6)
    (g64,) = torch.autograd.grad(y, z, dy.double())
    assert g.dtype == torch.float32
    torch.testing.assert_close(g.double(), g64, rtol=0, atol=2e-5 * g64.abs().max().item())
    sums = partials.double().sum(0)
    torch.testing.assert_close(sums[2], g64.sum((0, 1, 2)), rtol=0, atol=1e-4 * g64.abs().sum().item() / c)


def test_grid_stride_split_with_a_dead_tile(monkeypatch):
    """2 programs over 7 row tiles (2 rows each with fp32 x) x 1 strip: 4 tiles a program, the eighth past the
    last image (dead: loads and stores nothing). The split is fixed (no GPU-dependent program count) and the kernels use no atomics, so the
    partials' fixed-order sums give the same bits on every run (the interpreter runs programs in order, so a
    second run here would prove nothing)."""
    for kernel in (kernel_module._dwconv_ln_bwd_tile_kernel, kernel_module._ln_bwd_tile):
        assert "atomic" not in inspect.getsource(kernel.fn)
    monkeypatch.setattr(kernel_module, "NORM_TILE_PROGRAMS", 2)
    consts, _ = kernel_module._norm_bwd_tile_config(96, 4)
    assert consts["TILE_H"] == 2 and consts["TILE_W"] == 8
    assert kernel_module._norm_tile_grid(1, 13, 8, consts) == (2, 4)
    x, params, dy = _case(1, 13, 8, 96, 3, seed=22)
    first = _run(dwconv_layernorm, x, params, dy, torch.float32, torch.float32)
    eager = _run(dwconv_layernorm_reference, x, params, dy, torch.float32, torch.float32)
    exact = _run(dwconv_layernorm_reference, x, params, dy, torch.float64, torch.float64)
    for name, f, e, r in zip(NAMES, first, eager, exact):
        assert_within_rule(f, e, r, torch.float32, name)


def test_every_tile_backward_config_is_a_compile_target():
    labels = {(t.kernel, t.label) for t in kernel_module.compile_targets() if t.dtype in ("bf16", "fp32")}
    for c, budget in ((96, 48), (192, 48), (384, 48), (768, 24), (1536, 24)):  # the spill-free budgets
        for x_bytes, dtype in ((2, "bf16"), (4, "fp32")):
            config = kernel_module._norm_bwd_tile_config(c, x_bytes)
            assert config[0]["TILE_H"] * config[0]["TILE_W"] * 3 <= budget
            target = kernel_module._norm_bwd_tile_target(dtype, dtype, 7, *config)
            assert (target.kernel, target.label) in labels, target.label
    for c in (128, 1024, 80):  # power-of-two C and C the three chunks do not cover: the strip kernel
        assert kernel_module._norm_bwd_tile_config(c, 2) is None


def test_the_input_and_weight_gradient_kernel_compiles_c_in_at_the_tile_widths():
    """C = 3 * 2^k (a multiple of its 32-channel blocks) is compiled in: no channel mask, immediate offsets;
    every other C runs the runtime-C variant (STRIDE_C = 0). Each is a compile target."""
    labels = {t.label for t in kernel_module.compile_targets()
              if t.kernel == "dwconv_bwd_dgrad_wgrad" and t.dtype == "bf16"}
    for c in (96, 192, 384, 768, 1536, 24, 80, 128, 1024, 2048):
        stride_c = kernel_module._wgrad_stride_c(c)
        assert stride_c == (c if c in (96, 192, 384, 768, 1536) else 0), c
        assert kernel_module._bwd_conv_target("bf16", 7, stride_c).label in labels, c
