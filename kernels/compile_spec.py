"""What a kernel module hands to `compile_check`: one entry per kernel config the launchers can pick."""
from __future__ import annotations

from dataclasses import dataclass, field

# FMA contraction (a*b + c -> one FFMA) in every compile and launch, set explicitly: Triton 3.9 defaults it on
# (and warns), 3.10 turns the default off. The kernels' speed, the SASS model's FFMA counts and the bits the
# tests pin all assume it; TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off.
FP_FUSION = True


def compile_options(target: "CompileTarget") -> dict:
    """triton.compile options for a target, as its launch gets them."""
    return {"num_warps": target.num_warps, "num_stages": target.num_stages, "enable_fp_fusion": FP_FUSION}


@dataclass(frozen=True)
class CompileTarget:
    kernel: str  # display name, e.g. "dwconv_layernorm_fwd"
    fn: object  # the @triton.jit function (unwrapped from any autotuner/heuristics)
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    dtype: str = "fp32"  # activation dtype this config is used for
    label: str = ""  # short description of the config (block sizes, flags)
    expects_tensor_cores: bool = False  # SASS must show HMMA (sm_80) / HGMMA or HMMA (sm_90)
    # Integer arguments the launcher guarantees are multiples of 16 whenever it picks this target (it
    # checks, and picks another target otherwise): compiled divisible, as Triton specializes such a launch.
    divisible_by_16: tuple = ()
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch that a real call makes at a given shape: what `sass_report` compiles and models.

    Kernel modules expose `launch_plans(batch, height, width, channels, dtype, training) -> list[LaunchPlan]`
    (forward launches, then backward launches when `training`), choosing exactly the config their launcher
    would pick for that shape with autotuning off.
    """
    target: CompileTarget  # the config the launcher picks; its signature/constexprs as a real launch builds them
    grid: tuple  # programs launched (1 to 3 ints)
    phase: str  # "forward" or "backward"
    hbm_bytes: float  # bytes this launch moves to/from HBM, counting re-reads whose footprint exceeds L2
    l2_bytes: float  # bytes its programs request from L2 (halos and re-reads across programs included)
    loop_trips: int  # iterations of the hot loop one program runs (per-iteration counts x trips = total; a loop
    #   that runs another count is named in trips_by_class)
    flops: float = 0.0  # useful floating-point operations of the launch
    divisible_by_16: tuple = ()  # integer argument names that are multiples of 16 at this shape (Triton specializes them)
    note: str = ""  # one line: what this launch does
    int_args: dict = field(default_factory=dict)  # integer argument values at this shape: sass_report specializes
    #   them as Triton's launcher does (1 -> constant, multiple of 16 -> divisible); divisible_by_16 when absent
    outer_trips: int = 1  # iterations of loops enclosing the hot loop, per program (loop_trips counts every
    #   hot-loop iteration of the program, so nested loops give loop_trips = inner x outer)
    loop_shares: dict = field(default_factory=dict)  # innermost loops in branches only some programs take: {key:
    #   fraction of programs that run the loop}, keyed as trips_by_class; a loop holding no key gets the "other"
    #   entry, or 1 without one (every program runs it)
    trips_by_class: dict = field(default_factory=dict)  # innermost loops that run another count than loop_trips,
    #   told apart by what their SASS body holds: an instruction class (a sass_report.CLASSES name) or a base opcode
    #   (e.g. "SHFL"): {key: iterations per program}, e.g. {"global store": 2} for a loop that stores each
    #   iteration; the first key a loop holds gives its trips, a loop holding none runs the "other" entry, or
    #   loop_trips without one. It keeps such a loop's count right whichever loops the compiler unrolls away
