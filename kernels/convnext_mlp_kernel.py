"""Fused ConvNeXt MLP: out = residual + sample_scale[n] * gamma * (act(x W1^T + b1) W2^T + b2).

x and residual are [N, H, W, C] contiguous (NHWC); the kernels see them as [M, C] rows, M = N*H*W.
D is the hidden width (4C in ConvNeXt, any D works). Work is counted in units of one M x C x D matmul
(eager: 2 forward, 4 backward).

Forward, one of two plans (`_two_gemm_forward`: fused while C fits one output tile, two GEMMs from C = 192 for
fp16/bf16; fastconvnext.tooling.mlp_paths costs both on the model):
- fused, `_mlp_fwd_kernel`: per program (row tile, C-out tile) and per BLOCK_D chunk of the hidden,
  pre = x W1[chunk]^T + b1, h = act(pre) cast to the input dtype, acc += h W2[n-tile, chunk]^T; epilogue
  y2 = acc + b2, out = residual + scale * gamma * y2. h never reaches global memory; fc1 is recomputed
  per C-out tile: 1 + cdiv(C, BLOCK_N) units.
- two GEMMs: `_mlp_hidden_kernel` (fc1 + b1 + act -> h [M, D] stored once in the activation dtype), then
  `_mlp_fwd_kernel` with LOAD_H (h W2^T + b2, x gamma x scale + residual): 2 units, 2 * M * D bytes of h.
When gamma is trained, forward also writes y2 ([M, C]) so that dgamma = sum(dy * scale * y2) needs no
matmul. pre = x W1^T + b1 ([M, D], activation dtype, as eager keeps its fc1 output) is saved for backward only where the
hidden per image is small (`_saves_pre`: H * W * D <= 7 * 7 * 4096, ConvNeXt-T/S/B's last stage at 224x224; ConvNeXt-T
fp32: 1.7 MiB per image) and the two-GEMM forward materialises it anyway (fc1 + act stores it beside h, STORE_PRE);
elsewhere nothing D-wide is saved (h and pre are recomputed).

Backward, dy = grad of out, g = dy * gamma * scale, d_residual = dy, at most 6 units at every C:
- one C tile (C <= 128 for fp16/bf16): `_mlp_bwd_dx_kernel` (x and g rows loaded once per row tile where they need
  no padding, see `_dx_configs`, else streamed per chunk) recomputes pre and dh = g W2[:, chunk], forms
  dpre = dh * act'(pre) in fp32, dx += dpre W1[chunk] (3 units), stores h and dpre [M, D] and the fp32
  row-group partial sums of dpre (db1), g (db2) and dy * scale * y2 (dgamma); `_mlp_bwd_dw_kernel`
  accumulates dW1^T += x^T dpre, dW2 += g^T h (2 units). (Recomputing h in the dW kernel instead would
  save 2 * M * D bytes for one more unit, but spilled on sm_80 at every tile that keeps 64x64 wgmma.)
- wider C: `_mlp_hidden_kernel` (IS_BACKWARD) recomputes pre, dh -> stores h and dpre, db1 partials
  (2 units), or with pre at hand (LOAD_PRE) computes only dh = dy (diag(gamma) W2) (the launcher folds gamma into W2,
  so dy goes to the tensor cores as it is; the drop-path scale multiplies dh rows) in one 128x256 accumulator and
  reads pre back per column quarter (1 unit). pre is at hand when the forward saved it, or from a first backward pass
  (`fc1_pre`: fc1 + b1 -> pre [M, D] stored for this backward only, 1 unit) where the two passes' wider tiles cost
  fewer L2 bytes than the two-accumulator kernel (`_two_pass_hidden_backward`: fp16/bf16 from C = 512 on Triton 3.9,
  at multiples of 512 before; fp32 with TF32 from C = 256); `_mlp_fwd_kernel` with LOAD_H and B_KN computes dx = dpre W1 (1 unit); the dW kernel
  reads h and dpre (2 units) and sums db2, dgamma.
The dW kernel's grid is (2 x D chunks: dW1 programs then dW2 programs, one accumulator each; C tiles; M
segments); each program walks its segment's row tiles in order; the segment count depends only on M, so results
are bitwise reproducible; no atomics anywhere.
Row-tile kernels use 1-D grids with the column tiles fastest, so the programs sharing a row tile run
together and read its rows from HBM once.

Configs: per (C, D, dtype) bucket, compiled for sm_80 and sm_90 without spills (see `compile_targets`);
fp16/bf16 tiles give every dot at least 64 x 64 per warpgroup (sm_90: wgmma m64 n64/n128/n256); the GEMM kernels
(fc1 + act, fc2, the dx GEMM) take 32K-output tiles (128x256, 256x128), halving the operand bytes each output costs
from L2 against 128x128, and run their epilogues one column half at a time, a quarter where GELU is evaluated or
fc2 also stores y2 (`_SPLIT_TILE`, no spills); the hidden-backward kernel takes 128x128 tiles from C = 192 (128x256
with pre saved: one accumulator), the dW kernel 32K-output accumulators from C = 129; candidates of one kernel reduce
in one order (`_same_reduction_order`), so autotuning cannot change bits. One small config per kernel in the
interpreter.

`launch_plans(batch, height, width, channels, dtype, training)` lists the launches a call makes at a shape
(config, grid, modelled bytes) for fastconvnext/tooling/sass_report.py; the launchers and it share `_grid`, `_kinds`
and the configs.

Precision: fp16/bf16 operands go to tensor cores via tl.dot with fp32 accumulation; fp32 operands use
"tf32" when torch allows TF32 matmuls (either flag API, `_tf32_allowed`), else "ieee" (always "ieee" in the
interpreter). Biases, gamma and sample_scale are used in fp32, as are pre, dh, act'(pre) and their
product; fp32 master weights are cast to x's dtype for the dots and their gradients are returned in their
own dtype. The exact (erf) GELU evaluates Phi(x) = erfc(-x / sqrt 2) / 2 in fp32 from one fitted polynomial
(`_gelu_cdf`: within 6.1e-7 of fp64 GELU on [-12, 12], no cancellation in the negative tail) rather than libdevice's
erff, whose two coefficient sets cost ~10 predicated moves per element in the SASS.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._env import autotune_enabled, interpreting
from ._op_support import (
    DTYPE_NAMES, autocast_key, device_guard as _device_guard, forward_mode_ad, register_autocast_rules,
)
from ._triton_compat import approx_div_helper, config_choice, require_supported
from .compile_spec import FP_FUSION, CompileTarget
from .reference import FUSED_ACTS, convnext_mlp_reference

require_supported()  # an older Triton: ImportError naming the installed and the required release
# div.approx.f32 as the installed Triton spells it, chosen now: in the mode (TRITON_INTERPRET) this module's
# @triton.jit functions are made in
approx_div = approx_div_helper()

# Rows per partial sum of the small vectors in the dx kernel (every config's BLOCK_M is a multiple).
_PART_ROWS = 16
# The dW kernel splits M into segments of about this many rows (fixed, so results do not depend on
# the GPU or the block config); at most _MAX_SEGMENTS partial copies of the weights are kept. Segment
# boundaries are multiples of _SEGMENT_ALIGN rows, a multiple of every BLOCK_M, so that the rows summed
# into one partial do not depend on the config either.
_SEGMENT_ROWS = 8192
_MAX_SEGMENTS = 64
_SEGMENT_ALIGN = 256

# Output tiles of at least this many elements run their epilogue one column half at a time.
_SPLIT_TILE = tl.constexpr(32768)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_SQRT_HALF_LOG2E = tl.constexpr(0.8493218003)  # sqrt(log2(e) / 2)
_HALF_OVER_SQRT_LOG2E = tl.constexpr(0.4162773056)  # 1 / (2 sqrt(log2 e))
# erfc(z) = t * exp(P(t) - z^2) for z >= 0, t = 1 / (1 + z / 2): P is a degree-9 fit of ln(erfcx(z) / t) on t in (0, 1]
# made for this kernel (Chebyshev nodes, Lawson-weighted least squares, fp64): |error of ln erfc| <= 9.8e-8, so GELU in
# fp32 lands within 6.1e-7 of the fp64 GELU on [-12, 12] (torch's fp32 erf GELU: 1.3e-6). One polynomial for every z:
# libdevice's erff picks between two coefficient sets per element, which ptxas turns into ~10 predicated moves each
_ERFC_P0 = tl.constexpr(-2.8257482)  # -1.26551222 x log2 e - 1 (the 1/2 in front of erfc)
_ERFC_P1 = tl.constexpr(1.44272772)  # 1.00002265 x log2 e
_ERFC_P2 = tl.constexpr(0.539748323)  # 0.374125028 x log2 e
_ERFC_P3 = tl.constexpr(0.139058825)  # 0.0963882328 x log2 e
_ERFC_P4 = tl.constexpr(-0.265407723)  # -0.183966615 x log2 e
_ERFC_P5 = tl.constexpr(0.391478919)  # 0.271352509 x log2 e
_ERFC_P6 = tl.constexpr(-1.61740632)  # -1.12110063 x log2 e
_ERFC_P7 = tl.constexpr(2.12545773)  # 1.47325503 x log2 e
_ERFC_P8 = tl.constexpr(-1.17337947)  # -0.813324674 x log2 e
_ERFC_P9 = tl.constexpr(0.243470085)  # 0.168760603 x log2 e


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # tanh via exp: saturates to +-1 for large |u| without overflow trouble
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_cdf(pre):
    # Phi(pre) = erfc(-pre / sqrt 2) / 2 from erfc of |pre| / sqrt 2 (no 1 + erf cancellation for negative pre)
    # in base 2 (exp2 without a scaling multiply): u = z * sqrt(log2 e), so z^2 log2 e = u^2; P's coefficients
    # scaled by log2 e, Phi's 1/2 folded into the constant term
    u = tl.abs(pre) * _SQRT_HALF_LOG2E
    t = approx_div(1.0, 1.0 + _HALF_OVER_SQRT_LOG2E * u)  # div.approx.f32 (_triton_compat: per Triton release)
    poly = _ERFC_P9 * t + _ERFC_P8
    poly = poly * t + _ERFC_P7
    poly = poly * t + _ERFC_P6
    poly = poly * t + _ERFC_P5
    poly = poly * t + _ERFC_P4
    poly = poly * t + _ERFC_P3
    poly = poly * t + _ERFC_P2
    poly = poly * t + _ERFC_P1
    poly = poly * t + _ERFC_P0
    half_erfc = t * tl.exp2(poly - u * u)
    return tl.where(pre >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _activation(pre, ACT: tl.constexpr):
    if ACT == "gelu":
        return pre * _gelu_cdf(pre)
    elif ACT == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (pre + _TANH_CUBIC * pre * pre * pre)
        return 0.5 * pre * (1.0 + _tanh(inner))
    else:
        return tl.maximum(pre, 0.0)


@triton.jit
def _activation_grad(pre, ACT: tl.constexpr):
    if ACT == "gelu":
        return _gelu_cdf(pre) + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    elif ACT == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (pre + _TANH_CUBIC * pre * pre * pre)
        t = _tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * pre * pre)
        return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * d_inner
    else:
        return tl.where(pre > 0.0, 1.0, 0.0)


@triton.jit
def _load_rows(ptr, rows, row_mask, cols, C: tl.constexpr):
    # [BLOCK_M, BLOCK_K] tile of a row-major [M, C] tensor, zero outside
    mask = row_mask[:, None] & (cols[None, :] < C)
    return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE: tl.constexpr):
    # per-row drop-path scale in fp32; rows outside M get 0 so they contribute nothing to sums
    if HAS_SCALE:
        return tl.load(scale_ptr + rows // HW, mask=row_mask, other=0.0)
    else:
        return tl.where(row_mask, 1.0, 0.0)


@triton.jit
def _load_g(dy_ptr, gamma_ptr, rows, row_mask, row_scale, cols, C: tl.constexpr, HAS_GAMMA: tl.constexpr):
    # g = dy * gamma * sample_scale (fp32), the gradient reaching y2 = h W2^T + b2
    g = _load_rows(dy_ptr, rows, row_mask, cols, C).to(tl.float32) * row_scale[:, None]
    if HAS_GAMMA:
        g = g * tl.load(gamma_ptr + cols, mask=cols < C, other=0.0)[None, :]
    return g


@triton.jit
def _load_g_operand(dy_ptr, gamma_ptr, rows, row_mask, row_scale, cols, C: tl.constexpr, HAS_GAMMA: tl.constexpr,
                    HAS_SCALE: tl.constexpr):
    # g as a dot operand in dy's dtype (callers cast to the other operand's); without gamma and drop path it is dy itself (rows outside M load 0), which
    # spares the fp32 round trip and the registers it holds (the no-feature compiles spilled on sm_80 without this)
    if HAS_GAMMA or HAS_SCALE:
        g = _load_g(dy_ptr, gamma_ptr, rows, row_mask, row_scale, cols, C, HAS_GAMMA)
        return g.to(dy_ptr.dtype.element_ty)
    else:
        return _load_rows(dy_ptr, rows, row_mask, cols, C)


@triton.jit
def _load_w_t(w_ptr, i_offs, j_offs, I: tl.constexpr, J: tl.constexpr):
    # [len(i_offs), len(j_offs)] tile of W^T for a row-major W of shape [J, I]
    mask = (i_offs[:, None] < I) & (j_offs[None, :] < J)
    return tl.load(w_ptr + j_offs[None, :] * I + i_offs[:, None], mask=mask, other=0.0)


@triton.jit
def _load_w(w_ptr, i_offs, j_offs, I: tl.constexpr, J: tl.constexpr):
    # [len(i_offs), len(j_offs)] tile of a row-major W of shape [I, J]
    mask = (i_offs[:, None] < I) & (j_offs[None, :] < J)
    return tl.load(w_ptr + i_offs[:, None] * J + j_offs[None, :], mask=mask, other=0.0)


@triton.jit
def _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C: tl.constexpr, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    # x W1[chunk]^T without bias, reduction over C in BLOCK_K steps
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(x_ptr, rows, row_mask, k_offs, C)
        acc = tl.dot(x, _load_w_t(w1_ptr, k_offs, d_offs, C, D), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _streamed_dh(dy_ptr, gamma_ptr, w2_ptr, rows, row_mask, row_scale, d_offs, C: tl.constexpr,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # dh = g W2[:, chunk], reduction over C in BLOCK_K steps
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        w2 = _load_w(w2_ptr, k_offs, d_offs, C, D)
        g = _load_g_operand(dy_ptr, gamma_ptr, rows, row_mask, row_scale, k_offs, C, HAS_GAMMA, HAS_SCALE)
        acc = tl.dot(g.to(w2.dtype), w2, acc, input_precision=DOT_PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mlp_fwd_kernel(
    x_ptr,  # [M, C] activation dtype; with LOAD_H the hidden [M, D] (h, or dpre for dx)
    res_ptr,  # [M, C] activation dtype (HAS_RESIDUAL)
    w1_ptr,  # [D, C] activation dtype (unused with LOAD_H)
    b1_ptr,  # [D] fp32 (unused with LOAD_H)
    w2_ptr,  # [C, D] activation dtype; with B_KN a [D, C] matrix (W1 for dx)
    b2_ptr,  # [C] fp32 (HAS_BIAS)
    gamma_ptr,  # [C] fp32 (HAS_GAMMA)
    scale_ptr,  # [N] fp32 (HAS_SCALE)
    out_ptr,  # [M, C] activation dtype (or the autocast output dtype)
    y2_ptr,  # [M, C] activation dtype (SAVE_Y2)
    M,
    HW,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
    LOAD_H: tl.constexpr,
    B_KN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SAVE_Y2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one program per (row tile, column tile), column tiles fastest: the programs sharing a row tile run
    # together, so its rows come from HBM once
    pid_m = tl.program_id(0) // tl.cdiv(C, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(C, BLOCK_N)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < C
    RESIDENT_X: tl.constexpr = BLOCK_K >= C and not LOAD_H
    if RESIDENT_X:
        x_tile = _load_rows(x_ptr, rows, row_mask, tl.arange(0, BLOCK_K), C)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        if LOAD_H:
            h = _load_rows(x_ptr, rows, row_mask, d_offs, D)
        else:
            if RESIDENT_X:
                w1_t = _load_w_t(w1_ptr, tl.arange(0, BLOCK_K), d_offs, C, D)
                pre = tl.dot(x_tile, w1_t, input_precision=DOT_PRECISION)
            else:
                pre = _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C, D, BLOCK_M, BLOCK_K, BLOCK_D,
                                    DOT_PRECISION)
            pre += tl.load(b1_ptr + d_offs, mask=d_offs < D, other=0.0)[None, :]
            h = _activation(pre, ACT).to(x_ptr.dtype.element_ty)
        if B_KN:
            w = _load_w(w2_ptr, d_offs, n_offs, D, C)
        else:
            w = _load_w_t(w2_ptr, d_offs, n_offs, D, C)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

    first = pid_n * BLOCK_N
    if BLOCK_M * BLOCK_N >= _SPLIT_TILE and SAVE_Y2:
        # a 32K-output tile that also stores y2: the epilogue a quarter at a time (halves spilled 32-120 B with
        # layer scale and no drop path, on sm_80 and sm_90)
        left, right = _column_halves(acc, BLOCK_M, BLOCK_N)
        _fwd_epilogue_halves(left, rows, row_mask, first, res_ptr, b2_ptr, gamma_ptr, scale_ptr, out_ptr, y2_ptr,
                             HW, C, BLOCK_M, BLOCK_N // 2, HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA, HAS_SCALE, SAVE_Y2)
        _fwd_epilogue_halves(right, rows, row_mask, first + BLOCK_N // 2, res_ptr, b2_ptr, gamma_ptr, scale_ptr,
                             out_ptr, y2_ptr, HW, C, BLOCK_M, BLOCK_N // 2, HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA,
                             HAS_SCALE, SAVE_Y2)
    elif BLOCK_M * BLOCK_N >= _SPLIT_TILE:
        # a 32K-output tile: the epilogue's loads and temporaries for half of it at a time (else ptxas spills)
        _fwd_epilogue_halves(acc, rows, row_mask, first, res_ptr, b2_ptr, gamma_ptr, scale_ptr, out_ptr, y2_ptr, HW,
                             C, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA, HAS_SCALE, SAVE_Y2)
    else:
        _fwd_epilogue(acc, rows, row_mask, n_offs, res_ptr, b2_ptr, gamma_ptr, scale_ptr, out_ptr, y2_ptr, HW, C,
                      HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA, HAS_SCALE, SAVE_Y2)


@triton.jit
def _fwd_epilogue_halves(tile, rows, row_mask, first, res_ptr, b2_ptr, gamma_ptr, scale_ptr, out_ptr, y2_ptr, HW,
                         C: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr,
                         SAVE_Y2: tl.constexpr):
    # the epilogue of a [ROWS, COLS] tile of columns first .. first + COLS - 1, one column half after the other
    left, right = _column_halves(tile, ROWS, COLS)
    _fwd_epilogue(left, rows, row_mask, first + tl.arange(0, COLS // 2), res_ptr, b2_ptr, gamma_ptr, scale_ptr,
                  out_ptr, y2_ptr, HW, C, HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA, HAS_SCALE, SAVE_Y2)
    _fwd_epilogue(right, rows, row_mask, first + COLS // 2 + tl.arange(0, COLS // 2), res_ptr, b2_ptr, gamma_ptr,
                  scale_ptr, out_ptr, y2_ptr, HW, C, HAS_BIAS, HAS_RESIDUAL, HAS_GAMMA, HAS_SCALE, SAVE_Y2)


@triton.jit
def _column_halves(tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    # [ROWS, COLS] -> its left and right [ROWS, COLS // 2] halves
    return tl.split(tl.permute(tl.reshape(tile, [ROWS, 2, COLS // 2]), [0, 2, 1]))


@triton.jit
def _fwd_epilogue(acc, rows, row_mask, n_offs, res_ptr, b2_ptr, gamma_ptr, scale_ptr, out_ptr, y2_ptr, HW,
                  C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
                  HAS_SCALE: tl.constexpr, SAVE_Y2: tl.constexpr):
    # y2 = acc + b2 (stored with SAVE_Y2); out = residual + scale * gamma * y2 for the columns n_offs
    n_mask = n_offs < C
    y2 = acc
    if HAS_BIAS:
        y2 += tl.load(b2_ptr + n_offs, mask=n_mask, other=0.0)[None, :]
    offs = rows[:, None] * C + n_offs[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    if SAVE_Y2:
        tl.store(y2_ptr + offs, y2.to(y2_ptr.dtype.element_ty), mask=mask)
    out = y2
    if HAS_GAMMA:
        out = out * tl.load(gamma_ptr + n_offs, mask=n_mask, other=0.0)[None, :]
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + rows // HW, mask=row_mask, other=0.0)[:, None]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_group_sums(part_ptr, values, pid_m, n_offs, n_mask, n_parts, C: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PART_ROWS: tl.constexpr):
    # sums over each PART_ROWS rows of a [BLOCK_M, BLOCK_N] fp32 tile -> rows of part [n_parts, C]
    GROUPS: tl.constexpr = BLOCK_M // PART_ROWS
    sums = tl.sum(tl.reshape(values, [GROUPS, PART_ROWS, BLOCK_N]), axis=1)
    part_rows = pid_m.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    mask = (part_rows[:, None] < n_parts) & n_mask[None, :]
    tl.store(part_ptr + part_rows[:, None] * C + n_offs[None, :], sums, mask=mask)


@triton.jit
def _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre, dpre, pid_m, rows, row_mask, d_offs, M, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PART_ROWS: tl.constexpr, ACT: tl.constexpr):
    # h = act(pre) and dpre in the activation dtype for the weight-gradient GEMMs; db1 partials from fp32 dpre
    offs = rows[:, None] * D + d_offs[None, :]
    d_mask = d_offs < D
    mask = row_mask[:, None] & d_mask[None, :]
    tl.store(h_ptr + offs, _activation(pre, ACT).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
    _store_row_group_sums(db1_part_ptr, dpre, pid_m, d_offs, d_mask, tl.cdiv(M, PART_ROWS), D, BLOCK_M, BLOCK_D,
                          PART_ROWS)


@triton.jit
def _mlp_hidden_kernel(
    x_ptr,  # [M, C] activation dtype
    dy_ptr,  # [M, C] activation dtype (IS_BACKWARD)
    w1_ptr,  # [D, C] activation dtype
    b1_ptr,  # [D] fp32
    w2_ptr,  # [C, D] activation dtype (IS_BACKWARD)
    gamma_ptr,  # [C] fp32 (HAS_GAMMA)
    scale_ptr,  # [N] fp32 (HAS_SCALE)
    h_ptr,  # [M, D] activation dtype
    dpre_ptr,  # [M, D] activation dtype (IS_BACKWARD)
    db1_part_ptr,  # [cdiv(M, PART_ROWS), D] fp32 (IS_BACKWARD)
    pre_ptr,  # [M, D] activation dtype: x W1^T + b1 kept for backward (STORE_PRE writes it, LOAD_PRE reads it)
    M,
    HW,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PART_ROWS: tl.constexpr,
    ACT: tl.constexpr,
    IS_BACKWARD: tl.constexpr,
    STORE_PRE: tl.constexpr,
    LOAD_PRE: tl.constexpr,
    STORE_H: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # forward: h = act(x W1^T + b1) (STORE_PRE: pre too; without STORE_H pre alone, the first pass of a two-pass
    # hidden backward); backward also dh = g W2 and dpre = dh * act'(pre) (fp32 until stored), pre recomputed or
    # (LOAD_PRE) read back from the forward's copy or the first pass: one K = C GEMM instead of two
    pid_m = tl.program_id(0) // tl.cdiv(D, BLOCK_D)  # hidden tiles fastest (see _mlp_fwd_kernel)
    pid_d = tl.program_id(0) % tl.cdiv(D, BLOCK_D)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if LOAD_PRE:
        # w2 is diag(gamma) W2 (the launcher folds the layer scale in, HAS_GAMMA off): dy itself is the dot operand,
        # fetched straight to shared memory; the drop-path scale of a row multiplies its dh row
        row_scale = _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE)
        dh = _streamed_dh(dy_ptr, gamma_ptr, w2_ptr, rows, row_mask, row_scale, d_offs, C, D, BLOCK_M, BLOCK_K,
                          BLOCK_D, False, False, DOT_PRECISION)
        if HAS_SCALE:
            dh = dh * row_scale[:, None]
        _store_hidden_saved_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, dh, pid_m, rows, row_mask, pid_d * BLOCK_D, M,
                                D, BLOCK_M, BLOCK_D, PART_ROWS, ACT)
    else:
        pre = _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C, D, BLOCK_M, BLOCK_K, BLOCK_D, DOT_PRECISION)
        pre += tl.load(b1_ptr + d_offs, mask=d_offs < D, other=0.0)[None, :]
        if IS_BACKWARD:
            row_scale = _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE)
            dh = _streamed_dh(dy_ptr, gamma_ptr, w2_ptr, rows, row_mask, row_scale, d_offs, C, D, BLOCK_M, BLOCK_K,
                              BLOCK_D, HAS_GAMMA, HAS_SCALE, DOT_PRECISION)
            if 2 * BLOCK_M * BLOCK_D >= _SPLIT_TILE:
                # two accumulators of 16K: act, act' and the stores for one column quarter at a time (halves spilled
                # 16-80 B on sm_80/sm_90)
                pre_left, pre_right = _column_halves(pre, BLOCK_M, BLOCK_D)
                dh_left, dh_right = _column_halves(dh, BLOCK_M, BLOCK_D)
                first = pid_d * BLOCK_D
                _store_hidden_halves(h_ptr, dpre_ptr, db1_part_ptr, pre_left, dh_left, pid_m, rows, row_mask, first, M,
                                     D, BLOCK_M, BLOCK_D // 2, PART_ROWS, ACT)
                _store_hidden_halves(h_ptr, dpre_ptr, db1_part_ptr, pre_right, dh_right, pid_m, rows, row_mask,
                                     first + BLOCK_D // 2, M, D, BLOCK_M, BLOCK_D // 2, PART_ROWS, ACT)
            else:
                _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre, dh * _activation_grad(pre, ACT), pid_m, rows,
                              row_mask, d_offs, M, D, BLOCK_M, BLOCK_D, PART_ROWS, ACT)
        elif BLOCK_M * BLOCK_D >= _SPLIT_TILE:
            # the activation's temporaries for a quarter of a 32K-element tile at a time (halves spilled 256 B on
            # sm_90), an eighth when pre is stored too (quarters spilled 24-72 B on sm_80 and sm_90)
            first = pid_d * BLOCK_D
            if STORE_PRE and STORE_H:
                left, right = _column_halves(pre, BLOCK_M, BLOCK_D)
                _store_act_quarters(h_ptr, pre_ptr, left, rows, row_mask, first, D, BLOCK_M, BLOCK_D // 2, ACT,
                                    STORE_PRE, STORE_H)
                _store_act_quarters(h_ptr, pre_ptr, right, rows, row_mask, first + BLOCK_D // 2, D, BLOCK_M,
                                    BLOCK_D // 2, ACT, STORE_PRE, STORE_H)
            else:
                _store_act_quarters(h_ptr, pre_ptr, pre, rows, row_mask, first, D, BLOCK_M, BLOCK_D, ACT, STORE_PRE,
                                    STORE_H)
        else:
            _store_act(h_ptr, pre_ptr, pre, rows, row_mask, d_offs, D, ACT, STORE_PRE, STORE_H)


@triton.jit
def _store_hidden_halves(h_ptr, dpre_ptr, db1_part_ptr, pre, dh, pid_m, rows, row_mask, first, M, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, COLS: tl.constexpr, PART_ROWS: tl.constexpr, ACT: tl.constexpr):
    # _store_hidden for the [BLOCK_M, COLS] tiles pre and dh (columns first + [0, COLS)), one column half at a time
    HALF: tl.constexpr = COLS // 2
    pre_left, pre_right = _column_halves(pre, BLOCK_M, COLS)
    dh_left, dh_right = _column_halves(dh, BLOCK_M, COLS)
    _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre_left, dh_left * _activation_grad(pre_left, ACT), pid_m, rows,
                  row_mask, first + tl.arange(0, HALF), M, D, BLOCK_M, HALF, PART_ROWS, ACT)
    _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre_right, dh_right * _activation_grad(pre_right, ACT), pid_m, rows,
                  row_mask, first + HALF + tl.arange(0, HALF), M, D, BLOCK_M, HALF, PART_ROWS, ACT)


@triton.jit
def _store_act_quarters(h_ptr, pre_ptr, pre, rows, row_mask, first, D: tl.constexpr, ROWS: tl.constexpr,
                        COLS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, STORE_H: tl.constexpr):
    # _store_act for the [ROWS, COLS] tile pre (columns first + [0, COLS)), one column quarter at a time
    QUARTER: tl.constexpr = COLS // 4
    left, right = _column_halves(pre, ROWS, COLS)
    q0, q1 = _column_halves(left, ROWS, COLS // 2)
    q2, q3 = _column_halves(right, ROWS, COLS // 2)
    cols = first + tl.arange(0, QUARTER)
    _store_act(h_ptr, pre_ptr, q0, rows, row_mask, cols, D, ACT, STORE_PRE, STORE_H)
    _store_act(h_ptr, pre_ptr, q1, rows, row_mask, cols + QUARTER, D, ACT, STORE_PRE, STORE_H)
    _store_act(h_ptr, pre_ptr, q2, rows, row_mask, cols + 2 * QUARTER, D, ACT, STORE_PRE, STORE_H)
    _store_act(h_ptr, pre_ptr, q3, rows, row_mask, cols + 3 * QUARTER, D, ACT, STORE_PRE, STORE_H)


@triton.jit
def _store_act(h_ptr, pre_ptr, pre, rows, row_mask, d_offs, D: tl.constexpr, ACT: tl.constexpr,
               STORE_PRE: tl.constexpr, STORE_H: tl.constexpr):
    mask = row_mask[:, None] & (d_offs[None, :] < D)
    offs = rows[:, None] * D + d_offs[None, :]
    if STORE_PRE:  # before the activation's temporaries are live
        tl.store(pre_ptr + offs, pre.to(pre_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + offs, _activation(pre, ACT).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_hidden_saved_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, dh, pid_m, rows, row_mask, first, M,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, COLS: tl.constexpr, PART_ROWS: tl.constexpr,
                            ACT: tl.constexpr):
    # _store_hidden for the [BLOCK_M, COLS] tile dh (columns first + [0, COLS)) with pre read back from the forward's
    # copy, a column quarter at a time from 16K-element tiles (the quarter's pre, act and act' in registers)
    if BLOCK_M * COLS >= _SPLIT_TILE // 2:
        QUARTER: tl.constexpr = COLS // 4
        left, right = _column_halves(dh, BLOCK_M, COLS)
        q0, q1 = _column_halves(left, BLOCK_M, COLS // 2)
        q2, q3 = _column_halves(right, BLOCK_M, COLS // 2)
        _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, q0, pid_m, rows, row_mask, first, M, D,
                               BLOCK_M, QUARTER, PART_ROWS, ACT)
        _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, q1, pid_m, rows, row_mask, first + QUARTER, M,
                               D, BLOCK_M, QUARTER, PART_ROWS, ACT)
        _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, q2, pid_m, rows, row_mask, first + 2 * QUARTER,
                               M, D, BLOCK_M, QUARTER, PART_ROWS, ACT)
        _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, q3, pid_m, rows, row_mask, first + 3 * QUARTER,
                               M, D, BLOCK_M, QUARTER, PART_ROWS, ACT)
    else:
        _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, dh, pid_m, rows, row_mask, first, M, D,
                               BLOCK_M, COLS, PART_ROWS, ACT)


@triton.jit
def _store_hidden_from_pre(h_ptr, dpre_ptr, db1_part_ptr, pre_ptr, dh, pid_m, rows, row_mask, first, M,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, COLS: tl.constexpr, PART_ROWS: tl.constexpr,
                           ACT: tl.constexpr):
    d_offs = first + tl.arange(0, COLS)
    pre = _load_rows(pre_ptr, rows, row_mask, d_offs, D).to(tl.float32)
    _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre, dh * _activation_grad(pre, ACT), pid_m, rows, row_mask, d_offs,
                  M, D, BLOCK_M, COLS, PART_ROWS, ACT)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mlp_bwd_dx_kernel(
    x_ptr,  # [M, C] activation dtype
    dy_ptr,  # [M, C] activation dtype
    w1_ptr,  # [D, C] activation dtype
    b1_ptr,  # [D] fp32
    w2_ptr,  # [C, D] activation dtype
    gamma_ptr,  # [C] fp32 (HAS_GAMMA)
    scale_ptr,  # [N] fp32 (HAS_SCALE)
    y2_ptr,  # [M, C] activation dtype (HAS_Y2)
    dx_ptr,  # [M, C] activation dtype
    h_ptr,  # [M, D] activation dtype (STORE_HIDDEN)
    dpre_ptr,  # [M, D] activation dtype (STORE_HIDDEN)
    db1_part_ptr,  # [cdiv(M, PART_ROWS), D] fp32 (STORE_HIDDEN)
    db2_part_ptr,  # [cdiv(M, PART_ROWS), C] fp32 (STORE_HIDDEN)
    dgamma_part_ptr,  # [cdiv(M, PART_ROWS), C] fp32 (STORE_HIDDEN and HAS_Y2)
    M,
    HW,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PART_ROWS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    STORE_HIDDEN: tl.constexpr,
    HAS_Y2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # STORE_HIDDEN (the weight gradients are wanted) needs one C tile (BLOCK_N >= C): each hidden element is
    # then stored by exactly one program; the epilogue then also writes the db2 and dgamma row-group partials
    # one program per (row tile, column tile), column tiles fastest: the programs sharing a row tile run
    # together, so its rows come from HBM once
    pid_m = tl.program_id(0) // tl.cdiv(C, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(C, BLOCK_N)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < C
    row_scale = _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE)
    # resident x and g rows (BLOCK_K >= C) in two pieces of K_LO + K_HI = C columns where C is the sum of two powers
    # of two (C = 96: 64 + 32), so no register holds padding; else one zero-padded BLOCK_K-wide piece
    K_LO: tl.constexpr = BLOCK_K // 2 if BLOCK_K // 2 < C else BLOCK_K
    K_HI: tl.constexpr = C - K_LO if K_LO < C else 16
    TWO_PIECES: tl.constexpr = BLOCK_K >= C and K_LO < C and K_HI >= 16 and (K_HI & (K_HI - 1)) == 0
    K_FIRST: tl.constexpr = K_LO if TWO_PIECES else BLOCK_K
    if BLOCK_K >= C:
        k_first = tl.arange(0, K_FIRST)
        x_tile = _load_rows(x_ptr, rows, row_mask, k_first, C)
        g_tile = _load_g_operand(dy_ptr, gamma_ptr, rows, row_mask, row_scale, k_first, C, HAS_GAMMA,
                                 HAS_SCALE).to(x_tile.dtype)
        if TWO_PIECES:
            k_rest = K_LO + tl.arange(0, K_HI)
            x_rest = _load_rows(x_ptr, rows, row_mask, k_rest, C)
            g_rest = _load_g_operand(dy_ptr, gamma_ptr, rows, row_mask, row_scale, k_rest, C, HAS_GAMMA,
                                     HAS_SCALE).to(x_tile.dtype)

    dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        if BLOCK_K >= C:
            pre = tl.dot(x_tile, _load_w_t(w1_ptr, k_first, d_offs, C, D), input_precision=DOT_PRECISION)
            dh = tl.dot(g_tile, _load_w(w2_ptr, k_first, d_offs, C, D), input_precision=DOT_PRECISION)
            if TWO_PIECES:
                pre = tl.dot(x_rest, _load_w_t(w1_ptr, k_rest, d_offs, C, D), pre, input_precision=DOT_PRECISION)
                dh = tl.dot(g_rest, _load_w(w2_ptr, k_rest, d_offs, C, D), dh, input_precision=DOT_PRECISION)
        else:
            pre = _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C, D, BLOCK_M, BLOCK_K, BLOCK_D,
                                DOT_PRECISION)
            dh = _streamed_dh(dy_ptr, gamma_ptr, w2_ptr, rows, row_mask, row_scale, d_offs, C, D, BLOCK_M,
                              BLOCK_K, BLOCK_D, HAS_GAMMA, HAS_SCALE, DOT_PRECISION)
        pre += tl.load(b1_ptr + d_offs, mask=d_offs < D, other=0.0)[None, :]
        dpre = dh * _activation_grad(pre, ACT)
        if STORE_HIDDEN:
            _store_hidden(h_ptr, dpre_ptr, db1_part_ptr, pre, dpre, pid_m, rows, row_mask, d_offs, M, D, BLOCK_M,
                          BLOCK_D, PART_ROWS, ACT)
        dx = tl.dot(dpre.to(x_ptr.dtype.element_ty), _load_w(w1_ptr, d_offs, n_offs, D, C), dx,
                    input_precision=DOT_PRECISION)

    offs = rows[:, None] * C + n_offs[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
    if STORE_HIDDEN:
        n_parts = tl.cdiv(M, PART_ROWS)
        g_n = _load_g(dy_ptr, gamma_ptr, rows, row_mask, row_scale, n_offs, C, HAS_GAMMA)
        _store_row_group_sums(db2_part_ptr, g_n, pid_m, n_offs, n_mask, n_parts, C, BLOCK_M, BLOCK_N, PART_ROWS)
        if HAS_Y2:
            dy_n = _load_rows(dy_ptr, rows, row_mask, n_offs, C).to(tl.float32)
            y2_n = _load_rows(y2_ptr, rows, row_mask, n_offs, C).to(tl.float32)
            _store_row_group_sums(dgamma_part_ptr, dy_n * row_scale[:, None] * y2_n, pid_m, n_offs, n_mask,
                                  n_parts, C, BLOCK_M, BLOCK_N, PART_ROWS)


@triton.jit
def _mlp_bwd_dw_kernel(
    x_ptr,  # [M, C] activation dtype
    dy_ptr,  # [M, C] activation dtype
    h_ptr,  # [M, D] activation dtype
    dpre_ptr,  # [M, D] activation dtype
    gamma_ptr,  # [C] fp32 (HAS_GAMMA)
    scale_ptr,  # [N] fp32 (HAS_SCALE)
    y2_ptr,  # [M, C] activation dtype (HAS_Y2)
    dw1_part_ptr,  # [NUM_SEGMENTS, D, C] fp32, NUM_SEGMENTS = cdiv(M, SEGMENT_ROWS)
    dw2_part_ptr,  # [NUM_SEGMENTS, C, D] fp32
    db2_part_ptr,  # [NUM_SEGMENTS, C] fp32 (VECTOR_SUMS)
    dgamma_part_ptr,  # [NUM_SEGMENTS, C] fp32 (VECTOR_SUMS and HAS_Y2)
    M,
    HW,
    SEGMENT_ROWS,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VECTOR_SUMS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_Y2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # one GEMM per program over the segment's rows: programs [0, D_TILES) dW1^T[c-tile, chunk] += x^T dpre, programs
    # [D_TILES, 2 D_TILES) dW2[c-tile, chunk] += g^T h, one accumulator each (up to 32K fp32 without spills); the
    # dW1 programs of the first D chunk then sum the C-wide db2 and dgamma (VECTOR_SUMS; else the fused dx kernel
    # wrote them) in a second pass over dy (and y2), which keeps the sums out of the dW2 loop's registers
    D_TILES: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    is_dw2 = tl.program_id(0) >= D_TILES
    pid_d = tl.program_id(0) % D_TILES
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    first_row = pid_s * SEGMENT_ROWS  # SEGMENT_ROWS is a multiple of BLOCK_M
    last_row = tl.minimum(first_row + SEGMENT_ROWS, M)
    seg = pid_s.to(tl.int64)
    mask = c_mask[:, None] & d_mask[None, :]
    if is_dw2:
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + c_offs, mask=c_mask, other=0.0)
        dw2 = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for row0 in range(first_row, last_row, BLOCK_M):
            rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # row0 < M fits i32
            row_mask = rows < M
            dys = _load_rows(dy_ptr, rows, row_mask, c_offs, C).to(tl.float32)
            dys = dys * _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE)[:, None]
            g = dys * gamma[None, :] if HAS_GAMMA else dys
            h = _load_rows(h_ptr, rows, row_mask, d_offs, D)
            dw2 = tl.dot(tl.trans(g.to(h.dtype)), h, dw2, input_precision=DOT_PRECISION)
        tl.store(dw2_part_ptr + seg * C * D + c_offs[:, None] * D + d_offs[None, :], dw2, mask=mask)
    else:
        # [BLOCK_C, BLOCK_D] = x tile^T @ dpre chunk, the same accumulator layout as dW2
        dw1_t = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for row0 in range(first_row, last_row, BLOCK_M):
            rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < M
            x_c = _load_rows(x_ptr, rows, row_mask, c_offs, C)
            dpre = _load_rows(dpre_ptr, rows, row_mask, d_offs, D)
            dw1_t = tl.dot(tl.trans(x_c), dpre, dw1_t, input_precision=DOT_PRECISION)
        tl.store(dw1_part_ptr + seg * D * C + d_offs[None, :] * C + c_offs[:, None], dw1_t, mask=mask)
        if VECTOR_SUMS:
            if pid_d == 0:
                _store_vector_sums(dy_ptr, gamma_ptr, scale_ptr, y2_ptr, db2_part_ptr, dgamma_part_ptr, seg, c_offs,
                                   c_mask, first_row, last_row, M, HW, C, BLOCK_M, BLOCK_C, HAS_GAMMA, HAS_SCALE,
                                   HAS_Y2)


@triton.jit
def _store_vector_sums(dy_ptr, gamma_ptr, scale_ptr, y2_ptr, db2_part_ptr, dgamma_part_ptr, seg, c_offs, c_mask,
                       first_row, last_row, M, HW, C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       HAS_GAMMA: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_Y2: tl.constexpr):
    # the segment's db2 = sum g and dgamma = sum dy * scale * y2 partials for one C tile (fp32, rows in order)
    db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dgamma = tl.zeros([BLOCK_C], dtype=tl.float32)
    for row0 in range(first_row, last_row, BLOCK_M):
        rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        dys = _load_rows(dy_ptr, rows, row_mask, c_offs, C).to(tl.float32)
        dys = dys * _row_scale(scale_ptr, rows, row_mask, HW, HAS_SCALE)[:, None]
        db2 += tl.sum(dys, axis=0)
        if HAS_Y2:
            dgamma += tl.sum(dys * _load_rows(y2_ptr, rows, row_mask, c_offs, C).to(tl.float32), axis=0)
    if HAS_GAMMA:
        db2 = db2 * tl.load(gamma_ptr + c_offs, mask=c_mask, other=0.0)
    tl.store(db2_part_ptr + seg * C + c_offs, db2, mask=c_mask)
    if HAS_Y2:
        tl.store(dgamma_part_ptr + seg * C + c_offs, dgamma, mask=c_mask)


@triton.jit
def _bf16_dot_probe_kernel(a_ptr, b_ptr, out_ptr):  # [16, 16] bf16, [16, 16] bf16, [16, 16] fp32
    offs = tl.arange(0, 16)
    tile = offs[:, None] * 16 + offs[None, :]
    tl.store(out_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPE = DTYPE_NAMES
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _cfg(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=num_warps,
                num_stages=num_stages)


def _hidden_cfg(BLOCK_M, BLOCK_D, BLOCK_K, num_warps, num_stages) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages)


def _dw_cfg(BLOCK_M, BLOCK_C, BLOCK_D, num_warps, num_stages) -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)


# One small deterministic config per kernel for the interpreter (no autotuning there): C <= 32 takes the
# fused/resident-x paths, wider C the two-GEMM and streamed ones.
_INTERPRETER_MN = _cfg(32, 32, 32, 32, 1, 1)
_INTERPRETER_HIDDEN = _hidden_cfg(32, 32, 32, 1, 1)
_INTERPRETER_DW = _dw_cfg(32, 32, 32, 1, 1)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


# Candidate configs per (C, D, dtype) bucket, compiled for sm_80 and sm_90 without spills (compile_targets).
# fp16/bf16 tiles are chosen so that every tl.dot is at least 64x64 per warpgroup (sm_90: wgmma m64 n>=64):
# Triton gives each group of 4 warps 64 rows of the output tile when BLOCK_M allows, else splits the columns,
# so BLOCK_M = 16 * num_warps and the dot's N >= 64 (a 64-row tile in 8 warps would give n = N / 2).
def _fwd_configs(C: int, D: int, dtype: str) -> List[dict]:
    """Fused forward (fc1 + act + fc2 in one kernel): BLOCK_N covers all of C up to 128."""
    cp = _pow2(C)
    if dtype == "fp32":  # "ieee" dots run on FMA units: small register tiles
        return [_cfg(32, min(cp, 64), min(cp, 32), 32, 4, 2)]
    block_n = max(64, min(cp, 128))
    return [_cfg(128, block_n, min(block_n, 64) if cp > 128 else block_n, 64, 8, 3),
            _cfg(64, block_n, min(block_n, 64) if cp > 128 else block_n, 64, 4, 3)]


def _gemm_configs(C: int, D: int, dtype: str) -> List[dict]:
    """[M, D] @ [D, C] with the fused epilogues (fc2 of the two-GEMM forward, dx = dpre W1); BLOCK_D is the
    K step (BLOCK_K unused)."""
    cp = _pow2(C)
    if dtype == "fp32":
        return [_cfg(32, min(cp, 64), 32, 32, 4, 2)]
    # 256x128: 32K outputs per program, so each [M, D] row tile and [D, C] column tile is read from L2 once per
    # 32K outputs instead of 16K (128x256 spilled on sm_80 with the full epilogue)
    return [_cfg(256 if cp >= 128 else 128, max(64, min(cp, 128)), 64, 64, 8, 3)]


def _fc2_configs(C: int, D: int, dtype: str) -> List[dict]:
    """fc2 of the two-GEMM forward: _gemm_configs' tiles, cut where a Triton release spills fc2's full epilogue
    (y2 stored, gamma and drop path applied); _triton_compat.CONFIG_CHOICES, Triton 3.9 keeps _gemm_configs':
    fp16/bf16 at most `mlp.fc2_rows` rows (before 3.9, 256x128 spilled 40 B on sm_80 at C = 384 and 768: 128x128),
    fp32 K steps of `mlp.fc2_fp32_k_step` (before 3.9, 32-wide steps spilled 8-16 B on sm_90 with tf32 at C = 96; a
    K step does not change the reduction order)."""
    if dtype == "fp32":
        return [dict(cfg, BLOCK_D=config_choice("mlp.fc2_fp32_k_step")) for cfg in _gemm_configs(C, D, dtype)]
    return [dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], config_choice("mlp.fc2_rows"))) for cfg in _gemm_configs(C, D, dtype)]


def _dx_gemm_configs(C: int, D: int, dtype: str) -> List[dict]:
    """dx = dpre W1: 128x256 where one 256-wide tile covers C (C = 192: 0.91x the L2 operand bytes per output of
    256x128, whose second C tile is half empty); fc2's fuller epilogue spilled 40 B on sm_80 with that tile."""
    if dtype != "fp32" and _pow2(C) == 256:
        return [_cfg(128, 256, 64, 64, 8, 3)]
    # before Triton 3.9 (_triton_compat "mlp.dx_gemm_rows"), 256x128 spilled 8 B on sm_80 at C = 384 and 768: 128 rows
    rows = config_choice("mlp.dx_gemm_rows") if dtype != "fp32" else 256
    return [dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], rows)) for cfg in _gemm_configs(C, D, dtype)]


def _hidden_configs(C: int, D: int, dtype: str) -> List[dict]:
    """fc1 + b1 + act -> h, one [BLOCK_M, BLOCK_D] tile per program."""
    if dtype == "fp32":
        return [_hidden_cfg(32, 64, 32, 4, 2)]
    # 32K outputs per program (see _gemm_configs), wgmma n256, from C = 192 (at C = 192 it spilled until the activation
    # ran by column quarters)
    # (from C = `mlp.fc1_wide_from`, _triton_compat: before Triton 3.9 128x256 spilled 8 B on sm_80 at C = 192 with pre
    # stored, in 3 stages or 4, so those releases start at 384)
    if C >= config_choice("mlp.fc1_wide_from"):
        return [_hidden_cfg(128, 256, 64, 8, 4)]
    return [_hidden_cfg(128, 128, 64, 8, 3)]


def _hidden_bwd_configs(C: int, D: int, dtype: str) -> List[dict]:
    """Recompute pre, dh = g W2 -> dpre, h: two fp32 [BLOCK_M, BLOCK_D] accumulators."""
    if dtype == "fp32":
        return [_hidden_cfg(32, 32, 32, 4, 2)]
    # 128x128 (x and g rows read from L2 once per 128 hidden columns, act' and stores per column half; 128x64 read
    # them 1.5x as often). Narrower K steps below C = 768 keep ptxas under a spill: at C = 384 64-wide steps spilled
    # 16 B on sm_80 (3 stages) and 32-wide ones 16-24 B on sm_90 with 3 stages; at C = 192 32-wide steps spilled 8 B
    if C & (C - 1) == 0:
        # power-of-two C (ConvNeXt-B's 256..1024): a launch drops the C masks, and the 128x128 tiles then spilled 64 B
        # on sm_90 at every K step tried (launch-specialized compiles, gamma with and without drop path)
        return [_hidden_cfg(128, 64, 64, 8, 3)]
    # before Triton 3.9 (_triton_compat "mlp.hidden_bwd_k64_from_768"), 64-wide steps spilled 8 B on sm_90 at C = 768
    if C >= 768 and config_choice("mlp.hidden_bwd_k64_from_768"):
        return [_hidden_cfg(128, 128, 64, 8, 3)]
    if C >= 384:
        return [_hidden_cfg(128, 128, 32, 8, 2)]
    if C >= 192:
        return [_hidden_cfg(128, 128, 16, 8, 3)]
    return [_hidden_cfg(128, 64, 64, 8, 3)]


def _hidden_bwd_pre_configs(C: int, D: int, dtype: str) -> List[dict]:
    """dh = g W2 -> dpre, h with pre read back from the forward's copy: one fp32 [BLOCK_M, BLOCK_D] accumulator."""
    if dtype == "fp32":
        return _hidden_bwd_configs(C, D, dtype)
    # before Triton 3.9 (_triton_compat "mlp.hidden_bwd_pre_wide"), 128x256 spilled 8-264 B (sm_80 and sm_90, C = 192-768)
    if (C & (C - 1) == 0 and C >= 1024) or not config_choice("mlp.hidden_bwd_pre_wide"):
        # ConvNeXt-B's last stage: launches without C masks spilled 136-160 B at 128x256 (sm_90, 64- and 32-wide K steps)
        return [_hidden_cfg(128, 128, 64, 8, 3)]
    return [_hidden_cfg(128, 256, 64, 8, 3)]


def _fc1_pre_configs(C: int, D: int, dtype: str) -> List[dict]:
    """fc1 + b1 -> pre for the hidden backward: fc1 + act's tiles, except where a Triton release spills its 128x256 tile
    (_triton_compat "mlp.fc1_pre_wide": before 3.9, 16 B on sm_80 at C = 768), which then takes 128x128."""
    if dtype == "fp32" or C < 192 or config_choice("mlp.fc1_pre_wide"):
        return _hidden_configs(C, D, dtype)
    return [_hidden_cfg(128, 128, 64, 8, 3)]


def _dx_configs(C: int, D: int, dtype: str) -> List[dict]:
    """Fused dx kernel for C <= BLOCK_N (recomputes pre and dh, stores dpre and h for the dW GEMMs)."""
    cp = _pow2(C)
    if dtype == "fp32":
        return [_cfg(32, min(cp, 32), min(cp, 32), 32, 4, 2)]
    block_n = max(64, min(cp, 128))
    # x and g rows resident (loaded once, not once per hidden chunk) where they need no zero padding: C a power of two,
    # or cp / 2 plus a power of two >= 16 (C = 96: 64 + 32; the padded 128-wide tiles spilled 24-72 B on sm_80).
    # Else streamed in 16-wide K steps, one stage (64- or 32-wide steps spilled with drop path on)
    # Where a Triton release spills the two resident pieces, `mlp.dx_two_pieces_streamed` (_triton_compat) gives the
    # streamed (BLOCK_K, BLOCK_D) it takes instead (Triton 3.4/3.5 at C = 96 on sm_80: 72-192 B resident, 8-16 B streamed
    # in 64-wide hidden chunks, none in 32-wide ones)
    rest = C - cp // 2
    if C == cp:
        return [_cfg(128, block_n, cp, 64, 8, 1)]
    if rest >= 16 and rest & (rest - 1) == 0:
        streamed = config_choice("mlp.dx_two_pieces_streamed")
        return [_cfg(128, block_n, cp, 64, 8, 1) if streamed is None else _cfg(128, block_n, *streamed, 8, 1)]
    return [_cfg(128, block_n, 16, 64, 8, 1)]


def _dw_configs(C: int, D: int, dtype: str) -> List[dict]:
    """dW GEMMs: the dW1^T and dW2 accumulators [BLOCK_C, BLOCK_D] stay in registers."""
    cp = _pow2(C)
    if dtype == "fp32":
        # BLOCK_D=16 at C > 64 keeps ptxas below a stack spill on sm_90 (compile_check).
        return [_dw_cfg(32, min(cp, 32), 32 if cp <= 64 else 16, 4, 1)]
    if cp <= 64:
        return [_dw_cfg(64, 64, 64, 4, 2)]
    # one accumulator per program (dW1 or dW2), 32-row steps (64 spilled 8 B on sm_80 in bf16 at 128x128). 32K-output
    # tiles from C = 129: each row step reads BLOCK_C + BLOCK_D operand columns from L2 per BLOCK_C x BLOCK_D outputs,
    # so 128x256 costs 3/4 of 128x128's L2 bytes; 256x128 where one 256-wide C tile covers C (no half-empty second
    # tile at C = 192). C <= 128 keeps 128x128: it is HBM-bound there and a 256-wide tile pads more of the wgmma work
    # (`mlp.dw_wide_tiles`, _triton_compat: Triton 3.4/3.5 spilled 8-128 B on sm_80 with 32K-output tiles and keep 128x128)
    if cp <= 128 or not config_choice("mlp.dw_wide_tiles"):
        return [_dw_cfg(32, 128, 128, 8, 1)]
    if cp == 256:
        return [_dw_cfg(32, 256, 128, 8, 1)]
    return [_dw_cfg(32, 128, 256, 8, 1)]


def _to_triton_configs(configs: List[dict]) -> List[triton.Config]:
    out = []
    for cfg in configs:
        meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
        out.append(triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


# kind -> (jit function, GPU candidates, interpreter config)
_KERNEL_TABLE = {
    "fwd": (lambda: _mlp_fwd_kernel, _fwd_configs, _INTERPRETER_MN),
    "hidden": (lambda: _mlp_hidden_kernel, _hidden_configs, _INTERPRETER_HIDDEN),
    "fc2": (lambda: _mlp_fwd_kernel, _fc2_configs, _INTERPRETER_MN),
    "dx": (lambda: _mlp_bwd_dx_kernel, _dx_configs, _INTERPRETER_MN),
    "hidden_bwd": (lambda: _mlp_hidden_kernel, _hidden_bwd_configs, _INTERPRETER_HIDDEN),
    "hidden_bwd_pre": (lambda: _mlp_hidden_kernel, _hidden_bwd_pre_configs, _INTERPRETER_HIDDEN),
    "fc1_pre": (lambda: _mlp_hidden_kernel, _fc1_pre_configs, _INTERPRETER_HIDDEN),
    "dx_gemm": (lambda: _mlp_fwd_kernel, _dx_gemm_configs, _INTERPRETER_MN),
    "dw": (lambda: _mlp_bwd_dw_kernel, _dw_configs, _INTERPRETER_DW),
}


def _config(kind: str, C: int, D: int, dtype: str, gpu: bool = False) -> dict:
    """The config a launch of `kind` uses with autotuning off (the interpreter's in the interpreter, unless
    `gpu`: what a GPU launch would use)."""
    fn, configs, interpreter_cfg = _KERNEL_TABLE[kind]
    return interpreter_cfg if interpreting() and not gpu else configs(C, D, dtype)[0]


def _two_gemm_forward(C: int, D: int, dtype: str, precision: str = "ieee", gpu: bool = False) -> bool:
    """Whether the forward runs as two GEMM kernels (h stored once) rather than the fused kernel.

    Rule: the fused kernel while C fits one output tile of its config, two GEMMs beyond. Why: the fused kernel
    recomputes fc1 once per C-out tile beyond the first, which costs a whole M x C x D matmul per extra tile, while
    the split pays 2 * M * D bytes of h (written, read back), a fraction of that time at every ConvNeXt width
    (fastconvnext.tooling.mlp_paths costs both on the performance model; tests check that it agrees). The rule reads
    the GPU's tile in the interpreter too, so the interpreter runs the plan a GPU runs at the same C."""
    return triton.cdiv(C, _config("fwd", C, D, dtype, gpu=True)["BLOCK_N"]) > 1


def _fused_dx(C: int, D: int, dtype: str, gpu: bool = False) -> bool:
    """Whether backward uses the fused dx kernel (one C tile: pre, dh, dx and the dpre/h stores in one pass)
    rather than the hidden-backward kernel followed by the dx GEMM."""
    return _config("dx", C, D, dtype, gpu)["BLOCK_N"] >= C


def _kinds(C: int, D: int, dtype: str, precision: str, training: bool, gpu: bool = False,
           saved_pre: bool = False) -> List[str]:
    """The kernels one call launches, in order (x and weight gradients wanted in training; `saved_pre`: the forward
    keeps pre for backward, see `_saves_pre`)."""
    kinds = ["hidden", "fc2"] if _two_gemm_forward(C, D, dtype, precision, gpu) else ["fwd"]
    if training:
        if _fused_dx(C, D, dtype, gpu):
            kinds.append("dx")
        elif saved_pre:
            kinds += ["hidden_bwd_pre", "dx_gemm"]
        elif _two_pass_hidden_backward(C, D, dtype, precision, gpu or not interpreting()):
            kinds += ["fc1_pre", "hidden_bwd_pre", "dx_gemm"]
        else:
            kinds += ["hidden_bwd", "dx_gemm"]
        kinds.append("dw")
    return kinds


# Rule of the hidden backward where pre is not at hand: two passes (fc1_pre, then the one-accumulator kernel) from
# this C on, by dot precision; None: never. Why: the second pass's tiles cost fewer L2 operand bytes per output than
# the two-accumulator kernel, which outweighs pre's extra HBM round trip once C is wide; fp32 without TF32 is
# FMA-bound either way. For fp16/bf16 the split's tiles depend on the release: 128x256 from Triton 3.9
# ("mlp.hidden_bwd_pre_wide", "mlp.fc1_pre_wide" in _triton_compat), where it wins from C = 512 and loses at
# C = 320-384 (the half-empty last 256-wide tile); with the 128x128 tiles of older releases it wins only at
# C = 512, 1024, 2048 (model split/unsplit 0.77 / 0.72 / 0.69 on H100) and loses at 640-768 (1.08-1.09), hence
# multiples of 512 there. tests/test_tooling_wall.py checks this against the performance model
# (fastconvnext.tooling.mlp_paths) at every ConvNeXt width, on the installed release.
_TWO_PASS_FROM_C = {"bf16": 512, "fp16": 512, "tf32": 256, "ieee": None}
_TWO_PASS_NARROW_MULTIPLE = 512


def _two_pass_hidden_backward(C: int, D: int, dtype: str, precision: str = "ieee", gpu: bool = False) -> bool:
    """Whether backward (pre not saved) recomputes pre in a GEMM of its own (`fc1_pre`: pre stored [M, D] for this
    backward only) and then runs the one-accumulator hidden backward on it, rather than the kernel that recomputes
    pre and dh side by side in two 128x128 accumulators: see _TWO_PASS_FROM_C."""
    start = _TWO_PASS_FROM_C[precision if dtype == "fp32" else dtype]
    if start is None or C < start:
        return False
    if dtype == "fp32" or (config_choice("mlp.hidden_bwd_pre_wide") and config_choice("mlp.fc1_pre_wide")):
        return True
    return C % _TWO_PASS_NARROW_MULTIPLE == 0


# The forward keeps pre = x W1^T + b1 ([M, D], activation dtype) for backward while H * W * D per image is at most
# this: ConvNeXt-T/S/B's last stage at 224x224 (7 x 7 x 4C, C <= 1024), where the hidden is smallest. Backward then
# skips recomputing pre (one M*C*D matmul of its five). ConvNeXt-T fp32: 3 blocks x 49 x 3072 x 4 B = 1.7 MiB per
# image; at the earlier stages (4x, 16x, 64x as many hidden elements per image) pre stays recomputed.
_SAVED_PRE_PER_IMAGE = 7 * 7 * 4096


def _saves_pre(HW: int, C: int, D: int, dtype: str, precision: str, gpu: bool = False) -> bool:
    """Whether a training forward at this shape keeps pre for backward: where the hidden per image is small (see
    _SAVED_PRE_PER_IMAGE) and the forward materialises pre anyway (two-GEMM forward) for a backward that would
    recompute it in the hidden-backward kernel (not the fused dx kernel)."""
    return (HW * D <= _SAVED_PRE_PER_IMAGE and _two_gemm_forward(C, D, dtype, precision, gpu)
            and not _fused_dx(C, D, dtype, gpu))


def _m_bucket(M: int) -> int:
    """Autotune bucket of the row count: batch-1 inference and batch-256 training never share a choice."""
    return triton.next_power_of_2(max(M, 1))


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, C: int, D: int, dtype: str, m_bucket: int, flags: tuple):
    """The autotuned kernel for one (C, D, dtype, M bucket, flags) bucket (GPU only). Each bucket has its own
    autotuner (one choice per bucket); the compiled binaries are shared through the jit function's cache."""
    fn, configs, _ = _KERNEL_TABLE[kernel_name]
    return triton.autotune(configs=_to_triton_configs(configs(C, D, dtype)), key=["C", "D"])(fn())


def _select(kernel_name: str, C: int, D: int, dtype: torch.dtype, M: int, flags: dict):
    """(kernel, config) for a launch; config None means the autotuner picks among the candidates.

    Every candidate of one kernel reduces in the same order (see `_same_reduction_order`), so which one the
    autotuner picks does not change the bits."""
    fn, configs, interpreter_cfg = _KERNEL_TABLE[kernel_name]
    if interpreting():
        return fn(), interpreter_cfg
    candidates = configs(C, D, _TRITON_DTYPE[dtype])
    if len(candidates) == 1 or not autotune_enabled():
        return fn(), candidates[0]
    return _tuned(kernel_name, C, D, _TRITON_DTYPE[dtype], _m_bucket(M), tuple(sorted(flags.items()))), None


def _same_reduction_order(kernel_name: str, configs: List[dict]) -> bool:
    """Whether the candidates reduce every output element in the same order, and take the same path.

    The dots chain their K steps through the fp32 accumulator (one MMA/FMA k-step after another), so the
    blocking of K (BLOCK_K, BLOCK_D of the GEMMs, BLOCK_M of the dW kernel) does not change the order. What
    does: the tree of a tl.sum, fixed by the tile shape and warp count (the db1 row-group sums of the dx and
    hidden-backward kernels, the dW kernel's column sums and segment split), hence one config for those; the
    forward candidates share BLOCK_N, which decides the fused/two-GEMM path."""
    if kernel_name in ("dx", "hidden_bwd", "hidden_bwd_pre", "dw"):
        return len(configs) == 1
    if kernel_name == "fwd":
        return len({c["BLOCK_N"] for c in configs}) == 1
    return True


def _launch(kernel_name: str, grid_fn, args: tuple, C: int, D: int, dtype: torch.dtype, M: int, **flags):
    kernel, cfg = _select(kernel_name, C, D, dtype, M, flags)
    if cfg is None:
        kernel[grid_fn](*args, C=C, D=D, **flags, enable_fp_fusion=FP_FUSION)
        return
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    kernel[grid_fn(meta)](*args, C=C, D=D, **meta, **flags, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"], enable_fp_fusion=FP_FUSION)


def _tf32_allowed() -> bool:
    """Whether eager fp32 matmuls on CUDA may use TF32, read through either torch API without raising.

    torch 2.13 raises on reading the legacy `allow_tf32` once TF32 was set through the fp32_precision API
    (torch.backends.cuda.matmul.fp32_precision or torch.backends.fp32_precision); the new attribute reports
    both (the matmul one inherits the global one when "none")."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    if getattr(torch.backends, "fp32_precision", None) == "tf32":
        return True
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and _tf32_allowed():
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
def _params(x, fc1_weight, fc1_bias, fc2_weight, gamma, sample_scale):
    """Weights in x's dtype for the dots, small vectors in fp32 (dummies for absent ones)."""
    w1 = fc1_weight.to(x.dtype).contiguous()
    w2 = fc2_weight.to(x.dtype).contiguous()
    b1 = fc1_bias.to(torch.float32).contiguous()
    dummy = b1
    g = gamma.to(torch.float32).contiguous() if gamma is not None else dummy
    s = sample_scale.to(torch.float32).contiguous() if sample_scale is not None else dummy
    return w1, b1, w2, g, s


@functools.lru_cache(maxsize=4)
def _interpreter_bf16_dot_ok(create_dot) -> bool:
    """Whether the interpreter's tl.dot (create_dot, the key) multiplies bf16 correctly: one 16x16 probe.
    Triton 3.9's reads the raw bf16 bits as integers (results ~1e10)."""
    a = torch.eye(16, dtype=torch.bfloat16)
    b = torch.arange(256, dtype=torch.float32).reshape(16, 16).to(torch.bfloat16)
    out = torch.empty(16, 16)
    _bf16_dot_probe_kernel[(1,)](a, b, out)
    return torch.equal(out, b.float())


def _check_interpreter_dtype(dtype: torch.dtype) -> None:
    """Refuse dots that Triton's interpreter would compute wrongly, instead of returning garbage."""
    if dtype != torch.bfloat16 or not interpreting():
        return
    from triton.runtime import interpreter

    if not _interpreter_bf16_dot_ok(interpreter.interpreter_builder.create_dot):
        raise TypeError("convnext_mlp: bfloat16 cannot run in Triton's interpreter (TRITON_INTERPRET=1): its "
                        "tl.dot misreads bf16 operands; use float16/float32 there, or a GPU for bfloat16")


def _keeps_pre(x, D: int, save_pre: bool) -> bool:
    """Whether a forward that may save for backward (`save_pre`) keeps pre at x's shape (see `_saves_pre`)."""
    N, H, W, C = x.shape
    return save_pre and _saves_pre(H * W, C, D, _TRITON_DTYPE[x.dtype], _dot_precision(x.dtype))


def _forward_outputs(x, D: int, save_y2: bool, save_pre: bool, out_dtype=None):
    """Uninitialised (out, y2, pre) of the forward op (empty placeholders for y2 and pre when not kept)."""
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    y2 = torch.empty_like(x) if save_y2 else x.new_empty(0)
    M = x.shape[0] * x.shape[1] * x.shape[2]
    pre = x.new_empty((M, D)) if _keeps_pre(x, D, save_pre) else x.new_empty(0)
    return out, y2, pre


def _forward_impl(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, act, save_y2,
                  out_dtype=None, save_pre=False):
    N, H, W, C = x.shape
    D = fc1_weight.shape[0]
    M, HW = N * H * W, H * W
    out, y2, pre = _forward_outputs(x, D, save_y2, save_pre, out_dtype)
    if M == 0:
        return out, y2, pre
    _check_interpreter_dtype(x.dtype)
    w1, b1, w2, g, s = _params(x, fc1_weight, fc1_bias, fc2_weight, gamma, sample_scale)
    b2 = fc2_bias.to(torch.float32).contiguous()
    precision = _dot_precision(x.dtype)
    epilogue = dict(HAS_BIAS=True, HAS_RESIDUAL=True, HAS_GAMMA=gamma is not None,
                    HAS_SCALE=sample_scale is not None, SAVE_Y2=save_y2, DOT_PRECISION=precision)
    y2_or_out = y2 if save_y2 else out
    with _device_guard(x.device):
        if _two_gemm_forward(C, D, _TRITON_DTYPE[x.dtype], precision):
            h = torch.empty((M, D), device=x.device, dtype=x.dtype)
            _launch("hidden", functools.partial(_grid, "hidden", M=M, C=C, D=D),
                    (x, x, w1, b1, w1, b1, b1, h, h, b1, pre if pre.numel() else h, M, HW), C, D, x.dtype, M,
                    PART_ROWS=_PART_ROWS, ACT=act, IS_BACKWARD=False, STORE_PRE=pre.numel() > 0, LOAD_PRE=False,
                    STORE_H=True,
                    HAS_GAMMA=False, HAS_SCALE=False, DOT_PRECISION=precision)
            _launch("fc2", functools.partial(_grid, "fc2", M=M, C=C, D=D),
                    (h, residual, w1, b1, w2, b2, g, s, out, y2_or_out, M, HW), C, D, x.dtype, M, ACT=act,
                    LOAD_H=True, B_KN=False, **epilogue)
        else:
            _launch("fwd", functools.partial(_grid, "fwd", M=M, C=C, D=D),
                    (x, residual, w1, b1, w2, b2, g, s, out, y2_or_out, M, HW), C, D, x.dtype, M, ACT=act,
                    LOAD_H=False, B_KN=False, **epilogue)
    return out, y2, pre


def _segments(M: int) -> Tuple[int, int]:
    """(segments, rows per segment) of the dW kernel's M split; depends only on M."""
    wanted = max(1, min(_MAX_SEGMENTS, triton.cdiv(M, _SEGMENT_ROWS)))
    rows = triton.cdiv(triton.cdiv(max(M, 1), wanted), _SEGMENT_ALIGN) * _SEGMENT_ALIGN
    return triton.cdiv(max(M, 1), rows), rows


def _num_segments(M: int) -> int:
    return _segments(M)[0]


def _grid(kind: str, meta: dict, M: int, C: int, D: int) -> tuple:
    """Programs of one launch (shared by the launchers and launch_plans)."""
    if kind == "dw":  # dW1 programs, then dW2 programs, along axis 0
        return (2 * triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(C, meta["BLOCK_C"]), _num_segments(M))
    if kind in ("hidden", "hidden_bwd", "hidden_bwd_pre", "fc1_pre"):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_D"]),)
    return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)


def _backward_hidden(dx, grad_out, x, w1, b1, w2, g, s, y2, pre, has_gamma, has_scale, act, want_x_side,
                     want_hidden):
    """Writes dx (when wanted). With `want_hidden` returns what the weight gradients need: h and dpre ([M, D],
    activation dtype), the fp32 db1 row-group partials, and (fused dx kernel only, else None) the fp32 db2 and
    dgamma row-group partials. `pre`: the forward's copy ([M, D]) or empty (recomputed)."""
    N, H, W, C = x.shape
    D = w1.shape[0]
    M, HW = N * H * W, H * W
    dtype, precision = _TRITON_DTYPE[x.dtype], _dot_precision(x.dtype)
    fused = want_x_side and _fused_dx(C, D, dtype)
    has_y2 = y2.numel() > 0
    h = dpre = db1_part = None
    n_parts = triton.cdiv(M, _PART_ROWS)
    if want_hidden or not fused:
        h = torch.empty((M, D), device=x.device, dtype=x.dtype)
        dpre = torch.empty_like(h)
        db1_part = torch.empty((n_parts, D), device=x.device, dtype=torch.float32)
    flags = dict(PART_ROWS=_PART_ROWS, ACT=act, HAS_GAMMA=has_gamma, HAS_SCALE=has_scale)
    if fused:
        vector_parts = None
        hidden = (x, x, b1, b1, b1)
        if want_hidden:
            vector_parts = [torch.empty((n_parts, C), device=x.device, dtype=torch.float32)]
            vector_parts.append(torch.empty_like(vector_parts[0]) if has_y2 else None)
            hidden = (h, dpre, db1_part, vector_parts[0], vector_parts[1] if has_y2 else vector_parts[0])
        _launch("dx", functools.partial(_grid, "dx", M=M, C=C, D=D),
                (x, grad_out, w1, b1, w2, g, s, y2 if has_y2 else x, dx, *hidden, M, HW), C, D, x.dtype, M, **flags,
                STORE_HIDDEN=want_hidden, HAS_Y2=has_y2 and want_hidden, DOT_PRECISION=precision)
        return h, dpre, db1_part, vector_parts
    if not pre.numel() and _two_pass_hidden_backward(C, D, dtype, precision, not interpreting()):
        # first pass: pre alone ([M, D], for this backward only), then the one-accumulator hidden backward
        pre = torch.empty((M, D), device=x.device, dtype=x.dtype)
        _launch("fc1_pre", functools.partial(_grid, "fc1_pre", M=M, C=C, D=D),
                (x, x, w1, b1, w1, b1, b1, h, h, b1, pre, M, HW), C, D, x.dtype, M, PART_ROWS=_PART_ROWS, ACT=act,
                IS_BACKWARD=False, STORE_PRE=True, LOAD_PRE=False, STORE_H=False, HAS_GAMMA=False, HAS_SCALE=False,
                DOT_PRECISION=precision)
    if pre.numel():  # dh = dy (diag(gamma) W2), pre read back
        w2_gamma = (g[:, None] * w2.float()).to(w2.dtype) if has_gamma else w2
        _launch("hidden_bwd_pre", functools.partial(_grid, "hidden_bwd_pre", M=M, C=C, D=D),
                (x, grad_out, w1, b1, w2_gamma, g, s, h, dpre, db1_part, pre, M, HW), C, D, x.dtype, M,
                **dict(flags, HAS_GAMMA=False), IS_BACKWARD=True, STORE_PRE=False, LOAD_PRE=True, STORE_H=True,
                DOT_PRECISION=precision)
    else:
        _launch("hidden_bwd", functools.partial(_grid, "hidden_bwd", M=M, C=C, D=D),
                (x, grad_out, w1, b1, w2, g, s, h, dpre, db1_part, h, M, HW), C, D, x.dtype, M, **flags,
                IS_BACKWARD=True, STORE_PRE=False, LOAD_PRE=False, STORE_H=True, DOT_PRECISION=precision)
    if want_x_side:
        _launch("dx_gemm", functools.partial(_grid, "dx_gemm", M=M, C=C, D=D),
                (dpre, x, w1, b1, w1, b1, b1, b1, dx, dx, M, HW), C, D, x.dtype, M, ACT=act, LOAD_H=True, B_KN=True,
                HAS_BIAS=False, HAS_RESIDUAL=False, HAS_GAMMA=False, HAS_SCALE=False, SAVE_Y2=False,
                DOT_PRECISION=precision)
    return h, dpre, db1_part, None


def _backward_dw(grad_out, x, h, dpre, g, s, y2, has_gamma, has_scale, vector_parts):
    """dW1, dW2, db2 and (with y2) dgamma as fp32 sums of partials; db2/dgamma from `vector_parts` when the dx
    kernel wrote them, else summed here."""
    N, H, W, C = x.shape
    D = dpre.shape[1]
    M, HW = N * H * W, H * W
    segments, segment_rows = _segments(M)
    has_y2 = y2.numel() > 0
    dw1_part = torch.empty((segments, D, C), device=x.device, dtype=torch.float32)
    dw2_part = torch.empty((segments, C, D), device=x.device, dtype=torch.float32)
    if vector_parts is None:
        vector_parts = [torch.empty((segments, C), device=x.device, dtype=torch.float32)]
        vector_parts.append(torch.empty_like(vector_parts[0]) if has_y2 else None)
        vector_sums = True
    else:
        vector_sums = False
    db2_part, dgamma_part = vector_parts
    args = (x, grad_out, h, dpre, g, s, y2 if has_y2 else x, dw1_part, dw2_part, db2_part,
            db2_part if dgamma_part is None else dgamma_part, M, HW, segment_rows)
    _launch("dw", functools.partial(_grid, "dw", M=M, C=C, D=D), args, C, D, x.dtype, M, VECTOR_SUMS=vector_sums,
            HAS_GAMMA=has_gamma, HAS_SCALE=has_scale, HAS_Y2=has_y2, DOT_PRECISION=_dot_precision(x.dtype))
    return dw1_part.sum(0), dw2_part.sum(0), db2_part.sum(0), (dgamma_part.sum(0) if has_y2 else None)


def _grad_like(t: Optional[torch.Tensor], wanted: bool, fallback: torch.Tensor) -> torch.Tensor:
    """A gradient buffer shaped like t, or an empty placeholder where that gradient is not computed."""
    if t is None:
        return fallback.new_empty(0)
    return torch.empty_like(t) if wanted else t.new_empty(0)


def _backward_grads(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, y2, want_x_side,
                    want_weight_side):
    """Uninitialised outputs of the backward op: (dx, dW1, db1, dW2, db2, dgamma); shared with the fake."""
    has_dgamma = want_weight_side and gamma is not None and y2.numel() > 0
    return (_grad_like(x, want_x_side, x), _grad_like(fc1_weight, want_weight_side, x),
            _grad_like(fc1_bias, want_weight_side, x), _grad_like(fc2_weight, want_weight_side, x),
            _grad_like(fc2_bias, want_weight_side, x), _grad_like(gamma, has_dgamma, fc2_bias))


def _backward_impl(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, y2, pre, act,
                   want_x_side, want_weight_side):
    grads = _backward_grads(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, y2, want_x_side,
                            want_weight_side)
    if x.numel() == 0 or not (want_x_side or want_weight_side):
        return tuple(g.zero_() for g in grads)
    _check_interpreter_dtype(x.dtype)
    dx, dw1, db1, dw2, db2, dgamma = grads
    grad_out = grad_out.contiguous()
    w1, b1, w2, g, s = _params(x, fc1_weight, fc1_bias, fc2_weight, gamma, sample_scale)
    has_gamma, has_scale = gamma is not None, sample_scale is not None
    with _device_guard(x.device):
        h, dpre, db1_part, vector_parts = _backward_hidden(dx, grad_out, x, w1, b1, w2, g, s, y2, pre, has_gamma,
                                                           has_scale, act, want_x_side, want_weight_side)
        if want_weight_side:
            dw1_f32, dw2_f32, db2_f32, dgamma_f32 = _backward_dw(grad_out, x, h, dpre, g, s, y2, has_gamma,
                                                                 has_scale, vector_parts)
            for grad, value in ((dw1, dw1_f32), (db1, db1_part.sum(0)), (dw2, dw2_f32), (db2, db2_f32)):
                grad.copy_(value)
            if dgamma.numel():
                dgamma.copy_(dgamma_f32)
    return dx, dw1, db1, dw2, db2, dgamma


# ---------------------------------------------------------------------------------------------
# torch.library ops, autograd and the functional wrapper
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastconvnext::convnext_mlp_fwd", mutates_args=())
def _mlp_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    gamma: Optional[torch.Tensor],
    sample_scale: Optional[torch.Tensor],
    act: str,
    save_y2: bool,
    out_dtype: Optional[torch.dtype] = None,
    save_pre: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, y2, pre); the dots run in x's dtype, out has out_dtype (default x's), residual is read in its own. pre
    ([M, D]) is kept for backward where `save_pre` and the shape call for it (`_keeps_pre`), else empty."""
    return _forward_impl(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, act,
                         save_y2, out_dtype, save_pre)


@_mlp_fwd_op.register_fake
def _(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, act, save_y2, out_dtype=None,
      save_pre=False):
    return _forward_outputs(x, fc1_weight.shape[0], save_y2, save_pre, out_dtype)


@torch.library.custom_op("fastconvnext::convnext_mlp_bwd", mutates_args=())
def _mlp_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    gamma: Optional[torch.Tensor],
    sample_scale: Optional[torch.Tensor],
    y2: torch.Tensor,
    pre: torch.Tensor,
    act: str,
    want_x_side: bool,
    want_weight_side: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, y2, pre,
                          act, want_x_side, want_weight_side)


@_mlp_bwd_op.register_fake
def _(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, y2, pre, act, want_x_side,
      want_weight_side):
    return _backward_grads(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, y2, want_x_side,
                           want_weight_side)


def _setup_context(ctx, inputs, output):
    x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, act = inputs[:9]
    ctx.act = act
    ctx.residual_dtype = residual.dtype
    ctx.has_gamma = gamma is not None
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, output[1], output[2])


def _mlp_backward(ctx, grad_out, _grad_y2, _grad_pre):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, y2, pre = ctx.saved_tensors
    need = ctx.needs_input_grad
    want_x_side = need[0]
    want_weight_side = need[2] or need[3] or need[4] or need[5] or (ctx.has_gamma and need[6])
    dx, dw1, db1, dw2, db2, dgamma = _mlp_bwd_op(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                 gamma, sample_scale, y2, pre, ctx.act, want_x_side,
                                                 want_weight_side)

    def pick(t, i):
        return t if need[i] else None

    d_residual = grad_out.to(ctx.residual_dtype) if need[1] else None
    d_gamma = dgamma if (ctx.has_gamma and need[6]) else None
    return (pick(dx, 0), d_residual, pick(dw1, 2), pick(db1, 3), pick(dw2, 4), pick(db2, 5), d_gamma,
            None, None, None, None, None)


_mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_setup_context)


# Autocast: eager's F.linear is on both CPU's and CUDA's low-precision lists, so under autocast(dtype) the
# rule hands the kernel x and the fc weights/biases in that dtype (fp32 accumulation inside), keeps gamma and
# sample_scale fp32, and gives the output eager's dtype: residual + gamma * linear_out promotes to fp32 with
# an fp32 gamma or residual. Registered for the AutocastCUDA and AutocastCPU keys (and for the Python
# dispatcher, which torch.compile traces through).
def _eager_out_dtype(residual: torch.Tensor, gamma: Optional[torch.Tensor], linear_dtype: torch.dtype):
    branch = linear_dtype if gamma is None else torch.promote_types(gamma.dtype, linear_dtype)
    return torch.promote_types(residual.dtype, branch)


def _autocast_rule(device_type: str):
    key = autocast_key(device_type)

    def forward_in_autocast_dtype(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale,
                                  act, save_y2, out_dtype=None, save_pre=False):
        dtype = torch.get_autocast_dtype(device_type)
        out_dtype = out_dtype or _eager_out_dtype(residual, gamma, dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return _mlp_fwd_op(x.to(dtype), residual, fc1_weight.to(dtype), fc1_bias.to(dtype),
                               fc2_weight.to(dtype), fc2_bias.to(dtype), gamma, sample_scale, act, save_y2,
                               out_dtype, save_pre)

    return forward_in_autocast_dtype


register_autocast_rules("convnext_mlp_fwd", _autocast_rule)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the dots will run in: autocast's when it is on for x's device, else x's."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check(cond: bool, exc, message: str):
    if not cond:
        raise exc(message)


def _validate(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale):
    tensors = dict(x=x, residual=residual, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                   fc2_bias=fc2_bias, gamma=gamma, sample_scale=sample_scale)
    for name, t in tensors.items():
        _check(t is None and name in ("gamma", "sample_scale") or isinstance(t, torch.Tensor), TypeError,
               f"convnext_mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check(isinstance(act, str) and act in FUSED_ACTS, ValueError,
           f"convnext_mlp: act must be one of {FUSED_ACTS}, got {act!r}")
    _check(x.dtype in _TRITON_DTYPE, TypeError,
           f"convnext_mlp: x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(x.dim() == 4, ValueError, f"convnext_mlp: x must be [N, H, W, C], got shape {tuple(x.shape)}")
    N, H, W, C = x.shape
    D = fc1_weight.shape[0] if fc1_weight.dim() == 2 else -1
    expected = dict(residual=(N, H, W, C), fc1_weight=(D, C), fc1_bias=(D,), fc2_weight=(C, D), fc2_bias=(C,),
                    gamma=(C,), sample_scale=(N,))
    for name, shape in expected.items():
        t = tensors[name]
        if t is None:
            continue
        _check(tuple(t.shape) == shape, ValueError,
               f"convnext_mlp: {name} must have shape {shape} (x is {tuple(x.shape)}, D={D}), got {tuple(t.shape)}")
        _check(t.device == x.device, ValueError,
               f"convnext_mlp: {name} is on {t.device}, expected x's device {x.device}")
        _check(t.is_floating_point() and t.dtype in _TRITON_DTYPE, TypeError,
               f"convnext_mlp: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    _check(C >= 1 and D >= 1, ValueError, f"convnext_mlp: need C >= 1 and D >= 1, got C={C}, D={D}")
    _check(residual.dtype == x.dtype, TypeError,
           f"convnext_mlp: residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    for name in ("x", "residual"):
        _check(tensors[name].is_contiguous(), ValueError,
               f"convnext_mlp: {name} must be contiguous in [N, H, W, C] order (a channels_last NCHW tensor "
               f"seen through .permute(0, 2, 3, 1)); got strides {tuple(tensors[name].stride())}")
    if x.is_cuda:
        _check(not interpreting(), ValueError, "convnext_mlp: CUDA tensors cannot run with TRITON_INTERPRET=1")
    else:
        _check(interpreting() and x.device.type == "cpu", ValueError,
               f"convnext_mlp: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
               f"set before import), got device {x.device}")


def convnext_mlp(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu",
                 sample_scale=None):
    """residual + sample_scale[n] * gamma * (act(x W1^T + b1) W2^T + b2), x/residual [N, H, W, C] NHWC.

    Same result as `reference.convnext_mlp_reference`, returned in x's dtype (under autocast in eager's
    dtype, see `_autocast_rule`); differentiable in x, residual, both weights and biases and gamma. Under
    forward-mode AD (torch.func.jvp/jacfwd/vmap, forward_ad dual tensors) it runs the eager reference, whose
    ops carry those rules. bfloat16 is refused in Triton's interpreter (its tl.dot is wrong there).
    """
    _validate(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale)
    tensors = (x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale)
    if forward_mode_ad(*tensors):
        return convnext_mlp_reference(*tensors[:7], act=act, sample_scale=sample_scale)
    _check_interpreter_dtype(_compute_dtype(x))
    save_y2 = gamma is not None and gamma.requires_grad and torch.is_grad_enabled()
    # pre may be kept only for a backward that recomputes it: the x or weight side trains
    save_pre = torch.is_grad_enabled() and any(tensors[i] is not None and tensors[i].requires_grad
                                               for i in (0, 2, 3, 4, 5, 6))
    out, _, _ = _mlp_fwd_op(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, sample_scale, act,
                            save_y2, None, save_pre)
    return out



# ---------------------------------------------------------------------------------------------
# Compile targets (for fastconvnext/tooling/compile_check.py)
# ---------------------------------------------------------------------------------------------
# Representative (C, D) buckets: a small odd one, then the four ConvNeXt stage widths.
_BUCKETS = ((40, 72), (96, 384), (192, 768), (384, 1536), (768, 3072))
_DTYPES = ("fp32", "fp16", "bf16")

_FWD_POINTERS = ["x_ptr", "res_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "gamma_ptr", "scale_ptr", "out_ptr",
                 "y2_ptr"]
_HIDDEN_POINTERS = ["x_ptr", "dy_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "gamma_ptr", "scale_ptr", "h_ptr", "dpre_ptr",
                    "db1_part_ptr", "pre_ptr"]
_DX_POINTERS = ["x_ptr", "dy_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "gamma_ptr", "scale_ptr", "y2_ptr", "dx_ptr",
                "h_ptr", "dpre_ptr", "db1_part_ptr", "db2_part_ptr", "dgamma_part_ptr"]
_DW_POINTERS = ["x_ptr", "dy_ptr", "h_ptr", "dpre_ptr", "gamma_ptr", "scale_ptr", "y2_ptr", "dw1_part_ptr",
                "dw2_part_ptr", "db2_part_ptr", "dgamma_part_ptr"]
# kind -> (display name, pointer args, integer args, structural flags); optional HAS_* flags come from _flags
_KERNELS = {
    "fwd": ("convnext_mlp_fwd", _FWD_POINTERS, ["M", "HW"],
            dict(LOAD_H=False, B_KN=False, HAS_BIAS=True, HAS_RESIDUAL=True)),
    "hidden": ("convnext_mlp_fc1_act", _HIDDEN_POINTERS, ["M", "HW"],
               dict(PART_ROWS=_PART_ROWS, IS_BACKWARD=False, LOAD_PRE=False, STORE_H=True)),
    "fc2": ("convnext_mlp_fc2", _FWD_POINTERS, ["M", "HW"],
            dict(LOAD_H=True, B_KN=False, HAS_BIAS=True, HAS_RESIDUAL=True)),
    "dx": ("convnext_mlp_bwd_dx", _DX_POINTERS, ["M", "HW"], dict(PART_ROWS=_PART_ROWS)),
    "hidden_bwd": ("convnext_mlp_bwd_hidden", _HIDDEN_POINTERS, ["M", "HW"],
                   dict(PART_ROWS=_PART_ROWS, IS_BACKWARD=True, STORE_PRE=False, LOAD_PRE=False, STORE_H=True)),
    "hidden_bwd_pre": ("convnext_mlp_bwd_hidden_saved_pre", _HIDDEN_POINTERS, ["M", "HW"],
                       dict(PART_ROWS=_PART_ROWS, IS_BACKWARD=True, STORE_PRE=False, LOAD_PRE=True, STORE_H=True)),
    "fc1_pre": ("convnext_mlp_bwd_fc1_pre", _HIDDEN_POINTERS, ["M", "HW"],
                dict(PART_ROWS=_PART_ROWS, IS_BACKWARD=False, STORE_PRE=True, LOAD_PRE=False, STORE_H=False)),
    "dx_gemm": ("convnext_mlp_bwd_dx_gemm", _FWD_POINTERS, ["M", "HW"],
                dict(LOAD_H=True, B_KN=True, HAS_BIAS=False, HAS_RESIDUAL=False)),
    "dw": ("convnext_mlp_bwd_dw", _DW_POINTERS, ["M", "HW", "SEGMENT_ROWS"], {}),
}


def _flags(kind: str, act: str = "gelu", has_gamma: bool = True, has_scale: bool = True,
           training: bool = True, fused_dx: bool = True, saved_pre: bool = False) -> dict:
    """Every constexpr flag of a launch of `kind`, as the launchers pass them (`fused_dx`: the backward path;
    `saved_pre`: the training forward keeps pre)."""
    flags = dict(_KERNELS[kind][3], ACT=act)
    if kind in ("fwd", "fc2"):
        flags.update(HAS_GAMMA=has_gamma, HAS_SCALE=has_scale, SAVE_Y2=has_gamma and training)
    elif kind == "dx_gemm":
        flags.update(HAS_GAMMA=False, HAS_SCALE=False, SAVE_Y2=False)
    elif kind == "hidden":
        flags.update(HAS_GAMMA=False, HAS_SCALE=False, STORE_PRE=saved_pre and training)
    elif kind == "fc1_pre":
        flags.update(HAS_GAMMA=False, HAS_SCALE=False)
    elif kind == "hidden_bwd_pre":  # the launcher folds gamma into W2
        flags.update(HAS_GAMMA=False, HAS_SCALE=has_scale)
    elif kind in ("dx", "hidden_bwd"):
        flags.update(HAS_GAMMA=has_gamma, HAS_SCALE=has_scale)
        if kind == "dx":
            flags.update(STORE_HIDDEN=training, HAS_Y2=has_gamma and training)
    else:
        del flags["ACT"]
        flags.update(VECTOR_SUMS=not fused_dx, HAS_GAMMA=has_gamma, HAS_SCALE=has_scale, HAS_Y2=has_gamma and training)
    return flags


def _target(kind: str, cfg: dict, C: int, D: int, dtype: str, flags: dict, precision: str) -> CompileTarget:
    name, pointers, ints, _ = _KERNELS[kind]
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    constexprs = dict(C=C, D=D, **meta, **flags, DOT_PRECISION=precision)
    on = " ".join(k for k, v in flags.items() if v is True)
    label = " ".join(f"{k}={v}" for k, v in meta.items())
    label += f" w{cfg['num_warps']} s{cfg['num_stages']} C={C} D={D} act={flags.get('ACT', '-')} {precision} {on}"
    return CompileTarget(
        kernel=name, fn=_KERNEL_TABLE[kind][0](), signature=_signature(pointers, ints, list(constexprs), dtype),
        constexprs=constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], dtype=dtype,
        label=label.strip(), expects_tensor_cores=dtype in ("fp16", "bf16") or precision == "tf32",
    )


def _signature(pointers: List[str], ints: List[str], constexprs: List[str], dtype: str) -> dict:
    sig = {}
    for name in pointers:
        small = name.startswith(("b1", "b2", "gamma", "scale")) or "part" in name
        sig[name] = "*fp32" if small else f"*{dtype}"
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def compile_targets() -> List[CompileTarget]:
    """Every config the launchers can pick, per dtype and representative (C, D) bucket.

    Each kernel a bucket launches (under either fp32 precision) is compiled with all optional features on (the
    most registers live), fp32 both with "ieee" (torch's default) and "tf32" dots; every candidate config of
    it once more with layer scale but no drop path (the default training step) and once with the features off.
    Where the backward is not the fused dx kernel, both with pre recomputed and kept (`_saves_pre` depends on H * W,
    which a bucket leaves open). The other activations are compiled once per dtype at C = 96."""
    targets = []
    for dtype in _DTYPES:
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
        for C, D in _BUCKETS:
            fused_dx = _fused_dx(C, D, dtype, gpu=True)
            pre_kept = (False,) if fused_dx else (False, True)
            kinds = []
            for precision, saved in ((p, k) for p in precisions for k in pre_kept):
                kinds += [k for k in _kinds(C, D, dtype, precision, True, True, saved) if k not in kinds]
            for kind, saved in ((k, saved) for k in kinds for saved in pre_kept):
                for i, cfg in enumerate(_KERNEL_TABLE[kind][1](C, D, dtype)):
                    for precision in precisions:
                        if kind in _kinds(C, D, dtype, precision, True, True, saved):
                            targets.append(_target(kind, cfg, C, D, dtype, _flags(kind, fused_dx=fused_dx,
                                                                                  saved_pre=saved), precision))
                    # layer scale without drop path (ConvNeXt's default training): its own register allocation
                    targets.append(_target(kind, cfg, C, D, dtype, _flags(kind, has_scale=False, fused_dx=fused_dx,
                                                                          saved_pre=saved), precisions[0]))
                    targets.append(_target(kind, cfg, C, D, dtype, _flags(kind, has_gamma=False, has_scale=False,
                                                                          training=False, fused_dx=fused_dx),
                                           precisions[0]))
        for act in ("gelu_tanh", "relu"):
            for kind in _kinds(96, 384, dtype, "ieee", training=True, gpu=True):
                if kind != "dw" or _fused_dx(96, 384, dtype, gpu=True):
                    cfg = _KERNEL_TABLE[kind][1](96, 384, dtype)[0]
                    targets.append(_target(kind, cfg, 96, 384, dtype,
                                           _flags(kind, act, fused_dx=_fused_dx(96, 384, dtype, gpu=True)), "ieee"))
    unique = {(t.kernel, t.label, t.dtype): t for t in reversed(targets)}  # flag sets a kind ignores coincide
    return [t for t in targets if unique[(t.kernel, t.label, t.dtype)] is t]


# ---------------------------------------------------------------------------------------------
# Launch plans (for fastconvnext/tooling/sass_report.py): every figure below is a model, not a measurement
# ---------------------------------------------------------------------------------------------
_MODEL_L2_BYTES = 50e6  # H100 SXM (tooling roofline.MACHINES[90], tested equal): larger footprints are re-read from HBM
_MODEL_SMS = 132  # H100 SXM (likewise)


def _plan_figures(kind, cfg, M, C, D, s, flags):
    """(grid, HBM bytes, L2 bytes, loop trips, outer trips, executed M*C*D matmul units) of one launch (a model).

    The row-tile kernels run the column tiles of a row tile next to each other, so the rows they share come from
    HBM once; the weights (at most 2 * 3072 * 768 * 2 bytes) stay in L2. Columns a mask turns off are not fetched: a
    column tile costs L2 bytes for its valid columns only (C / tiles of them on average)."""
    grid = _grid(kind, cfg, M, C, D)
    act, hidden, w = M * C * s, M * D * s, D * C * s
    programs = math.prod(grid)
    bm = cfg["BLOCK_M"]
    if kind in ("fwd", "fc2", "dx_gemm"):
        bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
        c_tiles, chunks = triton.cdiv(C, bn), triton.cdiv(D, bd)
        bn = C / c_tiles  # valid columns per tile
        epilogue = act * (flags["HAS_RESIDUAL"] + 1 + flags["SAVE_Y2"])
        vectors = (D + 3 * C) * 4
        if kind == "fwd":
            inner = _inner_trips(cfg["BLOCK_K"], C)
            rows_l2 = bm * C * s * (chunks if inner > 1 else 1)
            return (grid, act + epilogue + 2 * w + vectors, programs * (rows_l2 + (D * C + bn * D) * s + bm * bn * s * 3),
                    chunks * inner, (chunks if inner > 1 else 1), 1 + c_tiles)
        hbm = hidden + epilogue + w + vectors
        return grid, hbm, programs * ((bm + bn) * D * s + bm * bn * s * 3), chunks, 1, 1
    if kind in ("hidden", "hidden_bwd"):
        bd, backward = cfg["BLOCK_D"], kind == "hidden_bwd"
        parts = triton.cdiv(M, _PART_ROWS) * D * 4 * backward
        stored_pre = hidden * flags.get("STORE_PRE", False)  # the forward's copy of pre for backward
        hbm = (act + hidden + w) * (1 + backward) + parts + D * 4 + stored_pre
        per_program = (bm + bd) * C * s * (1 + backward) + bm * bd * s * (1 + backward)
        l2 = programs * per_program + parts + stored_pre
        return grid, hbm, l2, _inner_trips(cfg["BLOCK_K"], C), 1, 1 + backward
    if kind == "fc1_pre":  # x and W1 in, pre out
        per_program = (bm + cfg["BLOCK_D"]) * C * s + bm * cfg["BLOCK_D"] * s
        return grid, act + w + hidden + D * 4, programs * per_program, _inner_trips(cfg["BLOCK_K"], C), 1, 1
    if kind == "hidden_bwd_pre":  # dy and W2 in (dh = g W2), pre in, h and dpre out
        bd = cfg["BLOCK_D"]
        parts = triton.cdiv(M, _PART_ROWS) * D * 4
        hbm = act + w + 3 * hidden + parts + (D + C) * 4
        per_program = (bm + bd) * C * s + 3 * bm * bd * s
        return grid, hbm, programs * per_program + parts, _inner_trips(cfg["BLOCK_K"], C), 1, 1
    if kind == "dx":
        bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
        c_tiles, chunks, inner = triton.cdiv(C, bn), triton.cdiv(D, bd), _inner_trips(cfg["BLOCK_K"], C)
        bn = C / c_tiles  # valid columns per tile
        parts = triton.cdiv(M, _PART_ROWS) * 4
        stores = flags["STORE_HIDDEN"] * (2 * hidden + parts * (D + C * (1 + flags["HAS_Y2"])) + act * flags["HAS_Y2"])
        hbm = 3 * act + 2 * w + stores + (D + 2 * C) * 4
        per_program = 2 * bm * C * s * (chunks if inner > 1 else 1) + 2 * D * C * s + bn * D * s + bm * bn * s
        return grid, hbm, programs * per_program + stores, chunks * inner, (chunks if inner > 1 else 1), \
            1 + 2 * c_tiles
    # dw: the programs of one segment are consecutive in launch order and walk its rows in the same order; those
    # resident together share each tile's HBM read, later waves re-read the segment unless it stays in L2
    segments, segment_rows = _segments(M)
    bc, bd = C / grid[1], cfg["BLOCK_D"]  # valid columns per C tile
    has_y2 = flags["HAS_Y2"] and flags["VECTOR_SUMS"]
    waves = triton.cdiv(grid[0] * grid[1], _MODEL_SMS)
    streamed = 2 * act + 2 * hidden
    footprint = streamed * min(segment_rows, M) / M
    partials = segments * (2 * D * C + flags["VECTOR_SUMS"] * (1 + has_y2) * C) * 4
    hbm = streamed * (waves if footprint > _MODEL_L2_BYTES else 1) + has_y2 * act + partials
    tiles = triton.cdiv(min(segment_rows, M), bm)
    per_tile = bm * (bc + bd) * s  # a dW1 program reads x and dpre, a dW2 program dy and h
    # the sums pass of the first dW1 programs reads dy (and y2) once more
    l2 = programs * tiles * per_tile + grid[1] * grid[2] * tiles * bm * bc * s * (1 + has_y2) * flags["VECTOR_SUMS"] \
        + partials
    return grid, hbm, l2, tiles, 1, 2


def _inner_trips(block_k: int, K: int) -> int:
    return triton.cdiv(K, block_k) if block_k < K else 1


_PLAN_NOTES = {
    "fwd": "fused fc1 + b1 + act + fc2 + b2, x gamma x scale + residual (hidden kept on chip)",
    "hidden": "fc1 + b1 + act -> h [M, D] stored once (two-GEMM forward)",
    "fc2": "h W2^T + b2, x gamma x scale + residual (two-GEMM forward)",
    "dx": "fused dx: recomputes pre and dh, stores h and dpre for the dW GEMMs, db1/db2/dgamma row-group partials",
    "hidden_bwd": "recomputes pre, dh = g W2 -> dpre and h [M, D], db1 row-group partials",
    "hidden_bwd_pre": "dh = g W2, pre read back (saved by the forward, or from fc1_pre) -> dpre and h [M, D], db1 "
                      "row-group partials",
    "fc1_pre": "recomputes pre = x W1^T + b1 [M, D] for the hidden backward (first of two passes)",
    "dx_gemm": "dx = dpre W1",
    "dw": "dW1^T = x^T dpre, dW2 = g^T h (+ db2, dgamma after the two-GEMM path), per-segment partials",
}


# matmul units of a launch that eager also runs (the rest is recomputation)
_USEFUL_UNITS = {"fwd": 2, "hidden": 1, "fc2": 1, "dx": 2, "hidden_bwd": 1, "hidden_bwd_pre": 1, "fc1_pre": 0,
                 "dx_gemm": 1, "dw": 2}


def _torch_plan(phase: str, nbytes: float, note: str):
    from .compile_spec import LaunchPlan

    return LaunchPlan(target=None, grid=(), phase=phase, hbm_bytes=float(nbytes), l2_bytes=float(nbytes),
                      loop_trips=0, note=note)


def launch_plans(batch: int, height: int, width: int, channels: int, dtype, training: bool, act: str = "gelu",
                 has_gamma: bool = True, has_scale: bool = False, hidden: Optional[int] = None) -> list:
    """The launches one `convnext_mlp` call makes at this shape on a GPU with autotuning off (each kernel's
    first candidate config), forward then (when `training`) backward, with modelled bytes.

    Defaults are ConvNeXt's block: GELU, a layer scale (trained when training), no drop path, hidden = 4C,
    parameters in the activation dtype. The dots' precision is what the current TF32 flags give. Byte figures
    are a model (H100: 50 MB L2): hbm_bytes counts a tensor once plus the re-reads whose footprint exceeds L2,
    l2_bytes what the programs request. torch steps (partial sums, casts) are plans with target None. Each
    kernel's note gives the matmul work it executes in units of one M*C*D matmul (eager: 2 forward, 4 backward)."""
    from .compile_spec import LaunchPlan

    dtype = _TRITON_DTYPE.get(dtype, dtype)
    _check(dtype in _DTYPE_BYTES, ValueError, f"launch_plans: dtype must be fp32, fp16 or bf16, got {dtype!r}")
    C, D, s = channels, hidden or 4 * channels, _DTYPE_BYTES[dtype]
    M, HW = batch * height * width, height * width
    precision = "tf32" if dtype == "fp32" and _tf32_allowed() else "ieee"
    saved_pre = training and _saves_pre(HW, C, D, dtype, precision, gpu=True)
    plans = []
    if dtype != "fp32":
        plans.append(_torch_plan("forward", (D + 2 * C) * (s + 4), "torch: b1, b2, gamma cast to fp32"))
    for kind in _kinds(C, D, dtype, precision, training, gpu=True, saved_pre=saved_pre):
        phase = "forward" if kind in ("fwd", "hidden", "fc2") else "backward"
        if kind in ("dx", "hidden_bwd", "hidden_bwd_pre") and dtype != "fp32":
            plans.append(_torch_plan("backward", (D + C) * (s + 4), "torch: b1, gamma cast to fp32"))
        if kind == "hidden_bwd_pre" and has_gamma:
            plans.append(_torch_plan("backward", 2 * D * C * s, "torch: diag(gamma) W2 for the dh GEMM"))
        cfg = _KERNEL_TABLE[kind][1](C, D, dtype)[0]
        flags = _flags(kind, act, has_gamma, has_scale, training, _fused_dx(C, D, dtype, gpu=True), saved_pre)
        int_args = dict(M=M, HW=HW)
        if kind == "dw":
            int_args["SEGMENT_ROWS"] = _segments(M)[1]
        grid, hbm, l2, trips, outer, units = _plan_figures(kind, cfg, M, C, D, s, flags)
        # dw: one in grid[0] programs runs the db2/dgamma sums loop, the only loop with a warp shuffle (its row sums;
        # the dots shuffle in no dtype, FMA or tensor cores); half run the dW1 loop, half the dW2 loop
        shares = {"SHFL": 1 / grid[0], "other": 0.5} if kind == "dw" else {}
        plans.append(LaunchPlan(
            target=_target(kind, cfg, C, D, dtype, flags, precision), grid=grid, phase=phase, hbm_bytes=float(hbm),
            l2_bytes=float(l2), loop_trips=trips, outer_trips=outer, flops=float(2 * M * C * D * _USEFUL_UNITS[kind]),
            note=f"{_PLAN_NOTES[kind]}; executes {units} M*C*D matmul units",
            divisible_by_16=tuple(k for k, v in int_args.items() if v % 16 == 0), int_args=int_args,
            loop_shares=shares))
    if training:
        segments = _segments(M)[0]
        sums = (2 * D * C + (1 + has_gamma) * C) * (segments + 1) * 4
        plans.append(_torch_plan("backward", sums, "torch: dW1, dW2, db2, dgamma segment sums"))
        plans.append(_torch_plan("backward", (triton.cdiv(M, _PART_ROWS) + 1) * D * 4, "torch: db1 partial sum"))
        grads = 2 * D * C + D + (1 + has_gamma) * C
        plans.append(_torch_plan("backward", grads * (4 + s), "torch: copies into the parameter dtype"))
    return plans
