"""The roofline as text (terminal), markdown (benchmarks/ROOFLINE.md) and CSV rows."""
from __future__ import annotations

import inspect

from fastconvnext.tooling import model_tables, roofline
from fastconvnext.tooling.roofline import OP_LABELS, ROOFLINE_GPUS
from fastconvnext.tooling.bench.table import format_table, markdown_table

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
    """The performance model's prior for the terminal: one model, labelled MODEL (no measurement)."""
    return "\n".join(sass_model_text(batch, dtype, models))


# ------------------------------------------------------------------------------- static SASS model

MODEL_DEPTHS = {"tiny": (3, 3, 9, 3), "base": (3, 3, 27, 3)}
MODEL_ARCHS = ((90, "H100"), (80, "A100"))
MODES = (("forward", "fwd"), ("forward_backward", "fwd+bwd"))


def model_entry(op, arch, dtype, shape, mode):
    """The prior's row for one stage shape ({"fused_us", "fused_pessimistic_us", "eager_us", "floor_us"}), or None."""
    table = model_tables.prior()
    if table is None:
        return None
    return table.get((op, arch, dtype, shape.channels, shape.size * shape.size, shape.batch, mode))


def minimum_us(op, arch, dtype, shape, mode):
    gpu = roofline.MACHINES[90 if arch >= 90 else 80].gpu
    pass_ = dict(MODES)[mode]
    return roofline.traffic(op, "fused_min", pass_, shape, dtype).seconds(gpu) * 1e6


def model_stage_rows(batch, dtype, models, arch):
    """Per stage, op and pass: fused µs (model), at the L2 low edge, eager estimate µs, eager floor µs,
    estimate/fused, floor/fused, minimum µs, fused/minimum."""
    rows = []
    for shape in roofline.stage_shapes(models, batch):
        for op in roofline.OPS:
            for mode, pass_ in MODES:
                entry = model_entry(op, arch, dtype, shape, mode)
                if entry is None:
                    continue
                fused, floor = entry["fused_us"], minimum_us(op, arch, dtype, shape, mode)
                rows.append([shape.label, OP_LABELS[op], pass_, f"{fused:,.1f}", f"{entry['fused_pessimistic_us']:,.1f}",
                             f"{entry['eager_us']:,.1f}", f"{entry['floor_us']:,.1f}",
                             _speedup(entry["eager_us"] / fused), _speedup(entry["floor_us"] / fused),
                             f"{floor:,.1f}", f"{fused / floor:.2f}"])
    return rows


MODEL_HEADERS = ("stage", "op", "pass", "fused µs", "fused µs, L2 low edge", "eager estimate µs", "eager floor µs",
                 "estimate/fused", "floor/fused", "minimum µs", "fused/minimum")
EAGER_BASES = {"estimate": "eager_us", "floor": "floor_us"}


def blocks_ratio(batch, dtype, model, arch, mode, eager="eager_us", fused="fused_us", family="ConvNeXt"):
    """Whole-model blocks: sum over stages of depth x (eager dwconv+LN + eager MLP of the family, roofline.BLOCKS)
    over the same of fused; eager is the prior's eager estimate ("eager_us") or floor ("floor_us"), fused its fused_us
    or fused_pessimistic_us. ConvNeXt V2's depths and widths are V1's at T and B."""
    eager_sum = fused_sum = 0.0
    for depth, shape in zip(MODEL_DEPTHS[model], roofline.stage_shapes((model,), batch)):
        for op in roofline.BLOCKS[family]:
            entry = model_entry(op, arch, dtype, shape, mode)
            if entry is None:
                return None
            eager_sum += depth * entry[eager]
            fused_sum += depth * entry[fused]
    return eager_sum / fused_sum


MODEL_LEGEND = ("fused = the static SASS model of the fused launches (per launch max of HBM, L2, tensor-core, "
                "issue and MUFU time, summed); L2 low edge = the same at the pessimistic public L2->SM bandwidth; "
                "eager estimate = eager PyTorch at public efficiencies (what the auto prior compares with); eager "
                "floor = every eager op at peak (a torch.compile-class bound); minimum = the fusion floor; ratios "
                "above 1x favour the fused kernels.")


def sass_model_text(batch, dtype, models, archs=MODEL_ARCHS):
    if model_tables.prior() is None:
        return ["MODEL: fastconvnext/prior.json is missing; run `python -m fastconvnext.tooling.sass_report`."]
    lines = [f"MODEL, not a measurement (the prior; {model_tables.stamp()}). {MODEL_LEGEND}"]
    for arch, name in archs:
        rows = model_stage_rows(batch, dtype, models, arch)
        if not rows:
            lines.append(f"{name}: no model rows for batch {batch}, {dtype} (regenerate with "
                         f"`python -m fastconvnext.tooling.sass_report --batch {batch}`).")
            continue
        ratios = _blocks_ratio_texts(batch, dtype, models, arch)
        lines += ["", f"{name} SXM, batch {batch}, {dtype} (MODEL); whole-model blocks " + "; ".join(ratios),
                  format_table(MODEL_HEADERS, rows)]
    return lines


def model_name(family, model):
    """"ConvNeXt-T", "ConvNeXt V2-B", ... for a roofline.BLOCKS family and a MODEL_DEPTHS model."""
    return f"{family}-{model[0].upper()}"


def _blocks_ratio_texts(batch, dtype, models, arch):
    """'<model> <pass> estimate/fused E (floor/fused F, L2 low edge P)' per family, model and pass the prior covers."""
    texts = []
    for family in roofline.BLOCKS:
        for model in models:
            for mode, pass_ in MODES:
                ratio = blocks_ratio(batch, dtype, model, arch, mode, family=family)
                if ratio is not None:
                    floor = blocks_ratio(batch, dtype, model, arch, mode, eager="floor_us", family=family)
                    low = blocks_ratio(batch, dtype, model, arch, mode, fused="fused_pessimistic_us", family=family)
                    texts.append(f"{model_name(family, model)} {pass_} estimate/fused {_speedup(ratio)} (floor/fused "
                                 f"{_speedup(floor)}, L2 low edge {_speedup(low)})")
    return texts


def _model_markdown(batch, dtype, arch, name, models=("tiny", "base")):
    rows = model_stage_rows(batch, dtype, models, arch)
    if not rows:
        return f"(no model rows for batch {batch}, {dtype} on {name})"
    ratios = _blocks_ratio_texts(batch, dtype, models, arch)
    return (f"Whole-model blocks (depth-weighted sum of a block's two ops): {'; '.join(ratios)}.\n\n"
            + markdown_table(MODEL_HEADERS, rows))


_SUMMARY_RATIOS = (("eager_us", "fused_us"), ("floor_us", "fused_us"), ("eager_us", "fused_pessimistic_us"))


def _stage_block_cell(family, arch, dtype, shape, mode):
    """'estimate / floor / low edge' of one block of the family at one stage shape, or '-' without a prior row."""
    entries = [model_entry(op, arch, dtype, shape, mode) for op in roofline.BLOCKS[family]]
    if any(entry is None for entry in entries):
        return "-"
    columns = {column for pair in _SUMMARY_RATIOS for column in pair}
    total = {column: sum(entry[column] for entry in entries) for column in columns}
    return " / ".join(_speedup(total[eager] / total[fused]) for eager, fused in _SUMMARY_RATIOS)


def _model_blocks_cell(family, batch, dtype, model, arch, mode):
    ratios = [blocks_ratio(batch, dtype, model, arch, mode, eager, fused, family) for eager, fused in _SUMMARY_RATIOS]
    return "-" if None in ratios else " / ".join(_speedup(r) for r in ratios)


def model_summary_markdown(batch=256, dtype="bf16", models=("tiny", "base")):
    """The README table: one block per stage (dwconv+LN then the family's MLP; ConvNeXt's rows first, then ConvNeXt
    V2's, labelled "V2") and the whole-model blocks, H100 and A100, forward and training: eager estimate / fused,
    eager floor / fused, and the estimate at the L2 low edge (MODEL)."""
    headers = ["stage"] + [f"{name} {pass_}: estimate / floor / low edge" for _, name in MODEL_ARCHS for _, pass_ in MODES]
    points = [(arch, mode) for arch, _ in MODEL_ARCHS for mode, _ in MODES]
    body = []
    for family in roofline.BLOCKS:
        prefix = "" if family == "ConvNeXt" else f"{family.split()[-1]} "
        for shape in roofline.stage_shapes(models, batch):
            body.append([prefix + shape.label] + [_stage_block_cell(family, arch, dtype, shape, mode)
                                                  for arch, mode in points])
        for model in models:
            body.append([f"{model_name(family, model)} blocks"] + [
                _model_blocks_cell(family, batch, dtype, model, arch, mode) for arch, mode in points])
    return markdown_table(headers, body)


# Design targets: fused/eager at most this per pass, whole-model blocks eager/fused at least this, fused/minimum at most 2
TARGET_FUSED_OVER_EAGER = {"forward": 0.8, "forward_backward": 1.0}
TARGET_BLOCKS_SPEEDUP = {"forward": 2.0, "forward_backward": 1.5}
TARGET_OVER_MINIMUM = 2.0


def _met(ok):
    return "yes" if ok else "**no**"


def targets_markdown(batch=256, dtype="bf16", model="tiny", arch=90):
    """The design targets checked on the model against the eager estimate: per stage, op and pass, then the blocks."""
    headers = ["stage", "op", "pass", "fused µs (model)", "eager estimate µs", "fused/eager", "target",
               "met", "minimum µs", "fused/minimum", "≤ 2 met"]
    body = []
    for shape in roofline.stage_shapes((model,), batch):
        for op in roofline.OPS:
            for mode, pass_ in MODES:
                entry = model_entry(op, arch, dtype, shape, mode)
                if entry is None:
                    body.append([shape.label, OP_LABELS[op], pass_] + ["-"] * 8)
                    continue
                ratio = entry["fused_us"] / entry["eager_us"]
                floor = minimum_us(op, arch, dtype, shape, mode)
                body.append([shape.label, OP_LABELS[op], pass_, f"{entry['fused_us']:,.1f}",
                             f"{entry['eager_us']:,.1f}", f"{ratio:.2f}", f"≤ {TARGET_FUSED_OVER_EAGER[mode]}",
                             _met(ratio <= TARGET_FUSED_OVER_EAGER[mode]), f"{floor:,.1f}",
                             f"{entry['fused_us'] / floor:.2f}", _met(entry["fused_us"] / floor <= TARGET_OVER_MINIMUM)])
    blocks = []
    for family in roofline.BLOCKS:
        for mode, pass_ in MODES:
            ratio = blocks_ratio(batch, dtype, model, arch, mode, family=family)
            if ratio is not None:
                blocks.append(f"{model_name(family, model)} {pass_} {_speedup(ratio)} (target ≥ "
                              f"{TARGET_BLOCKS_SPEEDUP[mode]}×: {_met(ratio >= TARGET_BLOCKS_SPEEDUP[mode])})")
    return (f"Whole-model blocks (depth-weighted sum of a block's two ops), eager/fused: "
            f"{'; '.join(blocks) or '-'}.\n\n"
            + markdown_table(headers, body))


L2_WHAT_IF_TBPS = (5.5, 7.0, 8.0, 11.0)  # beside the model's own constant: the range a calibration could land in


def _launch_us_at_l2(launch, l2_scale):
    """One launches.json record's modelled µs with its L2 term scaled (the other terms as compiled)."""
    terms = dict(launch["terms_us"])
    if "l2" in terms:
        terms["l2"] *= l2_scale
    return max(terms.values(), default=launch["us"])


def _fused_us_at_l2(launches, key, l2_scale):
    records = launches.get(key)
    return None if not records else sum(_launch_us_at_l2(r, l2_scale) for r in records)


def _l2_what_if(launches, batch, dtype, model, arch, scale):
    """{(op, mode): [(depth, eager estimate µs, fused µs with the L2 term scaled)] per stage}, or None where the
    prior or launches.json lacks a stage."""
    out = {}
    for op in roofline.OPS:
        for mode, _ in MODES:
            out[op, mode] = []
            for depth, shape in zip(MODEL_DEPTHS[model], roofline.stage_shapes((model,), batch)):
                key = (op, arch, dtype, shape.channels, shape.size * shape.size, batch, mode)
                entry, us = model_entry(op, arch, dtype, shape, mode), _fused_us_at_l2(launches, key, scale)
                if entry is None or us is None:
                    return None
                out[op, mode].append((depth, entry["eager_us"], us))
    return out


def _blocks_at(stages, family, mode):
    """Whole-model blocks eager/fused of a family from `_l2_what_if`'s figures."""
    eager = sum(depth * e for op in roofline.BLOCKS[family] for depth, e, _ in stages[op, mode])
    fused = sum(depth * f for op in roofline.BLOCKS[family] for depth, _, f in stages[op, mode])
    return eager / fused


def l2_sensitivity_markdown(batch=256, dtype="bf16", model="tiny", arch=90, what_if=L2_WHAT_IF_TBPS):
    """The verdict at other L2->SM bandwidths: each launch of launches.json re-maxed with its L2 term scaled (the
    launches today's code makes; the MLP's path rules are not re-run); eager is the eager estimate."""
    launches = model_tables.launches()
    assumed = roofline.MACHINES[arch].l2_bytes_per_s / 1e12
    headers = ["L2->SM TB/s",
               *(f"{model_name(family, model)} blocks {pass_}" for family in roofline.BLOCKS for _, pass_ in MODES),
               *(f"{OP_LABELS[op]} {pass_} s1/s2/s3/s4" for op in roofline.OPS for _, pass_ in MODES)]
    body = []
    for tbps in (assumed, *(t for t in what_if if t != assumed)):
        stages = _l2_what_if(launches, batch, dtype, model, arch, assumed / tbps)
        if stages is None:
            return f"(no per-launch detail for batch {batch}, {dtype}, sm_{arch} in launches.json)"
        cells = [_speedup(_blocks_at(stages, family, mode)) for family in roofline.BLOCKS for mode, _ in MODES]
        cells += [" / ".join(f"{f / e:.2f}" for _, e, f in stages[op, mode])
                  for op in roofline.OPS for mode, _ in MODES]
        label = f"{tbps:g} (the model's, public figures)" if tbps == assumed else f"{tbps:g}"
        body.append([label, *cells])
    return markdown_table(headers, body)


def _loop_markdown(loop) -> str:
    """One hot loop of launches.json: its instructions per body execution, by class and detail."""
    per = f" per {loop['iterations_per_body']} iters" if loop["iterations_per_body"] > 1 else ""
    detail = " [" + ", ".join(f"{k} {v}" for k, v in loop["detail"].items()) + "]" if loop["detail"] else ""
    return f"{loop['instructions']} instr{per}: " + ", ".join(f"{k} {v}" for k, v in loop["classes"].items()) + detail


def _executions_markdown(loops) -> str:
    """Each hot loop's body executions per program, in the hot-loop column's order."""
    return "; ".join(f"{loop['executions']:g}" for loop in loops) or "-"


def _launch_markdown(batch, dtype, arch, model="tiny"):
    launches = model_tables.launches()
    headers = ["stage", "op", "pass", "kernel", "regs", "smem B", "CTAs/SM", "waves", "executions", "µs", "bound",
               "HBM/L2/TC/issue/MUFU µs", "hot loop per iteration"]
    body = []
    for shape in roofline.stage_shapes((model,), batch):
        for op in roofline.OPS:
            for mode, pass_ in MODES:
                key = (op, arch, dtype, shape.channels, shape.size * shape.size, batch, mode)
                for launch in launches.get(key, []):
                    if launch["kernel"] == "torch":
                        continue
                    terms, hot = launch["terms_us"], launch["hot_loops"]
                    loops = "; ".join(_loop_markdown(loop) for loop in hot)
                    body.append([shape.label, OP_LABELS[op], pass_, launch["kernel"], launch["registers"],
                                 launch["shared_bytes"], launch["ctas_per_sm"], launch["waves"],
                                 _executions_markdown(hot),
                                 f"{launch['us']:,.1f}", launch["bound"],
                                 "/".join(f"{terms.get(k, 0):,.1f}" for k in ("hbm", "l2", "tensor", "issue", "mufu")),
                                 loops or "(no loop)"])
    if not body:
        return f"(no per-launch detail for batch {batch}, {dtype}, sm_{arch} in launches.json)"
    return markdown_table(headers, body)


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
        for op in roofline.BUILT_OPS:
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
    """benchmarks/ROOFLINE.md: `python -m fastconvnext.tooling.bench --roofline --markdown > benchmarks/ROOFLINE.md`."""
    example = roofline.stage_shapes(("tiny",), batch)[0]
    sources = "\n".join(f"- {line}" for line in (*roofline.MACHINE_SOURCES, *roofline.EAGER_SOURCES))
    parts = [
        "# Performance model: eager PyTorch vs the fused kernels (MODEL, not measurement)",
        "",
        "Nothing on this page was measured on a GPU. On a GPU, `auto` times fused against eager for each shape at "
        "first use and keeps the faster; this model is its prior where it cannot time, and a design tool. "
        "`fastconvnext bench` on CUDA prints measured times beside these predictions.",
        "",
        "## Static SASS model",
        "",
        "`python -m fastconvnext.tooling.sass_report` compiles every launch the fused ops make at each stage shape "
        "(the config the launcher picks, with a real launch's specialization) for sm_90 and sm_80, finds the hot "
        "loops in the SASS and counts their instructions by class. A launch's time is the largest of HBM bytes / "
        "bandwidth (re-reads beyond L2 counted), L2->SM bytes / L2 bandwidth, tensor-core MACs / (peak x the load "
        "path's efficiency; with one CTA per SM the epilogue's issue time added), issued warp-instructions / 4 per "
        "clock per SM, and MUFU work; an op's time is the sum over its launches. *eager estimate* is eager PyTorch "
        "at public efficiencies (cuBLAS GEMMs, bandwidth-bound passes, the depthwise conv), what the prior compares "
        "with; *eager floor* is every eager op at peak, a torch.compile-class bound; *L2 low edge* repeats the "
        "fused model at the pessimistic public L2->SM figure. *minimum* is the floor any fusion could reach "
        f"(`fused_min` below). Prior: `fastconvnext/prior.json` ({model_tables.stamp() or 'missing'}).",
        "",
        "Constants and their sources (none of them measured by this project):",
        "",
        sources,
        "",
        "### One block per stage, batch 256, bf16 (model)",
        "",
        "Sum of a block's two ops (dwconv+LN and the MLP; rows labelled V2: ConvNeXt V2's MLP with GRN); each cell "
        "is eager estimate / fused, eager floor / fused, and eager estimate / fused at the L2 low edge; above 1x "
        "means the model predicts the fused block faster.",
        "",
        model_summary_markdown(256, "bf16"),
        "",
        "### Design targets: ConvNeXt-T, batch 256, bf16, H100 SXM (model)",
        "",
        targets_markdown(256, "bf16", "tiny", 90),
        "",
        "### What the verdict hinges on: the L2->SM bandwidth (model, what-if)",
        "",
        "Many MLP launches are L2-bound on the model, so the tables move with the L2->SM constant. Here each "
        "launch of the per-launch table below is re-maxed with its L2 term scaled to other bandwidths (same "
        "launches and configs; every other term as compiled); cells are fused / eager estimate per stage, blocks "
        "are eager estimate / fused. A what-if on the model: `python -m fastconvnext.tooling.calibrate` measures "
        "the constant on a GPU.",
        "",
        l2_sensitivity_markdown(256, "bf16", "tiny", 90),
        "",
        f"### H100 SXM, batch {batch}, {dtype} (model)",
        "",
        _model_markdown(batch, dtype, 90, "H100"),
        "",
        f"### A100 SXM, batch {batch}, {dtype} (model)",
        "",
        _model_markdown(batch, dtype, 80, "A100"),
        "",
        "### Per launch: ConvNeXt-T, batch 256, bf16, H100 SXM (model)",
        "",
        "Hot loop = innermost backward branch in the SASS; counts are per iteration (per warp), by class; "
        "detail lists tensor-core instructions with their m×n×k and memory instructions with their width in bits. "
        "executions = times one program runs each hot loop's body (in the hot-loop column's order; a body unrolled "
        "over several iterations runs once per them; averaged over the launch's programs where only some take the "
        "loop's branch).",
        "",
        _launch_markdown(256, "bf16", 90),
        "",
        "# Byte/FLOP model (analytic): what the eager floor and estimate are made of",
        "",
        "Generated by `python -m fastconvnext.tooling.bench --roofline --markdown "
        f"--batch {batch} --dtype {dtype}` (code: `fastconvnext/tooling/roofline.py`). Analytic: nothing is "
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
        "ConvNeXt V2's MLP (eager and the fusion floor; its kernels as built are in the static SASS model above):",
        "",
        _steps_table(example, dtype, "convnext_v2_mlp", ("eager", "fused_min")),
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
        "### ConvNeXt V2 MLP",
        "",
        _doc(roofline.convnext_v2_mlp_steps),
        "",
    ]
    return "\n".join(parts)
