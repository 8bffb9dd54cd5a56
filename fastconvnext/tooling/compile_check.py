"""Compile every kernel config the launchers can pick for real GPU targets, without a GPU.

    python -m fastconvnext.tooling.compile_check --arch 80 90 [--kernel NAME] [--jobs N] [--strict]

Each module in KERNEL_MODULES exposes `compile_targets() -> list[CompileTarget]`. Every target is
built with triton.compile for each arch; the cubin's resource usage (cuobjdump) and SASS are
checked, twice where the kernel has integer arguments: as its launcher guarantees them (unspecialized unless
the target names them in `divisible_by_16`) and with every integer argument a multiple of 16, the specialization
a launch at ConvNeXt's shapes gets (Triton compiles a separate variant for it, with other registers; --ints
picks one of the two). Fails (exit 1) on register spills (STACK or LOCAL > 0), shared memory above the arch's
per-block limit, a compile taking more than MAX_COMPILE_SECONDS of CPU time (Triton's and ptxas's: what it costs
on an idle core, whatever else the machine runs), or a target that expects tensor
cores whose SASS has none. A kernel module whose file does not exist yet is reported as skipped,
or is a failure with --strict.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastconvnext.kernels import _env
from fastconvnext.kernels.compile_spec import compile_options

KERNEL_MODULES = ("dwconv_layernorm_kernel", "convnext_mlp_kernel", "convnext_v2_mlp_kernel")
SHARED_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TENSOR_CORE_OPS = {80: ("HMMA",), 86: ("HMMA",), 89: ("HMMA",), 90: ("HGMMA",)}
MAX_COMPILE_SECONDS = 60.0
_KERNELS = "fastconvnext.kernels"  # where the kernel modules live


@dataclass
class CheckResult:
    kernel: str
    label: str
    dtype: str
    arch: int
    registers: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    tensor_cores: str = "-"  # the tensor-core instruction found ("HMMA"/"HGMMA"), "no", or "-" if not expected
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _triton_version() -> str:
    import triton

    return triton.__version__


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[dict, str]:
    """(REG/STACK/SHARED/LOCAL from cuobjdump --dump-resource-usage, SASS text)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    fields = {name: int(value) for name, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    missing = {"REG", "STACK", "SHARED", "LOCAL"} - fields.keys()
    if missing:
        raise RuntimeError(f"cuobjdump resource usage lacks {sorted(missing)}:\n{usage}")
    return fields, sass


def _integer_arguments(target) -> tuple:
    return tuple(name for name, kind in target.signature.items() if kind[:1] == "i")


def _launch_specialization(target) -> dict:
    """The weakest specialization a launch of this target gets: pointers 16-byte aligned (Triton specializes on
    `data_ptr() % 16 == 0`; the launchers pass whole contiguous tensors, so that is the variant that runs, and
    its vectorized loads change the register budget) and the integer arguments the launcher guarantees are
    multiples of 16 (`CompileTarget.divisible_by_16`) marked so. Integers it does not guarantee stay
    unspecialized: a target must compile without spills for every value its launcher can pass."""
    names = target.fn.arg_names
    unknown = set(target.divisible_by_16) - set(_integer_arguments(target))
    if unknown:
        raise ValueError(f"{target.kernel}: divisible_by_16 names {sorted(unknown)}, not integer arguments")
    return {
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in target.signature.items()
        if kind.startswith("*") or name in target.divisible_by_16
    }


def check_target(target, arch: int) -> CheckResult:
    """Compile one CompileTarget for sm_<arch> and judge it; never raises for a compile error."""
    from fastconvnext.kernels._triton_compat import compile_for_arch

    result = CheckResult(target.kernel, target.label, target.dtype, arch)
    if _env.interpreting():
        result.failures.append("TRITON_INTERPRET is set: cannot compile")
        return result
    start = _cpu_seconds()
    try:
        compiled = compile_for_arch(target.fn, target.signature, target.constexprs, _launch_specialization(target),
                                    arch, compile_options(target))
        result.seconds = _cpu_seconds() - start
        usage, sass = _resource_usage(compiled.asm["cubin"])
    except Exception as error:  # a compile error is a finding, reported in the table
        result.seconds = _cpu_seconds() - start
        result.failures.append(f"compile error: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return result
    result.registers, result.stack_bytes, result.local_bytes = usage["REG"], usage["STACK"], usage["LOCAL"]
    result.shared_bytes = max(usage["SHARED"], int(getattr(compiled.metadata, "shared", 0) or 0))
    _judge(result, target, sass)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (ptxas runs as one)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _tensor_core_ops(arch: int, dtype: str) -> tuple:
    """fp16/bf16 dots must use wgmma (HGMMA) on sm_90; fp32 (tf32) tiles are 32 rows, below wgmma's
    64-row minimum, so HMMA is their tensor-core instruction there."""
    if arch >= 90 and dtype == "fp32":
        return ("HGMMA", "HMMA")
    return TENSOR_CORE_OPS.get(arch, ("HMMA",))


def _judge(result: CheckResult, target, sass: str) -> None:
    arch = result.arch
    if result.stack_bytes > 0 or result.local_bytes > 0:
        result.failures.append(f"register spill: STACK={result.stack_bytes} LOCAL={result.local_bytes} bytes")
    limit = SHARED_LIMIT_BYTES.get(arch, SHARED_LIMIT_BYTES[80])
    if result.shared_bytes > limit:
        result.failures.append(f"shared memory {result.shared_bytes} B > sm_{arch} limit {limit} B")
    if result.seconds > MAX_COMPILE_SECONDS:
        result.failures.append(f"compile took {result.seconds:.1f} CPU s > {MAX_COMPILE_SECONDS:.0f} s")
    if target.expects_tensor_cores:
        ops = _tensor_core_ops(arch, target.dtype)
        found = [op for op in ops if re.search(rf"\b{op}\b", sass)]
        result.tensor_cores = found[0] if found else "no"
        if not found:
            result.failures.append(f"no tensor-core instruction ({'/'.join(ops)}) in SASS")


# ------------------------------------------------------------------------- target collection


def module_present(name: str) -> bool:
    from fastconvnext import kernels  # the kernel modules' folder, wherever this module lives

    return any((Path(folder) / f"{name}.py").is_file() for folder in kernels.__path__)


def load_targets(module_names=KERNEL_MODULES) -> tuple[list, list[str]]:
    """([(module, CompileTarget)], [missing module names])."""
    targets, missing = [], []
    for name in module_names:
        if not module_present(name):
            missing.append(name)
            continue
        module = importlib.import_module(f"{_KERNELS}.{name}")
        targets += [(name, target) for target in module.compile_targets()]
    return targets, missing


INT_SPECIALIZATIONS = ("both", "launcher", "divisible")


def int_specializations(target, mode: str = "both") -> list:
    """The variants of `target` to compile: "launcher" = as its launcher guarantees; "divisible" = every integer
    argument a multiple of 16 (label suffix "ints%16"); "both". One target when the two are the same."""
    if mode not in INT_SPECIALIZATIONS:
        raise ValueError(f"--ints must be one of {INT_SPECIALIZATIONS}, got {mode!r}")
    ints = _integer_arguments(target)
    if set(ints) <= set(target.divisible_by_16):
        return [target]
    divisible = replace(target, divisible_by_16=ints, label=f"{target.label} ints%16".strip())
    return {"both": [target, divisible], "launcher": [target], "divisible": [divisible]}[mode]


# Filled before the pool forks, so workers get targets (which hold JIT functions) by index.
_JOBS: list = []


def _run_job(index: int) -> CheckResult:
    target, arch = _JOBS[index]
    return check_target(target, arch)


def _die_with_parent() -> None:
    """Pool worker initializer: the kernel sends SIGKILL to this worker when its parent dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill every child this process forked, not only those the pool has recorded: an interrupt that lands
    between a worker's fork and the pool's record of it leaves a child only multiprocessing knows, and its exit
    handler would then wait forever for that idle worker (a narrow window, found by reading the pool's code)."""
    recorded = list((getattr(pool, "_processes", None) or {}).values())
    for process in {*recorded, *multiprocessing.active_children()}:
        if process.is_alive():
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A fork pool whose workers never outlive this process: killed on an exception (Ctrl-C, a timeout's
    SIGTERM turned into an exception) and, through PR_SET_PDEATHSIG, when this process is killed outright."""
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_die_with_parent)
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield pool
    except BaseException:
        _kill_workers(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise SystemExit(128 + signum)


def run_checks(jobs_list: list, workers: int) -> list[CheckResult]:
    global _JOBS
    _JOBS = jobs_list
    if workers <= 1 or len(jobs_list) <= 1:
        return [_run_job(i) for i in range(len(jobs_list))]
    with worker_pool(workers) as pool:
        return list(pool.map(_run_job, range(len(jobs_list)), chunksize=1))


# ---------------------------------------------------------------------------------- report


_COLUMNS = ("config", "dtype", "sm", "regs", "spill B", "smem B", "compile CPU s", "TC", "status")


def _row(result: CheckResult) -> tuple:
    spill = result.stack_bytes + result.local_bytes if result.stack_bytes >= 0 else "?"
    status = "ok" if result.ok else "FAIL: " + "; ".join(result.failures)
    return (
        result.label, result.dtype, result.arch, result.registers, spill, result.shared_bytes,
        f"{result.seconds:.1f}", result.tensor_cores, status,
    )


def format_table(results: list[CheckResult]) -> str:
    lines = []
    for kernel in dict.fromkeys(r.kernel for r in results):
        rows = [_COLUMNS] + [_row(r) for r in results if r.kernel == kernel]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(_COLUMNS) - 1)]
        lines.append(f"\n== {kernel} ==")
        for row in rows:
            cells = [str(v).ljust(w) for v, w in zip(row, widths)] + [str(row[-1])]
            lines.append("  ".join(cells))
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastconvnext.tooling.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--kernel", action="append", default=[],
                        help="only modules or kernels whose name contains NAME (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--strict", action="store_true", help="a missing kernel module is a failure")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--sample", type=int, default=1, metavar="N",
                        help="compile every Nth target of each module, first included (default 1: all); "
                             "the test suite samples to stay inside CI's time budget")
    parser.add_argument("--spread", type=int, default=0, metavar="N",
                        help="compile only N targets of each module, spread evenly over its list (first and last "
                             "included; after --sample); the test suite's handful")
    parser.add_argument("--ints", choices=INT_SPECIALIZATIONS, default="both",
                        help="integer-argument specializations to compile (default both: as the launcher guarantees, "
                             "and all multiples of 16)")
    parser.add_argument("--use-cache", action="store_true",
                        help="reuse Triton's compile cache (default: a fresh one, so compile times are real)")
    return parser.parse_args(argv)


def _selected(module: str, kernel: str, filters: list[str]) -> bool:
    return not filters or any(f in module or f in kernel for f in filters)


def sample_targets(targets: list, every: int) -> list:
    """Every `every`-th (module, target) of each module, in listing order, the first one included."""
    if every < 1:
        raise ValueError(f"--sample must be >= 1, got {every}")
    kept, seen = [], {}
    for module, target in targets:
        index = seen[module] = seen.get(module, -1) + 1
        if index % every == 0:
            kept.append((module, target))
    return kept


def spread_targets(targets: list, count: int) -> list:
    """`count` (module, target) pairs of each module, evenly spaced over its list, first and last included."""
    if count < 1:
        raise ValueError(f"--spread must be >= 1, got {count}")
    by_module: dict = {}
    for module, target in targets:
        by_module.setdefault(module, []).append((module, target))
    kept = []
    for items in by_module.values():
        if len(items) <= count:
            kept += items
            continue
        picks = sorted({round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(count)})
        kept += [items[i] for i in picks]
    return kept


def main(argv=None) -> int:
    args = _parse_args(argv)
    if _env.interpreting():
        print("compile_check: TRITON_INTERPRET is set; unset it (compiling for a GPU target is impossible "
              "in interpreter mode)", file=sys.stderr)
        return 2
    modules = [m for m in KERNEL_MODULES if not args.kernel or any(f in m for f in args.kernel)] or KERNEL_MODULES
    targets, missing = load_targets(modules)
    for name in missing:
        print(f"{name}: skipped: module not present" + (" (failure: --strict)" if args.strict else ""))
    selected = [(m, t) for m, t in targets if _selected(m, t.kernel, args.kernel)]
    chosen = sample_targets(selected, args.sample)
    if args.spread:
        chosen = spread_targets(chosen, args.spread)
    jobs = [(v, arch) for _, t in chosen for v in int_specializations(t, args.ints) for arch in args.arch]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compile_check_") as fresh_cache:
        if not args.use_cache:
            os.environ["TRITON_CACHE_DIR"] = fresh_cache  # read by Triton at each compile
        results = run_checks(jobs, args.jobs)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiles (triton {_triton_version()}) in {time.perf_counter() - start:.0f} s, "
          f"{len(failed)} failed"
          + (f", {len(missing)} module(s) missing" if missing else ""))
    if not jobs and not missing:
        print("compile_check: no targets matched", file=sys.stderr)
        return 1
    return 1 if failed or (args.strict and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
