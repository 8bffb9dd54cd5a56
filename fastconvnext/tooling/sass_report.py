"""Static performance model read off the SASS: what each kernel launch executes, and how long that takes on paper.

    python -m fastconvnext.tooling.sass_report [--arch 90 80] [--dtype bf16 fp16 fp32] [--batch 64 256]
        [--models tiny base] [--jobs N] [--table PATH] [--markdown PATH] [--loops]

Run it in a shell WITHOUT TRITON_INTERPRET (it compiles for sm_80/sm_90; no GPU needed).

For every ConvNeXt-T/-B stage shape, batch, dtype and arch, each kernel module hands over the launches a real
call makes (`launch_plans(batch, height, width, channels, dtype, training)`, see compile_spec.LaunchPlan). Each
launch's config is compiled with the specialization a real launch gets (16-byte aligned pointers; integer
arguments divisible by 16 marked so, equal to 1 made constants, as Triton's launcher does), its SASS
disassembled (cuobjdump) and cached on disk, keyed by Triton's hash of the kernel as loaded (its source and the @jit functions it calls), Triton's version and the
config (directory: $FASTCONVNEXT_SASS_CACHE, default ~/.cache/fastconvnext/sass). The hot loops are the innermost
backward branches; their instructions are counted per iteration by class. Each runs the plan's trips: `loop_trips`,
or, for a loop the plan tells apart by an instruction class or opcode its body holds (`trips_by_class`, e.g. the V2
MLP's per-image loop, the one that stores), that count: whichever loops the compiler unrolled away, those left keep
theirs. A loop in a branch only some programs take runs for the plan's share of them (`loop_shares`, keyed the same
way, e.g. the V1 MLP's db2/dgamma sums loop by its warp shuffle).

The model, per launch (every figure it gives is a model, never a measurement):
    time = max(hbm, l2, tensor, issue, mufu)
    hbm    = HBM bytes (re-reads whose footprint exceeds L2 counted) / HBM bandwidth
    l2     = bytes the programs request from L2 / L2 -> SM bandwidth
    tensor = tensor-core MACs on the busiest SM / (peak MACs per clock x the load path's efficiency: 0.6 with plain
             pointer loads, 0.7 with TMA; mma.sync on sm_90 at half the wgmma rate); where only one CTA fits an SM,
             plus the issue time of the instructions outside the loops (its epilogue runs after its matmul)
    issue  = warp-instructions on the busiest SM / (4 per clock: one per scheduler)
    mufu   = MUFU warp-instructions on the busiest SM x 32 / (16 results per clock)
The busiest SM runs ceil(programs / SMs) programs (the tail wave is counted whole). Launch latency, memory
latency not hidden by too few warps, bank conflicts and the instruction cache are not modelled. Launches run one
after another; an op's time is their sum. torch steps between kernels (partial sums, casts) are bytes / bandwidth;
a torch GEMM step (the V2 MLP's backward matmuls) also takes its FLOPs at the eager estimate's cuBLAS rate.
Each case is also costed at the low edge of the public L2 -> SM figures (`pessimistic`). Eager PyTorch is given two
ways by fastconvnext.tooling.roofline: the eager estimate (its kernels at public efficiencies; what the prior
compares with) and the eager floor (every op at peak: a torch.compile-class bound). Constants and their sources:
roofline.MACHINE_SOURCES and EAGER_SOURCES, none measured by this project.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastconvnext.tooling import roofline
from fastconvnext.tooling.model_tables import LAUNCHES_PATH, PRIOR_PATH
from fastconvnext.kernels import _env
from fastconvnext.kernels.compile_spec import compile_options

_KERNELS = "fastconvnext.kernels"  # where the kernel modules live
KERNEL_OPS = {"dwconv_layernorm": "dwconv_layernorm_kernel", "convnext_mlp": "convnext_mlp_kernel",
              "convnext_v2_mlp": "convnext_v2_mlp_kernel"}
MODES = ("forward", "forward_backward")
DTYPES = ("bf16", "fp16", "fp32")
STAGE_SIZES = (56, 28, 14, 7)
STAGE_CHANNELS = {"tiny": (96, 192, 384, 768), "base": (128, 256, 512, 1024)}
CACHE_ENV = "FASTCONVNEXT_SASS_CACHE"


# ------------------------------------------------------------------------------------------ machines


# The machines' figures live with the byte/FLOP model's, in fastconvnext/tooling/roofline.py (one place for them).
Machine, MACHINES, MACHINE_SOURCES = roofline.Machine, roofline.MACHINES, roofline.MACHINE_SOURCES
H100_SXM, A100_SXM = MACHINES[90], MACHINES[80]


# Fraction of the dense tensor peak a GEMM loop reaches, by how its operands arrive (roofline.MACHINE_SOURCES).
LOAD_PATH_EFFICIENCY = {"pointer": 0.6, "tma": 0.7}
HMMA_ON_SM90 = 0.5  # mma.sync on Hopper: half of the wgmma rate


def tensor_efficiency(arch: int, opcode: str, n: int, load_path: str = "pointer") -> float:
    """The modelled fraction of the dense peak for a tensor instruction of width n (n is kept for the callers'
    sake: the public figures do not resolve it)."""
    fraction = LOAD_PATH_EFFICIENCY[load_path]
    return fraction * HMMA_ON_SM90 if arch >= 90 and not opcode.endswith("GMMA") else fraction


# ------------------------------------------------------------------------------------- SASS parsing

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.x]*)\s*([^;]*);")
_TENSOR = {"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "HMMA.SP"}
_INT = {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IMNMX", "IABS", "VIADD",
        "VIMNMX", "SEL", "PRMT", "PLOP3", "P2R", "R2P", "FLO", "POPC", "BREV", "BMSK", "IDP", "IMUL", "SGXT",
        "IMADSP", "ICMP", "VIADDMNMX", "ISCADD", "LEPC"}
_FP32 = {"FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FADD32I", "FMUL32I", "HADD2", "HMUL2",
         "HSETP2", "HMNMX2", "FSWZADD", "DADD", "DMUL", "DFMA"}
_CONVERT = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"}
_BARRIER = {"BAR", "SYNCS", "WARPGROUP", "DEPBAR", "MEMBAR", "LDGDEPBAR", "FENCE", "ERRBAR", "ARRIVES", "CCTL"}
_MOVE = {"MOV", "CS2R", "S2R", "S2UR", "R2UR", "LDC", "MOV32I", "SHFL", "VOTE", "VOTEU", "MATCH", "REDUX"}
CLASSES = ("tensor", "ffma", "hfma2", "fp32 other", "mufu", "convert", "global load", "global->shared",
           "shared load", "shared store", "global store", "barrier/wait", "int/address", "move/shuffle",
           "control/other")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # full mnemonic with modifiers, e.g. "LDG.E.128" or "HGMMA.64x128x16.F32.BF16"
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of the (first) kernel function in cuobjdump -sass output, in address order."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            address, pred, opcode, operands = match.groups()
            out.append(Instruction(int(address, 16), opcode, operands.strip(), (pred or "").strip()))
    return out


def _access_bits(opcode: str) -> int:
    parts = opcode.split(".")
    if parts[0] == "LDSM":  # ldmatrix: .M88.N loads N 8x8 matrices = 32*N bits per thread
        count = parts[-1]
        return 32 * int(count) if count.isdigit() else 32
    for part in parts[1:]:
        if part in ("128", "64"):
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def tensor_shape(opcode: str) -> tuple[int, int, int]:
    """(m, n, k) of a tensor-core instruction: HGMMA.64x128x16.*, HMMA.16816.* (16x8x16), HMMA.1688.* (16x8x8)."""
    parts = opcode.split(".")
    if parts[0].endswith("GMMA"):
        m, n, k = (int(v) for v in parts[1].split("x"))
        return m, n, k
    digits = parts[1]
    shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32), "1684": (16, 8, 4)}
    if digits not in shapes:
        raise ValueError(f"unknown tensor-core instruction shape in {opcode!r}")
    return shapes[digits]


def classify(instr: Instruction) -> tuple[str, str]:
    """(class, detail key): detail is the opcode with its shape or access width, e.g. "LDG.128"."""
    op, base = instr.opcode, instr.base
    unbased = base[1:] if base.startswith("U") and base[1:] in _INT | _MOVE | {"MOV"} else base
    if base in _TENSOR:
        m, n, k = tensor_shape(op)
        return "tensor", f"{base} {m}x{n}x{k}"
    if base == "FFMA" or base == "FFMA32I":
        return "ffma", "FFMA"
    if base == "HFMA2":
        return ("move/shuffle", "HFMA2.MMA (move)") if ".MMA" in op and "RZ" in instr.operands else ("hfma2", "HFMA2")
    if base in _FP32:
        return "fp32 other", base
    if base == "MUFU":
        return "mufu", op
    if base in _CONVERT:
        return "convert", base
    if base in ("LDG", "LD", "LDGMC"):
        return "global load", f"LDG.{_access_bits(op)}"
    if base in ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF"):
        return "global->shared", f"{base}.{_access_bits(op)}" if base == "LDGSTS" else base
    if base in ("LDS", "LDSM"):
        return "shared load", f"{base}.{_access_bits(op)}"
    if base in ("STS", "STSM"):
        return "shared store", f"{base}.{_access_bits(op)}"
    if base in ("STG", "ST", "RED", "ATOM", "ATOMG", "REDG", "UTMASTG", "UTMAREDG"):
        return "global store", f"{base}.{_access_bits(op)}"
    if base in _BARRIER:
        return "barrier/wait", op.split(".")[0] + ("." + op.split(".")[1] if base in ("BAR", "WARPGROUP") else "")
    if unbased in _INT:
        return "int/address", base
    if unbased in _MOVE or base in ("UMOV", "ULDC", "UIADD3", "USHF", "ULOP3", "ULEA", "UISETP", "USEL"):
        return "move/shuffle", base
    return "control/other", base


def _branch_target(instr: Instruction):
    if instr.base != "BRA" or instr.predicate in ("@!PT",):
        return None
    match = re.search(r"0x([0-9a-f]+)", instr.operands)
    return int(match.group(1), 16) if match else None


@dataclass(frozen=True, order=True)
class Loop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def holds(self, address: int) -> bool:
        return self.start <= address <= self.end


def find_loops(instrs: list[Instruction]) -> list[Loop]:
    """Loops from backward branches (target below the branch; a branch to itself is the end-of-kernel trap).
    Several backward branches to one target (a `continue`) make one loop, ending at the last of them."""
    ends: dict[int, int] = {}
    for instr in instrs:
        target = _branch_target(instr)
        if target is not None and target < instr.address:
            ends[target] = max(ends.get(target, 0), instr.address)
    return sorted(Loop(start, end) for start, end in ends.items())


def hot_loops(loops: list[Loop]) -> list[Loop]:
    """The innermost loops: those that contain no other loop."""
    return [loop for loop in loops if not any(loop.contains(other) for other in loops)]


@dataclass
class LoopCounts:
    loop: Loop
    classes: Counter  # class -> instructions per execution of the body
    details: Counter  # detail key -> instructions per execution of the body
    iterations_per_body: int = 1  # > 1 when ptxas unrolled the loop (see unroll_factor)
    executions: float = 0.0  # times one program runs the body, on average over the launch (see loop_weights)

    @property
    def total(self) -> int:
        return sum(self.classes.values())

    def holds(self, key: str) -> bool:
        """Whether the body holds an instruction of class `key` (a CLASSES name) or of opcode `key` (e.g. "SHFL")."""
        return bool(self.classes.get(key)) or any(opcode(detail) == key for detail in self.details)


def opcode(detail: str) -> str:
    """The base opcode of a detail key (see classify): "LDG.128" -> "LDG", "HGMMA 64x128x16" -> "HGMMA"."""
    return detail.split(" ")[0].split(".")[0]


def count_loop(instrs: list[Instruction], loop: Loop) -> LoopCounts:
    classes, details = Counter(), Counter()
    for instr in instrs:
        if loop.holds(instr.address):
            cls, detail = classify(instr)
            classes[cls] += 1
            details[detail] += 1
    return LoopCounts(loop, classes, details)


_WORK_CLASSES = ("tensor", "ffma", "hfma2", "mufu", "global load", "global->shared", "shared load")


def unroll_factor(main: LoopCounts, remainder: LoopCounts) -> int:
    """U when `main` is `remainder` unrolled U times by ptxas (its work instructions exactly U times the
    remainder loop's), else 1."""
    work = {k: v for k, v in remainder.classes.items() if k in _WORK_CLASSES and v}
    if not work or set(k for k in main.classes if k in _WORK_CLASSES and main.classes[k]) != set(work):
        return 1
    ratios = {main.classes[k] / v for k, v in work.items()}
    if len(ratios) == 1:
        ratio = ratios.pop()
        if ratio >= 2 and ratio == int(ratio):
            return int(ratio)
    return 1


OTHER = "other"  # the key of a plan's by-key table (trips_by_class, loop_shares) for loops holding none of its keys


def by_key(counts: LoopCounts, table, default):
    """A plan table's value for an innermost loop: that of the first key its body holds (LoopCounts.holds), else
    the table's OTHER entry, else `default`."""
    table = table or {}
    return next((value for key, value in table.items() if counts.holds(key)), table.get(OTHER, default))


def plan_trips(counts: LoopCounts, loop_trips: int, trips_by_class=None) -> int:
    """The plan's trips for an innermost loop: `LaunchPlan.trips_by_class` by key (see by_key), else `loop_trips`."""
    return by_key(counts, trips_by_class, loop_trips)


def loop_weights(instrs, loops: list[Loop], loop_trips: int, outer_trips: int, shares=None,
                 trips_by_class=None) -> dict:
    """Executions per program of each innermost loop's body: its trips (see plan_trips), except that a loop
    ptxas unrolled U times (followed by its remainder loop) runs trips // U times and the remainder trips % U
    times; times the plan's share of programs that take the branch holding the loop (`LaunchPlan.loop_shares` by
    key, see by_key; 1 where it names none), as an average over the launch's programs."""
    inner = hot_loops(loops)
    counted = {loop: count_loop(instrs, loop) for loop in inner}
    trips = {loop: plan_trips(counted[loop], loop_trips, trips_by_class) for loop in inner}
    weights = {loop: float(n) for loop, n in trips.items()}
    for main, remainder in zip(inner, inner[1:]):
        factor = unroll_factor(counted[main], counted[remainder])
        if factor > 1:
            weights[main] = float(trips[main] // factor)
            weights[remainder] = float(trips[main] % factor)
    for loop in inner:
        weights[loop] *= by_key(counted[loop], shares, 1.0)
    return weights


def multiplicity(address: int, loops: list[Loop], weights: dict, outer_trips: int) -> float:
    """How often one program executes the instruction at `address`: an innermost loop's body as often as
    its weight (see loop_weights), code in enclosing loops `outer_trips` times, the rest once."""
    for loop, weight in weights.items():
        if loop.holds(address):
            return weight
    if any(loop.holds(address) for loop in loops):
        return outer_trips
    return 1


@dataclass
class ProgramWork:
    """What one program (CTA) executes, per warp, weighted by loop trips."""

    warp_instructions: float = 0.0  # per warp
    mufu: float = 0.0  # per warp
    tensor_macs: float = 0.0  # per program (all warps / warpgroups)
    tensor_seconds_per_sm_clock: float = 0.0  # MACs / (efficiency-weighted rate), in SM clocks
    outside_loops: float = 0.0  # per warp: instructions outside every loop (prologue and epilogue)
    tensor_ops: Counter = field(default_factory=Counter)
    loop_weights: dict = field(default_factory=dict)  # Loop -> executions of its body (see loop_weights)


def program_work(instrs, loops, num_warps, loop_trips, outer_trips, machine: Machine, dtype: str,
                 shares=None, trips_by_class=None) -> ProgramWork:
    weights = loop_weights(instrs, loops, loop_trips, outer_trips, shares, trips_by_class)
    work = ProgramWork(loop_weights=weights)
    rate = machine.macs_per_clock["tf32" if dtype == "fp32" else "16bit"]
    load_path = "tma" if any(instr.base == "UTMALDG" for instr in instrs) else "pointer"
    for instr in instrs:
        if instr.base in ("NOP",) or (instr.base == "BRA" and _branch_target(instr) == instr.address):
            continue
        times = multiplicity(instr.address, loops, weights, outer_trips)
        work.warp_instructions += times
        if not any(loop.holds(instr.address) for loop in loops):
            work.outside_loops += 1
        cls, detail = classify(instr)
        if cls == "mufu":
            work.mufu += times
        elif cls == "tensor":
            m, n, k = tensor_shape(instr.opcode)
            # a wgmma is one instruction per warp of its warpgroup for the whole 64-row tile
            issuers = num_warps / 4 if instr.base.endswith("GMMA") else num_warps
            macs = times * issuers * m * n * k
            work.tensor_macs += macs
            work.tensor_seconds_per_sm_clock += macs / (rate * tensor_efficiency(machine.arch, instr.base, n, load_path))
            work.tensor_ops[detail] += times
    return work


# --------------------------------------------------------------------------------------- compiling


def specialization(target, plan) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher builds them for this launch.

    Pointers are 16-byte aligned (torch allocations; the launchers pass whole tensors). An integer argument
    whose value is known (plan.int_args) is specialized as Triton does: 1 becomes a constant, a multiple of
    16 is marked divisible; otherwise the plan's divisible_by_16 names are marked."""
    names = list(target.fn.arg_names)
    signature, constexprs = dict(target.signature), dict(target.constexprs)
    int_args = dict(getattr(plan, "int_args", {}) or {}) if plan is not None else {}
    divisible = set(getattr(plan, "divisible_by_16", ()) or ()) if plan is not None else set()
    attrs = {}
    for name, kind in target.signature.items():
        if kind == "constexpr" or name not in names:
            continue
        if kind.startswith("*"):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif kind[0] in "iu":
            value = int_args.get(name)
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
            elif value is not None and abs(value) >= 2**31:
                signature[name] = "i64"
            if (value is not None and value != 1 and value % 16 == 0) or (value is None and name in divisible):
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def cache_dir() -> Path:
    root = _env.read(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fastconvnext", "sass")
    return Path(root)


def _source_hash(fn) -> str:
    """Triton's own hash of the kernel as loaded (its source, the @jit functions it calls, the constexpr
    globals it reads): in memory, so a kernel file edited during a run cannot key new text to old SASS."""
    key = getattr(fn, "cache_key", None)
    if isinstance(key, str):
        return key[:24]
    import inspect

    source = inspect.getsource(getattr(fn, "fn", fn))
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def compile_key(target, arch: int, signature, constexprs, attrs) -> str:
    import triton

    text = json.dumps([
        _source_hash(target.fn), triton.__version__, arch, sorted(signature.items()),
        sorted((k, str(v)) for k, v in constexprs.items()), sorted((str(k), v) for k, v in attrs.items()),
        target.num_warps, target.num_stages,
    ])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Compiled:
    sass: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    seconds: float = 0.0
    cached: bool = False


def compile_sass(target, arch: int, plan=None, use_cache: bool = True) -> Compiled:
    """Compile one target for sm_<arch> with the launch's specialization; SASS and resources, cached on disk."""
    from .compile_check import _resource_usage

    signature, constexprs, attrs = specialization(target, plan)
    key = compile_key(target, arch, signature, constexprs, attrs)
    path = cache_dir() / f"{key}.json.z"
    if use_cache and path.is_file():
        data = json.loads(zlib.decompress(path.read_bytes()))
        return Compiled(data["sass"], data["registers"], data["shared"], data["spill"], data["seconds"], True)
    if _env.interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile for a GPU target")
    from fastconvnext.kernels._triton_compat import compile_for_arch

    start = time.perf_counter()
    compiled = compile_for_arch(target.fn, signature, constexprs, attrs, arch, compile_options(target))
    seconds = time.perf_counter() - start
    usage, sass = _resource_usage(compiled.asm["cubin"])
    shared = max(usage["SHARED"], int(getattr(compiled.metadata, "shared", 0) or 0))
    result = Compiled(sass, usage["REG"], shared, usage["STACK"] + usage["LOCAL"], seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"sass": sass, "registers": result.registers, "shared": shared, "spill": result.spill_bytes,
               "seconds": seconds}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(zlib.compress(json.dumps(payload).encode()))
    tmp.replace(path)  # atomic: parallel workers never see half a file
    return result


# -------------------------------------------------------------------------------------- occupancy


def ctas_per_sm(machine: Machine, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), shared memory, warps, CTAs."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = machine.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = machine.smem_per_sm // (shared_bytes + 1024) if shared_bytes else machine.max_ctas_per_sm
    by_warps = machine.max_warps_per_sm // num_warps
    return max(0, min(by_regs, by_smem, by_warps, machine.max_ctas_per_sm))


# ------------------------------------------------------------------------------------------ the model


@dataclass
class LaunchEstimate:
    kernel: str
    label: str
    phase: str
    note: str
    grid: tuple
    programs: int
    num_warps: int
    registers: int = 0
    shared_bytes: int = 0
    spill_bytes: int = 0
    ctas_per_sm: int = 0
    waves: float = 0.0
    loops: list = field(default_factory=list)  # [LoopCounts] of the hot loops
    loop_trips: int = 0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    tensor_macs: float = 0.0
    tensor_ops: dict = field(default_factory=dict)
    warp_instructions: float = 0.0
    plan_flops: float = 0.0  # the plan's useful FLOPs: 2 x tensor_macs / plan_flops checks the loop weights
    terms: dict = field(default_factory=dict)  # seconds: hbm, l2, tensor, issue, mufu

    @property
    def tensor_vs_plan(self) -> float:
        """Tensor-core FLOPs counted from the SASS over the plan's FLOPs (0 without either): near 1 (or above,
        for recomputation) when trips and loop weights are right."""
        return 2 * self.tensor_macs / self.plan_flops if self.tensor_macs and self.plan_flops else 0.0

    @property
    def seconds(self) -> float:
        return max(self.terms.values()) if self.terms else 0.0

    @property
    def bound(self) -> str:
        return max(self.terms, key=self.terms.get) if self.terms else "-"


def _programs(grid) -> int:
    return math.prod(int(g) for g in grid) if grid else 1


def estimate_launch(plan, machine: Machine, compiled: Compiled | None, dtype: str) -> LaunchEstimate:
    target = plan.target
    programs = _programs(plan.grid)
    est = LaunchEstimate(
        kernel=target.kernel if target else "torch", label=target.label if target else plan.note,
        phase=plan.phase, note=plan.note, grid=tuple(plan.grid), programs=programs,
        num_warps=target.num_warps if target else 0, loop_trips=plan.loop_trips,
        hbm_bytes=plan.hbm_bytes, l2_bytes=plan.l2_bytes, plan_flops=getattr(plan, "flops", 0.0),
    )
    est.terms["hbm"] = plan.hbm_bytes / machine.hbm_bytes_per_s
    est.terms["l2"] = plan.l2_bytes / machine.l2_bytes_per_s
    if compiled is None:  # a torch step: its bytes, and its GEMM FLOPs (plan.flops) at eager cuBLAS's rate
        if est.plan_flops:
            est.terms["tensor"] = est.plan_flops / torch_gemm_flops_per_s(machine, dtype)
        return est
    instrs = parse_sass(compiled.sass)
    loops = find_loops(instrs)
    trips, outer = plan.loop_trips, getattr(plan, "outer_trips", 1)
    if outer > 1 and len(hot_loops(loops)) == len(loops):
        trips = outer  # the plan's inner loop was unrolled by the compiler: the loops left are the outer ones
    work = program_work(instrs, loops, target.num_warps, trips, outer, machine, dtype, getattr(plan, "loop_shares", {}),
                        getattr(plan, "trips_by_class", {}))
    est.registers, est.shared_bytes, est.spill_bytes = compiled.registers, compiled.shared_bytes, compiled.spill_bytes
    est.loop_trips = trips
    est.ctas_per_sm = ctas_per_sm(machine, compiled.registers, compiled.shared_bytes, target.num_warps)
    est.waves = programs / (machine.sms * max(est.ctas_per_sm, 1))
    est.loops = [count_loop(instrs, loop) for loop in hot_loops(loops)]
    for main, remainder in zip(est.loops, est.loops[1:]):
        main.iterations_per_body = unroll_factor(main, remainder)
    for counts in est.loops:
        counts.executions = work.loop_weights[counts.loop]
    busiest = math.ceil(programs / machine.sms)  # programs on the busiest SM
    clock = machine.clock_hz
    est.tensor_macs = work.tensor_macs * programs
    est.tensor_ops = dict(work.tensor_ops)
    est.warp_instructions = work.warp_instructions * target.num_warps * programs
    est.terms["tensor"] = busiest * work.tensor_seconds_per_sm_clock / clock
    if est.terms["tensor"] and est.ctas_per_sm == 1:  # no other CTA's matmul runs under this one's epilogue
        est.terms["tensor"] += busiest * work.outside_loops * target.num_warps / (machine.issue_per_clock * clock)
    est.terms["issue"] = busiest * work.warp_instructions * target.num_warps / (machine.issue_per_clock * clock)
    est.terms["mufu"] = busiest * work.mufu * target.num_warps * 32 / (machine.mufu_per_clock * clock)
    return est


def torch_gemm_flops_per_s(machine: Machine, dtype: str) -> float:
    """The rate of a torch (cuBLAS) GEMM inside a fused op's launches: the eager estimate's (roofline.EAGER_EFFICIENCY
    of the dense peak; fp32 without TF32, torch's default for matmuls)."""
    return machine.gpu.matmul_peak(dtype, allow_tf32=False) * roofline.EAGER_EFFICIENCY["matmul"]


def launch_plans(op, batch, height, width, channels, dtype, training, machine=H100_SXM):
    """(the kernel module's launch_plans at this shape, "module"); `machine` is accepted for the callers'
    symmetry with the estimates (the plans do not depend on it)."""
    module = importlib.import_module(f"{_KERNELS}.{KERNEL_OPS[op]}")
    if not hasattr(module, "launch_plans"):
        raise AttributeError(f"{module.__name__} has no launch_plans(batch, height, width, channels, dtype, training)")
    return list(module.launch_plans(batch, height, width, channels, dtype, training)), "module"


# ------------------------------------------------------------------------------------------ eager


def _eager_traffic(op, batch, size, channels, dtype, mode, impl="eager"):
    shape = roofline.StageShape("-", 0, batch, size, channels)
    return roofline.traffic(op, impl, "fwd" if mode == "forward" else "fwd+bwd", shape, dtype)


def eager_seconds(op, batch, size, channels, dtype, mode, machine: Machine) -> float:
    """The eager estimate of fastconvnext.tooling.roofline (public efficiencies of eager PyTorch's kernels)."""
    return _eager_traffic(op, batch, size, channels, dtype, mode).estimate_seconds(machine.gpu)


def floor_seconds(op, batch, size, channels, dtype, mode, machine: Machine) -> float:
    """The eager floor of fastconvnext.tooling.roofline: every eager op at peak (a torch.compile-class bound)."""
    return _eager_traffic(op, batch, size, channels, dtype, mode).seconds(machine.gpu)


def minimum_seconds(op, batch, size, channels, dtype, mode, machine: Machine) -> float:
    """The fusion floor ("minimum") of fastconvnext.tooling.roofline."""
    return _eager_traffic(op, batch, size, channels, dtype, mode, "fused_min").seconds(machine.gpu)


def pessimistic(machine: Machine) -> Machine:
    """The machine at the low edge of its public L2 -> SM figures."""
    return replace(machine, l2_bytes_per_s=machine.l2_bytes_per_s_low)


# ------------------------------------------------------------------------------------------- driver


@dataclass
class Case:
    op: str
    arch: int
    dtype: str
    channels: int
    size: int
    batch: int
    mode: str

    @property
    def key(self):
        return (self.op, self.arch, self.dtype, self.channels, self.size * self.size, self.batch, self.mode)


def cases(archs=(90, 80), dtypes=DTYPES, batches=(64, 256), models=("tiny", "base"), ops=tuple(KERNEL_OPS)):
    out = []
    for arch in archs:
        for dtype in dtypes:
            for model in models:
                for size, channels in zip(STAGE_SIZES, STAGE_CHANNELS[model]):
                    for batch in batches:
                        for op in ops:
                            for mode in MODES:
                                out.append(Case(op, arch, dtype, channels, size, batch, mode))
    return out


@dataclass
class CaseResult:
    case: Case
    launches: list  # [LaunchEstimate]
    source: str  # where the plans came from: "module"
    eager_s: float  # the eager estimate
    minimum_s: float
    error: str = ""
    floor_s: float = 0.0  # the eager floor
    fused_low_s: float = 0.0  # the fused launches at the pessimistic L2 -> SM edge

    @property
    def fused_s(self) -> float:
        return sum(launch.seconds for launch in self.launches)


_JOBS: list = []


def _compile_job(index):
    target, arch, plan = _JOBS[index]
    try:
        return compile_sass(target, arch, plan)
    except Exception as error:  # a compile error is a finding: reported, not raised
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _compile_all(jobs, workers, progress=None):
    global _JOBS
    _JOBS = jobs
    out = []

    def collect(results):
        for result in results:
            out.append(result)
            if progress and len(out) % 10 == 0:
                progress(f"  {len(out)}/{len(jobs)} compiled")

    if workers <= 1 or len(jobs) <= 1:
        collect(_compile_job(i) for i in range(len(jobs)))
        return out
    from .compile_check import worker_pool

    with worker_pool(workers) as pool:
        collect(pool.map(_compile_job, range(len(jobs)), chunksize=1))
    return out


def run_model(case_list, workers=1, progress=None) -> list[CaseResult]:
    """Plans for every case, one compile per distinct (config, specialization, arch), then the estimates."""
    planned = []
    for case in case_list:
        machine = MACHINES[case.arch]
        try:
            plans, source = launch_plans(case.op, case.batch, case.size, case.size, case.channels, case.dtype,
                                         case.mode == "forward_backward", machine)
            planned.append((case, plans, source, ""))
        except Exception as error:
            planned.append((case, [], "-", f"no launch plans: {type(error).__name__}: {error}"))
    jobs, index, keys = [], {}, {}  # keys: hashed once (a kernel file edited mid-run must not split them)
    for case, plans, _, _ in planned:
        for plan in plans:
            if plan.target is None:
                continue
            sig, consts, attrs = specialization(plan.target, plan)
            key = keys[id(plan)] = compile_key(plan.target, case.arch, sig, consts, attrs)
            if key not in index:
                index[key] = len(jobs)
                jobs.append((plan.target, case.arch, plan))
    if progress:
        progress(f"{len(jobs)} distinct compiles for {len(case_list)} cases")
    compiled = _compile_all(jobs, workers, progress)
    results = []
    for case, plans, source, error in planned:
        machine = MACHINES[case.arch]
        launches, fused_low_s = [], 0.0
        for plan in plans:
            built = None
            if plan.target is not None:
                built = compiled[index[keys[id(plan)]]]
                if isinstance(built, str):
                    error = error or f"compile failed for {plan.target.kernel} {plan.target.label}: {built}"
                    continue
            launches.append(estimate_launch(plan, machine, built, case.dtype))
            fused_low_s += estimate_launch(plan, pessimistic(machine), built, case.dtype).seconds
        shape = (case.op, case.batch, case.size, case.channels, case.dtype, case.mode, machine)
        results.append(CaseResult(case, launches, source, eager_seconds(*shape), minimum_seconds(*shape), error,
                                  floor_seconds(*shape), fused_low_s))
    return results


# ------------------------------------------------------------------------------------------ output


def _versions() -> str:
    import triton

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "absent"
    return f"triton {triton.__version__}, torch {torch_version}"


PRIOR_COLUMNS = ("op", "arch", "dtype", "channels", "hw", "batch", "mode",
                 "fused_us", "fused_pessimistic_us", "eager_us", "floor_us")


def prior_document(results: list[CaseResult], command: str) -> dict:
    """fastconvnext/prior.json: the MODEL's predictions the auto policy falls back on where it cannot measure."""
    rows = []
    for result in sorted(results, key=lambda r: r.case.key):
        if result.error or not result.launches:
            continue
        rows.append([*result.case.key, *(round(t * 1e6, 3) for t in
                                         (result.fused_s, result.fused_low_s, result.eager_s, result.floor_s))])
    return {
        "what": "MODEL predictions, not measurements: fused_us from the static SASS model of each fused launch "
                "(max of HBM, L2, tensor, issue and MUFU time), fused_pessimistic_us the same at the low edge of the "
                "public L2 -> SM bandwidth, eager_us the eager estimate (eager PyTorch at public efficiencies), "
                "floor_us the eager floor (every eager op at peak: a torch.compile-class bound). The auto policy "
                "compares fused_us with eager_us only where it cannot time the shape on the GPU at hand.",
        "keys": "op; arch 80 = A100 SXM, 90 = H100 SXM; dtype; channels; hw = H*W; batch; mode forward (inference) "
                "or forward_backward (training forward + backward)",
        "generated_by": command,
        "versions": _versions(),
        "machine_sources": list(roofline.MACHINE_SOURCES) + list(roofline.EAGER_SOURCES),
        "columns": list(PRIOR_COLUMNS),
        "rows": rows,
    }


def launches_document(results: list[CaseResult]) -> dict:
    """fastconvnext/tooling/launches.json: per-launch detail (bf16, batch 256) that the prior's sums are made of,
    for benchmarks/ROOFLINE.md and the L2 what-if."""
    cases = []
    for result in sorted(results, key=lambda r: r.case.key):
        c = result.case
        if result.error or not result.launches or c.dtype != DETAIL_DTYPE or c.batch != DETAIL_BATCH:
            continue
        cases.append({"key": list(c.key), "launches": [launch_record(launch) for launch in result.launches]})
    return {"what": "MODEL: per-launch estimates of the static SASS model", "versions": _versions(), "cases": cases}


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


DETAIL_DTYPE, DETAIL_BATCH = "bf16", 256


def launch_record(launch: LaunchEstimate) -> dict:
    """One launch as plain data for launches.json (rendered in benchmarks/ROOFLINE.md)."""
    loops = []
    for counts in launch.loops:
        keep = {k: v for k, v in counts.details.items() if opcode(k) in _DETAIL_OPS}
        loops.append({"instructions": counts.total, "iterations_per_body": counts.iterations_per_body,
                      "executions": round(counts.executions, 2),
                      "classes": {k: counts.classes[k] for k in CLASSES if counts.classes.get(k)},
                      "detail": dict(sorted(keep.items()))})
    return {
        "kernel": launch.kernel, "config": launch.label, "phase": launch.phase, "grid": list(launch.grid),
        "registers": launch.registers, "shared_bytes": launch.shared_bytes, "ctas_per_sm": launch.ctas_per_sm,
        "waves": round(launch.waves, 2), "loop_trips": launch.loop_trips, "us": round(launch.seconds * 1e6, 2),
        "bound": launch.bound, "terms_us": {k: round(v * 1e6, 2) for k, v in launch.terms.items()},
        "hbm_mb": round(launch.hbm_bytes / 1e6, 2), "l2_mb": round(launch.l2_bytes / 1e6, 2), "hot_loops": loops,
        "tensor_vs_plan_flops": round(launch.tensor_vs_plan, 2), "spill_bytes": launch.spill_bytes,
    }


_DETAIL_OPS = ("HGMMA", "HMMA", "LDG", "LDGSTS", "LDS", "LDSM", "STS", "STG", "BAR", "MUFU", "WARPGROUP", "SYNCS",
               "UTMALDG")


def _fmt_counts(counter: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def loop_lines(launch: LaunchEstimate) -> list[str]:
    lines = []
    for counts in launch.loops:
        cls = " ".join(f"{name}={counts.classes[name]}" for name in CLASSES if counts.classes.get(name))
        per = "iter" if counts.iterations_per_body == 1 else f"{counts.iterations_per_body} iters (unrolled)"
        span = f"0x{counts.loop.start:x}-0x{counts.loop.end:x}"
        lines.append(f"      hot loop {span} x{counts.executions:g} per program: {counts.total} instr/{per}: {cls}")
        keys = Counter({k: v for k, v in counts.details.items() if opcode(k) in _DETAIL_OPS})
        if keys:
            lines.append(f"        detail: {_fmt_counts(keys)}")
    return lines


def text_report(results: list[CaseResult], loops: bool = False) -> str:
    lines = ["Static SASS model (MODEL, not measurement). time = max(hbm, l2, tensor, issue, mufu) per launch.",
             *("  " + s for s in MACHINE_SOURCES), ""]
    for result in results:
        c = result.case
        head = (f"{c.op} sm_{c.arch} {c.dtype} C={c.channels} {c.size}x{c.size} batch {c.batch} {c.mode}: "
                f"fused {result.fused_s * 1e6:,.1f} µs, eager estimate {result.eager_s * 1e6:,.1f} µs "
                f"({result.fused_s / result.eager_s:.2f}x eager), eager floor {result.floor_s * 1e6:,.1f} µs, "
                f"minimum {result.minimum_s * 1e6:,.1f} µs "
                f"[plans: {result.source}]")
        lines.append(head)
        if result.error:
            lines.append(f"    ERROR: {result.error}")
        for launch in result.launches:
            terms = " ".join(f"{k}={v * 1e6:,.1f}" for k, v in launch.terms.items())
            lines.append(f"    {launch.kernel} [{launch.label}] grid={launch.grid} regs={launch.registers} "
                         f"smem={launch.shared_bytes} CTAs/SM={launch.ctas_per_sm} waves={launch.waves:.2f} "
                         f"trips={launch.loop_trips}: {launch.seconds * 1e6:,.1f} µs ({launch.bound}; {terms})"
                         + (f" SASS/plan FLOPs={launch.tensor_vs_plan:.2f}" if launch.tensor_vs_plan else "")
                         + (f" SPILLS {launch.spill_bytes} B" if launch.spill_bytes else ""))
            if loops:
                lines += loop_lines(launch)
    return "\n".join(lines)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastconvnext.tooling.sass_report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(MACHINES))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--models", nargs="+", default=["tiny", "base"], choices=sorted(STAGE_CHANNELS))
    parser.add_argument("--op", nargs="+", default=list(KERNEL_OPS), choices=list(KERNEL_OPS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--table", type=Path, default=None,
                        help=f"write the prior here (default with the full grid: {PRIOR_PATH}; the per-launch "
                             f"detail goes to {LAUNCHES_PATH.name} beside it)")
    parser.add_argument("--no-table", action="store_true", help="do not write the prior")
    parser.add_argument("--loops", action="store_true", help="print per-iteration instruction classes of hot loops")
    parser.add_argument("--json", type=Path, help="also write every launch estimate as JSON")
    return parser.parse_args(argv)


def _full_grid(args) -> bool:
    return (set(args.arch) == set(MACHINES) and set(args.dtype) == set(DTYPES) and set(args.batch) >= {64, 256}
            and set(args.models) == set(STAGE_CHANNELS) and set(args.op) == set(KERNEL_OPS))


def _as_json(results):
    out = []
    for r in results:
        launches = []
        for launch in r.launches:
            launches.append({
                "kernel": launch.kernel, "label": launch.label, "phase": launch.phase, "grid": list(launch.grid),
                "registers": launch.registers, "shared_bytes": launch.shared_bytes, "ctas_per_sm": launch.ctas_per_sm,
                "waves": launch.waves, "loop_trips": launch.loop_trips, "spill_bytes": launch.spill_bytes, "terms_us": {k: v * 1e6 for k, v in
                                                                                   launch.terms.items()},
                "hot_loops": [{"start": lc.loop.start, "end": lc.loop.end, "classes": dict(lc.classes),
                               "details": dict(lc.details)} for lc in launch.loops],
            })
        out.append({"key": list(r.case.key), "fused_us": r.fused_s * 1e6, "eager_us": r.eager_s * 1e6,
                    "minimum_us": r.minimum_s * 1e6, "plans": r.source, "error": r.error, "launches": launches})
    return out


def _grid_command(argv) -> str:
    """The command line that chose the grid (output paths, --jobs and --loops left out: they do not change it)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--table", "--json", "--jobs"):
            skip = True
        elif not arg.startswith(("--table=", "--json=", "--jobs=")) and arg not in ("--loops", "--no-table"):
            kept.append(arg)
    return " ".join(["python -m fastconvnext.tooling.sass_report", *kept])


def main(argv=None) -> int:
    args = _parse_args(argv)
    if _env.interpreting():
        print("sass_report: TRITON_INTERPRET is set; unset it (compiling for a GPU target is impossible in "
              "interpreter mode)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    case_list = cases(tuple(args.arch), tuple(args.dtype), tuple(args.batch), tuple(args.models), tuple(args.op))
    results = run_model(case_list, args.jobs, progress=lambda msg: print(msg, file=sys.stderr))
    print(text_report(results, loops=args.loops))
    table = args.table or (PRIOR_PATH if _full_grid(args) else None)
    if table is not None and not args.no_table:
        write_json(table, prior_document(results, _grid_command(argv if argv is not None else sys.argv[1:])))
        launches = LAUNCHES_PATH if table == PRIOR_PATH else table.with_name(f"{table.stem}.launches.json")
        write_json(launches, launches_document(results))
        print(f"\nwrote {table} and {launches}")
    if args.json:
        args.json.write_text(json.dumps(_as_json(results), indent=1))
    failed = [r for r in results if r.error]
    spilling = spilling_launches(results)
    for line in spilling:
        print(f"SPILL (local-memory traffic is not in the model, so its time is optimistic): {line}")
    print(f"\n{len(results)} cases in {time.perf_counter() - start:.0f} s, {len(failed)} with errors, "
          f"{len(spilling)} spilling launch configs")
    return 1 if failed or spilling else 0


def spilling_launches(results: list[CaseResult]) -> list[str]:
    """One line per distinct (kernel, config, arch, dtype) whose launch-specialized compile spills."""
    seen = {}
    for result in results:
        for launch in result.launches:
            if launch.spill_bytes:
                key = (launch.kernel, launch.label, result.case.arch, result.case.dtype)
                seen.setdefault(key, f"{launch.kernel} [{launch.label}] sm_{result.case.arch} {result.case.dtype}: "
                                     f"{launch.spill_bytes} B")
    return list(seen.values())


if __name__ == "__main__":
    sys.exit(main())
