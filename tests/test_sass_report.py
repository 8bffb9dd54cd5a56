"""The static SASS model: instruction classes, hot-loop detection, the time formula, one real compile.

Everything but the real compile is pure text processing and arithmetic, checked against counts done by hand.
"""
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from fastconvnext.tooling import sass_report as sr
from fastconvnext.kernels.compile_spec import CompileTarget, LaunchPlan

# Hand-written in cuobjdump's layout. Outer loop 0x20..0xe0, inner loop 0x30..0xc0, end-of-kernel trap at 0x100.
CANNED = """
        /*0000*/                   S2R R0, SR_TID.X ;                                  /* 0x0000000000007919 */
        /*0010*/                   IMAD.MOV.U32 R2, RZ, RZ, 0x0 ;                      /* 0x000000ffff027424 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                    /* 0x0000000402047981 */
        /*0030*/                   LDS.U16 R8, [R0] ;                                  /* 0x0000000000087984 */
        /*0040*/                   FFMA R9, R4, R5, R9 ;                               /* 0x0000000504097223 */
        /*0050*/                   FFMA R10, R6, R7, R10 ;                             /* 0x00000007060a7223 */
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;     /* 0x00600000081879f0 */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                       /* 0x0000000000007b1d */
        /*0080*/                   MUFU.EX2 R11, R9 ;                                  /* 0x00000009000b7308 */
        /*0090*/                   F2FP.BF16.F32.PACK_AB R12, R10, R9 ;                /* 0x000000090a0c723e */
        /*00a0*/                   IADD3 R3, R3, 0x1, RZ ;                             /* 0x0000000103037810 */
        /*00b0*/                   ISETP.GE.AND P0, PT, R3, 0x10, PT ;                 /* 0x000000100300780c */
        /*00c0*/              @!P0 BRA 0x30 ;                                          /* 0xfffffffc00008947 */
        /*00d0*/                   STG.E.64 desc[UR4][R2.64], R8 ;                     /* 0x0000000802007986 */
        /*00e0*/               @P1 BRA 0x20 ;                                          /* 0xfffffffc00001947 */
        /*00f0*/                   EXIT ;                                              /* 0x000000000000794d */
        /*0100*/                   BRA 0x100;                                          /* 0xfffffffc00fc7947 */
"""


def test_instruction_classes_of_a_canned_loop_counted_by_hand():
    instrs = sr.parse_sass(CANNED)
    assert len(instrs) == 17
    loops = sr.find_loops(instrs)
    inner = sr.hot_loops(loops)
    assert inner == [sr.Loop(0x30, 0xC0)]
    counts = sr.count_loop(instrs, inner[0])
    assert counts.total == 10
    assert counts.classes == Counter({
        "shared load": 1, "ffma": 2, "tensor": 1, "barrier/wait": 1, "mufu": 1, "convert": 1, "int/address": 2,
        "control/other": 1,
    })
    assert counts.details["HGMMA 64x128x16"] == 1
    assert counts.details["LDS.16"] == 1
    assert counts.details["BAR.SYNC"] == 1


def test_widths_and_tensor_shapes():
    def detail(line):
        return sr.classify(sr.parse_sass(line)[0])

    assert detail("/*0000*/ LDG.E.U16 R1, desc[UR4][R2.64] ;") == ("global load", "LDG.16")
    assert detail("/*0000*/ LDG.E R1, desc[UR4][R2.64] ;") == ("global load", "LDG.32")
    assert detail("/*0000*/ LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;") == ("global->shared", "LDGSTS.128")
    assert detail("/*0000*/ LDSM.16.M88.4 R4, [R1] ;") == ("shared load", "LDSM.128")
    assert detail("/*0000*/ STS.64 [R1], R2 ;") == ("shared store", "STS.64")
    assert detail("/*0000*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;") == ("tensor", "HMMA 16x8x16")
    assert detail("/*0000*/ HFMA2.MMA R3, -RZ, RZ, 0, 0 ;")[0] == "move/shuffle"  # a move idiom, not math
    assert detail("/*0000*/ HFMA2 R3, R1, R2, R3 ;") == ("hfma2", "HFMA2")
    assert sr.tensor_shape("HGMMA.64x256x16.F32.BF16") == (64, 256, 16)


def test_nested_and_unrolled_loops():
    instrs = sr.parse_sass(CANNED)
    loops = sr.find_loops(instrs)
    assert loops == [sr.Loop(0x20, 0xE0), sr.Loop(0x30, 0xC0)]
    assert sr.Loop(0x20, 0xE0).contains(sr.Loop(0x30, 0xC0))
    # a main loop with 4x the work of the loop after it is the same loop unrolled 4 times plus its remainder
    main = sr.LoopCounts(sr.Loop(0, 1), Counter({"ffma": 16, "global load": 4, "int/address": 9}), Counter())
    rest = sr.LoopCounts(sr.Loop(2, 3), Counter({"ffma": 4, "global load": 1, "int/address": 5}), Counter())
    assert sr.unroll_factor(main, rest) == 4
    assert sr.unroll_factor(rest, main) == 1
    odd = sr.LoopCounts(sr.Loop(2, 3), Counter({"ffma": 4, "global load": 2}), Counter())
    assert sr.unroll_factor(main, odd) == 1


def test_time_formula_on_the_canned_kernel():
    """grid 264 on 132 SMs = 2 programs on the busiest SM; 4 warps = one warpgroup; 16 inner x 4 outer trips."""
    machine = sr.H100_SXM
    target = CompileTarget(kernel="canned", fn=None, signature={}, constexprs={}, num_warps=4, num_stages=1)
    plan = LaunchPlan(target=target, grid=(264,), phase="forward", hbm_bytes=6.7e6, l2_bytes=11e6, loop_trips=64,
                      outer_trips=4)
    compiled = sr.Compiled(CANNED, registers=64, shared_bytes=16384, spill_bytes=0)
    est = sr.estimate_launch(plan, machine, compiled, "bf16")
    clock = machine.clock_hz  # the clock 989 TFLOP/s of dense bf16 implies at 132 SMs x 4096 FLOP/clk
    assert clock == pytest.approx(989e12 / (132 * 4096)) and clock == pytest.approx(1.83e9, rel=1e-3)
    # per warp: 3 instructions outside the loops (S2R, IMAD.MOV, EXIT; the trap is not executed),
    # 3 in the outer loop only (LDG, STG, BRA) x 4, 10 in the inner loop x 64
    per_warp = 3 + 3 * 4 + 10 * 64
    assert est.terms["issue"] == pytest.approx(2 * per_warp * 4 / (4 * clock))
    assert est.terms["mufu"] == pytest.approx(2 * 64 * 4 * 32 / (16 * clock))
    macs = 64 * 64 * 128 * 16  # one wgmma per inner iteration for the warpgroup
    # pointer loads (no UTMALDG in the SASS): 0.6 of the dense 2048 MACs per clock
    assert est.terms["tensor"] == pytest.approx(2 * macs / (2048 * 0.6) / clock)
    assert est.terms["hbm"] == pytest.approx(6.7e6 / 3.35e12)
    assert est.terms["l2"] == pytest.approx(11e6 / 9.5e12)
    # 2 x 8.4M MACs at 2048 x 0.6 per clock: 13,653 clocks, above the 1,310 issue clocks
    assert est.seconds == max(est.terms.values()) and est.bound == "tensor"
    # 64 registers x 128 threads = 8192 per CTA -> 8 CTAs; 16 KB + 1 KB reserved shared -> 13; warps 16: 8
    assert est.ctas_per_sm == 8
    assert est.waves == pytest.approx(264 / (132 * 8))
    # one CTA per SM (200 KB of shared memory): nothing overlaps the 3 instructions outside the loops, per program
    alone = sr.estimate_launch(plan, machine, sr.Compiled(CANNED, registers=64, shared_bytes=200_000, spill_bytes=0),
                               "bf16")
    assert alone.ctas_per_sm == 1
    assert alone.terms["tensor"] == pytest.approx(est.terms["tensor"] + 2 * 3 * 4 / (4 * clock))
    # the pessimistic machine changes the L2 term only
    low = sr.estimate_launch(plan, sr.pessimistic(machine), compiled, "bf16")
    assert low.terms["l2"] == pytest.approx(11e6 / 8.0e12) and low.terms["tensor"] == est.terms["tensor"]


def test_tensor_efficiency_by_load_path():
    assert sr.tensor_efficiency(90, "HGMMA", 128) == 0.6 and sr.tensor_efficiency(90, "HGMMA", 64, "tma") == 0.7
    assert sr.tensor_efficiency(90, "HMMA", 128) == pytest.approx(0.3)  # mma.sync on Hopper: half the wgmma rate
    assert sr.tensor_efficiency(80, "HMMA", 128) == 0.6


def test_loop_shares_weight_branch_loops_by_the_programs_that_take_them():
    """A hot loop in a branch half the programs take (the MLP's dW1/dW2 split) counts half its trips per
    program on average; the first key its body holds (a class or an opcode) gives its share, else "other", else 1."""
    instrs = sr.parse_sass(CANNED)
    loops = sr.find_loops(instrs)
    inner = sr.Loop(0x30, 0xC0)
    assert sr.loop_weights(instrs, loops, 64, 4) == {inner: 64.0}
    assert sr.loop_weights(instrs, loops, 64, 4, {"tensor": 0.5, "other": 0.1}) == {inner: 32.0}
    assert sr.loop_weights(instrs, loops, 64, 4, {"SHFL": 0.5}) == {inner: 64.0}
    assert sr.loop_weights(instrs, loops, 64, 4, {"SHFL": 0.5, "other": 0.25}) == {inner: 16.0}
    assert sr.loop_weights(instrs, loops, 64, 4, {"MUFU": 0.125, "tensor": 0.5}) == {inner: 8.0}
    target = CompileTarget(kernel="canned", fn=None, signature={}, constexprs={}, num_warps=4, num_stages=1)
    compiled = sr.Compiled(CANNED, registers=64, shared_bytes=16384, spill_bytes=0)
    whole, half = (sr.estimate_launch(LaunchPlan(target=target, grid=(264,), phase="backward", hbm_bytes=0.0,
                                                 l2_bytes=0.0, loop_trips=64, outer_trips=4, loop_shares=shares),
                                      sr.H100_SXM, compiled, "bf16") for shares in ({}, {"tensor": 0.5}))
    assert half.tensor_macs == pytest.approx(whole.tensor_macs / 2)


# The V1 MLP's dw kernel as ptxas compiles it (three innermost loops; fp32 IEEE, so its dots are plain FFMA): the dW2
# loop (0x30..0x80) for programs [D_TILES, 2 D_TILES), the dW1 loop (0xa0..0xf0) for programs [0, D_TILES), and the
# db2/dgamma sums loop (0x100..0x150) for program 0 of them, whose row sums shuffle across lanes.
DW_FMA = """
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x18, PT ;
        /*0020*/              @!P0 BRA 0xa0 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   STS.128 [R1], R4 ;
        /*0050*/                   LDS.64 R8, [R1] ;
        /*0060*/                   FFMA R12, R8, R9, R12 ;
        /*0070*/                   ISETP.GE.AND P1, PT, R3, R5, PT ;
        /*0080*/              @!P1 BRA 0x30 ;
        /*0090*/                   BRA 0x160 ;
        /*00a0*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00b0*/                   STS.128 [R1], R4 ;
        /*00c0*/                   LDS.64 R8, [R1] ;
        /*00d0*/                   FFMA R12, R8, R9, R12 ;
        /*00e0*/                   ISETP.GE.AND P1, PT, R3, R5, PT ;
        /*00f0*/              @!P1 BRA 0xa0 ;
        /*0100*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/                   FADD R13, R4, R13 ;
        /*0120*/                   SHFL.BFLY PT, R14, R13, 0x10, 0x1f ;
        /*0130*/                   FFMA R15, R4, R5, R15 ;
        /*0140*/                   ISETP.GE.AND P1, PT, R3, R5, PT ;
        /*0150*/              @!P1 BRA 0x100 ;
        /*0160*/                   STG.E.128 desc[UR4][R2.64], R12 ;
        /*0170*/                   EXIT ;
        /*0180*/                   BRA 0x180;
"""


@pytest.mark.parametrize("dtype, dot", [("fp32", "FFMA R12, R8, R9, R12"),
                                        ("bf16", "HMMA.16816.F32.BF16 R12, R8, R10, R12")])
def test_the_v1_dw_plan_shares_its_loops_by_what_they_are_in_every_dtype(dtype, dot):
    """Half the dw programs run each weight-gradient loop, one in grid[0] the sums loop, whether the dots are FFMA
    (fp32 IEEE) or tensor-core instructions: at C = 96, batch 256, 196 executions per program, not 392 / 48."""
    from fastconvnext.kernels import convnext_mlp_kernel as v1

    plan = next(p for p in v1.launch_plans(256, 56, 56, 96, dtype, True) if p.target and p.target.kernel.endswith("dw"))
    sass = DW_FMA.replace("FFMA R12, R8, R9, R12", dot)
    est = sr.estimate_launch(plan, sr.H100_SXM, sr.Compiled(sass, 64, 0, 0), dtype)
    trips = plan.loop_trips
    assert [counts.executions for counts in est.loops] == [trips / 2, trips / 2, trips / plan.grid[0]]
    if dtype == "fp32":
        assert (trips, plan.grid[0]) == (392, 48)


# The V2 MLP's pass 1 as ptxas leaves it from C = 192 up (sm_90, 16-bit): the matmul's wgmma steps unrolled whole,
# outside every loop; the one loop left (0x40..0x90) is the per-image loop, which stores a partial per image slot.
UNROLLED = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24 ;
        /*0040*/                   FADD R9, R24, R25 ;
        /*0050*/                   SHFL.BFLY PT, R10, R9, 0x10, 0x1f ;
        /*0060*/                   STG.E desc[UR4][R2.64], R10 ;
        /*0070*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0080*/                   ISETP.GE.AND P0, PT, R3, c[0x0][0x180], PT ;
        /*0090*/              @!P0 BRA 0x40 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_a_loop_named_by_class_runs_its_own_trips_when_the_main_loop_is_unrolled_away():
    """loop_trips (12 K steps) belong to the matmul, which ptxas unrolled whole; the loop left is the per-image loop,
    which the plan names by the global store it holds: it runs its 4 trips, not the matmul's 12."""
    target = CompileTarget(kernel="unrolled", fn=None, signature={}, constexprs={}, num_warps=8, num_stages=1)
    plan = LaunchPlan(target=target, grid=(132,), phase="forward", hbm_bytes=0, l2_bytes=0, loop_trips=12,
                      trips_by_class={"global store": 4})
    est = sr.estimate_launch(plan, sr.H100_SXM, sr.Compiled(UNROLLED, 64, 0, 0), "bf16")
    # per warp: 5 instructions outside the loop (S2R, 3 HGMMA, EXIT; the trap is not executed), 6 in it x 4
    assert est.terms["issue"] == pytest.approx((5 + 6 * 4) * 8 / (4 * sr.H100_SXM.clock_hz))
    assert est.tensor_macs == 132 * 3 * 2 * 64 * 128 * 16  # each wgmma once, for 2 warpgroups
    assert [(counts.loop, counts.executions) for counts in est.loops] == [(sr.Loop(0x40, 0x90), 4.0)]
    assert est.loop_trips == 12  # the plan's main-loop count, as launches.json records it


def test_plan_trips_take_the_first_class_a_loop_holds():
    instrs = sr.parse_sass(CANNED)
    counts = sr.count_loop(instrs, sr.Loop(0x30, 0xC0))  # tensor and MUFU work, no global store
    assert sr.plan_trips(counts, 64) == 64
    assert sr.plan_trips(counts, 64, {"global store": 4}) == 64
    assert sr.plan_trips(counts, 64, {"mufu": 8, "tensor": 16}) == 8
    loops = sr.find_loops(instrs)
    assert sr.loop_weights(instrs, loops, 64, 4, {"tensor": 0.5}, {"tensor": 16}) == {sr.Loop(0x30, 0xC0): 8.0}


def test_the_v2_plans_name_the_per_image_loop_by_a_class_the_model_knows():
    from fastconvnext.kernels import convnext_v2_mlp_kernel as v2

    for C, size in ((96, 56), (192, 28), (768, 7)):
        for plan in v2.launch_plans(256, size, size, C, "bf16", True):
            assert set(plan.trips_by_class) <= set(sr.CLASSES)
            if plan.target is not None and plan.target.kernel.endswith(("fc1_sumsq", "bwd_sums")):
                assert plan.trips_by_class == {"global store": plan.int_args["SPAN"]}


def test_occupancy_limits():
    h100 = sr.H100_SXM
    assert sr.ctas_per_sm(h100, 255, 0, 8) == 1  # 256 regs x 256 threads = the whole register file
    assert sr.ctas_per_sm(h100, 32, 100 * 1024, 4) == 2  # shared memory bound
    assert sr.ctas_per_sm(h100, 16, 0, 1) == 32  # CTA-count bound


def test_specialization_follows_tritons_launcher():
    class FakeFn:
        arg_names = ["x_ptr", "n", "m", "k", "BLOCK"]

    target = CompileTarget(kernel="k", fn=FakeFn(), signature={"x_ptr": "*bf16", "n": "i32", "m": "i32", "k": "i32",
                                                               "BLOCK": "constexpr"}, constexprs={"BLOCK": 64})
    plan = LaunchPlan(target=target, grid=(1,), phase="forward", hbm_bytes=0, l2_bytes=0, loop_trips=1,
                      int_args={"n": 1, "m": 48, "k": 7})
    signature, constexprs, attrs = sr.specialization(target, plan)
    assert signature["n"] == "constexpr" and constexprs["n"] == 1  # a 1 becomes a constant
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}  # pointer and m = 48
    by_name = LaunchPlan(target=target, grid=(1,), phase="forward", hbm_bytes=0, l2_bytes=0, loop_trips=1,
                         divisible_by_16=("k",))
    assert sr.specialization(target, by_name)[2] == {(0,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}


def test_the_prior_document_has_every_column_per_case(tmp_path):
    case = sr.Case("convnext_mlp", 90, "bf16", 96, 56, 64, "forward")
    est = sr.LaunchEstimate("k", "", "forward", "", (1,), 1, 4, terms={"hbm": 2e-6, "issue": 5e-6})
    result = sr.CaseResult(case, [est], "module", eager_s=10e-6, minimum_s=1e-6, floor_s=4e-6, fused_low_s=6e-6)
    document = sr.prior_document([result], "python -m fastconvnext.tooling.sass_report")
    assert document["rows"] == [["convnext_mlp", 90, "bf16", 96, 3136, 64, "forward", 5.0, 6.0, 10.0, 4.0]]
    assert document["columns"][-4:] == ["fused_us", "fused_pessimistic_us", "eager_us", "floor_us"]
    assert "MODEL" in document["what"] and document["machine_sources"]
    sr.write_json(tmp_path / "prior.json", document)
    from fastconvnext import backend

    assert backend.read_prior(tmp_path / "prior.json") == {
        ("convnext_mlp", 90, "bf16", 96, 3136, 64, "forward"): {"fused_us": 5.0, "eager_us": 10.0}}


def test_a_torch_gemm_step_takes_its_flops_at_the_eager_cublas_rate():
    """A fused op's torch step (target None): bytes at HBM and L2 rates, and where it does GEMM FLOPs (the V2 MLP's
    backward matmuls), those at 0.78 of the dense peak (roofline.EAGER_EFFICIENCY), fp32 on the CUDA cores."""
    flops, nbytes = 2 * 65536 * 384 * 96, 40e6
    gemm = LaunchPlan(target=None, grid=(), phase="backward", hbm_bytes=nbytes, l2_bytes=nbytes, loop_trips=0,
                      flops=flops)
    bf16 = sr.estimate_launch(gemm, sr.H100_SXM, None, "bf16")
    assert bf16.terms == pytest.approx({"hbm": nbytes / 3.35e12, "l2": nbytes / 9.5e12,
                                        "tensor": flops / (0.78 * 989e12)})
    assert sr.estimate_launch(gemm, sr.H100_SXM, None, "fp32").terms["tensor"] == pytest.approx(flops / (0.78 * 67e12))
    copy = LaunchPlan(target=None, grid=(), phase="forward", hbm_bytes=nbytes, l2_bytes=nbytes, loop_trips=0)
    assert set(sr.estimate_launch(copy, sr.A100_SXM, None, "bf16").terms) == {"hbm", "l2"}


def test_committed_prior_covers_the_grid():
    from fastconvnext import policy
    from fastconvnext.tooling import model_tables

    assert set(sr.KERNEL_OPS) == set(policy.OPS)  # every op the dispatch decides is modelled
    prior = model_tables.prior()
    for op in sr.KERNEL_OPS:
        for arch in (80, 90):
            for channels, size in ((96, 56), (768, 7), (1024, 7)):
                for mode in sr.MODES:
                    assert (op, arch, "bf16", channels, size * size, 256, mode) in prior
    for row in prior.values():
        assert 0 < row["fused_us"] <= row["fused_pessimistic_us"] and 0 < row["floor_us"] <= row["eager_us"], row
    assert "commit" not in json.dumps(model_tables.prior_document())  # predictions only


TINY_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def scaled_sum(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        acc = acc * 1.5 + tl.load(x_ptr + i * BLOCK + offs)
    tl.store(y_ptr + offs, acc)
'''

COMPILE_TINY = '''
import json, sys
sys.path.insert(0, ".")
from tiny_kernel import scaled_sum
from fastconvnext.tooling import sass_report as sr
from fastconvnext.kernels.compile_spec import CompileTarget, LaunchPlan

target = CompileTarget(kernel="scaled_sum", fn=scaled_sum, constexprs={"BLOCK": 512}, num_warps=4, num_stages=1,
                       signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"})
out = {}
for n in (32, 1):
    plan = LaunchPlan(target=target, grid=(132,), phase="forward", hbm_bytes=0, l2_bytes=0, loop_trips=n,
                      int_args={"n": n})
    first, again = sr.compile_sass(target, 90, plan), sr.compile_sass(target, 90, plan)
    est = sr.estimate_launch(plan, sr.H100_SXM, first, "fp32")
    out[n] = {"registers": first.registers, "cached": [first.cached, again.cached],
              "loops": [[dict(c.classes), dict(c.details), c.iterations_per_body] for c in est.loops],
              "issue": est.terms["issue"]}
print(json.dumps(out))
'''


def test_one_real_compile_finds_the_loop_and_caches_it(tmp_path):
    (tmp_path / "tiny_kernel.py").write_text(textwrap.dedent(TINY_KERNEL))
    (tmp_path / "run.py").write_text(COMPILE_TINY)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[sr.CACHE_ENV] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    looped = out["32"]
    assert looped["cached"] == [False, True] and looped["registers"] > 0
    assert looped["loops"], "the runtime loop over n must show as a backward branch"
    # 512 fp32 over 128 threads: 4 elements each, one 16-byte load and 4 FFMA per iteration (times any unroll)
    classes, details, per_body = looped["loops"][0]
    assert classes["ffma"] == 4 * per_body and details["LDG.128"] == per_body
    # n == 1 is a constant in a real launch: the loop disappears
    assert out["1"]["loops"] == [] and out["1"]["issue"] < looped["issue"]


def _row(fused, eager, low=None, floor=None):
    return {"fused_us": fused, "fused_pessimistic_us": low or fused, "eager_us": eager, "floor_us": floor or eager}


FAKE_PRIOR = {  # two ops at one ConvNeXt-T stage shape: what the report code reads
    ("dwconv_layernorm", 90, "bf16", 96, 3136, 256, "forward"): _row(100.0, 300.0, 110.0, 150.0),
    ("convnext_mlp", 90, "bf16", 96, 3136, 256, "forward"): _row(300.0, 500.0, 330.0, 250.0),
}


def _use_tables(monkeypatch, prior, launches=None):
    from fastconvnext.tooling import model_tables

    monkeypatch.setattr(model_tables, "prior", lambda: prior)
    monkeypatch.setattr(model_tables, "launches", lambda: launches or {})


def test_predicted_us_and_the_model_tables_read_the_prior(monkeypatch):
    from fastconvnext.tooling.bench import ops_report, roofline_report
    from fastconvnext.tooling import roofline

    _use_tables(monkeypatch, FAKE_PRIOR)
    mlp = ops_report.predicted_us("convnext_mlp", (256, 56, 56, 96), "bf16", "fwd", arch=90)
    assert mlp == _row(300.0, 500.0, 330.0, 250.0)
    assert ops_report.predicted_us("convnext_mlp", (256, 56, 56, 96), "bf16", "fwd", arch=80) is None
    with pytest.raises(ValueError, match="mode"):
        ops_report.predicted_us("convnext_mlp", (256, 56, 56, 96), "bf16", "backward", arch=90)
    rows = roofline_report.model_stage_rows(256, "bf16", ("tiny",), 90)
    assert [r[:9] for r in rows] == [
        ["T-s1 C=96@56²", "dwconv+LN", "fwd", "100.0", "110.0", "300.0", "150.0", "3.00×", "1.50×"],
        ["T-s1 C=96@56²", "MLP", "fwd", "300.0", "330.0", "500.0", "250.0", "1.67×", "0.83×"]]
    floor = roofline.traffic("convnext_mlp", "fused_min", "fwd", roofline.stage_shapes(("tiny",), 256)[0], "bf16")
    assert rows[1][9] == f"{floor.seconds(roofline.H100_SXM) * 1e6:,.1f}"
    # the block at T-s1: estimate (300 + 500) / (100 + 300), floor (150 + 250) / 400, estimate at the low edge
    # 800 / (110 + 330); other stages and the A100 are not tabulated
    summary = roofline_report.model_summary_markdown(256, "bf16", ("tiny",))
    assert "| T-s1 C=96@56² | 2.00× / 1.00× / 1.82× | - | - | - |" in summary
    assert roofline_report.blocks_ratio(256, "bf16", "tiny", 90, "forward") is None  # stages 2-4 missing
    targets = roofline_report.targets_markdown(256, "bf16", "tiny", 90)
    dw_fwd = next(line for line in targets.splitlines() if line.startswith("| T-s1 C=96@56² | dwconv+LN | fwd |"))
    assert "| 100.0 | 300.0 | 0.33 | ≤ 0.8 | yes |" in dw_fwd  # 100 / 300 meets the forward target
    mlp_fwd = next(line for line in targets.splitlines() if line.startswith("| T-s1 C=96@56² | MLP | fwd |"))
    assert "| 0.60 | ≤ 0.8 | yes |" in mlp_fwd
    assert "| T-s2 C=192@28² | dwconv+LN | fwd | - |" in targets  # not tabulated: shown as missing, not met


def test_a_v2_block_is_the_dwconv_op_plus_the_v2_mlp(monkeypatch):
    from fastconvnext.tooling.bench import roofline_report

    prior = dict(FAKE_PRIOR)
    prior[("convnext_v2_mlp", 90, "bf16", 96, 3136, 256, "forward")] = _row(500.0, 1500.0, 600.0, 1000.0)
    _use_tables(monkeypatch, prior)
    summary = roofline_report.model_summary_markdown(256, "bf16", ("tiny",))
    assert "| T-s1 C=96@56² | 2.00× / 1.00× / 1.82× | - | - | - |" in summary  # V1's block: the V1 MLP only
    # estimate (300 + 1500) / (100 + 500), floor (150 + 1000) / 600, estimate at the low edge 1800 / (110 + 600)
    assert "| V2 T-s1 C=96@56² | 3.00× / 1.92× / 2.54× | - | - | - |" in summary
    assert "| ConvNeXt V2-T blocks | - | - | - | - |" in summary  # stages 2-4 missing
    rows = roofline_report.model_stage_rows(256, "bf16", ("tiny",), 90)
    assert [r[1] for r in rows] == ["dwconv+LN", "MLP", "V2 MLP"]


def test_measured_rows_sit_beside_the_prediction(monkeypatch, tmp_path):
    """The GPU path of benchmarks/ops_report.py on a canned `fastconvnext bench --ops` CSV."""
    from fastconvnext.tooling.bench import ops_report, roofline_report

    _use_tables(monkeypatch, FAKE_PRIOR)
    path = tmp_path / "bench.csv"
    path.write_text(
        "section,implementation,pass,dtype,shape,median_ms\n"
        "convnext_mlp,fused,fwd,bf16,256x56x56x96,0.6\n"
        "convnext_mlp,eager,fwd,bf16,256x56x56x96,1.0\n"
        "convnext_mlp,compile,fwd,bf16,256x56x56x96,0.7\n"  # not modelled: left out
        "dwconv_layernorm,fused,fwd+bwd,bf16,256x56x56x96,2.0\n"  # no prediction for fwd+bwd: left out
        "model,fused,fwd,bf16,256x3x224x224,9.0\n"
    )
    rows = ops_report.measured_vs_predicted(path, arch=90)
    assert rows == [["convnext_mlp", "256x56x56x96", "fwd", "fused", "600.0", "300.0", "2.00"],
                    ["convnext_mlp", "256x56x56x96", "fwd", "eager", "1,000.0", "500.0", "2.00"]]


def _stage_tables(l2_us, issue_us, eager_us):
    """Prior and launches with every ConvNeXt-T b256 bf16 H100 stage: each (op, mode) one launch, L2 vs issue."""
    from fastconvnext.tooling import roofline

    prior, launches = {}, {}
    for shape in roofline.stage_shapes(("tiny",), 256):
        for op in roofline.OPS:
            for mode in ("forward", "forward_backward"):
                key = (op, 90, "bf16", shape.channels, shape.size * shape.size, 256, mode)
                us = max(l2_us, issue_us)
                prior[key] = _row(us, eager_us)
                launches[key] = [{"kernel": "k", "us": us, "terms_us": {"l2": l2_us, "issue": issue_us}}]
    return prior, launches


def test_l2_sensitivity_rescales_only_the_l2_term(monkeypatch):
    from fastconvnext.tooling.bench import roofline_report
    from fastconvnext.tooling.roofline import MACHINES

    assumed = MACHINES[90].l2_bytes_per_s / 1e12
    # every launch L2-bound at the assumed constant (200 us) with 120 us of issue under it; eager 100 us
    _use_tables(monkeypatch, *_stage_tables(200.0, 120.0, 100.0))
    text = roofline_report.l2_sensitivity_markdown(what_if=(2 * assumed, 4 * assumed))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert len(rows) == 3
    # at the assumed constant: 200 us; at twice it: the L2 term halves to 100, so issue (120) binds; at 4x too
    assert "| 0.50× | 0.50× | 2.00 / 2.00 / 2.00 / 2.00 |" in rows[f"{assumed:g} (the model's, public figures)"]
    for scale in (2, 4):
        assert "| 0.83× | 0.83× | 1.20 / 1.20 / 1.20 / 1.20 |" in rows[f"{scale * assumed:g}"]


def test_l2_sensitivity_says_so_when_the_table_lacks_detail(monkeypatch):
    from fastconvnext.tooling.bench import roofline_report

    _use_tables(monkeypatch, FAKE_PRIOR)
    assert roofline_report.l2_sensitivity_markdown().startswith("(no per-launch detail")


def test_the_per_launch_detail_sums_to_the_predicted_times():
    """launches.json (what the L2 what-if re-maxes) and the prior come from one run: each op's launches add up to its
    predicted time, so the what-if starts from the prior's own figures."""
    from fastconvnext.tooling import model_tables

    prior, launches = model_tables.prior(), model_tables.launches()
    assert launches
    for key, records in launches.items():
        total = sum(launch["us"] for launch in records)
        assert total == pytest.approx(prior[key]["fused_us"], rel=1e-3, abs=0.05), key
        for launch in records:
            assert launch["us"] == pytest.approx(max(launch["terms_us"].values()), rel=1e-3, abs=0.02), key
            assert launch["spill_bytes"] == 0, (key, launch["kernel"])  # a spilling launch's figure is optimistic
    assert {key[0] for key in launches} == set(sr.KERNEL_OPS)
