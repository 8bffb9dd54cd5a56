"""The roofline as text (terminal), markdown (benchmarks/ROOFLINE.md) and CSV rows."""
from __future__ import annotations

import inspect

from fastconvnext.bench import roofline
from fastconvnext.bench.roofline import OP_LABELS, ROOFLINE_GPUS
from fastconvnext.bench.table import format_table, markdown_table

MB = 1e6
GFLOP = 1e9


def _speedup(x):
    return f"{x:.2f}×"


def _row_cells(row, allow_tf32):
    cells = [
        row.shape.label, OP_LABELS[row.op], row.pass_,
        f"{row.eager.bytes / MB:,.1f}", f"{row.fused.bytes / MB:,.1f}",
        f"{row.eager.flops / GFLOP:,.1f}", f"{row.fused.flops / GFLOP:,.1f}",
    ]
    for gpu in ROOFLINE_GPUS:
        cells += [
            f"{row.bound_us('eager', gpu, allow_tf32):,.1f}", f"{row.bound_us('fused', gpu, allow_tf32):,.1f}",
            _speedup(row.speedup(gpu, allow_tf32)),
        ]
    return cells


def _headers():
    headers = ["stage", "op", "pass", "eager MB", "fused MB", "eager GFLOP", "fused GFLOP"]
    for gpu in ROOFLINE_GPUS:
        short = gpu.name.split()[0]
        headers += [f"{short} eager µs", f"{short} fused µs", f"{short} ×"]
    return headers


def settings_line(batch, dtype, allow_tf32=False):
    gpus = "; ".join(
        f"{g.name}: {g.hbm_bytes_per_s / 1e12:.3g} TB/s, {g.matmul_peak(dtype, allow_tf32) / 1e12:.4g} TFLOP/s "
        f"{'tensor' if dtype != 'fp32' or allow_tf32 else 'fp32'} GEMM, "
        f"{g.vector_flops / 1e12:.3g} TFLOP/s fp32 CUDA cores"
        for g in ROOFLINE_GPUS
    )
    return f"batch {batch}, {dtype}, 224x224 stage shapes. {gpus}."


def text_report(batch=64, dtype="bf16", allow_tf32=False, models=("tiny", "base")):
    """The roofline table for the terminal (no measurement)."""
    rows = roofline.roofline_rows(batch, dtype, models)
    lines = [
        "Roofline (analytic, no measurement): bound = sum over kernels of max(bytes / HBM BW, FLOPs / peak)",
        settings_line(batch, dtype, allow_tf32),
        "eager = channels-last eager PyTorch (fastconvnext's eager path); fused = the Triton kernels as built; "
        "block = dwconv+LN + MLP; × = eager bound / fused bound",
        "",
        format_table(_headers(), [_row_cells(r, allow_tf32) for r in rows]),
    ]
    return "\n".join(lines)


def csv_rows(batch=64, dtype="bf16", allow_tf32=False, models=("tiny", "base")):
    """One dict per (stage, op, pass, implementation, GPU)."""
    out = []
    for row in roofline.roofline_rows(batch, dtype, models):
        for which in ("eager", "fused"):
            t = getattr(row, which)
            for gpu in ROOFLINE_GPUS:
                out.append({
                    "stage": row.shape.label, "op": row.op, "pass": row.pass_, "implementation": t.impl,
                    "batch": batch, "height": row.shape.size, "width": row.shape.size, "channels": row.shape.channels,
                    "dtype": dtype, "bytes": int(t.bytes), "flops": int(t.flops), "gpu": gpu.name,
                    "bound_us": round(t.seconds(gpu, allow_tf32) * 1e6, 3),
                    "limited_by": t.limited_by(gpu, allow_tf32),
                    "speedup_possible": round(row.speedup(gpu, allow_tf32), 3) if which == "eager" else "",
                })
    return out


# ----------------------------------------------------------------------------------------- markdown


def _summary_table(batch, dtype, allow_tf32):
    headers = ["stage", "block fwd MB eager → fused"]
    for gpu in ROOFLINE_GPUS:
        short = gpu.name.split()[0]
        headers += [f"{short} fwd ×", f"{short} fwd+bwd ×"]
    body = []
    rows = {(r.shape, r.pass_): r for r in roofline.roofline_rows(batch, dtype, ops=(("block", "eager"),))}
    for shape in roofline.stage_shapes(batch=batch):
        fwd, train = rows[(shape, "fwd")], rows[(shape, "fwd+bwd")]
        cells = [shape.label, f"{fwd.eager.bytes / MB:,.0f} → {fwd.fused.bytes / MB:,.0f}"]
        for gpu in ROOFLINE_GPUS:
            cells += [_speedup(fwd.speedup(gpu, allow_tf32)), _speedup(train.speedup(gpu, allow_tf32))]
        body.append(cells)
    return markdown_table(headers, body)


def _full_table(batch, dtype, allow_tf32, model):
    rows = roofline.roofline_rows(batch, dtype, (model,))
    return markdown_table(_headers(), [_row_cells(r, allow_tf32) for r in rows])


def _nchw_table(batch, dtype):
    gpu = ROOFLINE_GPUS[0]
    headers = ["stage", "pass", "NCHW+permute MB", "channels-last MB", "fused MB",
               f"{gpu.name.split()[0]} NCHW µs", "channels-last µs", "fused µs"]
    body = []
    for shape in roofline.stage_shapes(batch=batch):
        for pass_ in roofline.PASSES:
            ts = [roofline.traffic("dwconv_layernorm", impl, pass_, shape, dtype)
                  for impl in ("eager_nchw", "eager", "fused")]
            body.append([shape.label, pass_] + [f"{t.bytes / MB:,.1f}" for t in ts]
                        + [f"{t.seconds(gpu) * 1e6:,.1f}" for t in ts])
    return markdown_table(headers, body)


def _headroom_table(batch, dtype, allow_tf32):
    gpu = ROOFLINE_GPUS[0]
    short = gpu.name.split()[0]
    headers = ["stage", "op", "pass", "as built MB", "minimum MB", "as built GFLOP", "minimum GFLOP",
               f"{short} as built µs", f"{short} minimum µs"]
    body = []
    for shape in roofline.stage_shapes(batch=batch):
        for op in roofline.OPS:
            for pass_ in roofline.PASSES:
                built = roofline.traffic(op, "fused", pass_, shape, dtype)
                floor = roofline.traffic(op, "fused_min", pass_, shape, dtype)
                body.append([shape.label, OP_LABELS[op], pass_, f"{built.bytes / MB:,.1f}", f"{floor.bytes / MB:,.1f}",
                             f"{built.flops / GFLOP:,.1f}", f"{floor.flops / GFLOP:,.1f}",
                             f"{built.seconds(gpu, allow_tf32) * 1e6:,.1f}",
                             f"{floor.seconds(gpu, allow_tf32) * 1e6:,.1f}"])
    return markdown_table(headers, body)


def _steps_table(shape, dtype, op, impls):
    gpu = ROOFLINE_GPUS[0]
    headers = ["impl", "kernel", "read MB", "written MB", "GFLOP", "unit", f"{gpu.name.split()[0]} µs"]
    body = []
    for impl in impls:
        t = roofline.traffic(op, impl, "fwd+bwd", shape, dtype)
        for step in t.steps:
            body.append([impl, step.name, f"{step.read / MB:,.2f}", f"{step.written / MB:,.2f}",
                         f"{step.flops / GFLOP:,.2f}", step.unit, f"{step.seconds(gpu, dtype) * 1e6:,.1f}"])
    return markdown_table(headers, body)


def findings(batch, dtype, allow_tf32=False):
    """Statements read off the model: where the kernels as built lose to eager, and the largest headroom."""
    gpu = ROOFLINE_GPUS[0]
    short = gpu.name.split()[0]
    rows = roofline.roofline_rows(batch, dtype, ops=(("dwconv_layernorm", "eager"), ("convnext_mlp", "eager")))
    losing = [f"{OP_LABELS[r.op]} {r.pass_} at {r.shape.label} ({_speedup(r.speedup(gpu, allow_tf32))})"
              for r in rows if r.speedup(gpu, allow_tf32) < 1.0]
    lines = []
    if losing:
        lines.append(f"- On {short} the kernels as built are bound slower than eager for: " + "; ".join(losing) + ".")
    gaps = []
    for r in rows:
        floor = roofline.traffic(r.op, "fused_min", r.pass_, r.shape, dtype).seconds(gpu, allow_tf32)
        gaps.append((r.fused.seconds(gpu, allow_tf32) / floor, r))
    ratio, worst = max(gaps, key=lambda g: g[0])
    lines.append(f"- Largest headroom: {OP_LABELS[worst.op]} {worst.pass_} at {worst.shape.label}, as built "
                 f"{ratio:.1f}× the floor on {short}; see the headroom and kernel-by-kernel tables for where the "
                 f"bytes and FLOPs go (partial-sum buffers, fp32 intermediates, per-tile recomputation).")
    return "\n".join(lines)


def _doc(obj):
    return "```text\n" + inspect.getdoc(obj) + "\n```"


def markdown_report(batch=64, dtype="bf16", allow_tf32=False):
    """benchmarks/ROOFLINE.md: `python -m fastconvnext.bench --roofline --markdown > benchmarks/ROOFLINE.md`."""
    example = roofline.stage_shapes(("tiny",), batch)[0]
    parts = [
        "# Roofline: eager PyTorch vs the fused kernels",
        "",
        "Generated by `python -m fastconvnext.bench --roofline --markdown "
        f"--batch {batch} --dtype {dtype}` (code: `fastconvnext/bench/roofline.py`). Analytic: nothing is "
        "measured. For each kernel, time ≥ max(HBM bytes / bandwidth, FLOPs / peak); an implementation's "
        "bound is the sum over its kernels. The ratio eager bound / fused bound is the speed-up the fusion "
        "makes possible, not a measurement.",
        "",
        f"Settings: {settings_line(batch, dtype, allow_tf32)}",
        "",
        "*eager* = channels-last eager PyTorch (what fastconvnext runs without the kernels); *fused* = the "
        "Triton kernels as built (their recomputation and partial sums counted); *block* = dwconv+LN followed "
        "by the MLP; *fwd* = inference forward; *fwd+bwd* = training forward + backward. MB = 10^6 bytes.",
        "",
        "## Summary: one ConvNeXt block",
        "",
        _summary_table(batch, dtype, allow_tf32),
        "",
        "What the model says (derived from the tables below):",
        "",
        findings(batch, dtype, allow_tf32),
        "",
        "## ConvNeXt-T stages",
        "",
        _full_table(batch, dtype, allow_tf32, "tiny"),
        "",
        "## ConvNeXt-B stages",
        "",
        _full_table(batch, dtype, allow_tf32, "base"),
        "",
        "## dwconv+LN: transformers' NCHW + permute order vs channels-last vs fused",
        "",
        _nchw_table(batch, dtype),
        "",
        "## Headroom: fused as built vs the minimum any fusion needs",
        "",
        _headroom_table(batch, dtype, allow_tf32),
        "",
        f"## Kernel by kernel, {example.label}, batch {batch}, {dtype}, fwd+bwd",
        "",
        _steps_table(example, dtype, "dwconv_layernorm", ("eager", "fused")),
        "",
        _steps_table(example, dtype, "convnext_mlp", ("eager", "fused")),
        "",
        "## The byte model",
        "",
        _doc(roofline),
        "",
        "### dwconv + LayerNorm",
        "",
        _doc(roofline.dwconv_layernorm_steps),
        "",
        _doc(roofline.DwconvFusedLayout),
        "",
        "### MLP",
        "",
        _doc(roofline.convnext_mlp_steps),
        "",
        _doc(roofline.mlp_fused_tiles),
        "",
    ]
    return "\n".join(parts)
