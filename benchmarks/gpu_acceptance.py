"""GPU acceptance run in stages, each one command well under 10 minutes, for a short lease on a first GPU.

The reference box: one H100, Python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5.17 preinstalled, no
package index, this checkout copied there as a plain source tree (not installed), about 15 minutes of machine
time in all including its start-up, at most 10 minutes a command. So:

  preflight  (limit 50 s, expected ~15 s) versions, GPU, `fastconvnext.kernels` from this tree, CUDA; fails fast
             naming what is missing (expected vs found). Every stage runs these checks first.
  1          (limit 240 s, expected ~190 s) calibration constants (fastconvnext.tooling.calibrate --quick) and fused
             vs eager MEASURED per op (dwconv+LN, MLP, V2 MLP) at ConvNeXt-T's (= V2-T's) stage shapes, batch 64
             then 256, bf16, forward and forward+backward, medians with spreads and the fused/eager ratio; the prior's
             figure only as a MODEL column
  2          (limit 170 s, expected ~140 s) native correctness of the three ops at full stage shapes (batch 64) against
             the eager references under tests/tolerance.py's rule, bf16 first (stage 1's compiles), then fp32, fp16
             (V2's MLP there at the first and last stage shape only)
  3          (limit 240 s, expected ~170 s) fastconvnext.tune() and its table, a 50-step bf16-autocast training run
             fused vs eager, torch.compile (inductor) of ConvNeXt-T widths through both V1 fused ops
  tests      (extra, not in `all`; limit 590 s) pytest in GPU mode over KERNEL_TEST_FILES (serial compiles of
             three dtypes at batch 8: ~8-10 minutes; for a box with time to spare)

Compile work is what makes a first run slow (a kernel variant takes ~5-20 s of one core to compile), so: Triton
autotuning is off (FASTCONVNEXT_AUTOTUNE=0 pins each launcher's default config), only the variants the measured
shapes launch are compiled, they are compiled in parallel (a pool of processes runs each case once, on the GPU,
before anything is timed: the real launch path, so the cache keys are exactly the launches' own), and one Triton
cache directory (TRITON_CACHE_DIR, default <output>/cache/triton) carries them from stage to stage.

Each stage writes <output>/stage<N>.jsonl (a JSON object a line) and stage<N>.md figure by figure, each line
flushed and fsynced as soon as the figure exists, so a stage cut off by its time limit keeps everything it had
measured; <output>/gpu_acceptance.md and .json gather every stage run so far.

    benchmarks/gpu_acceptance.sh --stage preflight OUT       # then --stage 1, --stage 2, --stage 3, one command each
    benchmarks/gpu_acceptance.sh --stage all OUT             # all four in one command (~11 minutes of limits)
    benchmarks/gpu_acceptance.sh --rehearse --stage all OUT  # CPU: every stage's code path, tiny shapes, interpreter
    python benchmarks/gpu_acceptance.py --plan               # the plan, and the kernel variants each stage compiles
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------- the plan

COMMAND_LIMIT_S = 600  # the box's limit per command
DEVICE_BUDGET_S = 900  # machine time per session, start-up included
STARTUP_ALLOWANCE_S = 180  # the machine's start (minutes), file transfers, the gaps between commands


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    timeout_s: int  # the stage process is killed (its whole process group) at this limit
    expected_s: int  # what it should take on the reference box (H100, 16 cores), compiles included
    parts: tuple  # in the order they run (by value: a stage cut short keeps the first parts)
    why: str  # where the expected time goes


STAGES = (
    Stage("preflight", "versions, GPU, imports from this tree, CUDA", 50, 15, ("checks",),
          "imports torch, triton and the three kernel modules (no compile; transformers' version is read, not "
          "imported); ~10 s of imports on a cold disk"),
    Stage("1", "calibration and fused vs eager, MEASURED", 240, 190, ("prewarm", "calibrate", "ops"),
          "~15 s start (imports, CUDA context); prewarm ~80-120 s: 62 kernel variants (bf16, batch 64 and 256: 14 "
          "dwconv+LN, 23 MLP, 24 V2 MLP, 1 more dwconv at batch 256) plus 5 calibration kernels compiled by a pool of "
          "processes (at most 15), so the slowest worker's few compiles set the time, not their sum (~700 s serial); "
          "calibration ~10 s; 48 timed cases (3 ops: dwconv+LN, MLP, V2 MLP x 4 shapes x 2 passes x 2 batches, 3 "
          "warm-up + 25 interleaved repeats, L2 flushed) ~45 s"),
    Stage("2", "native correctness at full stage shapes", 170, 140, ("check bf16", "check fp32", "check fp16"),
          "~15 s start; bf16 reuses stage 1's 61 batch-64 variants (0 new compiles) and is checked while the pool "
          "compiles fp32 and fp16 (46 and 43 new variants; ~75-110 s in parallel); 64 checks, ~27 s: dwconv+LN and "
          "MLP at 4 shapes x 3 dtypes, V2 MLP at 4 shapes in bf16 but in fp32 and fp16 only at C=96@56 and C=768@7 "
          "(at all four: 18 + 16 variants instead of 9 + 8, ~25 s more, too close to the limit), each forward and "
          "forward+backward, fp64 references, a bitwise rerun"),
    Stage("3", "tune(), bf16 training, inductor", 240, 170, ("tune", "training", "inductor"),
          "~15 s start; tune() at batch 64 bf16 reuses stage 1's variants (0 new), ~20 s; the autocast training reads "
          "fp32 activations into the dwconv kernels (fp32 in, bf16 out): ~12 variants the launch plans do not list, "
          "compiled by the pool, ~40 s; 2 x 50 steps at batch 64 ~20 s; inductor (one block a stage, ConvNeXt-T "
          "widths, batch 64 bf16, forward+backward, reusing stage 1's variants) ~60 s of inductor's own compiles"),
)
EXTRA_STAGES = (
    Stage("tests", "pytest GPU mode over the kernel test files", 590, 540, ("pytest",),
          "FASTCONVNEXT_TEST_DEVICE=cuda runs tests/test_kernels_native.py at batch 8 in three dtypes (batch 8 is "
          "another specialization than the stages' 64): up to ~110 variants compiled one after another by pytest's "
          "single process, ~8-10 minutes; not part of `all`"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES + EXTRA_STAGES}
PLAN_ORDER = tuple(stage.name for stage in STAGES)

KERNEL_TEST_FILES = ("test_kernels_native.py", "test_dispatch_policy.py", "test_tuning.py", "test_kernel_env.py")
CONVNEXT_T = dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
STAGES_T = ((56, 96), (28, 192), (14, 384), (7, 768))  # (side, channels) of ConvNeXt-T's stages at 224x224
V2_MLP = "convnext_v2_mlp"  # ConvNeXt V2's MLP with GRN; ConvNeXt V2-T has ConvNeXt-T's widths and stage shapes
OPS = ("dwconv_layernorm", "convnext_mlp", V2_MLP)  # timed in stage 1, checked in stage 2
MODEL_OPS = OPS[:2]  # what stage 3's ConvNeXt (V1) runs
KERNEL_MODULES = tuple(f"{op}_kernel" for op in OPS)  # fastconvnext.kernels.<op>_kernel, one fused op each
OP_OPTIONS = {"dwconv_layernorm": dict(eps=1e-6), "convnext_mlp": dict(act="gelu", sample_scale=None),
              V2_MLP: dict(act="gelu", sample_scale=None)}  # each op's non-tensor arguments, in positional order
PASSES = ("forward", "forward_backward")
TRAINING_LOSS_RTOL = 0.05  # fused vs eager loss per step; bf16 rounding differs between the two paths
REFERENCE_BOX = {"python": "3.12", "torch": "2.11", "cuda": "13", "triton": "3.6", "transformers": "5.17"}
MIN_VERSIONS = {"python": (3, 10), "torch": (2, 4)}  # pyproject.toml's floors
MIN_ARCH = 80  # the kernels are built and checked for sm_80 and sm_90


@dataclass(frozen=True)
class Setup:
    """What the stages run on. REAL is the acceptance run; REHEARSAL the same code paths on CPU in Triton's
    interpreter at tiny shapes (fp32/fp16: the interpreter refuses bf16 dots), so the plumbing is proven here."""

    device: str = "cuda"
    op_shapes: tuple = STAGES_T  # stage 1: (side, channels)
    op_batches: tuple = (64, 256)
    op_dtype: str = "bf16"
    warmup: int = 3
    repeats: int = 25
    check_shapes: tuple = STAGES_T  # stage 2
    check_batch: int = 64  # one of op_batches: the same variants as stage 1
    check_dtypes: tuple = ("bf16", "fp32", "fp16")  # the first is op_dtype (stage 1 compiled it)
    # (op, shapes): in the dtypes after the first (new compiles) these ops are checked at these shapes only, to keep
    # stage 2 in its limit; V2's MLP at the first and last stage (C=96 recomputes its hidden in fp16, 768 stores it)
    check_subset: tuple = ((V2_MLP, (STAGES_T[0], STAGES_T[-1])),)
    model: dict = field(default_factory=lambda: dict(CONVNEXT_T))  # stage 3: tune and training
    inductor_model: dict = field(default_factory=lambda: dict(hidden_sizes=[96, 192, 384, 768], depths=[1, 1, 1, 1]))
    image: int = 224
    batch: int = 64  # tune, training and inductor (stage 1's specializations)
    dtype: str = "bf16"  # tune and inductor activations; training autocasts to it when autocast
    autocast: bool = True
    train_steps: int = 50
    train_cycle: int = 4  # distinct fixed batches the training cycles over
    compile_backend: str = "inductor"
    quick_timer: bool = False  # tune(): the default CUDA-event timer, or 1 warm-up + 2 repeats (rehearsal)
    workers: int = 0  # prewarm pool size; 0: from the CPU count


REAL = Setup()
REHEARSAL = Setup(
    device="cpu", op_shapes=((4, 8),), op_batches=(1, 2), op_dtype="fp32", warmup=1, repeats=3,
    check_shapes=((4, 8),), check_batch=2, check_dtypes=("fp32", "fp16"),
    check_subset=((V2_MLP, ((4, 8),)),),  # the subset's code path, at the one tiny shape
    model=dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
    inductor_model=dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
    image=16, batch=2, dtype="fp32", autocast=False, train_steps=4, train_cycle=2, quick_timer=True, workers=2)


def plan_problems(stages=STAGES, budget_s=DEVICE_BUDGET_S, startup_s=STARTUP_ALLOWANCE_S):
    """What is wrong with a plan (empty when it fits): limits under one command, stage 1 within 4 minutes, the
    sum of the limits within the device budget less the start-up allowance, expected times within the limits."""
    problems = []
    for stage in stages:
        if not 0 < stage.timeout_s < COMMAND_LIMIT_S:
            problems.append(f"stage {stage.name}: limit {stage.timeout_s} s is not under {COMMAND_LIMIT_S} s")
        if not 0 < stage.expected_s < stage.timeout_s:
            problems.append(f"stage {stage.name}: expected {stage.expected_s} s is not under its limit")
    first = [s for s in stages if s.name == "1"]
    if first and first[0].timeout_s > 240:
        problems.append(f"stage 1: limit {first[0].timeout_s} s is over 240 s")
    total = sum(s.timeout_s for s in stages)
    if total > budget_s - startup_s:
        problems.append(f"the limits sum to {total} s, over {budget_s} s less {startup_s} s of start-up")
    return problems


def plan_text():
    lines = ["| stage | what | limit s | expected s | parts | where the time goes |", "|---|---|---|---|---|---|"]
    for stage in STAGES + EXTRA_STAGES:
        extra = " (extra)" if stage in EXTRA_STAGES else ""
        lines.append(f"| {stage.name}{extra} | {stage.title} | {stage.timeout_s} | {stage.expected_s} | "
                     f"{', '.join(stage.parts)} | {stage.why} |")
    total = sum(s.timeout_s for s in STAGES)
    lines += ["", f"Limits of preflight + 1 + 2 + 3: {total} s; expected {sum(s.expected_s for s in STAGES)} s; budget "
                  f"{DEVICE_BUDGET_S} s of machine time less {STARTUP_ALLOWANCE_S} s for its start-up and gaps "
                  f"= {DEVICE_BUDGET_S - STARTUP_ALLOWANCE_S} s; each command under {COMMAND_LIMIT_S} s."]
    return "\n".join(lines)


def planned_variants(setup=REAL):
    """Kernel variants (distinct compiles) each stage's op launches need, by the kernels' own launch_plans (each
    launcher's config with autotuning off) specialized as Triton's launcher does (fastconvnext/tooling/sass_report.py). A MODEL
    of Triton's cache keys, not a count of compiles: the real count is in each stage's status (new cubins)."""
    import torch

    from fastconvnext.tooling import sass_report

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def variants(cases):
        keys = set()
        for op, batch, side, channels, dtype, training in cases:
            plans, _ = sass_report.launch_plans(op, batch, side, side, channels, dtypes[dtype], training)
            for plan in plans:
                if plan.target is None:
                    continue
                signature, constexprs, attrs = sass_report.specialization(plan.target, plan)
                keys.add((plan.target.kernel, tuple(sorted(signature.items())),
                          tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                          tuple(sorted((str(k), str(v)) for k, v in attrs.items())),
                          plan.target.num_warps, plan.target.num_stages))
        return keys

    stage1 = variants([(op, batch, side, c, setup.op_dtype, pass_ != "forward")
                       for op, batch, side, c, pass_ in op_cases(setup)])
    counts = {"1": len(stage1)}
    seen = set(stage1)
    for dtype in setup.check_dtypes:
        new = variants([(op, setup.check_batch, side, c, dtype, pass_ != "forward")
                        for d, op, side, c, pass_ in check_cases(setup) if d == dtype]) - seen
        counts[f"2 {dtype}"] = len(new)
        seen |= new
    model_shapes = [(setup.image // 4 // 2 ** i, c) for i, c in enumerate(setup.model["hidden_sizes"])]
    counts["3 (tune, inductor)"] = len(variants([(op, setup.batch, side, c, setup.dtype, training)
                                                 for side, c in model_shapes for op in MODEL_OPS
                                                 for training in (False, True)]) - seen)
    return counts


# ------------------------------------------------------------------------------------- incremental reports


class FigureLog:
    """One stage's report: <output>/stage<N>.jsonl (one JSON object a line: sections, figures, notes) and
    stage<N>.md, both appended figure by figure, each write flushed and fsynced at once, so a stage killed at
    any point leaves every figure it had, parseable (`read_records` drops a torn last line)."""

    def __init__(self, output: Path, stage: str, echo=print):
        output.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md = output / f"stage{stage}.jsonl", output / f"stage{stage}.md"
        for path in (self.jsonl, self.md):
            path.write_text("")  # a new run of the stage starts its files afresh
        self.echo, self.part, self.columns = echo, "", ()

    @staticmethod
    def _append(path, text):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _record(self, kind, **data):
        self._append(self.jsonl, json.dumps({"kind": kind, "part": self.part, "time": time.time(), **data},
                                            default=str) + "\n")

    def section(self, part, title, text="", columns=()):
        self.part, self.columns = part, tuple(columns)
        self._record("section", title=title, text=text, columns=list(columns))
        md = f"\n### {title}\n\n" + (f"{text}\n\n" if text else "")
        if columns:
            md += "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        self._append(self.md, md)
        self.echo(f"== {title}")

    def row(self, cells, **data):
        """One figure: its markdown cells (one per column of the section) and its raw values."""
        cells = [str(c) for c in cells]
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for the {len(self.columns)} columns {self.columns}")
        self._record("figure", cells=cells, **data)
        self._append(self.md, "| " + " | ".join(cells) + " |\n")
        self.echo("  " + " | ".join(cells))

    def note(self, text, **data):
        self._record("note", text=text, **data)
        self._append(self.md, f"\n{text}\n\n")
        self.echo(text)


def read_records(path):
    """The records of a stage's .jsonl; a last line cut short by a kill is dropped, any other bad line raises."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON")
    return records


# ---------------------------------------------------------------------------------------- orchestration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=plan_text())
    parser.add_argument("--stage", default="all",
                        help=f"'all' ({', '.join(PLAN_ORDER)}) or a comma list out of "
                             f"{', '.join(PLAN_ORDER + tuple(s.name for s in EXTRA_STAGES))}")
    parser.add_argument("--output", type=Path, help="directory for the reports (created)")
    parser.add_argument("--rehearse", action="store_true",
                        help="CPU: each stage's code path in Triton's interpreter at tiny shapes (no measurement)")
    parser.add_argument("--cache-dir", type=Path, help="root of the Triton, inductor and tune() caches "
                                                       "(default OUTPUT/cache; TRITON_CACHE_DIR, when set, wins)")
    parser.add_argument("--workers", type=int, default=0, help="prewarm processes (default: CPU cores - 1, max 15)")
    parser.add_argument("--plan", action="store_true", help="print the stage plan and the variants each compiles")
    parser.add_argument("--print-limit", action="store_true", help=argparse.SUPPRESS)  # the shell's backstop
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: one stage, in this process
    args = parser.parse_args(argv)
    names = PLAN_ORDER if args.stage.strip() == "all" else tuple(s.strip() for s in args.stage.split(",") if s.strip())
    unknown = [n for n in names if n not in STAGE_BY_NAME]
    if unknown or not names:
        parser.error(f"--stage takes 'all' or a comma list out of {', '.join(STAGE_BY_NAME)}, got {args.stage!r}")
    args.stages = names
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.output is None and not (args.plan or args.print_limit):
        parser.error("the following arguments are required: --output")
    if args.output is not None:
        args.output = args.output.resolve()
        args.cache_dir = (args.cache_dir or args.output / "cache").resolve()
    return args


def stage_environment(args, name, base=None):
    """The environment a stage process runs in: this checkout first on PYTHONPATH (nothing is installed on the
    box), autotuning off, the shared Triton/inductor caches, tune()'s cache under the cache dir, and
    TRITON_INTERPRET unset (native) or 1 (rehearsal)."""
    env = dict(os.environ if base is None else base)
    others = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + others)
    env["FASTCONVNEXT_AUTOTUNE"] = "0"
    env.setdefault("TRITON_CACHE_DIR", str(args.cache_dir / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.cache_dir / "inductor"))
    env["XDG_CACHE_HOME"] = str(args.cache_dir / "xdg")
    env.pop("FASTCONVNEXT_BACKEND", None)  # every part picks its backend explicitly
    env["PYTHONUNBUFFERED"] = "1"
    if args.rehearse:
        env["TRITON_INTERPRET"] = "1"
        env.pop("FASTCONVNEXT_TEST_DEVICE", None)
    else:
        env.pop("TRITON_INTERPRET", None)
        if name == "tests":
            env["FASTCONVNEXT_TEST_DEVICE"] = "cuda"
    return env


def count_cubins(directory):
    """Compiled kernels in a Triton cache directory (one .cubin each; inductor's own kernels included)."""
    total = 0
    for _, _, files in os.walk(directory):
        total += sum(name.endswith(".cubin") for name in files)
    return total


_current_child = None


def _kill_group(process, grace_s=5.0):
    """SIGTERM the process group of a stage (its pool workers and compilers too), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            if sig == signal.SIGTERM:
                os.killpg(process.pid, signal.SIGKILL)  # workers that outlived the stage's main process
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_stage_process(name, args, command=None, timeout_s=None, echo=None):
    """Run one stage as its own process group under its time limit; returns its status (also written to
    <output>/stage<N>.status.json). command/timeout_s: for tests."""
    global _current_child
    stage = STAGE_BY_NAME[name]
    timeout_s = stage.timeout_s if timeout_s is None else timeout_s
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    result_path, log_path = out / f"stage{name}.result.json", out / f"stage{name}.log"
    result_path.unlink(missing_ok=True)
    env = stage_environment(args, name)
    Path(env["TRITON_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    cubins_before = count_cubins(env["TRITON_CACHE_DIR"])
    if command is None:
        command = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--output", str(out),
                   "--cache-dir", str(args.cache_dir), "--workers", str(args.workers)] + (
                      ["--rehearse"] if args.rehearse else [])
    echo = echo or (lambda line: print(line, end="", flush=True))
    begin = time.monotonic()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        _current_child = process

        def pump():
            for line in process.stdout:
                log.write(line)
                log.flush()
                echo(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process)
            rc = process.returncode
        else:
            _kill_group(process, grace_s=1.0)  # a worker left behind would hold the GPU
        finally:
            _current_child = None
        reader.join(timeout=10)
    seconds = time.monotonic() - begin
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    ok = bool(result.get("ok")) and rc == 0 and not timed_out
    if timed_out:
        error = (f"timed out after {timeout_s} s and killed; the figures written before are kept in "
                 f"stage{name}.md / .jsonl")
    elif not result:
        error = f"exit code {rc} before the stage wrote its result (log: {log_path.name})"
    else:
        error = result.get("error") or ("" if rc == 0 else f"exit code {rc} (log: {log_path.name})")
    status = {"stage": name, "ok": ok, "error": error, "returncode": rc, "timed_out": timed_out,
              "seconds": round(seconds, 1), "limit_s": timeout_s, "expected_s": stage.expected_s,
              "new_cubins": count_cubins(env["TRITON_CACHE_DIR"]) - cubins_before,
              "triton_cache_dir": env["TRITON_CACHE_DIR"], "parts_done": result.get("parts_done", []),
              "rehearsal": bool(args.rehearse)}
    (out / f"stage{name}.status.json").write_text(json.dumps(status, indent=1))
    return status


def _on_signal(signum, frame):
    if _current_child is not None:
        _kill_group(_current_child, grace_s=2.0)
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    if args.print_limit:  # the shell's backstop: every stage's limit plus a margin for this process
        print(sum(STAGE_BY_NAME[n].timeout_s for n in args.stages) + 30)
        return 0
    if args.plan:
        print(plan_text())
        problems = plan_problems()
        try:
            counts = planned_variants(REHEARSAL if args.rehearse else REAL)
            print("\nKernel variants each stage's op launches compile (launch_plans, a MODEL of Triton's cache keys; "
                  "calibration adds 5 in stage 1, the autocast training in stage 3 about 12 the plans do not list):")
            for key, value in counts.items():
                print(f"  stage {key}: {value}")
        except Exception as error:  # the plan is still useful without the counts
            print(f"\n(variant counts not available: {type(error).__name__}: {error})")
        for problem in problems:
            print(f"PLAN PROBLEM: {problem}")
        return 1 if problems else 0
    if args.run_stage:
        return run_stage_in_process(args)
    signal.signal(signal.SIGTERM, _on_signal)
    statuses = []
    for name in args.stages:
        stage = STAGE_BY_NAME[name]
        print(f"[gpu_acceptance] stage {name}: {stage.title} (limit {stage.timeout_s} s, expected ~{stage.expected_s} s)"
              f"{' REHEARSAL' if args.rehearse else ''}", flush=True)
        status = run_stage_process(name, args)
        statuses.append(status)
        print(f"[gpu_acceptance] stage {name}: {'ok' if status['ok'] else 'FAILED: ' + status['error']} "
              f"({status['seconds']:.0f} s, {status['new_cubins']} new compiled kernels)", flush=True)
        write_summary(args.output)
        if name == "preflight" and not status["ok"]:
            print("[gpu_acceptance] preflight failed: nothing else runs (see above)", flush=True)
            break
    print(f"[gpu_acceptance] report: {args.output / 'gpu_acceptance.md'}")
    return 0 if statuses and all(s["ok"] for s in statuses) else 1


def write_summary(output):
    """<output>/gpu_acceptance.md and .json from every stage's status and figures written so far."""
    output = Path(output)
    names = [s.name for s in STAGES + EXTRA_STAGES]
    statuses = {}
    for name in names:
        path = output / f"stage{name}.status.json"
        if path.is_file():
            statuses[name] = json.loads(path.read_text())
        elif (output / f"stage{name}.jsonl").is_file():
            statuses[name] = {"stage": name, "ok": False, "error": "incomplete: no status (the run was cut off)"}
    ran = [n for n in names if n in statuses]
    missing = [n for n in PLAN_ORDER if n not in statuses]
    verdict = "FAILED" if any(not statuses[n]["ok"] for n in ran) else "INCOMPLETE" if missing else "PASSED"
    if any(statuses[n].get("rehearsal") for n in ran):
        verdict += " (REHEARSAL on CPU: no figure is a measurement)"
    lines = [f"# GPU acceptance run: {verdict}", "",
             "A REHEARSAL: Triton's interpreter on CPU at tiny shapes; nothing here is a measurement." if any(
                 statuses[n].get("rehearsal") for n in ran) else
             "Every timed figure is MEASURED on the GPU the preflight names, unless labelled MODEL.", "",
             "| stage | result | seconds | limit s | expected s | new compiled kernels |", "|---|---|---|---|---|---|"]
    for name in names:
        stage = STAGE_BY_NAME[name]
        status = statuses.get(name)
        if status is None:
            lines.append(f"| {name} | not run | | {stage.timeout_s} | {stage.expected_s} | |")
            continue
        result = "ok" if status["ok"] else f"FAILED: {status['error']}"
        lines.append(f"| {name} | {result} | {status.get('seconds', '')} | {stage.timeout_s} | {stage.expected_s} | "
                     f"{status.get('new_cubins', '')} |")
    for name in ran:
        md = output / f"stage{name}.md"
        lines += ["", f"## Stage {name}: {STAGE_BY_NAME[name].title}", ""]
        lines.append(md.read_text(encoding="utf-8").strip() if md.is_file() else "(no figures)")
    (output / "gpu_acceptance.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (output / "gpu_acceptance.json").write_text(json.dumps(
        {"verdict": verdict, "stages": statuses,
         "records": {name: read_records(output / f"stage{name}.jsonl") for name in ran}}, indent=1, default=str))
    return output / "gpu_acceptance.md"


# ------------------------------------------------------------------------------------------- preflight


@dataclass
class Check:
    what: str
    expected: str
    found: str
    ok: bool


def _version_tuple(text):
    parts = []
    for piece in str(text).split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _package_version(module):
    return getattr(module, "__version__", "unknown")


def preflight(rehearse=False, environ=None):
    """(checks, facts). Required: Python and torch at pyproject's floors, triton, numpy, fastconvnext and every
    kernel module (KERNEL_MODULES) imported from THIS checkout, CUDA with an sm_80+ GPU (not in a rehearsal), the
    environment the stage runs in (TRITON_INTERPRET, FASTCONVNEXT_AUTOTUNE=0, a writable TRITON_CACHE_DIR).
    transformers is reported, not required (no stage imports it). Versions differing from the reference box are
    reported, not failed."""
    environ = os.environ if environ is None else environ
    checks, facts = [], {"python": platform.python_version(), "host": platform.node()}
    found_py = sys.version_info[:2]
    checks.append(Check("Python", f">= {'.'.join(map(str, MIN_VERSIONS['python']))} (box: {REFERENCE_BOX['python']})",
                        f"{platform.python_version()} ({sys.executable})", found_py >= MIN_VERSIONS["python"]))
    modules = {}
    for name in ("numpy", "torch", "triton"):
        try:
            modules[name] = __import__(name)
            facts[name] = _package_version(modules[name])
        except Exception as error:  # noqa: BLE001 (a broken install is reported, whatever it raises)
            facts[name] = f"not importable ({type(error).__name__}: {error})"
    try:  # read, not imported (seconds): no stage imports transformers
        from importlib import metadata

        facts["transformers"] = metadata.version("transformers")
    except Exception:  # noqa: BLE001
        facts["transformers"] = "not installed"
    box = {"torch": REFERENCE_BOX["torch"], "triton": REFERENCE_BOX["triton"],
           "transformers": REFERENCE_BOX["transformers"], "numpy": "any"}
    checks.append(Check("numpy", "importable", facts["numpy"], "numpy" in modules))
    torch_ok = "torch" in modules and _version_tuple(facts["torch"]) >= MIN_VERSIONS["torch"]
    checks.append(Check("torch", f">= {'.'.join(map(str, MIN_VERSIONS['torch']))} (box: {box['torch']})",
                        facts["torch"], torch_ok))
    checks.append(Check("triton", f"importable (box: {box['triton']})", facts["triton"], "triton" in modules))
    checks.append(Check("transformers (reported only)", f"any (box: {box['transformers']})", facts["transformers"],
                        True))
    tree = ROOT / "fastconvnext"
    try:
        import fastconvnext

        where = Path(fastconvnext.__file__).resolve().parent
        facts["fastconvnext"] = f"{fastconvnext.__version__} from {where}"
        checks.append(Check("fastconvnext", f"imported from this checkout, {tree} (PYTHONPATH={ROOT})", str(where),
                            where == tree))
    except Exception as error:  # noqa: BLE001
        checks.append(Check("fastconvnext", f"imported from this checkout, {tree}", f"{type(error).__name__}: {error}",
                            False))
    kernels_dir = ROOT / "kernels"
    try:
        import importlib

        kernels = importlib.import_module("fastconvnext.kernels")
        paths = [str(Path(p).resolve()) for p in kernels.__path__]
        loaded = [importlib.import_module(f"fastconvnext.kernels.{m}").__file__ for m in KERNEL_MODULES]
        inside = all(Path(f).resolve().parent == kernels_dir for f in loaded)
        checks.append(Check("fastconvnext.kernels", f"{', '.join(KERNEL_MODULES)} from {kernels_dir}",
                            f"__path__ {paths}; modules from {sorted({str(Path(f).parent) for f in loaded})}",
                            paths == [str(kernels_dir)] and inside))
    except Exception as error:  # noqa: BLE001 (a Triton API missing in this version shows here)
        checks.append(Check("fastconvnext.kernels", f"{', '.join(KERNEL_MODULES)} import from {kernels_dir}",
                            f"{type(error).__name__}: {error}", False))
    interpret = environ.get("TRITON_INTERPRET", "")
    checks.append(Check("TRITON_INTERPRET", "1 (rehearsal)" if rehearse else "unset (native kernels)",
                        repr(interpret) if interpret else "unset",
                        interpret == "1" if rehearse else interpret in ("", "0")))
    autotune = environ.get("FASTCONVNEXT_AUTOTUNE", "")
    checks.append(Check("FASTCONVNEXT_AUTOTUNE", "'0' (each launcher's default config: fewer compiles)",
                        repr(autotune) if autotune else "unset", autotune == "0"))
    cache = environ.get("TRITON_CACHE_DIR", "")
    writable = False
    if cache:
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
            probe = Path(cache) / f".probe{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            writable = True
        except OSError:
            pass
    checks.append(Check("TRITON_CACHE_DIR", "a writable directory shared by the stages", cache or "unset", writable))
    if "torch" in modules:
        torch = modules["torch"]
        facts["cuda (torch build)"] = str(torch.version.cuda)
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
        found = (f"True: {count} device(s)" if available else
                 f"False: torch {torch.__version__} " + (f"built with CUDA {torch.version.cuda}, no device visible "
                                                         f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                                                         if torch.version.cuda else "is a CPU-only build (torch.version.cuda "
                                                                                     "is None)"))
        checks.append(Check("CUDA", "not needed (rehearsal: interpreter on CPU)" if rehearse else
                            f"torch.cuda.is_available() True (box: CUDA {REFERENCE_BOX['cuda']}, one H100)", found,
                            rehearse or available))
        if available:
            props = torch.cuda.get_device_properties(0)
            major, minor = torch.cuda.get_device_capability(0)
            facts.update({"gpu": props.name, "sm": f"sm_{major}{minor}", "SMs": props.multi_processor_count,
                          "memory GiB": round(props.total_memory / 2**30, 1),
                          "cudnn": torch.backends.cudnn.version(), "driver": _driver_version()})
            checks.append(Check("GPU", f"sm_{MIN_ARCH} or newer", f"{props.name}, sm_{major}{minor}, "
                                f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB",
                                10 * major + minor >= MIN_ARCH))
    return checks, facts


def _driver_version():
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "n/a"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "n/a"


def preflight_failure(checks):
    """The one message naming every failed check, expected vs found ("" when all passed)."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return ""
    return "preflight FAILED: " + "; ".join(f"{c.what}: expected {c.expected}, found {c.found}" for c in failed)


# ------------------------------------------------------------------------------------ the stage process


@dataclass
class Context:
    output: Path
    setup: Setup
    log: FigureLog
    workers: int = 0
    failures: list = field(default_factory=list)
    parts_done: list = field(default_factory=list)

    @property
    def measured(self):
        """The label of a timed figure: MEASURED on the GPU, never in a rehearsal."""
        return "REHEARSAL, NOT a measurement" if self.setup.device != "cuda" else "MEASURED"

    def fail(self, message):
        self.failures.append(message)
        self.log.note(f"FAILED: {message}")


def run_stage_in_process(args):
    name = args.run_stage
    if name not in STAGE_BY_NAME:
        raise SystemExit(f"unknown stage {name!r}")
    setup = REHEARSAL if args.rehearse else REAL
    log = FigureLog(args.output, name)
    ctx = Context(args.output, setup, log, workers=args.workers or setup.workers)
    begin = time.monotonic()
    checks, facts = preflight(args.rehearse)
    failure = preflight_failure(checks)
    if name == "preflight":
        log.section("checks", "Preflight", "Versions and devices, then each requirement, expected vs found.",
                    ("fact", "value"))
        for key, value in facts.items():
            log.row((key, value), fact=key, value=value)
        log.section("checks", "Requirements", columns=("check", "expected", "found", "result"))
        for check in checks:
            log.row((check.what, check.expected, check.found, "ok" if check.ok else "FAILED"), **asdict(check))
        ctx.parts_done.append("checks")
    else:
        log.note("Preflight: " + ", ".join(f"{k} {v}" for k, v in facts.items()), facts=facts)
    if failure:
        log.note(failure)  # echoed: the command's output names what is missing
        ctx.failures.append(failure)
    elif name != "preflight":
        if args.rehearse:
            log.note("REHEARSAL: Triton's interpreter on CPU at tiny shapes; no figure below is a measurement.")
        try:
            STAGE_FUNCTIONS[name](ctx)
        except Exception as error:  # the result must still be written
            import traceback

            traceback.print_exc()
            ctx.fail(f"{type(error).__name__}: {error}")
    result = {"ok": not ctx.failures, "error": "; ".join(ctx.failures)[:2000], "parts_done": ctx.parts_done,
              "seconds": round(time.monotonic() - begin, 1)}
    (args.output / f"stage{name}.result.json").write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


def _script_module(path: Path):
    """A sibling script (tests/tolerance.py) by its path: no sys.path entry."""
    import importlib.util

    name = f"_gpu_acceptance_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _torch_dtype(torch, name):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def op_inputs(torch, op, n, side, channels, dtype, device, params_fp32=False, seed=0):
    """Named tensor inputs of one op call at [n, side, side, channels] in the op's positional order, like a ConvNeXt
    (V2) block's (tests/test_kernels_native and test_convnext_v2_mlp recipes; GRN's parameters in the model's
    [1, 1, 1, D]). params_fp32: dwconv's parameters in fp32 (master weights; the fused op casts them to fp32 anyway)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    act = _torch_dtype(torch, dtype)

    def randn(*shape, scale=1.0, shift=0.0, dtype=act):
        return (torch.randn(*shape, device=device, generator=gen) * scale + shift).to(dtype)

    x = randn(n, side, side, channels)
    if op == "dwconv_layernorm":
        param = torch.float32 if params_fp32 else act
        return dict(x=x, dw_weight=randn(channels, 1, 7, 7, scale=0.3, dtype=param),
                    dw_bias=randn(channels, scale=0.1, dtype=param),
                    ln_weight=randn(channels, scale=0.1, shift=1.0, dtype=param),
                    ln_bias=randn(channels, scale=0.1, dtype=param))
    hidden = 4 * channels
    fc1 = dict(x=x, residual=randn(n, side, side, channels),
               fc1_weight=randn(hidden, channels, scale=1 / math.sqrt(channels)), fc1_bias=randn(hidden, scale=0.5))
    fc2 = dict(fc2_weight=randn(channels, hidden, scale=1 / math.sqrt(hidden)), fc2_bias=randn(channels, scale=0.5))
    if op == "convnext_mlp":
        return {**fc1, **fc2, "gamma": randn(channels, scale=0.5, shift=1.0)}
    grn = dict(grn_weight=randn(1, 1, 1, hidden, scale=0.5), grn_bias=randn(1, 1, 1, hidden, scale=0.5))
    return {**fc1, **grn, **fc2}


def op_call(op, inputs, requires_grad):
    """The positional call of the op (the same tuple for the fused and the eager side)."""
    tensors = tuple(v.detach().requires_grad_(requires_grad) for v in inputs.values())
    return tensors + tuple(OP_OPTIONS[op].values())


# ---------------------------------------------------------------------------------- parallel prewarm


def _worker_count(ctx, tasks):
    limit = ctx.workers or max(1, min(15, (os.cpu_count() or 2) - 1))
    return max(1, min(limit, len(tasks) or 1))


def prewarm_task(task):
    """Runs in a pool process: one real launch of what `task` names, so its kernels compile into the shared
    TRITON_CACHE_DIR. ("op", op, batch, side, channels, dtype, pass) | ("call", op, specs, pass, autocast dtype) |
    ("calibrate",). Returns (task, seconds, error)."""
    begin = time.monotonic()
    try:
        import torch

        from fastconvnext import tuning

        device = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
        kind = task[0]
        if kind == "calibrate":
            calibrate_machine = importlib.import_module("fastconvnext.tooling.calibrate")
            calibrate_machine.run_all(dry_run=device == "cpu", repeats=1, dot_shapes=calibrate_machine.QUICK_DOT_SHAPES)
        else:
            if kind == "op":
                _, op, batch, side, channels, dtype, pass_ = task
                call = op_call(op, op_inputs(torch, op, batch, side, channels, dtype, device), pass_ != "forward")
                autocast = None
            else:
                _, op, specs, pass_, autocast = task
                call = tuple(_from_spec(torch, spec, device) for spec in specs)
            recorded = tuning._recorded(call)
            run = tuning._runner(op, _Pass(pass_), recorded, "triton")
            if autocast is None:
                run()
            else:
                with torch.autocast(device, dtype=_torch_dtype(torch, autocast)):
                    run()
            if device == "cuda":
                torch.cuda.synchronize()
        return task, time.monotonic() - begin, ""
    except Exception as error:  # noqa: BLE001 (reported by the stage; the real run will meet it too)
        return task, time.monotonic() - begin, f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class _Pass:
    mode: str


def _spec(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), str(value.dtype).replace("torch.", ""),
                bool(value.requires_grad))
    return ("value", value)


def _from_spec(torch, spec, device):
    if spec[0] == "value":
        return spec[1]
    _, shape, stride, dtype, requires_grad = spec
    tensor = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device)
    with torch.no_grad():
        tensor.normal_().mul_(0.1)
    return tensor.requires_grad_(requires_grad)


class Prewarm:
    """A pool of processes compiling (by running once) the tasks' kernels in parallel; `wait(tag)` blocks until
    the tasks of that tag are done and writes one figure for them. With one worker (--workers 1) or if the pool
    cannot start, nothing is prewarmed and the stage's own first calls compile, one after another."""

    COLUMNS = ("tasks of", "tasks", "workers", "failed", "done after s", "slowest task s", "first error")

    def __init__(self, ctx, tagged_tasks, title):
        self.ctx, self.futures, self.pool, self.begin, self.title = ctx, {}, None, time.monotonic(), title
        tasks = [task for _, task in tagged_tasks]
        workers = self.workers = _worker_count(ctx, tasks)
        if not tasks or workers < 2:
            if tasks:
                ctx.log.note(f"{title}: not prewarmed (one worker): the kernels compile at their first call")
            return
        ctx.log.note(f"{title}: {len(tasks)} tasks on {workers} processes. Each task runs one real launch of its case "
                     "in a pool process, so the kernel variants compile in parallel into TRITON_CACHE_DIR (the exact "
                     "cache keys of the real launches) before the case is timed or checked.")
        try:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            for tag, task in tagged_tasks:
                self.futures.setdefault(tag, []).append(self.pool.submit(prewarm_task, task))
        except Exception as error:  # noqa: BLE001
            ctx.log.note(f"prewarm pool not started ({type(error).__name__}: {error}): kernels compile serially")
            self.pool = None

    def wait(self, tag=None):
        tags = [t for t in (list(self.futures) if tag is None else [tag]) if self.futures.get(t)]
        if tags:
            self.ctx.log.section("prewarm", f"{self.title}: done", columns=self.COLUMNS)
        for tag_ in tags:
            futures = self.futures.pop(tag_)
            results = []
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as error:  # noqa: BLE001 (a worker that died: BrokenProcessPool)
                    results.append((None, 0.0, f"{type(error).__name__}: {error}"))
            errors = [f"{task}: {error}" for task, _, error in results if error]
            self.ctx.log.row((tag_, len(results), self.workers, len(errors), f"{time.monotonic() - self.begin:.0f}",
                              f"{max(s for _, s, _ in results):.0f}", errors[0][:300] if errors else ""),
                             tag=str(tag_), errors=errors)

    def close(self):
        self.wait()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        elif self.pool is not None:  # the stage failed: do not wait for compiles nobody will use
            self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------- stage 1


def _device(ctx):
    import torch

    if ctx.setup.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the acceptance run needs a GPU (or --rehearse)")
    return torch


def op_cases(setup):
    """Stage 1's timed cases in the order they run: batch by batch, stage shape by shape, op, pass."""
    return [(op, batch, side, channels, pass_) for batch in setup.op_batches for side, channels in setup.op_shapes
            for op in OPS for pass_ in PASSES]


def check_cases(setup):
    """Stage 2's checks in the order they run: dtype by dtype, stage shape by shape, op, pass; in the dtypes after
    the first, an op of setup.check_subset only at its shapes."""
    first, subset = setup.check_dtypes[0], dict(setup.check_subset)
    return [(dtype, op, side, channels, pass_) for dtype in setup.check_dtypes for side, channels in setup.check_shapes
            for op in OPS if dtype == first or (side, channels) in subset.get(op, setup.check_shapes)
            for pass_ in PASSES]


def _predicted(op, shape, dtype, mode, arch):
    """The prior's {"fused_us", "eager_us" (the eager estimate), ...} (a MODEL), or None when it has no such point."""
    try:
        from fastconvnext.tooling.bench.ops_report import predicted_us

        return predicted_us(op, shape, dtype, mode, arch)
    except Exception as error:  # noqa: BLE001 (a model that cannot answer must not stop the measurement)
        print(f"predicted_us failed for {op} {shape}: {type(error).__name__}: {error}")
        return None


def stage_1(ctx):
    torch = _device(ctx)
    setup = ctx.setup
    cases = op_cases(setup)
    tasks = [("calibrate", ("calibrate",))] + [
        ("ops", ("op", op, batch, side, channels, setup.op_dtype, pass_)) for op, batch, side, channels, pass_ in cases]
    with Prewarm(ctx, tasks, "Prewarm: calibration kernels and every timed case, compiled in parallel"):
        pass
    ctx.parts_done.append("prewarm")
    calibrate_part(ctx)
    ctx.parts_done.append("calibrate")
    ops_part(ctx, torch, cases)
    ctx.parts_done.append("ops")


def calibrate_part(ctx):
    calibrate_machine = importlib.import_module("fastconvnext.tooling.calibrate")
    dry_run = ctx.setup.device != "cuda"
    label = "DRY RUN (interpreter; NOT a measurement)" if dry_run else "MEASURED"
    ctx.log.section("calibrate", "Machine calibration (fastconvnext.tooling.calibrate --quick)",
                    "The model's public-figure constants beside a measurement of each (on the GPU: CUDA events, "
                    "median of 10 repeats, min..max; a dry run: 2 interpreter runs); dot tiles: one per width N.",
                    ("figure", f"{label} median", "min .. max", "model (public figure or datasheet)", "measured/model",
                     "unit"))

    def on_row(row, facts):
        figure, median, (low, high), assumed, ratio, unit = row
        ctx.log.row((figure, f"{median:.3g}", f"{low:.3g} .. {high:.3g}", f"{assumed:.3g}", f"{ratio:.2f}", unit),
                    figure=figure, median=median, low=low, high=high, assumed=assumed, ratio=ratio, unit=unit)

    try:
        rows, suggest, facts = calibrate_machine.run_all(dry_run=dry_run, dot_shapes=calibrate_machine.QUICK_DOT_SHAPES,
                                                         on_row=on_row)
    except Exception as error:  # noqa: BLE001 (the op figures still matter)
        ctx.fail(f"calibration: {type(error).__name__}: {error}")
        return
    ctx.log.note("Calibration facts: " + ", ".join(f"{k} {v}" for k, v in facts.items())
                 + "\n\nSuggested constants:\n\n```\n" + json.dumps(suggest, indent=1) + "\n```",
                 suggested=suggest, facts=facts)
    (ctx.output / "calibrate_machine.json").write_text(json.dumps(
        {"measured": not dry_run, "facts": facts, "suggested": suggest}, indent=1, default=str))


OPS_COLUMNS = ("op", "N x H x W x C", "pass", "fused µs", "fused IQR µs", "eager µs", "eager IQR µs",
               "fused/eager (95% CI)", "MODEL fused µs", "MODEL eager µs")


def ops_part(ctx, torch, cases):
    from fastconvnext import backend, tuning
    from fastconvnext.tooling.bench import timing

    setup = ctx.setup
    arch = backend.device_arch() if setup.device == "cuda" else 90
    ctx.log.section("ops", f"Fused vs eager per op, {setup.op_dtype}, {ctx.measured}",
                    f"Per case: both implementations on the same inputs, {setup.warmup} warm-up calls each, then "
                    f"{setup.repeats} repeats taken in turns (order rotated each round), each call timed alone by CUDA "
                    "events after the L2 cache is overwritten; medians and interquartile ranges in µs; fused/eager is "
                    "the ratio of medians (< 1: fused faster) with a seeded 95% bootstrap interval. MODEL columns: the "
                    "prior's prediction (fastconvnext/prior.json: the SASS model's fused time and the eager estimate), shown "
                    "beside, never used to decide.",
                    OPS_COLUMNS)
    clock = timing.Clock(setup.device)
    for op, batch, side, channels, pass_ in cases:
        shape = (batch, side, side, channels)
        label = " x ".join(map(str, shape))
        try:
            inputs = op_inputs(torch, op, batch, side, channels, setup.op_dtype, setup.device)
            call = op_call(op, inputs, requires_grad=pass_ != "forward")
            recorded = tuning._recorded(call)
            key = _Pass(pass_)
            contenders = {impl: (tuning._runner(op, key, recorded, name), None)
                          for impl, name in (("fused", "triton"), ("eager", "eager"))}
            timings = timing.interleaved(contenders, clock, repeats=setup.repeats, warmup=setup.warmup)
            fused, eager = timings["fused"], timings["eager"]
            ratio = timing.ratio_of_medians(fused, eager)
            model = _predicted(op, shape, setup.op_dtype, pass_, 90 if arch >= 90 else 80)

            def us(ms):
                return f"{ms * 1e3:,.1f}"

            ctx.log.row((op, label, pass_, us(fused.median_ms), f"{us(fused.q1_ms)} .. {us(fused.q3_ms)}",
                         us(eager.median_ms), f"{us(eager.q1_ms)} .. {us(eager.q3_ms)}",
                         f"{ratio.value:.2f} ({ratio.low:.2f} .. {ratio.high:.2f})",
                         f"{model['fused_us']:,.1f}" if model else "not modelled",
                         f"{model['eager_us']:,.1f}" if model else "not modelled"),
                        op=op, shape=shape, pass_=pass_, dtype=setup.op_dtype,
                        fused_us=[t * 1e3 for t in fused.samples_ms], eager_us=[t * 1e3 for t in eager.samples_ms],
                        fused_over_eager=ratio.value, ci=[ratio.low, ratio.high], model=model)
            del inputs, call, recorded, contenders
        except Exception as error:  # noqa: BLE001 (the next case may still run)
            ctx.log.row((op, label, pass_, "ERROR", "", "", "", "", "", ""), op=op, shape=shape, pass_=pass_,
                        error=f"{type(error).__name__}: {error}")
            ctx.fail(f"{op} {label} {pass_}: {type(error).__name__}: {error}")
    clock.release()


# --------------------------------------------------------------------------------------------- stage 2


CHECK_COLUMNS = ("dtype", "op", "N x H x W x C", "pass", "tensors", "worst err / allowed", "worst tensor",
                 "bitwise rerun", "result")


def stage_2(ctx):
    torch = _device(ctx)
    setup = ctx.setup
    tolerance = _script_module(ROOT / "tests" / "tolerance.py")
    first, *later = setup.check_dtypes
    cases = check_cases(setup)
    tasks = [(dtype, ("op", op, setup.check_batch, side, channels, dtype, pass_))
             for dtype, op, side, channels, pass_ in cases if dtype != first]
    with Prewarm(ctx, tasks, f"Prewarm: {', '.join(later)} variants, compiled while {first} is checked") as pool:
        for dtype in setup.check_dtypes:
            pool.wait(dtype)
            ctx.log.section(f"check {dtype}", f"Native correctness, {dtype}, batch {setup.check_batch}",
                            "Fused (F) against the eager reference in the same dtype (E) and in float64 (R), for the "
                            "output and (forward+backward) every input gradient: max|F-R| <= 2 max|E-R| + atol "
                            "(tests/tolerance.py); the fused forward+backward is run twice and must agree bitwise."
                            + _subset_note(setup, dtype), CHECK_COLUMNS)
            for _, op, side, channels, pass_ in (case for case in cases if case[0] == dtype):
                check_case(ctx, torch, tolerance, op, setup.check_batch, side, channels, dtype, pass_)
            ctx.parts_done.append(f"check {dtype}")


def _subset_note(setup, dtype):
    """The sentence naming the ops checked at fewer shapes in this dtype ("" when none)."""
    if dtype == setup.check_dtypes[0] or not setup.check_subset:
        return ""
    return " " + "; ".join(f"{op} at {', '.join(f'C={c}@{side}' for side, c in shapes)} only (the plan's budget)"
                           for op, shapes in setup.check_subset) + "."


def _leaves(torch, inputs, cast, requires_grad):
    return {name: t.detach().to(cast or t.dtype).clone().requires_grad_(requires_grad and t.is_floating_point())
            for name, t in inputs.items()}


def check_case(ctx, torch, tolerance, op, batch, side, channels, dtype, pass_):
    from fastconvnext import kernels
    from fastconvnext.kernels import reference

    label = " x ".join(map(str, (batch, side, side, channels)))
    try:
        act = _torch_dtype(torch, dtype)
        inputs = op_inputs(torch, op, batch, side, channels, dtype, ctx.setup.device, params_fp32=True, seed=1)
        # No drop-path scale: ConvNeXt's default (drop_path_rate 0), and the variants stage 1 compiled (HAS_SCALE
        # would be a new compile of every MLP kernel; the interpreter suites check it on CPU).
        extra = OP_OPTIONS[op]
        fused_fn, eager_fn = getattr(kernels, op), getattr(reference, f"{op}_reference")
        training = pass_ == "forward_backward"
        dy = torch.randn(inputs["x"].shape, device=ctx.setup.device, generator=torch.Generator(
            device=ctx.setup.device).manual_seed(2))

        def run(fn, cast):
            leaves = _leaves(torch, inputs, cast, training)
            with torch.set_grad_enabled(training):
                out = fn(**leaves, **extra)
                if not training:
                    return {"out": out.detach()}
                names = [n for n, t in leaves.items() if t.requires_grad]
                grads = torch.autograd.grad(out, [leaves[n] for n in names], dy.to(out.dtype))
            return {"out": out.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}

        fused, again = run(fused_fn, None), run(fused_fn, None) if training else None
        eager, ref = run(eager_fn, act), run(eager_fn, torch.float64)
        worst, worst_name, failed = 0.0, "", []
        for name, value in fused.items():
            err = tolerance.max_abs_diff(value, ref[name])
            allowed = 2 * tolerance.max_abs_diff(eager[name], ref[name]) + tolerance.ATOL[act]
            if err / allowed >= worst:
                worst, worst_name = err / allowed, name
            if err > allowed:
                failed.append(f"{name} {err:.3g} > {allowed:.3g}")
        bitwise = "n/a" if again is None else all(torch.equal(fused[n], again[n]) for n in fused)
        if bitwise is False:
            failed.append("not bitwise repeatable")
        ok = not failed
        ctx.log.row((dtype, op, label, pass_, len(fused), f"{worst:.3f}", worst_name,
                     {True: "same", False: "DIFFERS", "n/a": "n/a"}[bitwise], "ok" if ok else "FAILED: " + "; ".join(failed)),
                    dtype=dtype, op=op, shape=[batch, side, side, channels], pass_=pass_, worst=worst, ok=ok,
                    failed=failed)
        if not ok:
            ctx.failures.append(f"{dtype} {op} {label} {pass_}: {'; '.join(failed)}")
    except Exception as error:  # noqa: BLE001
        ctx.log.row((dtype, op, label, pass_, "", "", "", "", f"ERROR {type(error).__name__}: {error}"),
                    dtype=dtype, op=op, pass_=pass_, error=f"{type(error).__name__}: {error}")
        ctx.failures.append(f"{dtype} {op} {label} {pass_}: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------------------------- stage 3


def stage_3(ctx):
    torch = _device(ctx)
    for part, function in (("tune", tune_part), ("training", training_part), ("inductor", inductor_part)):
        try:
            function(ctx, torch)
            ctx.parts_done.append(part)
        except Exception as error:  # noqa: BLE001 (the next part may still run)
            import traceback

            traceback.print_exc()
            ctx.fail(f"{part}: {type(error).__name__}: {error}")


def _convnext(torch, setup, config, classify=False, num_labels=10):
    import fastconvnext

    torch.manual_seed(0)
    config = fastconvnext.ConvNextConfig(**config, num_labels=num_labels, layer_scale_init_value=0.5)
    cls = fastconvnext.ConvNextForImageClassification if classify else fastconvnext.ConvNextModel
    return cls(config).to(setup.device)


def _sync(torch, setup):
    if setup.device == "cuda":
        torch.cuda.synchronize()


TUNE_COLUMNS = ("shape", "tuned choice", "fused µs", "eager µs", "fused/eager", "MODEL default choice",
                "MODEL fused µs", "MODEL eager µs")


def tune_part(ctx, torch):
    import functools

    import fastconvnext
    from fastconvnext import backend, tuning

    setup = ctx.setup
    timer = functools.partial(tuning.event_timer, warmup=1, repeats=2) if setup.quick_timer else None
    how = "1 warm-up, 2 repeats: a rehearsal" if setup.quick_timer else "CUDA events, 3 warm-ups, 20 repeats"
    ctx.log.section("tune", f"fastconvnext.tune(), ConvNeXt {setup.dtype} batch {setup.batch} at {setup.image}², "
                    f"{ctx.measured}",
                    f"Inference, then training; fused and eager µs are MEASURED medians ({how}) of each shape's "
                    "recorded call, timed afresh (retune); MODEL columns: what the untuned policy (the prior, else "
                    "eager) would choose, and its figures.", TUNE_COLUMNS)
    model = _convnext(torch, setup, setup.model).to(_torch_dtype(torch, setup.dtype))
    pixels = torch.randn(setup.batch, 3, setup.image, setup.image, device=setup.device,
                         dtype=_torch_dtype(torch, setup.dtype))
    tuned = 0
    for training in (False, True):
        model.train(training)
        table = fastconvnext.tune(model, pixels, training=training, timer=timer, retune=True)
        for key in sorted(table, key=lambda k: (k.op, k.channels, k.hw)):
            decision, default = table[key], backend.static_decision(key)
            tuned += decision.source == "tuned"
            ctx.log.row((key.label, "fused" if decision.fused else "eager", f"{decision.fused_us:,.1f}",
                         f"{decision.eager_us:,.1f}", f"{decision.fused_us / decision.eager_us:.2f}",
                         "fused" if default.fused else "eager",
                         f"{default.fused_us:,.1f}" if default.fused_us else "n/a",
                         f"{default.eager_us:,.1f}" if default.eager_us else "n/a"),
                        key=list(key), fused=decision.fused, fused_us=decision.fused_us, eager_us=decision.eager_us,
                        source=decision.source, model_fused=default.fused, model_source=default.source)
        _sync(torch, setup)
    if tuned == 0:
        ctx.fail("tune: no shape was tuned")
    backend.clear_policy()


def _train(torch, setup, model, batches, labels, backend_name):
    import fastconvnext

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(setup.device, dtype=_torch_dtype(torch, setup.dtype), enabled=setup.autocast)
    losses, times = [], []
    with fastconvnext.use_backend(backend_name):
        for step in range(setup.train_steps):
            i = step % len(batches)
            _sync(torch, setup)
            begin = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(batches[i], labels=labels[i]).loss
            loss.backward()
            optimizer.step()
            _sync(torch, setup)
            times.append((time.perf_counter() - begin) * 1e3)
            losses.append(loss.item())
    return losses, times


def training_verdict(fused_losses, eager_losses, cycle):
    """(ok, max relative difference, error): finite, fused within TRAINING_LOSS_RTOL of eager at every
    step, and (given two passes over the batches) a lower mean loss over the last pass than the first."""
    finite = all(math.isfinite(v) for v in fused_losses + eager_losses)
    rel = [abs(f - e) / max(abs(e), 1e-6) for f, e in zip(fused_losses, eager_losses)]
    worst = max(rel) if finite else float("nan")
    learned = all(sum(losses[-cycle:]) < sum(losses[:cycle]) for losses in (fused_losses, eager_losses)) \
        if len(fused_losses) >= 2 * cycle else True
    if not finite:
        return False, worst, "non-finite loss"
    if worst > TRAINING_LOSS_RTOL:
        return False, worst, f"fused and eager losses differ by {worst:.2%}"
    if not learned:
        return False, worst, "the loss did not decrease from the first pass over the batches to the last"
    return True, worst, ""


def training_prewarm_tasks(torch, setup, model, pixels):
    """The fused-op calls one training step makes (shapes, strides, dtypes as recorded, under autocast when the
    run autocasts), as prewarm tasks: the autocast path launches variants the op cases do not (fp32 x in)."""
    import fastconvnext
    from fastconvnext import tuning

    autocast = setup.dtype if setup.autocast else None
    with torch.autocast(setup.device, dtype=_torch_dtype(torch, setup.dtype), enabled=setup.autocast), \
            fastconvnext.use_backend("eager"):
        calls = tuning.collect_calls(model, pixels, training=True)
    return [("training", ("call", op, tuple(_spec(value) for value, _ in _with_grad(call)), "forward_backward",
                          autocast)) for key, (op, call) in calls.items()]


def _with_grad(recorded):
    """Recorded (value, needs_grad) pairs back to values that require grad where the call's did."""
    return [((value.detach().requires_grad_(needs) if hasattr(value, "requires_grad_") else value), needs)
            for value, needs in recorded]


def training_part(ctx, torch):
    import copy

    setup = ctx.setup
    precision = f"{setup.dtype} autocast" if setup.autocast else setup.dtype
    model = _convnext(torch, setup, setup.model, classify=True).train()
    gen = torch.Generator(device=setup.device).manual_seed(1)
    batches = [torch.randn(setup.batch, 3, setup.image, setup.image, device=setup.device, generator=gen)
               for _ in range(setup.train_cycle)]
    labels = [torch.randint(0, 10, (setup.batch,), device=setup.device, generator=gen)
              for _ in range(setup.train_cycle)]
    tasks = training_prewarm_tasks(torch, setup, copy.deepcopy(model), batches[0])
    with Prewarm(ctx, tasks, f"Prewarm: the fused-op calls of one {precision} training step"):
        pass
    ctx.log.section("training", f"Training, fused vs eager, {precision}, step times {ctx.measured}",
                    f"ConvNeXt classifier {setup.model}, AdamW lr 1e-4, batch {setup.batch} at {setup.image}², "
                    f"{setup.train_steps} steps cycling over {setup.train_cycle} fixed random batches, both from one "
                    f"initialization. Step times MEASURED (wall clock with synchronization; median of the steps after "
                    f"the first two). Pass: finite, |fused-eager|/|eager| <= {TRAINING_LOSS_RTOL:.0%} at every step, "
                    "mean loss of the last pass over the batches below the first.",
                    ("backend", "first loss", "last loss", "median step ms", "steps"))
    runs = {}
    for name in ("triton", "eager"):
        losses, times = _train(torch, setup, copy.deepcopy(model), batches, labels, name)
        steady = sorted(times[2:] or times)
        runs[name] = (losses, times)
        ctx.log.row((name, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{steady[len(steady) // 2]:.1f}", len(losses)),
                    backend=name, losses=losses, step_ms=times)
    ok, worst, error = training_verdict(runs["triton"][0], runs["eager"][0], setup.train_cycle)
    ctx.log.note(f"Training verdict: {'ok' if ok else 'FAILED: ' + error}; largest fused/eager loss difference "
                 f"{worst:.2%}.", ok=ok, worst=worst)
    if not ok:
        ctx.failures.append(f"training: {error}")


def inductor_part(ctx, torch):
    import copy

    import fastconvnext

    setup = ctx.setup
    tolerance = _script_module(ROOT / "tests" / "tolerance.py")
    dtype = _torch_dtype(torch, setup.dtype)
    ctx.log.section("inductor", f"torch.compile (backend '{setup.compile_backend}', fullgraph) through both fused ops",
                    f"ConvNeXt {setup.inductor_model} (ConvNeXt-T's widths and stage shapes), {setup.dtype}, batch "
                    f"{setup.batch} at {setup.image}², forward + backward, backend 'triton'; max |compiled - float64 "
                    "eager| against the rule 2 max|eager - float64| + atol.",
                    ("tensor", "compiled error", "allowed", "result"))
    model = _convnext(torch, setup, setup.inductor_model).train()
    pixels = torch.randn(setup.batch, 3, setup.image, setup.image, device=setup.device)

    def forward_backward(m, as_dtype, compile_=False):
        m = copy.deepcopy(m).to(as_dtype)
        run = torch.compile(m, fullgraph=True, backend=setup.compile_backend) if compile_ else m
        out = run(pixels.to(as_dtype)).pooler_output
        out.backward(torch.ones_like(out))
        return out.detach().double(), m.embeddings.patch_embeddings.weight.grad.detach().double()

    with fastconvnext.use_backend("eager"):
        reference = forward_backward(model, torch.float64)
        eager = forward_backward(model, dtype)
    torch._dynamo.reset()
    begin = time.monotonic()
    with fastconvnext.use_backend("triton"):
        fused = forward_backward(model, dtype, compile_=True)
    seconds = time.monotonic() - begin
    for what, f, e, r in zip(("pooler_output", "d stem weight"), fused, eager, reference):
        allowed = 2 * tolerance.max_abs_diff(e, r) + tolerance.ATOL[dtype]
        err = tolerance.max_abs_diff(f, r)
        ctx.log.row((what, f"{err:.3g}", f"{allowed:.3g}", "ok" if err <= allowed else "FAILED"),
                    tensor=what, err=err, allowed=allowed)
        if err > allowed:
            ctx.failures.append(f"inductor: {what} {err:.3g} > {allowed:.3g}")
    ctx.log.note(f"Compile and first forward+backward: {seconds:.0f} s (wall).", seconds=seconds)


# ----------------------------------------------------------------------------------------- extra stage


def stage_tests(ctx):
    files = [f"tests/{name}" for name in KERNEL_TEST_FILES if (ROOT / "tests" / name).is_file()]
    ctx.log.section("pytest", "Kernel test files in GPU mode" if ctx.setup.device == "cuda" else
                    "Kernel test files (CPU mode: the interpreter)", "Files: " + ", ".join(files), ())
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True)
    (ctx.output / "stagetests.pytest.log").write_text(done.stdout + done.stderr)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-15:]
    ctx.log.note("```\n" + "\n".join(tail) + "\n```", returncode=done.returncode)
    if done.returncode != 0:
        ctx.failures.append(f"pytest exit code {done.returncode}")
    ctx.parts_done.append("pytest")


STAGE_FUNCTIONS = {"1": stage_1, "2": stage_2, "3": stage_3, "tests": stage_tests}

if __name__ == "__main__":
    sys.exit(main())
