"""Fused depthwise KxK conv (+ bias) + LayerNorm over channels, forward and backward.

Layout: activations are [N, H, W, C] contiguous (a channels_last NCHW tensor seen through
.permute(0, 2, 3, 1)). The kernels see them as a [P, C] matrix with P = N*H*W pixels; a program
owns BLOCK_P consecutive pixels (flattened over n, h, w, so no tile is wasted at row ends) times
all channels, and finds each tap's source pixel as p + dh*W + dw, masked at image borders.

Forward: conv in fp32 over one runtime (not unrolled) loop of K*K taps, + bias, LayerNorm in
fp32; y in x's dtype, mean/rstd [P] in fp32 (always written: 8 bytes per pixel).
Backward (three kernels; the conv output is recomputed from x, not saved):
  1. recompute the conv output, LayerNorm backward -> g = d(conv output) in fp32, plus per-program
     partial sums of dy*xhat, dy and g (LN weight, LN bias, conv bias grads);
  2. dx = conv of g with the spatially flipped taps (the forward kernel, without norm);
  3. dW[tap, c] = sum_p g[p, c] * x[p + shift(tap), c], per-program partials.
Partials are summed by torch in a fixed order: same bits on every run, no atomics.

Configs: the forward is autotuned (key: C, an H*W bucket, dtypes) over _conv_configs; the backward
kernels use one fixed config each, because their tiling decides how the weight-gradient partials
are split. In the interpreter, or with FASTCONVNEXT_AUTOTUNE=0, the forward uses its first config.
compile_targets() lists every config for kernels/compile_check.py.

Params are converted to fp32 (taps as a [K*K, C] tap-major matrix) before the custom op, so
fp32 master params with fp16/bf16 activations work, and param grads come back in the params'
dtype through the cast. x must already be NHWC-contiguous: it is rejected, not copied, otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
import triton
import triton.language as tl

from ._env import autotune_enabled, interpreting
from .compile_spec import CompileTarget
from .reference import DWCONV_MAX_CHANNELS as MAX_CHANNELS
from .reference import DWCONV_MAX_KERNEL_SIZE as MAX_KERNEL_SIZE
from .reference import dwconv_layernorm_reference

MIN_BLOCK_C = 64  # fewer compiled variants; tiny C only wastes masked lanes
# Programs of the kernels that write gradient partials. Fixed (not per GPU), so the summation
# order and thus the bits do not depend on the GPU model; scaled down with C so the partial
# buffers stay a few MB: [programs, 3, C] and [pixel programs, K*K, C].
PARTIAL_PROGRAMS = 1024
PARTIAL_ELEMENTS = 1 << 18
DW_BLOCK_C = 64
# Pixel indices are int32 (element offsets are int64); headroom for the shifted taps and tail tiles.
MAX_PIXELS = 2**30
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _dwconv_tile(
    src_ptr,  # [P, C] conv input (x, or g for the input gradient)
    taps_ptr,  # [K*K, C] fp32 depthwise taps, tap-major
    p,  # [BLOCK_P] int32 pixel indices
    c,  # [BLOCK_C] int32 channel indices
    P, H, W, C,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pad: tl.constexpr = K // 2
    p_ok = p < P
    c_ok = c < C
    w_idx = p % W
    h_idx = (p // W) % H
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # One runtime loop over all taps: unrolling keeps K loaded tiles live at once (255 registers
    # and spills at 16 tile elements per thread) and fully unrolled 49 taps took minutes to build.
    for tap in tl.range(0, K * K, loop_unroll_factor=1):
        dh = tap // K - pad
        dw = tap % K - pad
        src_h = h_idx + dh
        src_w = w_idx + dw
        ok = p_ok & (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W)
        src_p = (p + dh * W + dw).to(tl.int64)
        vals = tl.load(src_ptr + src_p[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        weights = tl.load(taps_ptr + tap * C + c, mask=c_ok, other=0.0)
        acc += vals.to(tl.float32) * weights[None, :]
    return acc


@triton.jit
def _dwconv_ln_fwd_kernel(
    x_ptr,  # [P, C] input, x dtype (or fp32 g when HAS_NORM is False)
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32 conv bias (zeros when the module has none)
    ln_w_ptr,  # [C] fp32, read if HAS_NORM
    ln_b_ptr,  # [C] fp32, read if HAS_NORM
    y_ptr,  # [P, C] output, x dtype
    mean_ptr,  # [P] fp32, written if HAS_NORM
    rstd_ptr,  # [P] fp32, written if HAS_NORM
    P, H, W, C,
    eps,
    HW_BUCKET,  # autotune key only
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    acc = _dwconv_tile(x_ptr, taps_ptr, p, c, P, H, W, C, K, BLOCK_P, BLOCK_C)
    acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_NORM:
        mean = tl.sum(acc, axis=1) / C
        centered = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)
        ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0)
        ln_b = tl.load(ln_b_ptr + c, mask=c_ok, other=0.0)
        acc = centered * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
        tl.store(mean_ptr + p, mean, mask=p_ok)
        tl.store(rstd_ptr + p, rstd, mask=p_ok)
    offs = p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------- backward kernels


@triton.jit
def _dwconv_ln_bwd_norm_kernel(
    x_ptr,  # [P, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32
    ln_w_ptr,  # [C] fp32
    dy_ptr,  # [P, C] output gradient, x dtype
    mean_ptr,  # [P] fp32
    rstd_ptr,  # [P] fp32
    g_ptr,  # [P, C] fp32 out: gradient of the conv output
    partial_ptr,  # [programs, 3, C] fp32 out: sums of dy*xhat, dy, g over this program's pixels
    P, H, W, C,
    TILES_PER_PROGRAM,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
    ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(TILES_PER_PROGRAM):
        p = (pid * TILES_PER_PROGRAM + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        mask = p_ok[:, None] & c_ok[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        z = _dwconv_tile(x_ptr, taps_ptr, p, c, P, H, W, C, K, BLOCK_P, BLOCK_C) + bias[None, :]
        mean = tl.load(mean_ptr + p, mask=p_ok, other=0.0)
        rstd = tl.load(rstd_ptr + p, mask=p_ok, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy_w = dy * ln_w[None, :]
        proj_xhat = tl.sum(dy_w * xhat, axis=1) / C
        proj_one = tl.sum(dy_w, axis=1) / C
        g = (dy_w - xhat * proj_xhat[:, None] - proj_one[:, None]) * rstd[:, None]
        g = tl.where(mask, g, 0.0)
        tl.store(g_ptr + offs, g, mask=mask)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
        sum_dy += tl.sum(dy, axis=0)
        sum_g += tl.sum(g, axis=0)
    row = partial_ptr + pid.to(tl.int64) * 3 * C + c
    tl.store(row, sum_dy_xhat, mask=c_ok)
    tl.store(row + C, sum_dy, mask=c_ok)
    tl.store(row + 2 * C, sum_g, mask=c_ok)


@triton.jit
def _dwconv_wgrad_kernel(
    g_ptr,  # [P, C] fp32 gradient of the conv output
    x_ptr,  # [P, C] input, x dtype
    partial_ptr,  # [programs, K*K, C] fp32 out: per-program sums of g * shifted x
    P, H, W, C,
    TILES_PER_PROGRAM,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pad: tl.constexpr = K // 2
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    first_p = pid * TILES_PER_PROGRAM * BLOCK_P
    row = partial_ptr + pid.to(tl.int64) * (K * K) * C + c
    for tap in tl.range(0, K * K, loop_unroll_factor=1):
        dh = tap // K - pad
        dw = tap % K - pad
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for t in range(TILES_PER_PROGRAM):
            p = first_p + t * BLOCK_P + tl.arange(0, BLOCK_P)
            src_h = (p // W) % H + dh
            src_w = p % W + dw
            ok = (p < P) & (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W)
            mask = ok[:, None] & c_ok[None, :]
            src_p = (p + dh * W + dw).to(tl.int64)
            xs = tl.load(x_ptr + src_p[:, None] * C + c[None, :], mask=mask, other=0.0)
            g = tl.load(g_ptr + p.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0)
            acc += g * xs.to(tl.float32)
        tl.store(row + tap * C, tl.sum(acc, axis=0), mask=c_ok)


# -------------------------------------------------------------------------------- launchers


def _block_c(channels: int) -> int:
    return max(MIN_BLOCK_C, triton.next_power_of_2(channels))


def _conv_configs(block_c: int, has_norm: bool) -> list[tuple[int, int]]:
    """(BLOCK_P, num_warps) candidates for the full-C conv kernel, at 16 fp32 tile elements per
    thread. The forward is autotuned over both; the input gradient (no norm) uses the first."""
    configs = [(max(1, 2048 // block_c), 4), (max(1, 4096 // block_c), 8)]
    return configs if has_norm else configs[:1]


def _norm_bwd_config(block_c: int) -> tuple[int, int]:
    """(BLOCK_P, num_warps): 8 fp32 elements per thread per tile, as z, dy and g are live at once."""
    return max(1, 2048 // block_c), 8


def _wgrad_config() -> tuple[int, int]:
    return 32, 4  # BLOCK_P x DW_BLOCK_C tile


def _hw_bucket(height: int, width: int) -> int:
    return min(triton.next_power_of_2(height * width), 1 << 14)


_TUNED: dict = {}


def _tuned_conv_kernel(block_c: int, has_norm: bool):
    key = (block_c, has_norm)
    if key not in _TUNED:
        configs = [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=1) for p, w in _conv_configs(*key)]
        # Triton adds the tensor arguments' dtypes to the key.
        _TUNED[key] = triton.autotune(configs=configs, key=["C", "HW_BUCKET"])(_dwconv_ln_fwd_kernel)
    return _TUNED[key]


def _launch(kernel, grid, *args, **meta):
    """Every launch goes through here (inside `_device_guard`, which the tests check)."""
    kernel[grid](*args, **meta)


def _launch_conv(src, taps, bias, ln_w, ln_b, out, mean, rstd, eps, has_norm, kernel_size):
    n, h, w, c = out.shape
    pixels, block_c = n * h * w, _block_c(c)
    args = (src, taps, bias, ln_w, ln_b, out, mean, rstd, pixels, h, w, c, eps, _hw_bucket(h, w))
    consts = dict(K=kernel_size, BLOCK_C=block_c, HAS_NORM=has_norm)
    configs = _conv_configs(block_c, has_norm)
    if len(configs) > 1 and autotune_enabled():
        kernel = _tuned_conv_kernel(block_c, has_norm)
        _launch(kernel, lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]),), *args, **consts)
        return
    block_p, warps = configs[0]
    grid = (triton.cdiv(pixels, block_p),)
    _launch(_dwconv_ln_fwd_kernel, grid, *args, **consts, BLOCK_P=block_p, num_warps=warps, num_stages=1)


def _device_guard(device: torch.device):
    """Make the tensors' GPU current while launching: a model on cuda:1 with cuda:0 current must
    not launch on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(x, taps, bias, ln_w, ln_b, eps, out_dtype):
    n, h, w, c = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty((n, h, w), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    kernel_size = _kernel_size(taps)
    with _device_guard(x.device):
        _launch_conv(x, taps, bias, ln_w, ln_b, y, mean, rstd, eps, True, kernel_size)
    return y, mean, rstd


def _kernel_size(taps: torch.Tensor) -> int:
    return int(round(taps.shape[0] ** 0.5))


def _programs_for(tiles: int, max_programs: int) -> tuple[int, int]:
    """(programs, tiles per program) for a grid-stride over `tiles` pixel tiles."""
    tiles_per_program = triton.cdiv(tiles, max(1, min(max_programs, PARTIAL_PROGRAMS)))
    return triton.cdiv(tiles, tiles_per_program), tiles_per_program


def _backward(dy, x, taps, bias, ln_w, mean, rstd):
    with _device_guard(x.device):
        return _backward_launches(dy, x, taps, bias, ln_w, mean, rstd)


def _backward_launches(dy, x, taps, bias, ln_w, mean, rstd):
    n, h, w, c = x.shape
    pixels, taps_count = n * h * w, taps.shape[0]
    kernel_size = _kernel_size(taps)
    block_c = _block_c(c)

    block_p, warps = _norm_bwd_config(block_c)
    programs, tiles_per_program = _programs_for(triton.cdiv(pixels, block_p), PARTIAL_ELEMENTS // block_c)
    g = torch.empty((n, h, w, c), device=x.device, dtype=torch.float32)
    norm_partials = torch.empty((programs, 3, c), device=x.device, dtype=torch.float32)
    _launch(
        _dwconv_ln_bwd_norm_kernel, (programs,), x, taps, bias, ln_w, dy, mean, rstd, g, norm_partials, pixels, h, w, c, tiles_per_program,
        K=kernel_size, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps, num_stages=1,
    )

    dx = torch.empty_like(x)
    flipped = taps.flip(0).contiguous()  # tap (kh, kw) -> (K-1-kh, K-1-kw): correlation = conv transpose
    zeros = torch.zeros(c, device=x.device, dtype=torch.float32)
    _launch_conv(g, flipped, zeros, zeros, zeros, dx, mean, rstd, 0.0, False, kernel_size)

    block_p, warps = _wgrad_config()
    channel_blocks = triton.cdiv(c, DW_BLOCK_C)
    programs, tiles_per_program = _programs_for(triton.cdiv(pixels, block_p), PARTIAL_PROGRAMS // channel_blocks)
    tap_partials = torch.empty((programs, taps_count, c), device=x.device, dtype=torch.float32)
    grid = (programs, channel_blocks)
    _launch(
        _dwconv_wgrad_kernel, grid, g, x, tap_partials, pixels, h, w, c, tiles_per_program,
        K=kernel_size, BLOCK_P=block_p, BLOCK_C=DW_BLOCK_C, num_warps=warps, num_stages=1,
    )
    d_ln_w, d_ln_b, d_bias = (norm_partials[:, i].sum(0) for i in range(3))
    return dx, tap_partials.sum(0), d_bias, d_ln_w, d_ln_b


# ------------------------------------------------------------------- torch.library custom ops


@torch.library.custom_op("fastconvnext::dwconv_layernorm_fwd", mutates_args=())
def dwconv_layernorm_fwd(
    x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    eps: float, out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N,H,W,C]; taps [K*K, C], bias/ln_weight/ln_bias [C], all params fp32 and contiguous.
    The output has out_dtype (default: x's dtype); x is read in its own dtype."""
    return _forward(x, taps, bias, ln_weight, ln_bias, eps, out_dtype or x.dtype)


@dwconv_layernorm_fwd.register_fake
def _(x, taps, bias, ln_weight, ln_bias, eps, out_dtype=None):
    stats = x.new_empty(x.shape[:3], dtype=torch.float32)
    return torch.empty_like(x, dtype=out_dtype or x.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("fastconvnext::dwconv_layernorm_bwd", mutates_args=())
def dwconv_layernorm_bwd(
    dy: torch.Tensor, x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, d taps, d bias, d ln_weight, d ln_bias); param grads in fp32."""
    return _backward(dy.contiguous(), x, taps, bias, ln_weight, mean, rstd)


@dwconv_layernorm_bwd.register_fake
def _(dy, x, taps, bias, ln_weight, mean, rstd):
    c = x.shape[-1]
    return (
        torch.empty_like(x), taps.new_empty(taps.shape), bias.new_empty(c), ln_weight.new_empty(c),
        ln_weight.new_empty(c),
    )


def _setup_context(ctx, inputs, output):
    x, taps, bias, ln_weight = inputs[:4]
    _, mean, rstd = output
    ctx.save_for_backward(x, taps, bias, ln_weight, mean, rstd)


def _backward_rule(ctx, dy, _dmean, _drstd):
    x, taps, bias, ln_weight, mean, rstd = ctx.saved_tensors
    dx, dtaps, dbias, dln_w, dln_b = dwconv_layernorm_bwd(dy, x, taps, bias, ln_weight, mean, rstd)
    return dx, dtaps, dbias, dln_w, dln_b, None, None


dwconv_layernorm_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# Autocast: the op's output feeds the block's first Linear, which autocast runs in its low-precision
# dtype, so under autocast the op writes that dtype directly (x is still read in its own dtype, no cast
# pass; statistics stay fp32). Registered for CUDA and CPU, whose autocast lists differ (CUDA keeps
# layer_norm in fp32, which would otherwise hand the MLP fp32 activations).
_AUTOCAST_LIBRARY = torch.library.Library("fastconvnext", "IMPL")


def _autocast_forward_rule(device_type: str):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def forward_in_autocast_dtype(x, taps, bias, ln_weight, ln_bias, eps, out_dtype=None):
        dtype = out_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return dwconv_layernorm_fwd(x, taps, bias, ln_weight, ln_bias, eps, dtype)

    return key, forward_in_autocast_dtype


def _register_autocast_rules(op_name: str = "dwconv_layernorm_fwd") -> None:
    overload = getattr(torch.ops.fastconvnext, op_name).default
    for device_type in ("cuda", "cpu"):
        key, rule = _autocast_forward_rule(device_type)
        overload.py_impl(key)(rule)  # seen by the Python dispatcher (torch.compile tracing)
        _AUTOCAST_LIBRARY.impl(op_name, lambda _keys, *args, _rule=rule: _rule(*args), key.name, with_keyset=True)


_register_autocast_rules()


# -------------------------------------------------------------------------- public function


def _check_inputs(x, dw_weight, dw_bias, ln_weight, ln_bias):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be one of float32/float16/bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, H, W, C] (4-D), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(
            f"x must be contiguous in [N, H, W, C] order (a channels_last tensor seen through "
            f".permute(0, 2, 3, 1)), got strides {x.stride()} for shape {tuple(x.shape)}"
        )
    n, h, w, c = x.shape
    if c > MAX_CHANNELS:
        raise ValueError(f"C must be <= {MAX_CHANNELS}, got {c}")
    if n * h * w > MAX_PIXELS:
        raise ValueError(f"N*H*W must be <= {MAX_PIXELS} pixels (int32 pixel indices), got {n * h * w}")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); use the eager path")
    if not isinstance(dw_weight, torch.Tensor) or dw_weight.dim() != 4:
        raise ValueError(f"dw_weight must be a 4-D [C, 1, K, K] tensor, got {_describe(dw_weight)}")
    k = dw_weight.shape[-1]
    if tuple(dw_weight.shape) != (c, 1, k, k) or k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(
            f"dw_weight must be [C, 1, K, K] = [{c}, 1, K, K] with odd K <= {MAX_KERNEL_SIZE}, "
            f"got {tuple(dw_weight.shape)}"
        )
    params = {"dw_weight": dw_weight, "dw_bias": dw_bias, "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, param in params.items():
        if param is None and name == "dw_bias":
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(param).__name__}")
        if name != "dw_weight" and tuple(param.shape) != (c,):
            raise ValueError(f"{name} must have shape [C] = [{c}], got {tuple(param.shape)}")
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype must be one of float32/float16/bfloat16, got {param.dtype}")
        if param.device != x.device:
            raise ValueError(f"{name} is on {param.device} but x is on {x.device}; all must be on one device")


def _forward_mode_ad(*tensors) -> bool:
    """Whether any input carries a forward-mode tangent (torch.autograd.forward_ad) or is wrapped by a
    torch.func transform (jvp, jacfwd, vmap, grad): there the custom ops would drop tangents silently."""
    if torch.compiler.is_compiling():
        return False
    return any(
        t is not None and (forward_ad.unpack_dual(t).tangent is not None
                           or torch._C._functorch.is_functorch_wrapped_tensor(t))
        for t in tensors
    )


def _describe(value):
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def dwconv_layernorm(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm over C of depthwise_conv(x, padding K//2) + bias; x and the result are [N, H, W, C].

    x must be NHWC-contiguous (not copied here: the model always passes channels_last tensors).
    Params may be fp32 while x is fp16/bf16; the result has x's dtype, param grads the params'.
    """
    _check_inputs(x, dw_weight, dw_bias, ln_weight, ln_bias)
    if _forward_mode_ad(x, dw_weight, dw_bias, ln_weight, ln_bias):
        # The custom ops have no forward-mode (jvp) or vmap rule; the reference's ops have both.
        return dwconv_layernorm_reference(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    c, k = x.shape[-1], dw_weight.shape[-1]
    taps = dw_weight.reshape(c, k * k).t().float().contiguous()
    bias = x.new_zeros(c, dtype=torch.float32) if dw_bias is None else dw_bias.float().contiguous()
    y, _, _ = dwconv_layernorm_fwd(
        x, taps, bias, ln_weight.float().contiguous(), ln_bias.float().contiguous(), float(eps)
    )
    return y


# ------------------------------------------------------------------------- compile targets

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SHAPE_ARGS = {"P": "i32", "H": "i32", "W": "i32", "C": "i32"}


def _block_c_classes() -> list[int]:
    return [1 << i for i in range(MIN_BLOCK_C.bit_length() - 1, MAX_CHANNELS.bit_length())]


def compile_targets(kernel_sizes=(MAX_KERNEL_SIZE,)) -> list[CompileTarget]:
    """Every (kernel, BLOCK_C class, config, dtype) the launchers can pick, for compile_check.

    K changes only the unrolled row length (the kernel-row loop is a runtime loop), so the
    largest K bounds registers and compile time; pass more kernel_sizes to check them too.
    """
    targets = []
    for dtype, name in _TRITON_DTYPES.items():
        for k in kernel_sizes:
            targets += _conv_targets(name, k) + _norm_bwd_targets(name, k) + [_wgrad_target(name, k)]
    return targets


def _conv_targets(dtype: str, k: int) -> list[CompileTarget]:
    targets = []
    for block_c in _block_c_classes():
        for has_norm, src in ((True, dtype), (False, "fp32")):
            for block_p, warps in _conv_configs(block_c, has_norm):
                signature = {
                    "x_ptr": f"*{src}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32",
                    "ln_b_ptr": "*fp32", "y_ptr": f"*{dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                    **_SHAPE_ARGS, "eps": "fp32", "HW_BUCKET": "i32",
                    "K": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr", "HAS_NORM": "constexpr",
                }
                targets.append(CompileTarget(
                    kernel="dwconv_ln_fwd" if has_norm else "dwconv_dgrad",
                    fn=_dwconv_ln_fwd_kernel, signature=signature,
                    constexprs={"K": k, "BLOCK_P": block_p, "BLOCK_C": block_c, "HAS_NORM": has_norm},
                    num_warps=warps, num_stages=1, dtype=dtype,
                    label=f"K={k} BLOCK_P={block_p} BLOCK_C={block_c} warps={warps}",
                ))
    return targets


def _norm_bwd_targets(dtype: str, k: int) -> list[CompileTarget]:
    targets = []
    for block_c in _block_c_classes():
        block_p, warps = _norm_bwd_config(block_c)
        signature = {
            "x_ptr": f"*{dtype}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32",
            "dy_ptr": f"*{dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "g_ptr": "*fp32",
            "partial_ptr": "*fp32", **_SHAPE_ARGS, "TILES_PER_PROGRAM": "i32",
            "K": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr",
        }
        targets.append(CompileTarget(
            kernel="dwconv_ln_bwd_norm", fn=_dwconv_ln_bwd_norm_kernel, signature=signature,
            constexprs={"K": k, "BLOCK_P": block_p, "BLOCK_C": block_c},
            num_warps=warps, num_stages=1, dtype=dtype,
            label=f"K={k} BLOCK_P={block_p} BLOCK_C={block_c} warps={warps}",
        ))
    return targets


def _wgrad_target(dtype: str, k: int) -> CompileTarget:
    block_p, warps = _wgrad_config()
    signature = {
        "g_ptr": "*fp32", "x_ptr": f"*{dtype}", "partial_ptr": "*fp32", **_SHAPE_ARGS,
        "TILES_PER_PROGRAM": "i32", "K": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr",
    }
    return CompileTarget(
        kernel="dwconv_wgrad", fn=_dwconv_wgrad_kernel, signature=signature,
        constexprs={"K": k, "BLOCK_P": block_p, "BLOCK_C": DW_BLOCK_C},
        num_warps=warps, num_stages=1, dtype=dtype,
        label=f"K={k} BLOCK_P={block_p} BLOCK_C={DW_BLOCK_C} warps={warps}",
    )
