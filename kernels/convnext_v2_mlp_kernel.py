"""Fused ConvNeXt V2 MLP: out = residual + sample_scale[n] * (GRN(act(x W1^T + b1)) W2^T + b2).

GRN(h) = w * (h * Nx) + b + h with Nx[n, d] = G[n, d] / (mean_d G[n, d] + 1e-6), G[n, d] = ||h[n, :, :, d]||_2.
x and residual are [N, H, W, C] contiguous (NHWC), seen as [M, C] rows (M = N * P, P = H * W pixels per image); D is
the hidden width (4C in ConvNeXt V2). Work is counted in units of one M x C x D matmul (eager: 2 forward, 4 backward).

Why two passes. G needs every pixel of an image for each of the D hidden channels, so no row tile can finish GRN on
chip: the V1 single-kernel MLP (hidden never leaves the chip) cannot be kept. The GRN affine is per image and channel,
so it folds into fc2's A operand: GRN(h) = h * coef[n, d] + b[d] with coef = 1 + w * Nx. Hence
- pass 1, `_v2_fc1_kernel` (row tile x D tile): pre = x W1^T + b1, h = act(pre) rounded to the activation dtype, the
  fp32 sums of h^2 of the tile's rows per image it touches (`_image_slot_sums`: rows of a tile can span several
  images when P is not a multiple of BLOCK_M, so each row carries its image index; one partial per (tile, image
  slot, channel), written by one program), optionally h stored [M, D] (STORE_H);
- `_image_sums_kernel` sums each image's partials over its tiles in tile order: a fixed order, no float atomics, so the
  result is bitwise reproducible; the [N, D] fp32 epilogue (G = sqrt, mean over D, Nx, coef) is a few torch ops;
- pass 2, `_v2_fc2_kernel` (row tile x C tile): A = h * coef[image of the row] + b (fp32, rounded to the activation
  dtype), acc += A W2^T per D chunk, then + b2, x sample_scale[image], + residual. h is read back (LOAD) or recomputed
  from x (RECOMPUTE: fc1 + act again per D chunk, as V1's fused forward does).

Store h or recompute it (`_recomputes_hidden`; the figures below are a MODEL on H100 SXM peak rates, not measurements):
per row, storing costs 2 * D * s bytes (h written by pass 1 and read by pass 2) and no extra matmul; recomputing costs
cdiv(C, BLOCK_N) extra units in pass 2 (fc1 once per C tile) and reads x once more. Each pass is costed as
max(matmul time at peak, HBM bytes / bandwidth); the cheaper plan wins. For ConvNeXt-V2 (s = 2 bytes, bf16 peak
989 TFLOP/s, 3.35 TB/s) per row: C = 96: store 0.63 ns, recompute 0.25 ns (one 128-wide C tile: 2 units, both passes
near their matmul floor) -> recompute; C = 192: store 1.26 ns, recompute 1.19 ns (two C tiles) -> recompute by 5%;
C = 384: store 2.6 ns, recompute 6.0 ns; C = 768: store 9.5 ns, recompute 38 ns -> store. The rule keeps V1's shape:
recompute while C fits one 128-wide output tile, store beyond (C = 192's 5% is inside what the model leaves out: L2
re-reads of x per D chunk, launch gaps). fp32 ("ieee" on FMA units) stores everywhere: a recomputed unit there costs
far more than h's round trip.

Backward, pragmatic: the GEMMs are torch matmuls (cuBLAS; a Triton GEMM would only fuse elementwise work the two
Triton kernels below already do in one pass each): pre = x W1^T + b1 recomputed, g = dy * sample_scale,
dA = g W2. GRN's gradient depends on every pixel of the image through G and its mean:
  S1[n, d] = sum_p dA * h, S0[n, d] = sum_p dA       (per-image sums, `_v2_bwd_sums_kernel` + `_image_sums_kernel`,
                                                     same fixed order as the forward; that kernel also stores
                                                     A = GRN(h) for dW2)
  a = w * S1 (the gradient reaching Nx),  dG = a / (Gm + eps) - sum_d (a * G) / (D (Gm + eps)^2),
  dh = dA * coef + dG / G * h  (0 where G = 0, as torch.linalg.vector_norm's gradient at 0),
  dpre = dh * act'(pre)       (`_v2_bwd_dpre_kernel`), dw = sum_n S1 * Nx, db = sum_n S0,
then dx = dpre W1, dW1 = dpre^T x, db1 = sum dpre, dW2 = g^T A, db2 = sum g, d_residual = dy (torch).

Precision: fp16/bf16 dots with fp32 accumulation, fp32 dots "tf32" where torch allows TF32 matmuls else "ieee"; pre,
act, h^2 sums, G, Nx, coef and the GRN affine in fp32; h and A rounded to the activation dtype where eager rounds them.
The activations are V1's (`convnext_mlp_kernel`: exact erf GELU from a fitted erfc, tanh GELU, ReLU).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._env import interpreting
from ._op_support import autocast_key, device_guard as _device_guard, forward_mode_ad, register_autocast_rules
from ._triton_compat import config_choice
from .compile_spec import FP_FUSION, CompileTarget
from .convnext_mlp_kernel import (
    _TRITON_DTYPE,
    _activation,
    _activation_grad,
    _check,
    _compute_dtype,
    _interpreter_bf16_dot_ok,
    _dot_precision,
    _load_rows,
    _load_w_t,
    _streamed_fc1,
    _tf32_allowed,
)
from .reference import FUSED_ACTS, GRN_EPS, convnext_v2_mlp_reference

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _image_slot_sums(values, rows, pid_m, HW, SPAN, part_ptr, d_offs, d_mask, STRIDE: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    # column sums of a [BLOCK_M, BLOCK_D] fp32 tile (rows outside M already zero), one per image the tile's rows
    # touch: image first + j -> part[pid_m * SPAN + j, d_offs] (row stride STRIDE); slots past the tile's last image
    # get zeros, never read
    first = (pid_m.to(tl.int64) * BLOCK_M) // HW
    slot = rows // HW - first
    for j in range(SPAN):
        sums = tl.sum(tl.where((slot == j)[:, None], values, 0.0), axis=0)
        tl.store(part_ptr + (pid_m.to(tl.int64) * SPAN + j) * STRIDE + d_offs, sums, mask=d_mask)


@triton.jit
def _per_image(ptr, rows, row_mask, d_offs, d_mask, HW, D: tl.constexpr):
    # [BLOCK_M, BLOCK_D] gather of a [N, D] fp32 table at each row's image
    images = rows // HW
    mask = row_mask[:, None] & d_mask[None, :]
    return tl.load(ptr + images[:, None] * D + d_offs[None, :], mask=mask, other=0.0)


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _v2_fc1_kernel(
    x_ptr,  # [M, C] activation dtype
    w1_ptr,  # [D, C] activation dtype
    b1_ptr,  # [D] fp32
    h_ptr,  # [M, D] activation dtype (STORE_H)
    part_ptr,  # [row tiles * SPAN, D] fp32: sums of h^2 per (tile, image slot)
    M,
    HW,
    SPAN,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # D tiles fastest: the programs sharing a row tile run together and read its x rows from HBM once
    pid_m = tl.program_id(0) // tl.cdiv(D, BLOCK_D)
    pid_d = tl.program_id(0) % tl.cdiv(D, BLOCK_D)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    pre = _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C, D, BLOCK_M, BLOCK_K, BLOCK_D, DOT_PRECISION)
    pre += tl.load(b1_ptr + d_offs, mask=d_mask, other=0.0)[None, :]
    h = _activation(pre, ACT).to(x_ptr.dtype.element_ty)
    if STORE_H:
        mask = row_mask[:, None] & d_mask[None, :]
        tl.store(h_ptr + rows[:, None] * D + d_offs[None, :], h, mask=mask)
    hf = tl.where(row_mask[:, None], h.to(tl.float32), 0.0)
    _image_slot_sums(hf * hf, rows, pid_m, HW, SPAN, part_ptr, d_offs, d_mask, D, BLOCK_M)


@triton.jit
def _image_sums_kernel(
    part_ptr,  # [row tiles * SPAN, WIDTH] fp32 (from _image_slot_sums)
    out_ptr,  # [N, WIDTH] fp32
    HW,
    SPAN,
    WIDTH: tl.constexpr,
    TILE_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[n] = the partials of image n summed over its row tiles in tile order (fixed: bitwise reproducible)
    n = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < WIDTH
    first_tile = (n * HW) // TILE_ROWS
    tiles = ((n * HW + HW - 1) // TILE_ROWS - first_tile + 1).to(tl.int32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, tiles):
        tile = first_tile + i
        slot = n - (tile * TILE_ROWS) // HW
        acc += tl.load(part_ptr + (tile * SPAN + slot) * WIDTH + d_offs, mask=d_mask, other=0.0)
    tl.store(out_ptr + n * WIDTH + d_offs, acc, mask=d_mask)


@triton.jit
def _v2_fc2_kernel(
    x_ptr,  # [M, C] activation dtype (RECOMPUTE)
    h_ptr,  # [M, D] activation dtype (not RECOMPUTE)
    w1_ptr,  # [D, C] activation dtype (RECOMPUTE)
    b1_ptr,  # [D] fp32 (RECOMPUTE)
    coef_ptr,  # [N, D] fp32: 1 + w * Nx
    grn_b_ptr,  # [D] fp32
    w2_ptr,  # [C, D] activation dtype
    b2_ptr,  # [C] fp32
    scale_ptr,  # [N] fp32 (HAS_SCALE)
    res_ptr,  # [M, C] activation dtype
    out_ptr,  # [M, C] activation dtype (or the autocast output dtype)
    M,
    HW,
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # C tiles fastest (see _v2_fc1_kernel)
    pid_m = tl.program_id(0) // tl.cdiv(C, BLOCK_N)
    pid_n = tl.program_id(0) % tl.cdiv(C, BLOCK_N)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_offs < D
        if RECOMPUTE:
            pre = _streamed_fc1(x_ptr, w1_ptr, rows, row_mask, d_offs, C, D, BLOCK_M, BLOCK_K, BLOCK_D,
                                DOT_PRECISION)
            pre += tl.load(b1_ptr + d_offs, mask=d_mask, other=0.0)[None, :]
            h = _activation(pre, ACT).to(w2_ptr.dtype.element_ty)
        else:
            h = _load_rows(h_ptr, rows, row_mask, d_offs, D)
        coef = _per_image(coef_ptr, rows, row_mask, d_offs, d_mask, HW, D)
        grn_b = tl.load(grn_b_ptr + d_offs, mask=d_mask, other=0.0)
        a = (h.to(tl.float32) * coef + grn_b[None, :]).to(w2_ptr.dtype.element_ty)
        acc = tl.dot(a, _load_w_t(w2_ptr, d_offs, n_offs, D, C), acc, input_precision=DOT_PRECISION)
    out = acc + tl.load(b2_ptr + n_offs, mask=n_mask, other=0.0)[None, :]
    if HAS_SCALE:
        out = out * tl.load(scale_ptr + rows // HW, mask=row_mask, other=0.0)[:, None]
    offs = rows[:, None] * C + n_offs[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _v2_bwd_sums_kernel(
    pre_ptr,  # [M, D] activation dtype: x W1^T + b1
    da_ptr,  # [M, D] activation dtype: dA = g W2, the gradient reaching GRN's output
    coef_ptr,  # [N, D] fp32
    grn_b_ptr,  # [D] fp32
    a_ptr,  # [M, D] activation dtype: A = GRN(h), stored for dW2
    part_ptr,  # [row tiles * SPAN, 2 * D] fp32: sums of dA * h (columns < D) and of dA (columns >= D)
    M,
    HW,
    SPAN,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
):
    pid_m = tl.program_id(0) // tl.cdiv(D, BLOCK_D)
    pid_d = tl.program_id(0) % tl.cdiv(D, BLOCK_D)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    h = _activation(_load_rows(pre_ptr, rows, row_mask, d_offs, D).to(tl.float32), ACT)
    h = h.to(a_ptr.dtype.element_ty).to(tl.float32)  # the h the forward used: rounded to the activation dtype
    coef = _per_image(coef_ptr, rows, row_mask, d_offs, d_mask, HW, D)
    a = h * coef + tl.load(grn_b_ptr + d_offs, mask=d_mask, other=0.0)[None, :]
    mask = row_mask[:, None] & d_mask[None, :]
    tl.store(a_ptr + rows[:, None] * D + d_offs[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)
    da = _load_rows(da_ptr, rows, row_mask, d_offs, D).to(tl.float32)  # zero outside M and D
    _image_slot_sums(da * h, rows, pid_m, HW, SPAN, part_ptr, d_offs, d_mask, 2 * D, BLOCK_M)
    _image_slot_sums(da, rows, pid_m, HW, SPAN, part_ptr + D, d_offs, d_mask, 2 * D, BLOCK_M)


@triton.jit
def _v2_bwd_dpre_kernel(
    pre_ptr,  # [M, D] activation dtype
    da_ptr,  # [M, D] activation dtype
    coef_ptr,  # [N, D] fp32: 1 + w * Nx
    k_ptr,  # [N, D] fp32: dL/dG / G (0 where G = 0)
    dpre_ptr,  # [M, D] activation dtype
    M,
    HW,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACT: tl.constexpr,
):
    # dpre = (dA * coef + k * h) * act'(pre)
    pid_m = tl.program_id(0) // tl.cdiv(D, BLOCK_D)
    pid_d = tl.program_id(0) % tl.cdiv(D, BLOCK_D)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    d_offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    pre = _load_rows(pre_ptr, rows, row_mask, d_offs, D).to(tl.float32)
    h = _activation(pre, ACT).to(dpre_ptr.dtype.element_ty).to(tl.float32)
    da = _load_rows(da_ptr, rows, row_mask, d_offs, D).to(tl.float32)
    coef = _per_image(coef_ptr, rows, row_mask, d_offs, d_mask, HW, D)
    k = _per_image(k_ptr, rows, row_mask, d_offs, d_mask, HW, D)
    dpre = (da * coef + k * h) * _activation_grad(pre, ACT)
    mask = row_mask[:, None] & d_mask[None, :]
    tl.store(dpre_ptr + rows[:, None] * D + d_offs[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, **blocks) -> dict:
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


# One small config per kernel in the interpreter (BLOCK_M = 32: 5x3 and 7x7 images put tiles across images).
_INTERPRETER = {
    "fc1": _cfg(1, 1, BLOCK_M=32, BLOCK_D=32, BLOCK_K=32),
    "fc2": _cfg(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32),
    "fc2_recompute": _cfg(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_D=32),
    "image_sums": _cfg(1, 1, BLOCK_D=32),
    "bwd_sums": _cfg(1, 1, BLOCK_M=32, BLOCK_D=32),
    "bwd_dpre": _cfg(1, 1, BLOCK_M=32, BLOCK_D=32),
}


def _gpu_config(kind: str, C: int, dtype: str) -> dict:
    """The one config a GPU launch of `kind` uses (compiled for sm_80/sm_90 without spills: compile_targets).
    fp16/bf16 GEMM tiles give each dot at least 64 x 64 per warpgroup; fp32 ("ieee" on FMA units) small tiles."""
    cp = _pow2(C)
    wide = dtype != "fp32"
    if kind == "fc1":
        return _cfg(8, 3, BLOCK_M=128, BLOCK_D=128, BLOCK_K=64) if wide else _cfg(4, 2, BLOCK_M=32, BLOCK_D=64,
                                                                                  BLOCK_K=32)
    if kind == "fc2":
        if wide:
            return _cfg(8, 3, BLOCK_M=128, BLOCK_N=max(64, min(cp, 128)), BLOCK_K=64, BLOCK_D=64)
        # 16-wide K steps: 32-wide ones spilled 16 B on sm_90 with drop path at C = 40 (Triton 3.9)
        return _cfg(4, 2, BLOCK_M=32, BLOCK_N=min(cp, 64), BLOCK_K=32, BLOCK_D=16)
    if kind == "fc2_recompute":
        if wide:  # 2 stages: 3 spilled 8 B on sm_90 with drop path at C = 96 (Triton 3.9); chunk per release
            return _cfg(8, 2, BLOCK_M=128, BLOCK_N=max(64, min(cp, 128)), BLOCK_K=min(cp, 64),
                        BLOCK_D=config_choice("v2mlp.fc2_recompute_chunk"))
        return _cfg(4, 2, BLOCK_M=32, BLOCK_N=min(cp, 64), BLOCK_K=min(cp, 32), BLOCK_D=16)
    if kind == "image_sums":
        return _cfg(4, 1, BLOCK_D=512)
    # bwd_sums, bwd_dpre: elementwise [32, 128] tiles in 8 warps (4 spilled 40 B with fp32 tanh GELU)
    return _cfg(8, 1, BLOCK_M=32, BLOCK_D=128)


def _config(kind: str, C: int, dtype: str, gpu: bool = False) -> dict:
    return _INTERPRETER[kind] if interpreting() and not gpu else _gpu_config(kind, C, dtype)


def _span(tile_rows: int, HW: int) -> int:
    """The most images `tile_rows` consecutive rows can touch when each image has HW rows."""
    return (tile_rows - 1 + HW - 1) // HW + 1


def _recomputes_hidden(C: int, dtype: str) -> bool:
    """Whether pass 2 recomputes h from x (fc1 + act) rather than reading it back. Rule: recompute in fp16/bf16 while
    C fits one output tile of pass 2's GPU config (C <= 128), store h beyond and in fp32. Why: the module docstring's
    per-row model (matmul time at peak vs HBM bytes per pass) makes recomputing 2.5x cheaper at C = 96, even at
    C = 192 (5%, within what the model leaves out) and 2.3x dearer at C = 384, 4x at 768; fp32 matmuls run on FMA units,
    where a recomputed unit costs more than h's round trip. Decided on the GPU config, so the interpreter takes the
    GPU's path."""
    return dtype != "fp32" and triton.cdiv(C, _gpu_config("fc2_recompute", C, dtype)["BLOCK_N"]) == 1


def _check_interpreter_dtype(dtype: torch.dtype) -> None:
    """Refuse bf16 dots where Triton's interpreter computes them wrongly (V1's probe), instead of garbage."""
    if dtype != torch.bfloat16 or not interpreting():
        return
    from triton.runtime import interpreter

    if not _interpreter_bf16_dot_ok(interpreter.interpreter_builder.create_dot):
        raise TypeError("convnext_v2_mlp: bfloat16 cannot run in Triton's interpreter (TRITON_INTERPRET=1): its "
                        "tl.dot misreads bf16 operands; use float16/float32 there, or a GPU for bfloat16")


def _launch(kind: str, fn, grid: tuple, args: tuple, cfg: dict, **constexprs):
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    fn[grid](*args, **meta, **constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
             enable_fp_fusion=FP_FUSION)


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------
def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _image_sums(part: torch.Tensor, N: int, HW: int, span: int, width: int, tile_rows: int, C: int, dtype: str):
    """[N, width] fp32: each image's partial sums over its row tiles, in tile order."""
    out = part.new_empty((N, width))
    cfg = _config("image_sums", C, dtype)
    grid = (N, triton.cdiv(width, cfg["BLOCK_D"]))
    _launch("image_sums", _image_sums_kernel, grid, (part, out, HW, span), cfg, WIDTH=width, TILE_ROWS=tile_rows)
    return out


def _grn_coef(norms: torch.Tensor, grn_weight: torch.Tensor):
    """(Nx, coef = 1 + w * Nx, mean of G per image) from G [N, D] fp32."""
    mean = norms.mean(dim=-1, keepdim=True)
    nx = norms / (mean + GRN_EPS)
    return nx, 1.0 + _fp32(grn_weight) * nx, mean


def _forward_impl(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale, act,
                  out_dtype=None):
    N, H, W, C = x.shape
    D = fc1_weight.shape[0]
    M, HW = N * H * W, H * W
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    if M == 0:
        return out, x.new_zeros((N, D), dtype=torch.float32)
    _check_interpreter_dtype(x.dtype)
    dtype, precision = _TRITON_DTYPE[x.dtype], _dot_precision(x.dtype)
    w1, w2 = fc1_weight.to(x.dtype).contiguous(), fc2_weight.to(x.dtype).contiguous()
    b1, gb, b2 = _fp32(fc1_bias), _fp32(grn_bias), _fp32(fc2_bias)
    recompute = _recomputes_hidden(C, dtype)
    fc1_cfg = _config("fc1", C, dtype)
    tiles, span = triton.cdiv(M, fc1_cfg["BLOCK_M"]), _span(fc1_cfg["BLOCK_M"], HW)
    part = x.new_empty((tiles * span, D), dtype=torch.float32)
    h = x.new_empty(0) if recompute else x.new_empty((M, D))
    with _device_guard(x.device):
        _launch("fc1", _v2_fc1_kernel, (tiles * triton.cdiv(D, fc1_cfg["BLOCK_D"]),),
                (x, w1, b1, h if h.numel() else b1, part, M, HW, span), fc1_cfg, C=C, D=D, ACT=act,
                STORE_H=not recompute, DOT_PRECISION=precision)
        norms = _image_sums(part, N, HW, span, D, fc1_cfg["BLOCK_M"], C, dtype).sqrt_()
        _, coef, _ = _grn_coef(norms, grn_weight)
        cfg = _config("fc2_recompute" if recompute else "fc2", C, dtype)
        scale = _fp32(sample_scale) if sample_scale is not None else b2
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(C, cfg["BLOCK_N"]),)
        _launch("fc2", _v2_fc2_kernel, grid,
                (x, h if h.numel() else x, w1, b1, coef, gb, w2, b2, scale, residual, out, M, HW), cfg, C=C, D=D,
                ACT=act, RECOMPUTE=recompute, HAS_SCALE=sample_scale is not None, DOT_PRECISION=precision)
    return out, norms


def _backward_impl(grad_out, x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale,
                   norms, act, want_x):
    N, H, W, C = x.shape
    D = fc1_weight.shape[0]
    M, HW = N * H * W, H * W
    if M == 0:
        return (torch.zeros_like(x), torch.zeros_like(fc1_weight), torch.zeros_like(fc1_bias),
                torch.zeros_like(grn_weight), torch.zeros_like(grn_bias), torch.zeros_like(fc2_weight),
                torch.zeros_like(fc2_bias))
    _check_interpreter_dtype(x.dtype)
    dtype = _TRITON_DTYPE[x.dtype]
    x2 = x.reshape(M, C)
    w1, w2 = fc1_weight.to(x.dtype), fc2_weight.to(x.dtype)
    g = grad_out.reshape(M, C).to(x.dtype)
    if sample_scale is not None:
        g = (g.view(N, HW, C) * sample_scale.to(x.dtype).view(N, 1, 1)).view(M, C)
    pre = torch.addmm(fc1_bias.to(x.dtype), x2, w1.t())
    da = g.mm(w2).contiguous()
    nx, coef, mean = _grn_coef(norms, grn_weight)
    cfg = _config("bwd_sums", C, dtype)
    tiles, span = triton.cdiv(M, cfg["BLOCK_M"]), _span(cfg["BLOCK_M"], HW)
    grid = (tiles * triton.cdiv(D, cfg["BLOCK_D"]),)
    a = torch.empty_like(pre)
    part = x.new_empty((tiles * span, 2 * D), dtype=torch.float32)
    with _device_guard(x.device):
        _launch("bwd_sums", _v2_bwd_sums_kernel, grid, (pre, da, coef, _fp32(grn_bias), a, part, M, HW, span), cfg,
                D=D, ACT=act)
        sums = _image_sums(part, N, HW, span, 2 * D, cfg["BLOCK_M"], C, dtype)
        s1, s0 = sums[:, :D], sums[:, D:]
        shifted = mean + GRN_EPS
        grad_nx = _fp32(grn_weight) * s1
        grad_norms = grad_nx / shifted - (grad_nx * norms).sum(-1, keepdim=True) / (D * shifted * shifted)
        k = torch.where(norms > 0, grad_norms / norms, torch.zeros_like(norms))
        dpre = torch.empty_like(pre)
        cfg = _config("bwd_dpre", C, dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_D"]),)
        _launch("bwd_dpre", _v2_bwd_dpre_kernel, grid, (pre, da, coef, k.contiguous(), dpre, M, HW), cfg, D=D,
                ACT=act)
    dx = dpre.mm(w1).view(N, H, W, C) if want_x else x.new_zeros(0)
    return (dx, dpre.t().mm(x2).to(fc1_weight.dtype), dpre.sum(0, dtype=torch.float32).to(fc1_bias.dtype),
            (s1 * nx).sum(0).to(grn_weight.dtype), s0.sum(0).to(grn_bias.dtype),
            g.t().mm(a).to(fc2_weight.dtype), g.sum(0, dtype=torch.float32).to(fc2_bias.dtype))


# ---------------------------------------------------------------------------------------------
# torch.library ops, autograd and the functional wrapper
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastconvnext::convnext_v2_mlp_fwd", mutates_args=())
def _v2_mlp_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    grn_weight: torch.Tensor,
    grn_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    sample_scale: Optional[torch.Tensor],
    act: str,
    out_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, G): G [N, D] fp32 are GRN's per-image channel norms, kept for backward. grn_weight/bias are [D]."""
    return _forward_impl(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale,
                         act, out_dtype)


@_v2_mlp_fwd_op.register_fake
def _(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale, act,
      out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype), x.new_empty((x.shape[0], fc1_weight.shape[0]),
                                                                         dtype=torch.float32)


@torch.library.custom_op("fastconvnext::convnext_v2_mlp_bwd", mutates_args=())
def _v2_mlp_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    grn_weight: torch.Tensor,
    grn_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    sample_scale: Optional[torch.Tensor],
    norms: torch.Tensor,
    act: str,
    want_x: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW1, db1, dw, db of GRN, dW2, db2); dx is empty unless want_x."""
    return _backward_impl(grad_out, x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias,
                          sample_scale, norms, act, want_x)


@_v2_mlp_bwd_op.register_fake
def _(grad_out, x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale, norms, act,
      want_x):
    return (torch.empty_like(x) if want_x else x.new_empty(0), torch.empty_like(fc1_weight),
            torch.empty_like(fc1_bias), torch.empty_like(grn_weight), torch.empty_like(grn_bias),
            torch.empty_like(fc2_weight), torch.empty_like(fc2_bias))


def _setup_context(ctx, inputs, output):
    x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale, act = inputs[:10]
    ctx.act = act
    ctx.residual_dtype = residual.dtype
    ctx.save_for_backward(x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale,
                          output[1])


def _v2_mlp_backward(ctx, grad_out, _grad_norms):
    x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, sample_scale, norms = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _v2_mlp_bwd_op(grad_out.contiguous(), x, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight,
                           fc2_bias, sample_scale, norms, ctx.act, need[0])
    dx, dw1, db1, dgw, dgb, dw2, db2 = grads
    picked = [t if need[i] else None for i, t in zip((0, 2, 3, 4, 5, 6, 7), grads)]
    d_residual = grad_out.to(ctx.residual_dtype) if need[1] else None
    return (picked[0], d_residual, *picked[1:], None, None, None)


_v2_mlp_fwd_op.register_autograd(_v2_mlp_backward, setup_context=_setup_context)


# Autocast: eager runs both Linears in the autocast dtype and GRN's affine in fp32 (its fp32 weight promotes), so the
# rule hands the kernels x and the fc weights/biases in that dtype, GRN's parameters and sample_scale as they are, and
# gives the output eager's dtype: residual + (autocast-dtype branch).
def _autocast_rule(device_type: str):
    key = autocast_key(device_type)

    def forward_in_autocast_dtype(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias,
                                  sample_scale, act, out_dtype=None):
        dtype = torch.get_autocast_dtype(device_type)
        out_dtype = out_dtype or torch.promote_types(residual.dtype, dtype)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return _v2_mlp_fwd_op(x.to(dtype), residual, fc1_weight.to(dtype), fc1_bias.to(dtype), grn_weight,
                                  grn_bias, fc2_weight.to(dtype), fc2_bias.to(dtype), sample_scale, act, out_dtype)

    return forward_in_autocast_dtype


register_autocast_rules("convnext_v2_mlp_fwd", _autocast_rule)


def _validate(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act, sample_scale):
    tensors = dict(x=x, residual=residual, fc1_weight=fc1_weight, fc1_bias=fc1_bias, grn_weight=grn_weight,
                   grn_bias=grn_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, sample_scale=sample_scale)
    for name, t in tensors.items():
        _check(t is None and name == "sample_scale" or isinstance(t, torch.Tensor), TypeError,
               f"convnext_v2_mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check(isinstance(act, str) and act in FUSED_ACTS, ValueError,
           f"convnext_v2_mlp: act must be one of {FUSED_ACTS}, got {act!r}")
    _check(x.dtype in _TRITON_DTYPE, TypeError,
           f"convnext_v2_mlp: x must be float32, float16 or bfloat16, got {x.dtype}")
    _check(x.dim() == 4, ValueError, f"convnext_v2_mlp: x must be [N, H, W, C], got shape {tuple(x.shape)}")
    N, H, W, C = x.shape
    D = fc1_weight.shape[0] if fc1_weight.dim() == 2 else -1
    expected = dict(residual=[(N, H, W, C)], fc1_weight=[(D, C)], fc1_bias=[(D,)], grn_weight=[(D,), (1, 1, 1, D)],
                    grn_bias=[(D,), (1, 1, 1, D)], fc2_weight=[(C, D)], fc2_bias=[(C,)], sample_scale=[(N,)])
    for name, shapes in expected.items():
        t = tensors[name]
        if t is None:
            continue
        _check(tuple(t.shape) in shapes, ValueError,
               f"convnext_v2_mlp: {name} must have shape {' or '.join(map(str, shapes))} (x is {tuple(x.shape)}, "
               f"D={D}), got {tuple(t.shape)}")
        _check(t.device == x.device, ValueError,
               f"convnext_v2_mlp: {name} is on {t.device}, expected x's device {x.device}")
        _check(t.dtype in _TRITON_DTYPE, TypeError,
               f"convnext_v2_mlp: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    _check(C >= 1 and D >= 1, ValueError, f"convnext_v2_mlp: need C >= 1 and D >= 1, got C={C}, D={D}")
    _check(residual.dtype == x.dtype, TypeError,
           f"convnext_v2_mlp: residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    for name in ("x", "residual"):
        _check(tensors[name].is_contiguous(), ValueError,
               f"convnext_v2_mlp: {name} must be contiguous in [N, H, W, C] order (a channels_last NCHW tensor "
               f"seen through .permute(0, 2, 3, 1)); got strides {tuple(tensors[name].stride())}")
    if x.is_cuda:
        _check(not interpreting(), ValueError, "convnext_v2_mlp: CUDA tensors cannot run with TRITON_INTERPRET=1")
    else:
        _check(interpreting() and x.device.type == "cpu", ValueError,
               f"convnext_v2_mlp: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
               f"set before import), got device {x.device}")


def convnext_v2_mlp(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act="gelu",
                    sample_scale=None):
    """residual + sample_scale[n] * (GRN(act(x W1^T + b1)) W2^T + b2), x/residual [N, H, W, C] NHWC; grn_weight and
    grn_bias [D] or transformers' [1, 1, 1, D].

    Same result as `reference.convnext_v2_mlp_reference`, in x's dtype (under autocast in eager's dtype);
    differentiable in x, residual, both fc weights and biases and GRN's weight and bias. Under forward-mode AD it runs
    the eager reference. bfloat16 is refused in Triton's interpreter where its tl.dot is wrong.
    """
    _validate(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act, sample_scale)
    tensors = (x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias)
    if forward_mode_ad(*tensors, sample_scale):
        return convnext_v2_mlp_reference(*tensors, act=act, sample_scale=sample_scale)
    _check_interpreter_dtype(_compute_dtype(x))
    D = fc1_weight.shape[0]
    out, _ = _v2_mlp_fwd_op(x, residual, fc1_weight, fc1_bias, grn_weight.reshape(D), grn_bias.reshape(D),
                            fc2_weight, fc2_bias, sample_scale, act)
    return out


# ---------------------------------------------------------------------------------------------
# Compile targets (for compile_check)
# ---------------------------------------------------------------------------------------------
# ConvNeXt-V2 widths: Atto's first stage (C = 40), then Tiny's four stages.
_BUCKETS = ((40, 160), (96, 384), (192, 768), (384, 1536), (768, 3072))
_DTYPES = ("fp32", "fp16", "bf16")
_SMALL = ("b1_ptr", "part_ptr", "coef_ptr", "grn_b_ptr", "b2_ptr", "scale_ptr", "k_ptr")
# kind -> (display name, jit function, pointer args, integer args)
_KERNELS = {
    "fc1": ("convnext_v2_mlp_fc1_sumsq", lambda: _v2_fc1_kernel, ["x_ptr", "w1_ptr", "b1_ptr", "h_ptr", "part_ptr"],
            ["M", "HW", "SPAN"]),
    "fc2": ("convnext_v2_mlp_grn_fc2", lambda: _v2_fc2_kernel,
            ["x_ptr", "h_ptr", "w1_ptr", "b1_ptr", "coef_ptr", "grn_b_ptr", "w2_ptr", "b2_ptr", "scale_ptr", "res_ptr",
             "out_ptr"], ["M", "HW"]),
    "image_sums": ("convnext_v2_mlp_image_sums", lambda: _image_sums_kernel, ["part_ptr", "out_ptr"],
                   ["HW", "SPAN"]),
    "bwd_sums": ("convnext_v2_mlp_bwd_sums", lambda: _v2_bwd_sums_kernel,
                 ["pre_ptr", "da_ptr", "coef_ptr", "grn_b_ptr", "a_ptr", "part_ptr"], ["M", "HW", "SPAN"]),
    "bwd_dpre": ("convnext_v2_mlp_bwd_dpre", lambda: _v2_bwd_dpre_kernel,
                 ["pre_ptr", "da_ptr", "coef_ptr", "k_ptr", "dpre_ptr"], ["M", "HW"]),
}


def _flags(kind: str, C: int, D: int, dtype: str, act: str = "gelu", has_scale: bool = True,
           precision: str = "ieee", tile_rows: int = 0, width: int = 0) -> dict:
    """The constexpr arguments a launch of `kind` passes besides its BLOCK_* sizes."""
    if kind == "fc1":
        return dict(C=C, D=D, ACT=act, STORE_H=not _recomputes_hidden(C, dtype), DOT_PRECISION=precision)
    if kind == "fc2":
        return dict(C=C, D=D, ACT=act, RECOMPUTE=_recomputes_hidden(C, dtype), HAS_SCALE=has_scale,
                    DOT_PRECISION=precision)
    if kind == "image_sums":
        return dict(WIDTH=width, TILE_ROWS=tile_rows)
    return dict(D=D, ACT=act)


def _pointer_types(kind: str, flags: dict, dtype: str) -> dict:
    """Pointer argument -> Triton type as the launcher passes them (absent tensors get an fp32 stand-in)."""
    _, _, pointers, _ = _KERNELS[kind]
    types = {name: "*fp32" if name in _SMALL or kind == "image_sums" else f"*{dtype}" for name in pointers}
    if kind == "fc1" and not flags["STORE_H"]:
        types["h_ptr"] = "*fp32"  # b1 stands in
    return types


def _target(kind: str, C: int, D: int, dtype: str, flags: dict) -> CompileTarget:
    name, fn, _, ints = _KERNELS[kind]
    cfg = _gpu_config({"fc2": "fc2_recompute" if flags.get("RECOMPUTE") else "fc2"}.get(kind, kind), C, dtype)
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    constexprs = dict(flags, **meta)
    signature = dict(_pointer_types(kind, flags, dtype), **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs})
    on = " ".join(k for k, v in flags.items() if v is True)
    values = " ".join(f"{k}={v}" for k, v in constexprs.items() if v is not True and v is not False)
    return CompileTarget(
        kernel=name, fn=fn(), signature=signature, constexprs=constexprs, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], dtype=dtype, label=f"{values} w{cfg['num_warps']} s{cfg['num_stages']} {on}".strip(),
        expects_tensor_cores=kind in ("fc1", "fc2") and (dtype != "fp32" or flags["DOT_PRECISION"] == "tf32"),
    )


def compile_targets() -> List[CompileTarget]:
    """Every config the launchers can pick, per dtype and (C, D) bucket: the GEMM kernels under each fp32 precision
    ("ieee", "tf32"), pass 2 with and without drop path, the elementwise backward kernels, the per-image sums at both
    widths (D forward, 2D backward); the other activations once per dtype at C = 96."""
    targets = []
    for dtype in _DTYPES:
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
        for C, D in _BUCKETS:
            for precision in precisions:
                targets.append(_target("fc1", C, D, dtype, _flags("fc1", C, D, dtype, precision=precision)))
                for has_scale in (True, False):
                    targets.append(_target("fc2", C, D, dtype, _flags("fc2", C, D, dtype, has_scale=has_scale,
                                                                      precision=precision)))
            for kind in ("bwd_sums", "bwd_dpre"):
                targets.append(_target(kind, C, D, dtype, _flags(kind, C, D, dtype)))
        for act in ("gelu_tanh", "relu"):
            for kind in ("fc1", "fc2", "bwd_sums", "bwd_dpre"):
                targets.append(_target(kind, 96, 384, dtype, _flags(kind, 96, 384, dtype, act)))
    for C, D in _BUCKETS:  # fp32 partials whatever the activation dtype; tile rows of the fp32 and 16-bit configs
        for tile_rows in sorted({_gpu_config(k, C, d)["BLOCK_M"] for k in ("fc1", "bwd_sums") for d in _DTYPES}):
            for width in (D, 2 * D):
                targets.append(_target("image_sums", C, D, "fp32",
                                       _flags("image_sums", C, D, "fp32", tile_rows=tile_rows, width=width)))
    unique = {(t.kernel, t.label, t.dtype): t for t in reversed(targets)}
    return [t for t in targets if unique[(t.kernel, t.label, t.dtype)] is t]


# ---------------------------------------------------------------------------------------------
# Launch plans (for sass_report): every figure below is a model, not a measurement
# ---------------------------------------------------------------------------------------------
_PLAN_NOTES = {
    "fc1": "pass 1: fc1 + b1 + act, h^2 summed per (row tile, image slot){store}",
    "image_sums": "per-image sums of the {what} partials over the image's row tiles, in tile order",
    "fc2": "pass 2: A = h x coef[image] + b (GRN){h}, A W2^T + b2, x sample_scale, + residual",
    "bwd_sums": "A = GRN(act(pre)) stored for dW2; dA * h and dA summed per (row tile, image slot)",
    "bwd_dpre": "dpre = (dA x coef + k x h) x act'(pre)",
}


def _plan_figures(kind: str, cfg: dict, M: int, N: int, HW: int, C: int, D: int, s: int, flags: dict):
    """(grid, HBM bytes, L2 bytes, hot-loop trips, outer trips, executed M*C*D units) of one launch (a model: each
    tensor once from HBM; weights, coef and partials stay in L2; L2 bytes what the programs request)."""
    act, hidden, w = M * C * s, M * D * s, D * C * s
    if kind == "image_sums":
        width, tile_rows = flags["WIDTH"], flags["TILE_ROWS"]
        tiles = triton.cdiv(HW, tile_rows) + 1  # row tiles an image touches, at most
        grid = (N, triton.cdiv(width, cfg["BLOCK_D"]))
        nbytes = N * (tiles + 1) * width * 4
        return grid, nbytes, nbytes, tiles, 1, 0
    bm = cfg["BLOCK_M"]
    tiles, span = triton.cdiv(M, bm), _span(bm, HW)
    if kind == "fc1":
        bd = cfg["BLOCK_D"]
        grid = (tiles * triton.cdiv(D, bd),)
        parts = tiles * span * D * 4
        stored = hidden * flags["STORE_H"]
        hbm = act + w + D * 4 + stored + parts
        l2 = grid[0] * (bm + bd) * C * s + stored + parts
        return grid, hbm, l2, _inner_trips(cfg["BLOCK_K"], C), 1, 1
    if kind == "fc2":
        bn, bd = cfg["BLOCK_N"], cfg["BLOCK_D"]
        c_tiles, chunks = triton.cdiv(C, bn), triton.cdiv(D, bd)
        grid = (tiles * c_tiles,)
        recompute = flags["RECOMPUTE"]
        hbm = (act + w if recompute else hidden) + w + N * D * 4 + 2 * act + (D + 2 * C) * 4
        per_chunk = (bn * s + bm * 4) * bd + (bm + bd) * C * s * recompute + bm * bd * s * (not recompute)
        l2 = grid[0] * chunks * per_chunk + 2 * act
        inner = _inner_trips(cfg["BLOCK_K"], C) if recompute else 1
        return grid, hbm, l2, chunks * inner, chunks if recompute else 1, 1 + c_tiles * recompute
    grid = (tiles * triton.cdiv(D, cfg["BLOCK_D"]),)
    if kind == "bwd_sums":  # pre, dA in; A out; partials
        nbytes = 3 * hidden + N * D * 4 + tiles * span * 2 * D * 4
        return grid, nbytes, nbytes, span, 1, 0
    nbytes = 3 * hidden + 2 * N * D * 4  # bwd_dpre: pre, dA in; dpre out
    return grid, nbytes, nbytes, 1, 1, 0


def _inner_trips(block_k: int, K: int) -> int:
    return triton.cdiv(K, block_k) if block_k < K else 1


def _torch_plan(phase: str, nbytes: float, note: str, flops: float = 0.0):
    from .compile_spec import LaunchPlan

    return LaunchPlan(target=None, grid=(), phase=phase, hbm_bytes=float(nbytes), l2_bytes=float(nbytes),
                      loop_trips=0, flops=float(flops), note=note)


def launch_plans(batch: int, height: int, width: int, channels: int, dtype, training: bool, act: str = "gelu",
                 has_scale: bool = False, hidden: Optional[int] = None) -> list:
    """The launches one `convnext_v2_mlp` call makes at this shape on a GPU, forward then (when `training`) backward,
    with modelled bytes; torch steps (casts, the [N, D] GRN epilogue, the backward GEMMs and sums) are plans with
    target None. Defaults are ConvNeXt V2's block: GELU, hidden = 4C, no drop path. Byte figures are a model:
    hbm_bytes counts each tensor once, l2_bytes what the programs request."""
    from .compile_spec import LaunchPlan

    dtype = _TRITON_DTYPE.get(dtype, dtype)
    _check(dtype in _DTYPE_BYTES, ValueError, f"launch_plans: dtype must be fp32, fp16 or bf16, got {dtype!r}")
    C, D, s = channels, hidden or 4 * channels, _DTYPE_BYTES[dtype]
    N, HW = batch, height * width
    M = N * HW
    precision = "tf32" if dtype == "fp32" and _tf32_allowed() else "ieee"
    recompute = _recomputes_hidden(C, dtype)
    fc1_rows, bwd_rows = _gpu_config("fc1", C, dtype)["BLOCK_M"], _gpu_config("bwd_sums", C, dtype)["BLOCK_M"]
    steps = [("forward", "fc1", _flags("fc1", C, D, dtype, act, precision=precision)),
             ("forward", "image_sums", _flags("image_sums", C, D, dtype, tile_rows=fc1_rows, width=D)),
             ("forward", "grn", None),
             ("forward", "fc2", _flags("fc2", C, D, dtype, act, has_scale, precision))]
    if training:
        steps += [("backward", "gemms_in", None),
                  ("backward", "bwd_sums", _flags("bwd_sums", C, D, dtype, act)),
                  ("backward", "image_sums", _flags("image_sums", C, D, dtype, tile_rows=bwd_rows, width=2 * D)),
                  ("backward", "grn", None),
                  ("backward", "bwd_dpre", _flags("bwd_dpre", C, D, dtype, act)),
                  ("backward", "gemms_out", None)]
    plans = []
    if dtype != "fp32":
        plans.append(_torch_plan("forward", (2 * D + C) * (s + 4), "torch: b1, GRN bias, b2 cast to fp32"))
    for phase, kind, flags in steps:
        if kind == "grn":
            plans.append(_torch_plan(phase, 8 * N * D * 4, "torch: [N, D] GRN terms (G, mean, Nx, coef; backward: dG, k)"))
            continue
        if kind == "gemms_in":
            plans.append(_torch_plan(phase, 2 * M * C * s + (M * C + D * C + M * D) * s, "torch: g = dy x scale, "
                                     "pre = x W1^T + b1 recomputed", 2 * M * C * D))
            plans.append(_torch_plan(phase, (M * C + C * D + M * D) * s, "torch: dA = g W2", 2 * M * C * D))
            continue
        if kind == "gemms_out":
            plans.append(_torch_plan(phase, 3 * (M * C + M * D + C * D) * s, "torch: dx = dpre W1, dW1 = dpre^T x, "
                                     "dW2 = g^T A", 6 * M * C * D))
            plans.append(_torch_plan(phase, (M * D + M * C) * s, "torch: db1, db2 column sums"))
            continue
        target = _target(kind, C, D, dtype if kind != "image_sums" else "fp32", flags)
        cfg = {k: target.constexprs[k] for k in target.constexprs if k.startswith("BLOCK_")}
        grid, hbm, l2, trips, outer, units = _plan_figures(kind, cfg, M, N, HW, C, D, s, flags)
        int_args = dict(M=M, HW=HW, SPAN=_span(fc1_rows if kind == "fc1" else bwd_rows, HW))
        if kind == "image_sums":
            int_args = dict(HW=HW, SPAN=_span(flags["TILE_ROWS"], HW))
        int_args = {k: v for k, v in int_args.items() if k in _KERNELS[kind][3]}
        what = {"fc1": dict(store=", h stored [M, D]" if flags.get("STORE_H") else ""),
                "fc2": dict(h=", h recomputed from x" if flags.get("RECOMPUTE") else ", h read back"),
                "image_sums": dict(what="h^2" if phase == "forward" else "dA * h and dA")}.get(kind, {})
        # _image_slot_sums' loop (the one that stores: a partial per image slot) runs SPAN times, whatever the compiler
        # leaves of fc1's matmul loop (in 16-bit it unrolls it whole at most widths from C = 192 up)
        slot_loop = {"global store": int_args["SPAN"]} if kind in ("fc1", "bwd_sums") else {}
        plans.append(LaunchPlan(
            target=target, grid=grid, phase=phase, hbm_bytes=float(hbm), l2_bytes=float(l2), loop_trips=trips,
            outer_trips=outer, flops=float(2 * M * C * D if kind in ("fc1", "fc2") else 0),
            note=f"{_PLAN_NOTES[kind].format(**what)}; executes {units} M*C*D matmul units",
            divisible_by_16=tuple(k for k, v in int_args.items() if v % 16 == 0), int_args=int_args,
            trips_by_class=slot_loop))
    return plans
