"""Per-op report for the kernel issues: fused vs eager at ConvNeXt-T/-B stage shapes, batch 64 and 256.

Always (any machine, no measurement): per call, the modelled HBM bytes and FLOPs of eager PyTorch
(channels-last; for dwconv+LN also transformers' NCHW conv + permute order), the fused kernel as built
and the fusion floor, the H100 roofline bound of each, and the bytes each keeps for backward (counted
with saved_tensors_hooks under FakeTensorMode, see fastconvnext/tooling/bench/memory.py).
On CUDA (or on CPU with --measure, eager only): the measurement of `fastconvnext bench --ops
dwconv_layernorm,convnext_mlp` per batch: median ms, achieved GB/s and % of the HBM peak, TFLOP/s,
peak memory, fused vs eager vs torch.compile; then each measured fused/eager call beside the static SASS
model's prediction (`predicted_us`, the prior fastconvnext/prior.json), so the model can be calibrated.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastconvnext.tooling.bench import cases, memory
from fastconvnext.tooling import model_tables, roofline
from fastconvnext.tooling.bench.table import format_table

MB = 1e6


def analytic_rows(batches=(64, 256), dtype="bf16", models=("tiny", "base"), passes=roofline.PASSES):
    shapes = [s for b in batches for s in roofline.stage_shapes(models, b)]
    requests = [(op, impl, shape, dtype) for op in roofline.BUILT_OPS for shape in shapes
                for impl in roofline.IMPLS[op] if impl != "fused_min"]
    try:
        saved = dict(zip(((op, impl, shape) for op, impl, shape, _ in requests), memory.measure(requests)))
    except Exception as error:  # the table is still useful without the saved-bytes columns
        print(f"(saved-for-backward bytes not counted: {type(error).__name__}: {error})")
        saved = {}
    gpu = roofline.H100_SXM
    rows = []
    for op in roofline.BUILT_OPS:
        for shape in shapes:
            for pass_ in passes:
                t = {impl: roofline.traffic(op, impl, pass_, shape, dtype) for impl in roofline.IMPLS[op]}

                def saved_mb(impl):
                    s = saved.get((op, impl, shape))
                    return f"{s.extra / MB:,.1f}" if s is not None and pass_ == "fwd+bwd" else ""

                rows.append([
                    op, shape.label, shape.batch, pass_,
                    f"{t['eager'].bytes / MB:,.1f}",
                    f"{t['eager_nchw'].bytes / MB:,.1f}" if "eager_nchw" in t else "",
                    f"{t['fused'].bytes / MB:,.1f}", f"{t['fused_min'].bytes / MB:,.1f}",
                    f"{t['eager'].flops / 1e9:,.1f}", f"{t['fused'].flops / 1e9:,.1f}",
                    f"{t['eager'].seconds(gpu) * 1e6:,.1f}", f"{t['fused'].seconds(gpu) * 1e6:,.1f}",
                    saved_mb("eager"), saved_mb("fused"),
                ])
    return rows


ANALYTIC_HEADERS = ("op", "stage", "batch", "pass", "eager MB", "NCHW eager MB", "fused MB", "floor MB",
                    "eager GFLOP", "fused GFLOP", "H100 eager µs", "H100 fused µs", "eager saved MB",
                    "fused saved MB")


def print_analytic(batches, dtype, models):
    print(f"Per call, analytic ({dtype}): HBM bytes and FLOPs by the byte model of fastconvnext/tooling/roofline.py; "
          f"H100 SXM bound = sum over kernels of max(bytes / 3.35 TB/s, FLOPs / peak); 'saved' = bytes kept for "
          f"backward beyond inputs and parameters (saved_tensors_hooks, FakeTensorMode: exact shapes, nothing run).")
    print(format_table(ANALYTIC_HEADERS, analytic_rows(batches, dtype, models)))


def predicted_us(op, shape, dtype, mode, arch=None):
    """The prior's row (fastconvnext/prior.json: "fused_us", "eager_us" = the eager estimate, "floor_us", ...) for
    one op call, or None.

    op: "dwconv_layernorm" or "convnext_mlp"; shape: (N, H, W, C) or a roofline.StageShape; dtype: "bf16",
    "fp16" or "fp32"; mode: "forward" or "forward_backward" (also "fwd" / "fwd+bwd"); arch: 90 or 80, default
    that of the current CUDA device (90 without one). A MODEL figure, never a measurement."""
    n, h, w, c = shape.dims if hasattr(shape, "dims") else shape
    mode = {"fwd": "forward", "fwd+bwd": "forward_backward"}.get(mode, mode)
    if mode not in ("forward", "forward_backward"):
        raise ValueError(f"mode must be 'forward' or 'forward_backward', got {mode!r}")
    if arch is None:
        arch = _device_arch()
    table = model_tables.prior()
    if table is None:
        return None
    return table.get((op, arch, dtype, c, h * w, n, mode))


def _device_arch():
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 90 if major >= 9 else 80
    except ImportError:
        pass
    return 90


MEASURED_HEADERS = ("op", "shape", "pass", "impl", "measured µs", "predicted µs (model)", "measured/predicted")


def measured_vs_predicted(csv_path, arch=None):
    """Rows of a `fastconvnext bench --ops` CSV beside the model's prediction (fused and eager rows)."""
    import csv

    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["section"] not in roofline.OPS or row["implementation"] not in ("fused", "eager"):
                continue
            if not row["median_ms"] or row["pass"] not in ("fwd", "fwd+bwd"):
                continue
            dims = tuple(int(v) for v in row["shape"].split("x"))
            entry = predicted_us(row["section"], dims, row["dtype"], row["pass"], arch)
            if entry is None:
                continue
            predicted = entry["fused_us" if row["implementation"] == "fused" else "eager_us"]
            measured = float(row["median_ms"]) * 1e3
            rows.append([row["section"], row["shape"], row["pass"], row["implementation"], f"{measured:,.1f}",
                         f"{predicted:,.1f}", f"{measured / predicted:.2f}"])
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtype", choices=tuple(cases.DTYPES), help="default: bf16 on CUDA, fp32 for a CPU "
                                                                      "measurement; the analytic table uses bf16 "
                                                                      "unless given")
    parser.add_argument("--stages", default="tiny,base", help="comma list of tiny, base")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--measure", action="store_true", help="on CPU: also time the eager ops (slow at batch 64)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--output", type=Path, default=Path("bench-results/ops"))
    parser.add_argument("--no-compile", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from fastconvnext.tooling.bench import cli, environment

    models = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    device = environment.resolve_device(args.device)
    print_analytic(args.batch, args.dtype or "bf16", models)
    if device.type != "cuda" and not args.measure:
        print("\nNo CUDA device: nothing timed (the fused kernels need a GPU; --measure times the eager ops on CPU).")
        return 0
    status = 0
    for batch in args.batch:
        print()
        bench_args = ["--ops", "dwconv_layernorm,convnext_mlp", "--batch", str(batch), "--stages", ",".join(models),
                      "--device", device.type, "--output", str(args.output / f"batch{batch}")]
        if args.dtype:
            bench_args += ["--dtype", args.dtype]
        if args.repeats:
            bench_args += ["--repeats", str(args.repeats)]
        if args.warmup is not None:
            bench_args += ["--warmup", str(args.warmup)]
        if args.no_compile:
            bench_args.append("--no-compile")
        status = max(status, cli.main(bench_args))
        csv_path = args.output / f"batch{batch}" / "bench.csv"
        if csv_path.is_file():
            rows = measured_vs_predicted(csv_path)
            print(f"\nMeasured beside the prior (fastconvnext/prior.json, MODEL; eager predicted = the eager "
                  f"estimate), batch {batch}:")
            print(format_table(MEASURED_HEADERS, rows) if rows else "(no modelled shape among the measured rows)")
    return status
