"""Measure the performance model's machine constants on the GPU at hand, replacing its public figures.

fastconvnext/tooling/roofline.py's `Machine` carries figures taken from other projects' public measurements, not
measured by this project (MACHINE_SOURCES), that move the model most: the L2->SM read bandwidth (`l2_bytes_per_s`)
and the tensor-core efficiency (fastconvnext/tooling/sass_report.py's `tensor_efficiency`: 0.6 of the dense peak
with pointer loads, 0.7 with TMA). Four Triton microbenchmarks, each timed with CUDA events (warm-up, then repeats;
median and min/max), put a MEASURED figure beside each of the model's:
  hbm     read bandwidth of a buffer 4x the L2 (128-bit loads, every program a contiguous share)
  l2      read bandwidth of a buffer 1/4 of the L2, swept repeatedly by every program from a different start
  dot     tl.dot throughput on operands loaded once (no global traffic in the loop), bf16 in / fp32 accumulate,
          BLOCK_M 64/128 x BLOCK_N 64/128/256, as a fraction of the dense bf16 peak
  ffma    fp32 FMA issue rate of a register-only loop, in warp-instructions per SM per clock
Every kernel accumulates what it reads or computes and stores it, so none can be optimized away.

    python -m fastconvnext.tooling.calibrate --output DIR     # needs CUDA; ~1 minute on an H100
    python -m fastconvnext.tooling.calibrate --quick          # one dot tile per width N (3 instead of 6 dot
                                                            # kernels to compile): gpu_acceptance's stage 1
    python -m fastconvnext.tooling.calibrate --dry-run        # Triton interpreter, tiny sizes, NO measurement
    python -m fastconvnext.tooling.calibrate --sass 90        # compile the kernels for sm_90 (no GPU) and
                                                            # show the loop instructions (a MODEL check)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DOT_SHAPES = ((64, 64, 4), (64, 128, 4), (64, 256, 4), (128, 64, 4), (128, 128, 8), (128, 256, 8))  # M, N, warps
# The model's dot efficiency depends on the width N only (sass_report.tensor_efficiency): one tile per N is enough
# to check it, and compiles half the dot kernels (gpu_acceptance.py's stage 1 counts every compile).
QUICK_DOT_SHAPES = ((128, 64, 4), (128, 128, 8), (128, 256, 8))
DOT_K = 64
READ_BLOCK = 4096  # fp32 elements per program step: 16 B (one 128-bit load) per thread per 4 elements
FMA_CHAINS = 4  # independent FMA chains per element, to hide the FMA latency


def _dry_run_requested(argv):
    return "--dry-run" in (sys.argv[1:] if argv is None else argv)


if __name__ == "__main__" and _dry_run_requested(None):
    os.environ["TRITON_INTERPRET"] = "1"  # must precede triton.jit below

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastconvnext.kernels.compile_spec import FP_FUSION  # noqa: E402  (launched as the fused kernels are)


# ------------------------------------------------------------------------------------------- kernels


@triton.jit
def read_kernel(x_ptr,  # [n_blocks * BLOCK] fp32
                partial_ptr,  # [programs] fp32
                n_blocks, blocks_per_program, start_step, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = (pid * start_step) % n_blocks
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(blocks_per_program):
        block = (start + j) % n_blocks
        acc += tl.load(x_ptr + block * BLOCK + tl.arange(0, BLOCK), cache_modifier=".cg")  # L2, not L1
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def dot_kernel(a_ptr,  # [BLOCK_M, BLOCK_K] bf16
               b_ptr,  # [BLOCK_K, BLOCK_N] bf16 (fp16 in tests)
               out_ptr,  # [programs, BLOCK_M, BLOCK_N] fp32
               iterations, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols, ks = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * BLOCK_N + cols[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(iterations):
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + pid * BLOCK_M * BLOCK_N + rows[:, None] * BLOCK_N + cols[None, :], acc)


@triton.jit
def fma_kernel(out_ptr,  # [programs * BLOCK] fp32
               iterations, scale, shift, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    x0 = (offsets % 64).to(tl.float32)
    x1, x2, x3 = x0 + 1.0, x0 + 2.0, x0 + 3.0
    for _ in range(iterations):  # runtime scale/shift: nothing to fold; tl.fma: FFMA whatever FP fusion's default
        x0 = tl.fma(x0, scale, shift)
        x1 = tl.fma(x1, scale, shift)
        x2 = tl.fma(x2, scale, shift)
        x3 = tl.fma(x3, scale, shift)
    tl.store(out_ptr + offsets, x0 + x1 + x2 + x3)


# ------------------------------------------------------------------------------ launchers (host side)


def read_sum(x, programs, sweeps):
    """Per-program sums of `x` (fp32, a multiple of READ_BLOCK). sweeps=0: each program reads its own
    contiguous share once (HBM); sweeps>=1: every program reads all of x `sweeps` times, starting at a
    different block (L2). Returns (partials, bytes requested)."""
    import torch

    if x.dtype != torch.float32 or x.numel() % READ_BLOCK or x.numel() == 0:
        raise ValueError(f"read_sum needs a non-empty fp32 buffer of a multiple of {READ_BLOCK} elements, "
                         f"got {x.dtype} with {x.numel()}")
    n_blocks = x.numel() // READ_BLOCK
    if sweeps == 0:
        if n_blocks % programs:
            raise ValueError(f"{n_blocks} blocks do not split evenly over {programs} programs")
        per_program, step = n_blocks // programs, n_blocks // programs
    else:
        per_program, step = n_blocks * sweeps, max(1, n_blocks // programs)
    partials = torch.empty(programs, device=x.device, dtype=torch.float32)
    read_kernel[(programs,)](x, partials, n_blocks, per_program, step, BLOCK=READ_BLOCK, num_warps=8,
                             enable_fp_fusion=FP_FUSION)
    return partials, programs * per_program * READ_BLOCK * 4


def dot_loop(a, b, programs, iterations, num_warps):
    """`iterations` x (a @ b) accumulated in fp32 by each program; returns (out, FLOPs done)."""
    import torch

    (m, k), (k2, n) = a.shape, b.shape
    if k != k2 or a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        raise ValueError(f"dot_loop needs bf16 (or fp16) a [M, K] and b [K, N] of one dtype, got {a.dtype} {tuple(a.shape)}, "
                         f"{b.dtype} {tuple(b.shape)}")
    out = torch.empty(programs, m, n, device=a.device, dtype=torch.float32)
    dot_kernel[(programs,)](a.contiguous(), b.contiguous(), out, iterations, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k,
                            num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    return out, 2 * m * n * k * iterations * programs


def fma_loop(programs, iterations, block, device, scale=0.5, shift=1.0):
    """Returns (out, FMAs done) of fma_kernel: each element runs FMA_CHAINS chains x = x*scale + shift."""
    import torch

    out = torch.empty(programs * block, device=device, dtype=torch.float32)
    fma_kernel[(programs,)](out, iterations, scale, shift, BLOCK=block, num_warps=max(1, block // 128),
                            enable_fp_fusion=FP_FUSION)
    return out, programs * block * FMA_CHAINS * iterations


# ----------------------------------------------------------------------------------- timing, arithmetic


def time_ms(run, warmup=3, repeats=10, inner=1, cuda=True):
    """Milliseconds per call, one figure per repeat, each the mean of `inner` back-to-back calls. On a GPU one
    call precedes the start event, so the launches that follow queue behind it and the events time GPU work,
    not the launch latency (a dry run uses perf_counter)."""
    import torch

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            run()
            begin.record()
            for _ in range(inner):
                run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                run()
            times.append((time.perf_counter() - begin) * 1e3 / inner)
    return times


def rate(amount, times_ms):
    """amount (bytes, FLOPs, ...) per second at the median, the fastest and the slowest time."""
    if not times_ms or min(times_ms) <= 0:
        raise ValueError(f"rate needs positive times, got {times_ms}")
    per_s = lambda ms: amount / (ms * 1e-3)  # noqa: E731
    return {"median": per_s(statistics.median(times_ms)), "max": per_s(min(times_ms)), "min": per_s(max(times_ms))}


def ffma_issue_per_clock(fmas_per_s, sms, clock_hz):
    """Warp-instructions (32 FMAs each) per SM per clock."""
    return fmas_per_s / (32 * sms * clock_hz)


def assumed_dot_efficiency(arch, n):
    """The model's efficiency of a 16-bit dot of width n (pointer loads): wgmma on sm_90, HMMA on sm_80."""
    from fastconvnext.tooling.sass_report import tensor_efficiency

    return tensor_efficiency(arch, "HGMMA" if arch >= 90 else "HMMA", n)


# ------------------------------------------------------------------------------------------ the runs


def machine_for(arch, device_name):
    """The model's Machine for this arch, and the datasheet peaks of this very part where known
    (an H200 or an H100 PCIe has the sm_90 Machine but its own HBM bandwidth and tensor peak)."""
    from fastconvnext.tooling.roofline import MACHINES, gpu_for_device_name

    machine = MACHINES[90 if arch >= 90 else 80]
    return machine, gpu_for_device_name(device_name) or machine.gpu


def device_facts(torch, dry_run):
    facts = {"torch": torch.__version__, "triton": triton.__version__}
    if dry_run:
        return facts | {"device": "cpu (Triton interpreter, DRY RUN: no figure is a measurement)", "arch": 90,
                        "sms": 1}
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability()
    facts |= {"device": props.name, "arch": 10 * major + minor, "sms": props.multi_processor_count,
              "l2_bytes": getattr(props, "L2_cache_size", None), "cuda": torch.version.cuda}
    clock_khz = getattr(props, "clock_rate", None)  # not exposed by every torch build
    if clock_khz:
        facts["clock_hz"] = clock_khz * 1e3
    facts["nvidia-smi clocks.sm, clocks.max.sm (MHz)"] = _smi_clocks()
    return facts


def _smi_clocks():
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "n/a"
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def run_all(dry_run=False, repeats=10, dot_shapes=DOT_SHAPES, on_row=None):
    """Runs the microbenchmarks; returns (rows, suggestions, facts). Rows: (figure, measured median,
    measured min..max, assumed, measured/assumed, unit). dot_shapes: the (M, N, warps) dot tiles to time (a dry
    run takes the first two); on_row(row, facts) is called as soon as each row is measured, so a caller can
    write it out before the next kernel compiles."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: calibrate_machine needs a GPU (or --dry-run for the interpreter)")
    facts = device_facts(torch, dry_run)
    machine, gpu = machine_for(facts["arch"], facts["device"])
    facts["model"] = f"Machine {machine.name} (sm_{machine.arch}), datasheet peaks of {gpu.name}"
    device = "cpu" if dry_run else "cuda"
    sms = facts["sms"]
    l2 = facts.get("l2_bytes") or machine.l2_size
    clock = facts.get("clock_hz") or machine.clock_hz
    facts["clock_source"] = "torch" if "clock_hz" in facts else "model (the clock the bf16 peak implies)"

    def timed(run, inner):
        return time_ms(run, warmup=1 if dry_run else 3, repeats=2 if dry_run else repeats,
                       inner=1 if dry_run else inner, cuda=not dry_run)

    rows, suggest = [], {}

    def row(figure, measured, assumed, unit, scale=1.0):
        rows.append((figure, measured["median"] / scale, (measured["min"] / scale, measured["max"] / scale),
                     assumed / scale, measured["median"] / assumed, unit))
        if on_row is not None:
            on_row(rows[-1], facts)

    # HBM: 4x L2, one contiguous share per program, 8 programs per SM
    programs = 1 if dry_run else sms * 8
    n = READ_BLOCK * programs * (2 if dry_run else max(1, int(4 * l2) // (READ_BLOCK * 4 * programs)))
    x = torch.ones(n, device=device)
    hbm_bytes = read_sum(x, programs, 0)[1]
    hbm = rate(hbm_bytes, timed(lambda: read_sum(x, programs, 0), inner=20))
    row("HBM read bandwidth", hbm, gpu.hbm_bytes_per_s, "TB/s", 1e12)
    # L2: 1/4 of L2, every program sweeps all of it
    n = READ_BLOCK * (2 if dry_run else max(1, int(l2 / 4) // (READ_BLOCK * 4)))
    x = torch.ones(n, device=device)
    sweeps = 1 if dry_run else 4
    l2_bytes = read_sum(x, programs, sweeps)[1]
    l2_rate = rate(l2_bytes, timed(lambda: read_sum(x, programs, sweeps), inner=2))
    row("L2->SM read bandwidth", l2_rate, machine.l2_bytes_per_s, "TB/s", 1e12)
    suggest["roofline.Machine.l2_bytes_per_s"] = l2_rate["median"]
    # tensor cores
    peak = gpu.tensor_flops["bf16"]
    suggest["tensor_efficiency"] = {}
    for m, n_, warps in tuple(dot_shapes)[:2] if dry_run else dot_shapes:
        a = torch.randn(m, DOT_K, device=device).to(torch.bfloat16)
        b = torch.randn(DOT_K, n_, device=device).to(torch.bfloat16)
        programs, iterations = (1, 2) if dry_run else (sms * 8, 2048)  # 8 per SM: even waves, SMs full
        flops = dot_loop(a, b, programs, iterations, warps)[1]
        achieved = rate(flops, timed(lambda: dot_loop(a, b, programs, iterations, warps), inner=3))
        efficiency = {k: v / peak for k, v in achieved.items()}
        assumed = assumed_dot_efficiency(facts["arch"], n_)
        row(f"bf16 dot {m}x{n_}x{DOT_K} ({warps} warps), fraction of dense peak", efficiency, assumed, "of peak")
        suggest["tensor_efficiency"][f"{m}x{n_}"] = efficiency["median"]
    # FFMA issue rate
    block = 128 if dry_run else 1024
    programs, iterations = (1, 4) if dry_run else (sms * 16, 8192)
    fmas = fma_loop(programs, iterations, block, device)[1]
    fma_rate = rate(fmas, timed(lambda: fma_loop(programs, iterations, block, device), inner=5))
    issue = {k: ffma_issue_per_clock(v, sms, clock) for k, v in fma_rate.items()}
    row("FFMA warp-instructions per SM per clock", issue, machine.issue_per_clock, "/clk/SM")
    suggest["roofline.Machine.issue_per_clock (FFMA)"] = issue["median"]
    return rows, suggest, facts


def table(rows, dry_run=False):
    label = "DRY RUN (interpreter; NOT a measurement)" if dry_run else "MEASURED"
    lines = [f"| figure | {label} median | min .. max | model (public figure or datasheet) | measured/model | unit |",
             "|---|---|---|---|---|---|"]
    for figure, median, (low, high), assumed, ratio, unit in rows:
        lines.append(f"| {figure} | {median:.3g} | {low:.3g} .. {high:.3g} | {assumed:.3g} | {ratio:.2f} | {unit} |")
    return "\n".join(lines)


def report(rows, suggest, facts, dry_run=False):
    head = ", ".join(f"{k} {v}" for k, v in facts.items())
    how = ("DRY RUN in Triton's interpreter: the kernels ran at tiny sizes on the CPU and NO figure below is a "
           "measurement" if dry_run else "Each figure is MEASURED on this device (CUDA events, median of the repeats)")
    label = "DRY RUN, meaningless" if dry_run else "MEASURED medians"
    return (f"Machine calibration ({head}). {how}, beside the model's constant from fastconvnext/tooling/roofline.py / "
            "sass_report.py: the L2->SM bandwidth and the tensor-core efficiency there are other projects' public "
            "figures (roofline.MACHINE_SOURCES), the issue rate the CUDA guide's, HBM bandwidth and the bf16 peak the "
            "datasheet's.\n\n"
            + table(rows, dry_run) + f"\n\nSuggested constants ({label}):\n\n```\n" + json.dumps(suggest, indent=1)
            + "\n```")


# ------------------------------------------------------------------------------ SASS check (no GPU)


def sass_targets():
    """Each microbenchmark kernel as a compile target (pointers 16-byte aligned, as a launch gets them)."""
    from fastconvnext.kernels.compile_spec import CompileTarget

    def target(name, fn, signature, constexprs, warps):
        signature = signature | {k: "constexpr" for k in constexprs}
        return CompileTarget(kernel=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=warps)

    yield target("read", read_kernel, {"x_ptr": "*fp32", "partial_ptr": "*fp32", "n_blocks": "i32",
                                       "blocks_per_program": "i32", "start_step": "i32"}, {"BLOCK": READ_BLOCK}, 8)
    for m, n, warps in DOT_SHAPES:
        yield target(f"dot {m}x{n}", dot_kernel, {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32",
                                                   "iterations": "i32"},
                     {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": DOT_K}, warps)
    yield target("ffma", fma_kernel, {"out_ptr": "*fp32", "iterations": "i32", "scale": "fp32", "shift": "fp32"},
                 {"BLOCK": 1024}, 8)


def sass_summary(arch, only=None):
    """Per kernel: registers, spill bytes and the opcodes in its innermost loop (a MODEL-side check)."""
    from collections import Counter

    from fastconvnext.tooling.sass_report import compile_sass, find_loops, hot_loops, parse_sass

    lines = []
    for target in sass_targets():
        if only and not target.kernel.startswith(only):
            continue
        compiled = compile_sass(target, arch)
        instrs = parse_sass(compiled.sass)
        loops = hot_loops(find_loops(instrs)) or find_loops(instrs)
        counts = Counter(i.opcode for i in instrs if any(loop.holds(i.address) for loop in loops))
        lines.append(f"sm_{arch} {target.kernel}: {compiled.registers} registers, {compiled.spill_bytes} B spill; "
                     "loop: " + ", ".join(f"{op} x{c}" for op, c in counts.most_common(8)))
    return lines


# ------------------------------------------------------------------------------------------------ CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write calibrate_machine.json and .md here")
    parser.add_argument("--dry-run", action="store_true", help="interpreter, tiny sizes; checks the code only")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help=f"dot tiles {QUICK_DOT_SHAPES} only (one per width N)")
    parser.add_argument("--sass", type=int, choices=(80, 90), help="compile for sm_ARCH and print the loops")
    args = parser.parse_args(argv)
    if args.sass:
        print("\n".join(sass_summary(args.sass)))
        return 0
    try:
        rows, suggest, facts = run_all(args.dry_run, args.repeats, QUICK_DOT_SHAPES if args.quick else DOT_SHAPES)
    except RuntimeError as error:
        print(f"calibrate_machine: {error}", file=sys.stderr)
        return 2
    text = report(rows, suggest, facts, args.dry_run)
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "calibrate_machine.md").write_text(text + "\n")
        (args.output / "calibrate_machine.json").write_text(json.dumps(
            {"measured": not args.dry_run, "facts": facts, "suggested": suggest,
             "rows": [dict(zip(("figure", "median", "min_max", "assumed", "ratio", "unit"), r)) for r in rows]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
