"""Per-op report for the kernel issues: fused vs eager at ConvNeXt-T/-B stage shapes, batch 64 and 128.

Always (any machine, no measurement): per call, the modelled HBM bytes and FLOPs of eager PyTorch
(channels-last; for dwconv+LN also transformers' NCHW conv + permute order), the fused kernel as built
and the fusion floor, the H100 roofline bound of each, and the bytes each keeps for backward (counted
with saved_tensors_hooks under FakeTensorMode, see fastconvnext/bench/memory.py).
On CUDA (or on CPU with --measure, eager only): the measurement of `fastconvnext bench --ops
dwconv_layernorm,convnext_mlp` per batch: median ms, achieved GB/s and % of the HBM peak, TFLOP/s,
peak memory, fused vs eager vs torch.compile.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastconvnext.bench import cases, memory, roofline
from fastconvnext.bench.table import format_table

MB = 1e6


def analytic_rows(batches=(64, 128), dtype="bf16", models=("tiny", "base"), passes=roofline.PASSES):
    shapes = [s for b in batches for s in roofline.stage_shapes(models, b)]
    requests = [(op, impl, shape, dtype) for op in roofline.OPS for shape in shapes
                for impl in roofline.IMPLS[op] if impl != "fused_min"]
    try:
        saved = dict(zip(((op, impl, shape) for op, impl, shape, _ in requests), memory.measure(requests)))
    except Exception as error:  # the table is still useful without the saved-bytes columns
        print(f"(saved-for-backward bytes not counted: {type(error).__name__}: {error})")
        saved = {}
    gpu = roofline.H100_SXM
    rows = []
    for op in roofline.OPS:
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
    print(f"Per call, analytic ({dtype}): HBM bytes and FLOPs by the byte model of fastconvnext/bench/roofline.py; "
          f"H100 SXM bound = sum over kernels of max(bytes / 3.35 TB/s, FLOPs / peak); 'saved' = bytes kept for "
          f"backward beyond inputs and parameters (saved_tensors_hooks, FakeTensorMode: exact shapes, nothing run).")
    print(format_table(ANALYTIC_HEADERS, analytic_rows(batches, dtype, models)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
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
    from fastconvnext.bench import cli, environment

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
    return status
