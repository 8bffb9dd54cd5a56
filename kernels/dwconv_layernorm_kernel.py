"""Fused depthwise KxK conv (+ bias) + LayerNorm over channels, forward and backward.

Layout: activations are [N, H, W, C] contiguous (a channels_last NCHW tensor seen through
.permute(0, 2, 3, 1)); ROWS = N*H image rows of W pixels of C channels.

Forward tile kernel (C = 96 * 2^k, ConvNeXt-T/S/L's widths): a program owns a TILE_H x TILE_W tile of output
pixels and all C channels, as NCHUNK = 3 power-of-two chunks of CHUNK <= 512 channels, one channel a thread, so
no lane is idle. C is compiled in (STRIDE_C): every window and tap offset is an immediate, and a load's mask is one predicate per (input row,
window column). Per chunk, a runtime loop over kernel rows kh: output row r reads input row h0 - PAD + r + kh,
so each iteration loads one new window row (TILE_W + K - 1 pixels) and that kh's K taps (shared by all
output rows) and carries the tile's other TILE_H - 1 window rows in registers. A program runs
TILES_PER_PROGRAM row tiles of one strip (its taps stay in L1). Conv + bias in fp32, kept for all chunks;
LayerNorm statistics per pixel summed over the chunks in fp32. Every other C (ConvNeXt-B's 2^k among them)
runs `_dwconv_ln_fwd_strip_kernel` (one output row x BLOCK_W pixels, all C in one BLOCK_C >= C block, as the
backward). y in x's dtype (or the autocast dtype), mean/rstd [N*H*W] in fp32.

Strip kernels (backward, and the forward at other C): a program owns a strip of BLOCK_W consecutive pixels of one image row and a block of
channels. Per kernel row kh it loads the strip's input window (BLOCK_W + K - 1 pixels, halo included)
once into registers, with that row's K taps, and every window pixel feeds the K outputs it touches.
Tensors are 1-D per pixel, kept in tuples indexed at compile time, so the sliding window is register
renaming: no shared memory and no barrier in the tap loop.
Backward (the conv output is recomputed from x, not saved):
  1. LayerNorm backward -> g = d(conv output), stored in fp32 (never rounded to the activation dtype), plus
     per-program partial sums of dy*xhat, dy and g (LN weight, LN bias, conv bias grads). At the forward tile
     kernel's C, `_dwconv_ln_bwd_tile_kernel` recomputes the conv with the forward's chunks (`_conv_tile_chunk`)
     on shorter tiles (2 rows; 1 row from 256-channel chunks on, C >= 768) and runs the LayerNorm backward per
     pixel over the chunks; a program grid-strides over the batch's tiles (at most NORM_TILE_PROGRAMS programs).
     Every other C runs the strip kernel `_dwconv_ln_bwd_norm_kernel` (BLOCK_C = next_pow2(C), two channels a
     thread);
  2. `_dwconv_bwd_conv_kernel`: one pass over g (with halo) and x: dx = conv of g with the
     flipped taps, and per-program partials of dW[tap, c] = sum_p g[p, c] * x[p + shift(tap), c]
     held in registers over the program's rows. At C = 3 * 2^k, C is compiled in (STRIDE_C: immediate
     offsets, no channel mask) and strips are 8 pixels; other C run the runtime-C variant on 4-pixel strips;
  3. `_sum_rows_kernel`: each partial buffer summed over programs in a fixed order.
Same bits on every run and every GPU: no atomics, program counts independent of the GPU.

Configs: one per launch, chosen from C (`_forward_config`) and fixed for the backward kernels (their tiling
decides how the gradient partials are split), so the bits never depend on a tuner or on the GPU.
compile_targets() lists every config for compile_check; launch_plans() describes the launches a call makes
at a shape, for sass_report.

Params are converted to fp32 (taps as a [K*K, C] tap-major matrix) before the custom op, so
fp32 master params with fp16/bf16 activations work, and param grads come back in the params'
dtype through the cast. x must already be NHWC-contiguous: it is rejected, not copied, otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._env import interpreting
from ._op_support import (
    DTYPE_NAMES, autocast_key, device_guard as _device_guard, forward_mode_ad, register_autocast_rules,
)
from ._triton_compat import config_choice, require_supported
from .compile_spec import FP_FUSION, CompileTarget, LaunchPlan
from .reference import DWCONV_MAX_CHANNELS as MAX_CHANNELS
from .reference import DWCONV_MAX_KERNEL_SIZE as MAX_KERNEL_SIZE
from .reference import dwconv_layernorm_reference

require_supported()  # an older Triton: ImportError naming the installed and the required release

# Forward tile kernel: a tile of FWD_TILE_H x FWD_TILE_W output pixels, all C = FWD_NCHUNK * CHUNK channels as
# chunks of CHUNK (a power of two, one channel per thread, up to 16 warps): ConvNeXt-T/S/L's C = 96 * 2^k with no
# idle lane, where the strip kernel's next_pow2(C)-wide block leaves a quarter idle. Every other C runs the strip
# kernel: a power-of-two C fills its block exactly, and there the strip kernel is the faster one on the model (its
# 4 channels a thread share each load's address math; ConvNeXt-B b64 bf16 H100: C=128 122 vs 134 us, C=1024
# 17 vs 37 us for a 1-chunk tile), and a tile kernel with masked channels spilled (see below).
FWD_TILE_H, FWD_TILE_W = 3, 8
MIN_CHUNK, FWD_MAX_CHUNK = 32, 512  # one channel a thread: 1 to 16 warps
FWD_NCHUNK = 3
# Row tiles a forward program runs one after the other: its taps (and LayerNorm params) come from L2 once.
FWD_TILES_PER_PROGRAM = 4
# Conv outputs a thread holds (TILE_H * TILE_W * NCHUNK). Exact C: at 96 (TILE_H = 4, 3 chunks) ptxas
# spilled on sm_90; at 72, 161-182 registers and no spill at 1 and 8 warps (sm_80/sm_90), but 16 bytes of
# stack on sm_80 with fp16/bf16 x at 2 and 4 warps (C = 192, 384): 48 there (fp32 x at 48 spilled 8 bytes
# on sm_80 instead: x_bytes picks). 16 warps leave 128 registers a thread. A C the chunks do not cover exactly runs the strip kernel: the tile kernel with a runtime C
# (a 64-bit address a load, vector masks) spilled on sm_80/sm_90 even at 24 accumulators.
FWD_ACCUMULATORS, FWD_ACCUMULATORS_2_4_WARPS, FWD_ACCUMULATORS_16_WARPS = 72, 48, 40
MIN_BLOCK_C = 64  # backward: fewer compiled variants; tiny C only wastes masked lanes
BLOCK_W = 8  # output pixels per strip: 56/28/14/7-wide rows waste at most 1/8 of a strip
# Channels per thread in the full-C kernels: 4 keeps window + taps + accumulators near 130 registers.
CHANNELS_PER_THREAD = 4
# Backward conv: one channel per thread (its 49 tap-gradient accumulators live in registers) and one
# image row per warp; BLOCK_C = 32 divides every ConvNeXt width.
BWD_BLOCK_C = 32
BWD_ROW_TILE = 4
# Its strips are 4 pixels: at 8, its 49 tap-gradient + 49 tap + window registers spilled (sm_80/sm_90)
# and ptxas took over a minute.
BWD_BLOCK_W = 4
# With C compiled in (STRIDE_C), 8-pixel strips fit (sm_90 238 registers, sm_80 168 at C = 96, no spill): 14 window
# loads feed 8 pixels' 7 taps per kernel row instead of 10 feeding 4.
BWD_BLOCK_W_EXACT_C = 8
# Partial-sum budgets. Fixed (not per GPU), so the summation order and thus the bits do not depend on
# the GPU model: at most PARTIAL_PROGRAMS (row group, strip) programs write [3, C] norm partials, and
# the tap-gradient partials [row groups * strips, K*K, C] stay under PARTIAL_ELEMENTS fp32 (16 MB).
PARTIAL_PROGRAMS = 1024
# The tile LayerNorm backward (C = 3 * 2^k): at most this many programs, each writing [3, C] partials. More than
# PARTIAL_PROGRAMS, since its programs are 1 to 16 warps (C / 96): 2048 keeps 15 or more warps an SM at C = 96.
NORM_TILE_PROGRAMS = 2048
# Its conv outputs a thread, every dtype: at the forward's 72 (3-row tiles) it spilled 8 B on sm_90 (fp32 and fp16
# x at C = 96) and on sm_80 (16-bit x at C = 768); 2-row tiles (48) compile with 168 registers and no spill at
# C = 96-384, fp16/bf16/fp32, sm_80/sm_90, both integer specializations. Chunks wider than NORM_TILE_NARROW_CHUNK
# (C >= 768: 2-row tiles spilled 32 B on sm_80) get 24: 1 x 8 tiles, 113 registers at C = 768.
NORM_TILE_ACCUMULATORS = 48
NORM_TILE_WIDE_ACCUMULATORS = 24
NORM_TILE_NARROW_CHUNK = 128
PARTIAL_ELEMENTS = 1 << 22
REDUCE_BLOCK_R, REDUCE_BLOCK_N = 32, 128
GRID_Y_MAX = 65535  # CUDA's limit on the second grid dimension (row groups of the backward)
# Pixel indices are int32 (element offsets are int64); headroom for the shifted taps and tail tiles.
MAX_PIXELS = 2**30
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _conv_strip(
    src_ptr,  # [ROWS * W, C] conv input, any float dtype
    taps_ptr,  # [K*K, C] fp32 depthwise taps, tap-major
    row,  # image row n*H + h of the strip (int32 scalar)
    w0,  # first output pixel of the strip in its row
    live,  # scalar: the strip exists (False for a grid-stride tail)
    c,  # [BLOCK_C] int32 channel indices
    c_ok,  # [BLOCK_C] c < C
    H, W, C,
    K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Conv sums (no bias) of pixels w0 .. w0+BLOCK_W-1 of `row`: a tuple of BLOCK_W fp32 [BLOCK_C]."""
    PAD: tl.constexpr = K // 2
    WINDOW: tl.constexpr = BLOCK_W + K - 1
    h = row % H
    src = src_ptr + ((row - PAD).to(tl.int64) * W + (w0 - PAD)) * C
    row_step = W.to(tl.int64) * C
    tap_row = taps_ptr
    # Per-thread 32-bit offsets, loop-invariant: each load is one base + offset address computation.
    offsets = ()
    col_ok = ()
    for i in tl.static_range(WINDOW):
        src_w = w0 - PAD + i
        offsets = offsets + (i * C + c,)
        col_ok = col_ok + ((src_w >= 0) & (src_w < W),)
    tap_offsets = ()
    for kw in tl.static_range(K):
        tap_offsets = tap_offsets + (kw * C + c,)
    accs = ()
    for j in tl.static_range(BLOCK_W):
        accs = accs + (tl.zeros([BLOCK_C], dtype=tl.float32),)
    # Masks are `c < limit` with a scalar limit (C or 0): one compare per load, and Triton's
    # interpreter mishandles scalar & vector booleans.
    for kh in range(K):
        src_h = h - PAD + kh
        row_limit = tl.where(live & (src_h >= 0) & (src_h < H), C, 0)
        taps = ()
        for kw in tl.static_range(K):
            taps = taps + (tl.load(tap_row + tap_offsets[kw], mask=c_ok, other=0.0),)
        window = ()
        for i in tl.static_range(WINDOW):
            limit = tl.where(col_ok[i], row_limit, 0)
            window = window + (tl.load(src + offsets[i], mask=c < limit, other=0.0).to(tl.float32),)
        updated = ()
        for j in tl.static_range(BLOCK_W):
            acc = accs[j]
            for kw in tl.static_range(K):
                acc = tl.fma(window[j + kw], taps[kw], acc)
            updated = updated + (acc,)
        accs = updated
        src += row_step
        tap_row += K * C
    return accs


@triton.jit
def _join_halves(items, WIDTH: tl.constexpr):
    joined = ()
    for q in tl.static_range(WIDTH):
        joined = joined + (tl.join(items[q], items[q + WIDTH]),)
    return joined


@triton.jit
def _stack_columns(cols, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tuple of BLOCK_W (2..16) [BLOCK_C] columns -> [BLOCK_C, BLOCK_W] tile, tile[:, j] = cols[j].

    Joins add a per-thread trailing dim; pairing column q with q + width at each level (widths
    BLOCK_W/2, ..., 1) makes the final row-major reshape come out in natural column order."""
    items = cols
    if BLOCK_W >= 16:
        items = _join_halves(items, 8)
    if BLOCK_W >= 8:
        items = _join_halves(items, 4)
    if BLOCK_W >= 4:
        items = _join_halves(items, 2)
    items = _join_halves(items, 1)
    return tl.reshape(items[0], [BLOCK_C, BLOCK_W])


@triton.jit
def _widen(values):
    """fp32 copy of loaded values; bf16 through its bits (the top half of an fp32): one shift a value."""
    if values.dtype == tl.bfloat16:
        bits = values.to(tl.uint16, bitcast=True).to(tl.uint32) << 16  # a U16 load zero-extends: no PRMT
        return bits.to(tl.float32, bitcast=True)
    return values.to(tl.float32)


@triton.jit
def _splat(ok, lane):
    """The scalar `ok` as a [CHUNK] mask (one uniform predicate); the interpreter rejects scalar masks."""
    return (tl.zeros(lane.shape, dtype=tl.int32) + ok.to(tl.int32)) != 0


@triton.jit
def _window_row(src, src_h, H, col_ok, lane, STRIDE_C: tl.constexpr, WINDOW: tl.constexpr):
    """The WINDOW pixels of one input row from src (zeros outside the image): a tuple of fp32 [CHUNK]."""
    row_ok = (src_h >= 0) & (src_h < H)
    values = ()
    for i in tl.static_range(WINDOW):
        values = values + (_widen(tl.load(src + i * STRIDE_C, mask=_splat(row_ok & col_ok[i], lane), other=0.0)),)
    return values


@triton.jit
def _conv_tile_chunk(
    x_row0,  # [CHUNK] pointers: input pixel (h0 - PAD, w0 - PAD), this chunk's channels
    taps_chunk,  # [CHUNK] pointers: tap 0 of this chunk's channels in the [K*K, C] fp32 taps
    row_step,  # int64 scalar: elements per image row (W * C)
    h0, w0, H, W,
    STRIDE_C: tl.constexpr,  # C, compiled in: every offset is an immediate
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Conv sums (no bias) of the TILE_H x TILE_W tile for one channel chunk: a tuple of TILE_H*TILE_W fp32
    [CHUNK] vectors, row-major. Kernel row kh of output row r is input row h0 - PAD + r + kh, so from one
    kh to the next the tile's TILE_H window rows shift by one: each iteration loads one new input row and
    that kh's K taps (shared by all output rows) and carries the other rows in registers."""
    PAD: tl.constexpr = K // 2
    WINDOW: tl.constexpr = TILE_W + K - 1
    lane = tl.arange(0, CHUNK)
    col_ok = ()
    for i in tl.static_range(WINDOW):
        col_ok = col_ok + ((w0 - PAD + i >= 0) & (w0 - PAD + i < W),)
    src = x_row0
    rows = ()  # window rows of input rows h0 - PAD .. h0 - PAD + TILE_H - 2, flat: rows[r * WINDOW + i]
    for r in tl.static_range(TILE_H - 1):
        rows = rows + _window_row(src, h0 - PAD + r, H, col_ok, lane, STRIDE_C, WINDOW)
        src += row_step
    accs = ()
    for p in tl.static_range(TILE_H * TILE_W):
        accs = accs + (tl.zeros([CHUNK], dtype=tl.float32),)
    tap_row = taps_chunk
    for kh in range(K):
        rows = rows + _window_row(src, h0 - PAD + TILE_H - 1 + kh, H, col_ok, lane, STRIDE_C, WINDOW)
        taps = ()
        for kw in tl.static_range(K):
            taps = taps + (tl.load(tap_row + kw * STRIDE_C),)
        updated = ()
        for p in tl.static_range(TILE_H * TILE_W):
            acc = accs[p]
            for kw in tl.static_range(K):
                acc = tl.fma(rows[(p // TILE_W) * WINDOW + p % TILE_W + kw], taps[kw], acc)
            updated = updated + (acc,)
        accs = updated
        rows = rows[WINDOW:]
        src += row_step
        tap_row += K * STRIDE_C
    return accs


@triton.jit
def _conv_tile(
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    first_row,  # image row n*H + h0 of the tile's first output row
    h0, w0,  # the tile's first output row (in its image) and column
    lane, row_step, H, W,
    STRIDE_C: tl.constexpr,
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
    NCHUNK: tl.constexpr,
):
    """Conv sums (no bias) of one tile, all channels: NCHUNK tuples of TILE_H*TILE_W fp32 [CHUNK] vectors. A tile
    past the image's last row (h0 >= H) loads nothing and sums zeros."""
    PAD: tl.constexpr = K // 2
    live_h = tl.where(h0 < H, H, 0)
    x_row0 = x_ptr + ((first_row - PAD).to(tl.int64) * W + (w0 - PAD)) * STRIDE_C + lane
    sums = ()
    for k in tl.static_range(NCHUNK):
        sums = sums + (_conv_tile_chunk(x_row0 + k * CHUNK, taps_ptr + k * CHUNK + lane, row_step, h0, w0, live_h,
                                        W, STRIDE_C, K, TILE_H, TILE_W, CHUNK),)
    return sums


@triton.jit
def _dwconv_ln_fwd_kernel(
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32 conv bias (zeros when the module has none)
    ln_w_ptr,  # [C] fp32
    ln_b_ptr,  # [C] fp32
    y_ptr,  # [ROWS * W, C] output, x dtype or the autocast dtype
    mean_ptr,  # [ROWS * W] fp32
    rstd_ptr,  # [ROWS * W] fp32
    H, W,
    eps,
    TILES_PER_PROGRAM,  # consecutive row tiles of one strip a program runs (its taps stay in L1)
    STRIDE_C: tl.constexpr,  # C == NCHUNK * CHUNK, compiled into the offsets
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
    NCHUNK: tl.constexpr,
):
    # 1-D grid, strip fastest: the programs sharing a halo run side by side (L2 hits, not HBM re-reads)
    strips = tl.cdiv(W, TILE_W)
    groups = tl.cdiv(tl.cdiv(H, TILE_H), TILES_PER_PROGRAM)
    pid = tl.program_id(0)
    w0 = (pid % strips) * TILE_W
    image = pid // (strips * groups)
    lane = tl.arange(0, CHUNK)
    row_step = W.to(tl.int64) * STRIDE_C
    for t in range(TILES_PER_PROGRAM):
        h0 = (((pid // strips) % groups) * TILES_PER_PROGRAM + t) * TILE_H
        _dwconv_ln_tile(x_ptr, taps_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, y_ptr, mean_ptr, rstd_ptr, image, h0, w0,
                        lane, row_step, H, W, eps, STRIDE_C, K, TILE_H, TILE_W, CHUNK, NCHUNK)


@triton.jit
def _dwconv_ln_tile(
    x_ptr, taps_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, y_ptr, mean_ptr, rstd_ptr,  # as in _dwconv_ln_fwd_kernel
    image, h0, w0,  # the tile's image and first output row / column
    lane, row_step, H, W, eps,
    STRIDE_C: tl.constexpr,
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
    NCHUNK: tl.constexpr,
):
    """Conv + bias + LayerNorm of one tile; a tile past the image's last row (h0 >= H) loads and stores nothing."""
    first_row = image * H + h0  # image row of the tile's first output row
    sums = _conv_tile(x_ptr, taps_ptr, first_row, h0, w0, lane, row_step, H, W, STRIDE_C, K, TILE_H, TILE_W, CHUNK,
                      NCHUNK)
    z = ()  # NCHUNK tuples of TILE_H*TILE_W [CHUNK] conv outputs (+ bias)
    for k in tl.static_range(NCHUNK):
        bias = tl.load(bias_ptr + k * CHUNK + lane)
        with_bias = ()
        for p in tl.static_range(TILE_H * TILE_W):
            with_bias = with_bias + (sums[k][p] + bias,)
        z = z + (with_bias,)
    out_row0 = first_row.to(tl.int64) * W + w0  # pixel index of the tile's first output pixel
    # Loaded once a tile: in the pixel loop, each would be reloaded after every store (y might alias them).
    ln_ws = ()
    ln_bs = ()
    for k in tl.static_range(NCHUNK):
        ln_ws = ln_ws + (tl.load(ln_w_ptr + k * CHUNK + lane),)
        ln_bs = ln_bs + (tl.load(ln_b_ptr + k * CHUNK + lane),)
    for p in tl.static_range(TILE_H * TILE_W):
        total = z[0][p]
        for k in tl.static_range(1, NCHUNK):
            total += z[k][p]
        mean = tl.sum(total, axis=0) / STRIDE_C
        squares = tl.zeros([CHUNK], dtype=tl.float32)
        for k in tl.static_range(NCHUNK):
            centered = z[k][p] - mean
            squares = tl.fma(centered, centered, squares)
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / STRIDE_C + eps)
        pixel_ok = (h0 + p // TILE_W < H) & (w0 + p % TILE_W < W)
        pixel = out_row0 + (p // TILE_W) * W + p % TILE_W
        tl.store(mean_ptr + pixel, mean, mask=pixel_ok)
        tl.store(rstd_ptr + pixel, rstd, mask=pixel_ok)
        for k in tl.static_range(NCHUNK):
            y = (z[k][p] - mean) * rstd * ln_ws[k] + ln_bs[k]
            dst = y_ptr + pixel * STRIDE_C + k * CHUNK + lane
            tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=_splat(pixel_ok, lane))


@triton.jit
def _dwconv_ln_fwd_strip_kernel(
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32 conv bias (zeros when the module has none)
    ln_w_ptr,  # [C] fp32
    ln_b_ptr,  # [C] fp32
    y_ptr,  # [ROWS * W, C] output, x dtype or the autocast dtype
    mean_ptr,  # [ROWS * W] fp32
    rstd_ptr,  # [ROWS * W] fp32
    H, W, C,
    eps,
    K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The forward at a C the tile kernel's chunks do not cover exactly (its masked compiles spilled):
    a strip of BLOCK_W pixels of one row, all channels in one BLOCK_C >= C block."""
    # 1-D grid, strip fastest: the programs sharing a halo run side by side (L2 hits, not HBM re-reads)
    strips = tl.cdiv(W, BLOCK_W)
    row = tl.program_id(0) // strips
    w0 = (tl.program_id(0) % strips) * BLOCK_W
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    cols = _conv_strip(x_ptr, taps_ptr, row, w0, True, c, c_ok, H, W, C, K, BLOCK_W, BLOCK_C)
    z = _stack_columns(cols, BLOCK_W, BLOCK_C) + tl.load(bias_ptr + c, mask=c_ok, other=0.0)[:, None]
    mean = tl.sum(z, axis=0) / C  # masked channels are exactly 0 (zero taps and bias)
    centered = tl.where(c_ok[:, None], z - mean[None, :], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / C + eps)
    ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0)
    ln_b = tl.load(ln_b_ptr + c, mask=c_ok, other=0.0)
    y = centered * rstd[None, :] * ln_w[:, None] + ln_b[:, None]
    j = tl.arange(0, BLOCK_W)
    j_ok = w0 + j < W
    first = row * W + w0
    tl.store(mean_ptr + first + j, mean, mask=j_ok)
    tl.store(rstd_ptr + first + j, rstd, mask=j_ok)
    out = y_ptr + first.to(tl.int64) * C
    tl.store(out + c[:, None] + (j * C)[None, :], y.to(y_ptr.dtype.element_ty), mask=c_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------- backward kernels


@triton.jit
def _dwconv_ln_bwd_tile_kernel(
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32 conv bias (zeros when the module has none)
    ln_w_ptr,  # [C] fp32
    dy_ptr,  # [ROWS * W, C] output gradient, output dtype
    mean_ptr,  # [ROWS * W] fp32
    rstd_ptr,  # [ROWS * W] fp32
    g_ptr,  # [ROWS * W, C] fp32 out: gradient of the conv output
    partial_ptr,  # [programs, 3, C] fp32 out: sums of dy*xhat, dy, g over this program's pixels
    N, H, W,
    TILES_PER_PROGRAM,
    STRIDE_C: tl.constexpr,  # C == NCHUNK * CHUNK, compiled into the offsets
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
    NCHUNK: tl.constexpr,
):
    """LayerNorm backward at the forward tile kernel's C: the conv recomputed by the forward's tiles (3 chunks,
    no idle lane), then per pixel g over the chunks. Program p runs tiles p, p + programs, ... (strip fastest,
    as the forward: programs running side by side share halo rows), so the partials' split is fixed."""
    strips = tl.cdiv(W, TILE_W)
    row_tiles = tl.cdiv(H, TILE_H)
    pid = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    row_step = W.to(tl.int64) * STRIDE_C
    sums = ()  # per chunk: sum of dy * xhat, of dy, of g
    for i in tl.static_range(3 * NCHUNK):
        sums = sums + (tl.zeros([CHUNK], dtype=tl.float32),)
    for t in range(TILES_PER_PROGRAM):
        tile = pid + t * tl.num_programs(0)
        image = tile // (row_tiles * strips)
        h0 = tl.where(image < N, ((tile // strips) % row_tiles) * TILE_H, H)  # a tile past the last image is dead
        w0 = (tile % strips) * TILE_W
        sums = _ln_bwd_tile(x_ptr, taps_ptr, bias_ptr, ln_w_ptr, dy_ptr, mean_ptr, rstd_ptr, g_ptr, sums, image, h0,
                            w0, lane, row_step, H, W, STRIDE_C, K, TILE_H, TILE_W, CHUNK, NCHUNK)
    out = partial_ptr + pid * (3 * STRIDE_C) + lane
    for k in tl.static_range(NCHUNK):
        for s in tl.static_range(3):
            tl.store(out + s * STRIDE_C + k * CHUNK, sums[3 * k + s])


@triton.jit
def _ln_bwd_tile(
    x_ptr, taps_ptr, bias_ptr, ln_w_ptr, dy_ptr, mean_ptr, rstd_ptr, g_ptr,  # as in _dwconv_ln_bwd_tile_kernel
    sums,  # 3 * NCHUNK [CHUNK] running sums (see there); returned updated
    image, h0, w0,  # the tile's image and first output row / column
    lane, row_step, H, W,
    STRIDE_C: tl.constexpr,
    K: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    CHUNK: tl.constexpr,
    NCHUNK: tl.constexpr,
):
    """g of one tile's pixels (a dead tile, h0 >= H, loads and stores nothing and adds zeros)."""
    first_row = image * H + h0
    z = _conv_tile(x_ptr, taps_ptr, first_row, h0, w0, lane, row_step, H, W, STRIDE_C, K, TILE_H, TILE_W, CHUNK,
                   NCHUNK)  # bias added per pixel below
    out_row0 = first_row.to(tl.int64) * W + w0  # pixel index of the tile's first output pixel
    dy_tile = dy_ptr + out_row0 * STRIDE_C + lane
    g_tile = g_ptr + out_row0 * STRIDE_C + lane
    biases = ()  # loaded once a tile, as in _dwconv_ln_tile (g's stores might alias them)
    ln_ws = ()
    for k in tl.static_range(NCHUNK):
        biases = biases + (tl.load(bias_ptr + k * CHUNK + lane),)
        ln_ws = ln_ws + (tl.load(ln_w_ptr + k * CHUNK + lane),)
    for p in tl.static_range(TILE_H * TILE_W):
        pixel_ok = (h0 + p // TILE_W < H) & (w0 + p % TILE_W < W)
        ok = _splat(pixel_ok, lane)
        step = (p // TILE_W) * W + p % TILE_W  # pixels from the tile's first
        mean = tl.load(mean_ptr + out_row0 + step, mask=pixel_ok, other=0.0)
        rstd = tl.load(rstd_ptr + out_row0 + step, mask=pixel_ok, other=0.0)  # 0 off the image: xhat = g = 0
        xhats = ()
        dys = ()
        dot = tl.zeros([CHUNK], dtype=tl.float32)
        total = tl.zeros([CHUNK], dtype=tl.float32)
        for k in tl.static_range(NCHUNK):
            xhat = (z[k][p] + biases[k] - mean) * rstd
            dy = _widen(tl.load(dy_tile + step * STRIDE_C + k * CHUNK, mask=ok, other=0.0))
            dy_w = dy * ln_ws[k]
            dot = tl.fma(dy_w, xhat, dot)
            total += dy_w
            xhats = xhats + (xhat,)
            dys = dys + (dy,)
        proj_xhat = tl.sum(dot, axis=0) / STRIDE_C
        proj_one = tl.sum(total, axis=0) / STRIDE_C
        updated = ()
        for k in tl.static_range(NCHUNK):
            dy_w = dys[k] * ln_ws[k]
            g = (dy_w - xhats[k] * proj_xhat - proj_one) * rstd
            tl.store(g_tile + step * STRIDE_C + k * CHUNK, g, mask=ok)
            updated = updated + (tl.fma(dys[k], xhats[k], sums[3 * k]), sums[3 * k + 1] + dys[k], sums[3 * k + 2] + g)
        sums = updated
    return sums


@triton.jit
def _dwconv_ln_bwd_norm_kernel(
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    bias_ptr,  # [C] fp32
    ln_w_ptr,  # [C] fp32
    dy_ptr,  # [ROWS * W, C] output gradient, output dtype
    mean_ptr,  # [ROWS * W] fp32
    rstd_ptr,  # [ROWS * W] fp32
    g_ptr,  # [ROWS * W, C] fp32 out: gradient of the conv output
    partial_ptr,  # [row groups * strips, 3, C] fp32 out: sums of dy*xhat, dy, g over this program's pixels
    ROWS, H, W, C,
    ROWS_PER_PROGRAM,
    K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    strip = tl.program_id(0)  # strip fastest: neighbouring strips (shared halo) run side by side
    group = tl.program_id(1)
    w0 = strip * BLOCK_W
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    j = tl.arange(0, BLOCK_W)
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
    ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0)
    sum_dy_xhat = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(ROWS_PER_PROGRAM):
        row = group * ROWS_PER_PROGRAM + t
        live = row < ROWS
        cols = _conv_strip(x_ptr, taps_ptr, row, w0, live, c, c_ok, H, W, C, K, BLOCK_W, BLOCK_C)
        z = _stack_columns(cols, BLOCK_W, BLOCK_C) + bias[:, None]
        j_ok = w0 + j < tl.where(live, W, 0)
        mask = c_ok[:, None] & j_ok[None, :]
        first = row * W + w0
        mean = tl.load(mean_ptr + first + j, mask=j_ok, other=0.0)
        rstd = tl.load(rstd_ptr + first + j, mask=j_ok, other=0.0)
        offs = c[:, None] + (j * C)[None, :]
        base = first.to(tl.int64) * C
        xhat = tl.where(mask, (z - mean[None, :]) * rstd[None, :], 0.0)
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dy_w = dy * ln_w[:, None]
        proj_xhat = tl.sum(dy_w * xhat, axis=0) / C
        proj_one = tl.sum(dy_w, axis=0) / C
        g = tl.where(mask, (dy_w - xhat * proj_xhat[None, :] - proj_one[None, :]) * rstd[None, :], 0.0)
        tl.store(g_ptr + base + offs, g, mask=mask)
        sum_dy_xhat += tl.sum(dy * xhat, axis=1)
        sum_dy += tl.sum(dy, axis=1)
        sum_g += tl.sum(g, axis=1)
    out = partial_ptr + (group * tl.num_programs(0) + strip).to(tl.int64) * 3 * C + c
    tl.store(out, sum_dy_xhat, mask=c_ok)
    tl.store(out + C, sum_dy, mask=c_ok)
    tl.store(out + 2 * C, sum_g, mask=c_ok)


@triton.jit
def _dwconv_bwd_conv_kernel(
    g_ptr,  # [ROWS * W, C] fp32 gradient of the conv output
    x_ptr,  # [ROWS * W, C] input, x dtype
    taps_ptr,  # [K*K, C] fp32
    dx_ptr,  # [ROWS * W, C] out, x dtype
    partial_ptr,  # [row groups * strips, K*K, C] fp32 out: per-program sums of g * shifted x
    ROWS, H, W, C,
    TILES_PER_PROGRAM,
    K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROW_TILE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STRIDE_C: tl.constexpr,  # C compiled in (a multiple of BLOCK_C: no channel mask), or 0: the runtime C
):
    """dx[h, w] = sum_taps g[h + PAD - kh, w + PAD - kw] * tap[kh, kw] and
    dW[kh, kw] += g[h + PAD - kh, w + PAD - kw] * x[h, w]: both read the same g window."""
    PAD: tl.constexpr = K // 2
    WINDOW: tl.constexpr = BLOCK_W + K - 1
    strip = tl.program_id(0)
    group = tl.program_id(1)
    w0 = strip * BLOCK_W
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if STRIDE_C > 0:  # every offset below an immediate, every mask one predicate per (row, column)
        C = STRIDE_C
        c_ok = tl.full([BLOCK_C], True, tl.int1)
    else:
        c_ok = c < C
    col_ok = ()  # [BLOCK_C] masks: window column i of this strip is in the image (and c < C)
    for i in tl.static_range(WINDOW):
        col_in = (w0 - PAD + i >= 0) & (w0 - PAD + i < W)
        if STRIDE_C > 0:
            col_ok = col_ok + (_splat(col_in, c),)
        else:
            col_ok = col_ok + (c < tl.where(col_in, C, 0),)
    taps = ()
    dw = ()
    for tap in tl.static_range(K * K):
        taps = taps + (tl.load(taps_ptr + tap * C + c, mask=c_ok, other=0.0)[None, :],)
        dw = dw + (tl.zeros([ROW_TILE, BLOCK_C], dtype=tl.float32),)
    row_step = W.to(tl.int64) * C
    for t in range(TILES_PER_PROGRAM):
        rows = (group * TILES_PER_PROGRAM + t) * ROW_TILE + tl.arange(0, ROW_TILE)
        live = rows < ROWS
        h = rows % H
        here = (rows.to(tl.int64) * W + w0) * C
        live_width = tl.where(live, W - w0, 0)  # [ROW_TILE] pixels of each row's strip that exist
        xs = ()
        for j in tl.static_range(BLOCK_W):
            ok = (j < live_width)[:, None] & c_ok[None, :]
            xs = xs + (tl.load(x_ptr + here[:, None] + (j * C + c)[None, :], mask=ok, other=0.0).to(tl.float32),)
        dxs = ()
        for j in tl.static_range(BLOCK_W):
            dxs = dxs + (tl.zeros([ROW_TILE, BLOCK_C], dtype=tl.float32),)
        g_rows = g_ptr + here + (PAD * row_step - PAD * C)  # g window of kernel row kh = 0
        for kh in tl.static_range(K):
            src_h = h + PAD - kh
            row_ok = live & (src_h >= 0) & (src_h < H)
            # One 64-bit pointer tile per kernel row; each window pixel adds a uniform i*C to it.
            g_tile = g_rows[:, None] + c[None, :]
            window = ()
            for i in tl.static_range(WINDOW):
                ok = row_ok[:, None] & col_ok[i][None, :]
                window = window + (tl.load(g_tile + i * C, mask=ok, other=0.0),)
            updated_dx = ()
            for j in tl.static_range(BLOCK_W):
                acc = dxs[j]
                for kw in tl.static_range(K):
                    acc = tl.fma(window[j + K - 1 - kw], taps[kh * K + kw], acc)
                updated_dx = updated_dx + (acc,)
            dxs = updated_dx
            updated_dw = ()
            for kw in tl.static_range(K):
                acc = dw[kh * K + kw]
                for j in tl.static_range(BLOCK_W):
                    acc = tl.fma(window[j + K - 1 - kw], xs[j], acc)
                updated_dw = updated_dw + (acc,)
            dw = dw[: kh * K] + updated_dw + dw[(kh + 1) * K:]
            g_rows -= row_step
        for j in tl.static_range(BLOCK_W):
            ok = (j < live_width)[:, None] & c_ok[None, :]
            tl.store(dx_ptr + here[:, None] + (j * C + c)[None, :], dxs[j].to(dx_ptr.dtype.element_ty), mask=ok)
    out = partial_ptr + (group * tl.num_programs(0) + strip).to(tl.int64) * (K * K) * C + c
    for tap in tl.static_range(K * K):
        tl.store(out + tap * C, tl.sum(dw[tap], axis=0), mask=c_ok)


@triton.jit
def _sum_rows_kernel(
    src_ptr,  # [R, N] fp32 partials
    dst_ptr,  # [N] fp32 out: sum over R, in a fixed order
    R, N,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None] & cols_ok[None, :]
        acc += tl.load(src_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0)
    tl.store(dst_ptr + cols, tl.sum(acc, axis=0), mask=cols_ok)


# -------------------------------------------------------------------------------- launchers


def _block_c(channels: int) -> int:
    return max(MIN_BLOCK_C, triton.next_power_of_2(channels))


def _full_c_warps(block_c: int, channels_per_thread: int = CHANNELS_PER_THREAD) -> int:
    return max(1, block_c // (32 * channels_per_thread))


def _forward_config(channels: int, x_bytes: int = 2) -> Optional[tuple[dict, int]]:
    """(constexprs, num_warps) of the tile forward at C = channels, or None where the strip kernel runs:
    FWD_NCHUNK power-of-two chunks of MIN_CHUNK to FWD_MAX_CHUNK channels covering C exactly, one channel a
    thread, C compiled in (STRIDE_C). The tile is as tall as the accumulator budget allows (at least 2 rows;
    4 columns where 2 rows of 8 do not fit)."""
    chunk, rest = divmod(channels, FWD_NCHUNK)
    if rest or chunk & (chunk - 1) or not MIN_CHUNK <= chunk <= FWD_MAX_CHUNK:
        return None
    nchunk, warps = FWD_NCHUNK, chunk // 32
    budget = FWD_ACCUMULATORS_16_WARPS if warps > 8 else \
        FWD_ACCUMULATORS_2_4_WARPS if warps in (2, 4) and x_bytes == 2 else FWD_ACCUMULATORS
    if warps == 1:  # _triton_compat: before Triton 3.9, 72 at C = 96 spilled 8 B (sm_80 fp32 x, sm_90 16-bit x)
        budget = min(budget, config_choice("dwconv.fwd_accumulators_1_warp"))
    if warps > 8 and x_bytes == 4:  # _triton_compat: Triton 3.4/3.5, 40 at C = 1536 with fp32 x spilled 24 B on sm_80
        budget = min(budget, config_choice("dwconv.fwd_accumulators_16_warps_fp32_x"))
    tile_w = FWD_TILE_W if budget // (FWD_TILE_W * nchunk) >= 2 else FWD_TILE_W // 2
    tile_h = max(2, min(FWD_TILE_H, budget // (tile_w * nchunk)))
    return dict(STRIDE_C=channels, TILE_H=tile_h, TILE_W=tile_w, CHUNK=chunk, NCHUNK=nchunk), warps


def _forward_classes(x_bytes: int) -> list[tuple[dict, int]]:
    """Every tile-kernel config (one per C the tile kernel runs; every other C runs the strip kernel)."""
    widths = (FWD_NCHUNK * (MIN_CHUNK << i) for i in range((FWD_MAX_CHUNK // MIN_CHUNK).bit_length()))
    return [_forward_config(c, x_bytes) for c in widths if c <= MAX_CHANNELS]


def _strip_forward_config(block_c: int) -> tuple[int, int]:
    """(BLOCK_W, num_warps) of the strip forward: 4 channels per thread; at 16 warps (128 registers a thread)
    2-pixel strips, as the LayerNorm backward (8 and 4 pixels left 8-byte stacks on sm_90 or sm_80 where H, W and
    C are multiples of 16)."""
    return (BLOCK_W if block_c <= 1024 else BLOCK_W // 4), _full_c_warps(block_c)


def _norm_bwd_config(block_c: int) -> tuple[int, int]:
    """(BLOCK_W, num_warps) of the LayerNorm backward: z, dy and g tiles live at once. Two channels a
    thread (four spilled on sm_80); from 16 warps on (at most 128 registers a thread) narrower strips."""
    if block_c <= 512:
        return BLOCK_W, _full_c_warps(block_c, 2)
    if block_c == 1024:
        return BLOCK_W // 2, _full_c_warps(block_c, 2)
    return BLOCK_W // 4, _full_c_warps(block_c)


def _norm_bwd_tile_config(channels: int, x_bytes: int) -> Optional[tuple[dict, int]]:
    """(constexprs, num_warps) of the tile LayerNorm backward, or None where the strip kernel runs: the
    forward's tiles (the same C = 3 * 2^k) cut to at most NORM_TILE_ACCUMULATORS conv outputs a thread
    (NORM_TILE_WIDE_ACCUMULATORS for chunks wider than NORM_TILE_NARROW_CHUNK)."""
    config = _forward_config(channels, x_bytes)
    if config is None:
        return None
    consts, warps = config
    # _triton_compat: before Triton 3.9, fp32 x spilled 8 B on sm_90 with 2-row tiles at C = 192 and 384
    narrow = NORM_TILE_NARROW_CHUNK if x_bytes == 2 else config_choice("dwconv.norm_tile_narrow_chunk_fp32_x")
    budget = NORM_TILE_ACCUMULATORS if consts["CHUNK"] <= narrow else NORM_TILE_WIDE_ACCUMULATORS
    rows = max(1, min(consts["TILE_H"], budget // (consts["TILE_W"] * consts["NCHUNK"])))
    return dict(consts, TILE_H=rows), warps


def _norm_tile_grid(n: int, h: int, w: int, consts: dict) -> tuple[int, int]:
    """(programs, tiles per program) of the tile LayerNorm backward: every tile of the batch, grid-strided."""
    tiles = n * triton.cdiv(h, consts["TILE_H"]) * triton.cdiv(w, consts["TILE_W"])
    programs, per_program = _split(tiles, NORM_TILE_PROGRAMS)
    return programs, per_program


def _wgrad_stride_c(channels: int) -> int:
    """C compiled into the fused input/weight-gradient kernel at the forward tile kernel's widths (C = 3 * 2^k,
    ConvNeXt-T/S/L: a multiple of BWD_BLOCK_C), else 0 (the runtime C, masked channels)."""
    return channels if _forward_config(channels) is not None and channels % BWD_BLOCK_C == 0 else 0


def _wgrad_block_w(stride_c: int) -> int:
    """Pixels per strip of the fused input/weight-gradient kernel (stride_c from _wgrad_stride_c)."""
    return BWD_BLOCK_W_EXACT_C if stride_c else BWD_BLOCK_W


def _wgrad_config() -> tuple[int, int]:
    """(BLOCK_C, num_warps) of the fused input/weight-gradient kernel: one row per warp."""
    return BWD_BLOCK_C, BWD_ROW_TILE


def _launch(kernel, grid, *args, **meta):
    """Every launch goes through here (inside `_device_guard`, which the tests check)."""
    kernel[grid](*args, **meta, enable_fp_fusion=FP_FUSION)


def _kernel_size(taps: torch.Tensor) -> int:
    return int(round(taps.shape[0] ** 0.5))


def _forward_grid(n: int, h: int, w: int, consts: dict) -> tuple[tuple[int], int]:
    """(grid, row tiles per program): about FWD_TILES_PER_PROGRAM tiles each, spread evenly over the image."""
    row_tiles = triton.cdiv(h, consts["TILE_H"])
    per_program = triton.cdiv(row_tiles, triton.cdiv(row_tiles, FWD_TILES_PER_PROGRAM))
    return (n * triton.cdiv(row_tiles, per_program) * triton.cdiv(w, consts["TILE_W"]),), per_program


def _forward(x, taps, bias, ln_w, ln_b, eps, out_dtype):
    n, h, w, c = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty((n, h, w), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    config = _forward_config(c, x.element_size())
    if config is None:
        block_c = _block_c(c)
        block_w, warps = _strip_forward_config(block_c)
        with _device_guard(x.device):
            _launch(_dwconv_ln_fwd_strip_kernel, (n * h * triton.cdiv(w, block_w),), x, taps, bias, ln_w, ln_b, y,
                    mean, rstd, h, w, c, eps, K=_kernel_size(taps), BLOCK_W=block_w, BLOCK_C=block_c,
                    num_warps=warps, num_stages=1)
        return y, mean, rstd
    consts, warps = config
    grid, tiles_per_program = _forward_grid(n, h, w, consts)
    with _device_guard(x.device):
        _launch(_dwconv_ln_fwd_kernel, grid, x, taps, bias, ln_w, ln_b, y, mean, rstd, h, w, eps,
                tiles_per_program, K=_kernel_size(taps), **consts, num_warps=warps, num_stages=1)
    return y, mean, rstd


def _split(items: int, max_groups: int) -> tuple[int, int]:
    """(groups, items per group) for a grid-stride over `items` with at most max_groups groups."""
    per_group = triton.cdiv(items, max(1, min(max_groups, items)))
    return triton.cdiv(items, per_group), per_group


def _backward_grids(rows: int, width: int, channels: int, kernel_size: int) -> dict:
    """Grids and grid-stride lengths of the backward launches (shared by launchers and launch_plans)."""
    strips = triton.cdiv(width, _wgrad_block_w(_wgrad_stride_c(channels)))
    norm_strips = triton.cdiv(width, _norm_bwd_config(_block_c(channels))[0])
    norm_groups, rows_per_program = _split(rows, PARTIAL_PROGRAMS // norm_strips)
    row_tiles = triton.cdiv(rows, BWD_ROW_TILE)
    conv_groups, tiles_per_program = _split(
        row_tiles, min(GRID_Y_MAX, PARTIAL_ELEMENTS // (strips * kernel_size**2 * channels)))
    return dict(
        strips=strips, norm_strips=norm_strips, norm_groups=norm_groups, rows_per_program=rows_per_program,
        conv_groups=conv_groups, tiles_per_program=tiles_per_program,
        channel_blocks=triton.cdiv(channels, BWD_BLOCK_C),
    )


def _sum_rows(partials: torch.Tensor) -> torch.Tensor:
    """Sum of a [R, ...] fp32 buffer over R, in a fixed order (no atomics)."""
    rows = partials.shape[0]
    flat = partials.reshape(rows, -1)
    out = torch.empty(flat.shape[1], device=partials.device, dtype=torch.float32)
    grid = (triton.cdiv(flat.shape[1], REDUCE_BLOCK_N),)
    _launch(_sum_rows_kernel, grid, flat, out, rows, flat.shape[1],
            BLOCK_R=REDUCE_BLOCK_R, BLOCK_N=REDUCE_BLOCK_N, num_warps=4, num_stages=1)
    return out.view(partials.shape[1:])


def _backward(dy, x, taps, bias, ln_w, mean, rstd):
    with _device_guard(x.device):
        return _backward_launches(dy, x, taps, bias, ln_w, mean, rstd)


def _backward_launches(dy, x, taps, bias, ln_w, mean, rstd):
    n, h, w, c = x.shape
    kernel_size = _kernel_size(taps)
    grids = _backward_grids(n * h, w, c, kernel_size)
    strips = grids["strips"]

    g = torch.empty((n, h, w, c), device=x.device, dtype=torch.float32)
    tile_config = _norm_bwd_tile_config(c, x.element_size())
    if tile_config is None:
        block_c = _block_c(c)
        block_w, warps = _norm_bwd_config(block_c)
        norm_strips = grids["norm_strips"]
        norm_partials = torch.empty((grids["norm_groups"] * norm_strips, 3, c), device=x.device, dtype=torch.float32)
        _launch(
            _dwconv_ln_bwd_norm_kernel, (norm_strips, grids["norm_groups"]),
            x, taps, bias, ln_w, dy, mean, rstd, g, norm_partials, n * h, h, w, c, grids["rows_per_program"],
            K=kernel_size, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps, num_stages=1,
        )
    else:
        consts, warps = tile_config
        programs, tiles_per_program = _norm_tile_grid(n, h, w, consts)
        norm_partials = torch.empty((programs, 3, c), device=x.device, dtype=torch.float32)
        _launch(
            _dwconv_ln_bwd_tile_kernel, (programs,), x, taps, bias, ln_w, dy, mean, rstd, g, norm_partials,
            n, h, w, tiles_per_program, K=kernel_size, **consts, num_warps=warps, num_stages=1,
        )

    dx = torch.empty_like(x)
    tap_partials = torch.empty((grids["conv_groups"] * strips, kernel_size**2, c), device=x.device,
                               dtype=torch.float32)
    block_c, warps = _wgrad_config()
    _launch(
        _dwconv_bwd_conv_kernel, (strips, grids["conv_groups"], grids["channel_blocks"]),
        g, x, taps, dx, tap_partials, n * h, h, w, c, grids["tiles_per_program"],
        K=kernel_size, BLOCK_W=_wgrad_block_w(_wgrad_stride_c(c)), ROW_TILE=BWD_ROW_TILE, BLOCK_C=block_c,
        STRIDE_C=_wgrad_stride_c(c), num_warps=warps, num_stages=1,
    )
    d_ln_w, d_ln_b, d_bias = (sums.clone() for sums in _sum_rows(norm_partials))  # outputs must not alias
    return dx, _sum_rows(tap_partials), d_bias, d_ln_w, d_ln_b


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
def _autocast_forward_rule(device_type: str):
    key = autocast_key(device_type)

    def forward_in_autocast_dtype(x, taps, bias, ln_weight, ln_bias, eps, out_dtype=None):
        dtype = out_dtype or torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return dwconv_layernorm_fwd(x, taps, bias, ln_weight, ln_bias, eps, dtype)

    return forward_in_autocast_dtype


register_autocast_rules("dwconv_layernorm_fwd", _autocast_forward_rule)


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
    if forward_mode_ad(x, dw_weight, dw_bias, ln_weight, ln_bias):
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

_TRITON_DTYPES = DTYPE_NAMES
# (x dtype, output dtype) pairs a launch can see: same dtype, or fp32 x under fp16/bf16 autocast.
_DTYPE_PAIRS = (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "bf16"))


def _block_c_classes() -> list[int]:
    return [1 << i for i in range(MIN_BLOCK_C.bit_length() - 1, MAX_CHANNELS.bit_length())]


def _pair_label(x_dtype: str, y_dtype: str) -> str:
    return x_dtype if x_dtype == y_dtype else f"{x_dtype}->{y_dtype}"


def _forward_target(x_dtype, y_dtype, k, consts, warps) -> CompileTarget:
    """C is compiled in (STRIDE_C): one target per C the tile kernel runs."""
    signature = {
        "x_ptr": f"*{x_dtype}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32", "ln_b_ptr": "*fp32",
        "y_ptr": f"*{y_dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "H": "i32", "W": "i32",
        "eps": "fp32", "TILES_PER_PROGRAM": "i32", "STRIDE_C": "constexpr", "K": "constexpr", "TILE_H": "constexpr", "TILE_W": "constexpr",
        "CHUNK": "constexpr", "NCHUNK": "constexpr",
    }
    consts = dict(consts, K=k)
    label = " ".join(f"{name}={consts[name]}" for name in ("K", "TILE_H", "TILE_W", "CHUNK", "NCHUNK", "STRIDE_C"))
    return CompileTarget(
        kernel="dwconv_ln_fwd", fn=_dwconv_ln_fwd_kernel, signature=signature, constexprs=consts,
        num_warps=warps, num_stages=1, dtype=_pair_label(x_dtype, y_dtype), label=f"{label} warps={warps}",
    )


def _strip_forward_target(x_dtype, y_dtype, k, block_c) -> CompileTarget:
    block_w, warps = _strip_forward_config(block_c)
    signature = {
        "x_ptr": f"*{x_dtype}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32", "ln_b_ptr": "*fp32",
        "y_ptr": f"*{y_dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "H": "i32", "W": "i32", "C": "i32",
        "eps": "fp32", "K": "constexpr", "BLOCK_W": "constexpr", "BLOCK_C": "constexpr",
    }
    return CompileTarget(
        kernel="dwconv_ln_fwd_strip", fn=_dwconv_ln_fwd_strip_kernel, signature=signature,
        constexprs={"K": k, "BLOCK_W": block_w, "BLOCK_C": block_c}, num_warps=warps, num_stages=1,
        dtype=_pair_label(x_dtype, y_dtype), label=f"K={k} BLOCK_W={block_w} BLOCK_C={block_c} warps={warps}",
    )


def _norm_bwd_target(x_dtype, dy_dtype, k, block_c) -> CompileTarget:
    block_w, warps = _norm_bwd_config(block_c)
    signature = {
        "x_ptr": f"*{x_dtype}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32",
        "dy_ptr": f"*{dy_dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "g_ptr": "*fp32", "partial_ptr": "*fp32",
        "ROWS": "i32", "H": "i32", "W": "i32", "C": "i32", "ROWS_PER_PROGRAM": "i32",
        "K": "constexpr", "BLOCK_W": "constexpr", "BLOCK_C": "constexpr",
    }
    return CompileTarget(
        kernel="dwconv_ln_bwd_norm", fn=_dwconv_ln_bwd_norm_kernel, signature=signature,
        constexprs={"K": k, "BLOCK_W": block_w, "BLOCK_C": block_c}, num_warps=warps, num_stages=1,
        dtype=_pair_label(x_dtype, dy_dtype), label=f"K={k} BLOCK_W={block_w} BLOCK_C={block_c} warps={warps}",
    )


def _norm_bwd_tile_target(x_dtype, dy_dtype, k, consts, warps) -> CompileTarget:
    """C is compiled in (STRIDE_C): one target per C the tile kernel runs."""
    signature = {
        "x_ptr": f"*{x_dtype}", "taps_ptr": "*fp32", "bias_ptr": "*fp32", "ln_w_ptr": "*fp32",
        "dy_ptr": f"*{dy_dtype}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "g_ptr": "*fp32", "partial_ptr": "*fp32",
        "N": "i32", "H": "i32", "W": "i32", "TILES_PER_PROGRAM": "i32", "STRIDE_C": "constexpr", "K": "constexpr",
        "TILE_H": "constexpr", "TILE_W": "constexpr", "CHUNK": "constexpr", "NCHUNK": "constexpr",
    }
    consts = dict(consts, K=k)
    label = " ".join(f"{name}={consts[name]}" for name in ("K", "TILE_H", "TILE_W", "CHUNK", "NCHUNK", "STRIDE_C"))
    return CompileTarget(
        kernel="dwconv_ln_bwd_tile", fn=_dwconv_ln_bwd_tile_kernel, signature=signature, constexprs=consts,
        num_warps=warps, num_stages=1, dtype=_pair_label(x_dtype, dy_dtype), label=f"{label} warps={warps}",
    )


def _bwd_conv_target(x_dtype, k, stride_c=0) -> CompileTarget:
    """One target for the runtime C (stride_c 0) and one per C compiled in."""
    block_c, warps = _wgrad_config()
    block_w = _wgrad_block_w(stride_c)
    signature = {
        "g_ptr": "*fp32", "x_ptr": f"*{x_dtype}", "taps_ptr": "*fp32", "dx_ptr": f"*{x_dtype}",
        "partial_ptr": "*fp32", "ROWS": "i32", "H": "i32", "W": "i32", "C": "i32", "TILES_PER_PROGRAM": "i32",
        "K": "constexpr", "BLOCK_W": "constexpr", "ROW_TILE": "constexpr", "BLOCK_C": "constexpr",
        "STRIDE_C": "constexpr",
    }
    return CompileTarget(
        kernel="dwconv_bwd_dgrad_wgrad", fn=_dwconv_bwd_conv_kernel, signature=signature,
        constexprs={"K": k, "BLOCK_W": block_w, "ROW_TILE": BWD_ROW_TILE, "BLOCK_C": block_c, "STRIDE_C": stride_c},
        num_warps=warps, num_stages=1, dtype=x_dtype,
        label=f"K={k} BLOCK_W={block_w} ROW_TILE={BWD_ROW_TILE} BLOCK_C={block_c} STRIDE_C={stride_c} warps={warps}",
    )


def _sum_rows_target() -> CompileTarget:
    signature = {"src_ptr": "*fp32", "dst_ptr": "*fp32", "R": "i32", "N": "i32",
                 "BLOCK_R": "constexpr", "BLOCK_N": "constexpr"}
    return CompileTarget(
        kernel="dwconv_sum_partials", fn=_sum_rows_kernel, signature=signature,
        constexprs={"BLOCK_R": REDUCE_BLOCK_R, "BLOCK_N": REDUCE_BLOCK_N}, num_warps=4, num_stages=1,
        dtype="fp32", label=f"BLOCK_R={REDUCE_BLOCK_R} BLOCK_N={REDUCE_BLOCK_N}",
    )


def compile_targets(kernel_sizes=(MAX_KERNEL_SIZE,)) -> list[CompileTarget]:
    """Every (kernel, BLOCK_C class, config, dtype pair) the launchers can pick, for compile_check.

    K sets the unrolled window length, so the largest K bounds registers and compile time; pass more
    kernel_sizes to check smaller kernels too."""
    targets = []
    for k in kernel_sizes:
        for x_dtype, y_dtype in _DTYPE_PAIRS:
            tile_classes = _forward_classes(_DTYPE_BYTES[x_dtype])
            targets += [_forward_target(x_dtype, y_dtype, k, consts, warps) for consts, warps in tile_classes]
            norm_tiles = (_norm_bwd_tile_config(consts["STRIDE_C"], _DTYPE_BYTES[x_dtype]) for consts, _ in tile_classes)
            targets += [_norm_bwd_tile_target(x_dtype, y_dtype, k, *config) for config in norm_tiles if config]
            for block_c in _block_c_classes():
                targets.append(_strip_forward_target(x_dtype, y_dtype, k, block_c))
                targets.append(_norm_bwd_target(x_dtype, y_dtype, k, block_c))
        for x_dtype in _TRITON_DTYPES.values():
            widths = [consts["STRIDE_C"] for consts, _ in _forward_classes(_DTYPE_BYTES[x_dtype])]
            targets += [_bwd_conv_target(x_dtype, k, stride_c) for stride_c in [0] + sorted(
                {_wgrad_stride_c(c) for c in widths} - {0})]
    return targets + [_sum_rows_target()]


# --------------------------------------------------------------------------- launch plans
# A model, not a measurement. hbm_bytes: every tensor once, plus re-reads whose reuse footprint exceeds L2
# (halo rows/columns are shared by programs launched side by side, so they are L2 hits at every shape
# whose K image rows fit in L2). l2_bytes: the global loads and stores the programs issue (masked-off halo
# outside the image excluded). L1 hits subtracted only within one program: the warps of a backward conv
# tile request the same g rows in the same iteration (counted once per tile), and the LayerNorm backward
# re-reads its taps every row (counted once per program while they fit L1_RESIDENT_BYTES). Re-reads
# across programs are all counted.
L2_BYTES = 50e6  # the plans are costed for an H100 SXM: its L2 (tooling roofline.MACHINES[90].l2_size, tested equal)
L1_RESIDENT_BYTES = 64 * 1024  # assumed: data one program re-reads stays in L1 up to this size
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_LN_FLOPS_PER_ELEMENT = 8  # bias, centre, square, sum, scale, shift (forward); the backward ~2x


def _dtype_name(dtype) -> str:
    name = _TRITON_DTYPES.get(dtype, dtype)
    if name not in _DTYPE_BYTES:
        raise ValueError(f"launch_plans: dtype must be fp32/fp16/bf16 or a torch float dtype, got {dtype!r}")
    return name


def _valid_taps(size: int, k: int) -> int:
    """Sum over the `size` output positions of the input positions their K-wide window finds in the image."""
    pad = k // 2
    return sum(min(i + pad, size - 1) - max(i - pad, 0) + 1 for i in range(size))


def _valid_window_columns(width: int, k: int, block_w: int) -> int:
    """Columns of the strips' loaded windows (BLOCK_W + K - 1 each) that lie inside the image, all strips."""
    pad = k // 2
    return sum(min(w0 - pad + block_w + k - 1, width) - max(w0 - pad, 0) for w0 in range(0, width, block_w))


def _tile_g_rows(rows: int, height: int, k: int) -> int:
    """In-image g rows the backward conv tiles request (distinct per tile of BWD_ROW_TILE image rows)."""
    pad, total = k // 2, 0
    for first in range(0, rows, BWD_ROW_TILE):
        wanted = set()
        for row in range(first, min(first + BWD_ROW_TILE, rows)):
            image, h = divmod(row, height)
            wanted.update((image, src) for src in range(max(h - pad, 0), min(h + pad, height - 1) + 1))
        total += len(wanted)
    return total


def _int_plan(target, grid, phase, hbm, l2, trips, flops, note, int_args, outer_trips=1) -> LaunchPlan:
    return LaunchPlan(
        target=target, grid=tuple(grid), phase=phase, hbm_bytes=float(hbm), l2_bytes=float(l2),
        loop_trips=int(trips), flops=float(flops), note=note, int_args=dict(int_args), outer_trips=int(outer_trips),
        divisible_by_16=tuple(name for name, value in int_args.items() if value % 16 == 0),
    )


def _torch_plan(phase, nbytes, note) -> LaunchPlan:
    return LaunchPlan(target=None, grid=(), phase=phase, hbm_bytes=float(nbytes), l2_bytes=float(nbytes),
                      loop_trips=0, note=note)


def _forward_plan(name, batch, height, width, c, k, halo_reread) -> LaunchPlan:
    s, taps, pixels = _DTYPE_BYTES[name], k * k, batch * height * width
    act, stats, small = pixels * c * s, 8 * pixels, (taps + 3 * c) * 4
    conv_flops = 2 * taps * pixels * c
    config = _forward_config(c, s)
    if config is None:
        block_c = _block_c(c)
        block_w, warps = _strip_forward_config(block_c)
        programs = batch * height * triton.cdiv(width, block_w)
        # Strips: (in-image kernel rows per output row) x (in-image window columns), params once a program.
        window = batch * _valid_taps(height, k) * _valid_window_columns(width, k, block_w) * c
        return _int_plan(
            _strip_forward_target(name, name, k, block_c), (programs,), "forward",
            2 * act + stats + small + ((window * s - act) if halo_reread else 0),
            window * s + programs * small + act + stats, k, conv_flops + _LN_FLOPS_PER_ELEMENT * pixels * c,
            "conv + bias + LayerNorm: a strip of BLOCK_W pixels, all channels; "
            "hot loop = kernel rows", dict(H=height, W=width, C=c),
        )
    consts, warps = config
    tile_h, tile_w = consts["TILE_H"], consts["TILE_W"]
    (programs,), tiles = _forward_grid(batch, height, width, consts)
    # Forward tiles: each in-image input row of a tile's window is loaded once, its in-image columns only
    # (tiles past the last row load nothing).
    tile_elements = batch * _valid_window_columns(height, k, tile_h) * _valid_window_columns(width, k, tile_w) * c
    # Each tile loads every tap once; a program's later tiles find them in L1 while they fit there. The
    # LayerNorm params are loaded once a tile (L1 hits after the program's first).
    tap_bytes = taps * c * 4
    fwd_params = (tap_bytes if tap_bytes <= L1_RESIDENT_BYTES else tiles * tap_bytes) + 3 * c * 4
    return _int_plan(
        _forward_target(name, name, k, consts, warps), (programs,), "forward",
        2 * act + stats + small + ((tile_elements * s - act) if halo_reread else 0),
        tile_elements * s + programs * fwd_params + act + stats, k * tiles,
        conv_flops + _LN_FLOPS_PER_ELEMENT * pixels * c,
        "conv + bias + LayerNorm: TILES_PER_PROGRAM tiles of TILE_H x TILE_W pixels, all channels in NCHUNK "
        "chunks; hot loops = kernel rows (one per chunk) x tiles",
        dict(H=height, W=width, TILES_PER_PROGRAM=tiles), tiles,
    )


def _norm_bwd_plan(name, batch, height, width, c, k, halo_reread, grids) -> LaunchPlan:
    s, taps, pixels = _DTYPE_BYTES[name], k * k, batch * height * width
    act, stats, small = pixels * c * s, 8 * pixels, (taps + 3 * c) * 4
    flops = 2 * taps * pixels * c + 2 * _LN_FLOPS_PER_ELEMENT * pixels * c
    tap_bytes = taps * c * 4
    config = _norm_bwd_tile_config(c, s)
    if config is None:
        norm_groups, per_program, norm_strips = grids["norm_groups"], grids["rows_per_program"], grids["norm_strips"]
        partials = norm_groups * norm_strips * 3 * c * 4
        norm_w, _ = _norm_bwd_config(_block_c(c))
        window = batch * _valid_taps(height, k) * _valid_window_columns(width, k, norm_w) * c
        norm_taps = norm_strips * norm_groups * tap_bytes * (1 if tap_bytes <= L1_RESIDENT_BYTES else per_program)
        return _int_plan(
            _norm_bwd_target(name, name, k, _block_c(c)), (norm_strips, norm_groups), "backward",
            2 * act + 4 * pixels * c + stats + small + partials + ((window * s - act) if halo_reread else 0),
            window * s + norm_taps + act + 4 * pixels * c + stats + partials,
            k * per_program, flops,
            "recompute conv, LayerNorm backward -> g (fp32) + LN/bias partials; hot loop = kernel rows x rows",
            dict(ROWS=batch * height, H=height, W=width, C=c, ROWS_PER_PROGRAM=per_program), per_program,
        )
    consts, warps = config
    programs, tiles = _norm_tile_grid(batch, height, width, consts)
    # As the forward's tiles (see _forward_plan); taps and params come from L2 once a program while they fit L1.
    tile_elements = batch * _valid_window_columns(height, k, consts["TILE_H"]) * \
        _valid_window_columns(width, k, consts["TILE_W"]) * c
    params = (tap_bytes if tap_bytes <= L1_RESIDENT_BYTES else tiles * tap_bytes) + 2 * c * 4
    partials = programs * 3 * c * 4
    return _int_plan(
        _norm_bwd_tile_target(name, name, k, consts, warps), (programs,), "backward",
        2 * act + 4 * pixels * c + stats + small + partials + ((tile_elements * s - act) if halo_reread else 0),
        tile_elements * s + programs * params + act + 4 * pixels * c + stats + partials, k * tiles, flops,
        "recompute conv by the forward's tiles (NCHUNK chunks), LayerNorm backward per pixel -> g (fp32) + LN/bias "
        "partials; hot loops = kernel rows (one per chunk) x tiles",
        dict(N=batch, H=height, W=width, TILES_PER_PROGRAM=tiles), tiles,
    )


def launch_plans(batch: int, height: int, width: int, channels: int, dtype, training: bool,
                 kernel_size: int = MAX_KERNEL_SIZE) -> list[LaunchPlan]:
    """The launches one `dwconv_layernorm` call makes at this shape on a GPU with autotuning off (the
    forward's first config), forward then (when `training`) backward, with modelled bytes (see above).

    Params are taken as fp32 (ConvNeXt's master weights); the torch steps around the kernels (taps
    transposed to [K*K, C] fp32 and back for its gradient, gradient copies) are plans with target None."""
    name = _dtype_name(dtype)
    s, k, c = _DTYPE_BYTES[name], kernel_size, channels
    rows, pixels, taps = batch * height, batch * height * width, kernel_size**2
    act = pixels * c * s
    conv_flops = 2 * taps * pixels * c
    # A halo row is re-read K rows after its first use: from HBM only if those rows' x and y exceed L2.
    halo_reread = 2 * k * width * c * s > L2_BYTES
    plans = [
        _torch_plan("forward", 2 * taps * c * 4, "torch: taps transposed to a [K*K, C] fp32 matrix"),
        _forward_plan(name, batch, height, width, c, k, halo_reread),
    ]
    if not training:
        return plans
    grids = _backward_grids(rows, width, c, k)
    norm_plan = _norm_bwd_plan(name, batch, height, width, c, k, halo_reread, grids)
    plans.append(norm_plan)
    norm_programs = math.prod(norm_plan.grid)
    conv_groups, tiles, conv_strips = grids["conv_groups"], grids["tiles_per_program"], grids["strips"]
    conv_bwd_c, _ = _wgrad_config()
    tap_partials = conv_groups * conv_strips * taps * c * 4
    conv_programs = conv_strips * conv_groups * grids["channel_blocks"]
    g_requested = _tile_g_rows(rows, height, k) * _valid_window_columns(width, k, _wgrad_block_w(_wgrad_stride_c(c))) * c
    g_halo_hbm = (g_requested - pixels * c) * 4 if 2 * k * width * c * 4 > L2_BYTES else 0
    plans.append(_int_plan(
        _bwd_conv_target(name, k, _wgrad_stride_c(c)), (conv_strips, conv_groups, grids["channel_blocks"]), "backward",
        4 * pixels * c + 2 * act + taps * c * 4 + tap_partials + g_halo_hbm,
        g_requested * 4 + 2 * act + conv_programs * taps * conv_bwd_c * 4 + tap_partials, tiles,
        2 * conv_flops,
        "dx = conv(g, flipped taps) and tap-gradient partials from one read of g and x; hot loop = row tiles",
        dict(ROWS=rows, H=height, W=width, C=c, TILES_PER_PROGRAM=tiles),
    ))
    for count, columns, what in ((norm_programs, 3 * c, "LN weight/bias and conv bias"),
                                 (conv_groups * conv_strips, taps * c, "tap")):
        nbytes = (count + 1) * columns * 4
        plans.append(_int_plan(
            _sum_rows_target(), (triton.cdiv(columns, REDUCE_BLOCK_N),), "backward", nbytes, nbytes,
            triton.cdiv(count, REDUCE_BLOCK_R), count * columns, f"fixed-order sum of the {what} gradient partials",
            dict(R=count, N=columns),
        ))
    plans.append(_torch_plan("backward", 2 * (taps + 3 * c) * 4,
                             "torch: param-gradient copies (taps transposed back, LN/bias sums cloned)"))
    return plans
