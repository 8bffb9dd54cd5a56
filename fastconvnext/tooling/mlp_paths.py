"""The fused MLP's launch-path choices costed on the performance model, to check the rules the kernel states.

kernels/convnext_mlp_kernel.py picks its forward plan (fused kernel or two GEMMs) and, where pre is not at hand, its
hidden backward (one two-accumulator pass or fc1_pre + a one-accumulator pass) by rules written in its own code.
Here each plan is costed as the model costs a launch: per kernel the largest of its tensor work at the pointer-load
efficiency, its HBM bytes / bandwidth and its L2 -> SM bytes / L2 bandwidth, with the byte figures the kernel's
launch plans give (`_plan_figures`) at a nominal row count; the cheaper plan is the model's choice. MODEL, not
measurement; tests/test_tooling_wall.py checks that rules and model agree at every ConvNeXt width.
"""
from __future__ import annotations

from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.tooling.roofline import MACHINES
from fastconvnext.tooling.sass_report import LOAD_PATH_EFFICIENCY

ROWS = 256 * 28 * 28  # ConvNeXt-T stage 2 at batch 256; the choices scale with M, so any large M gives the same


def modelled_seconds(kinds, C: int, D: int, dtype: str, precision: str = "ieee", machine=MACHINES[90],
                     saved_pre: bool = False) -> float:
    """Sum over the launches `kinds` of max(tensor, HBM, L2) time on `machine` (GPU configs)."""
    gpu = machine.gpu
    if dtype == "fp32" and precision == "ieee":
        rate = gpu.vector_flops  # fp32 FMAs, no tensor cores
    else:
        rate = gpu.tensor_flops["tf32" if dtype == "fp32" else dtype] * LOAD_PATH_EFFICIENCY["pointer"]
    unit = 2 * ROWS * C * D / rate
    total = 0.0
    for kind in kinds:
        config = mlp._config(kind, C, D, dtype, gpu=True)
        _, hbm, l2, _, _, units = mlp._plan_figures(kind, config, ROWS, C, D, mlp._DTYPE_BYTES[dtype],
                                                    mlp._flags(kind, saved_pre=saved_pre))
        total += max(units * unit, hbm / machine.hbm_bytes_per_s, l2 / machine.l2_bytes_per_s)
    return total


def two_gemm_forward(C: int, D: int, dtype: str, precision: str = "ieee", machine=MACHINES[90]) -> bool:
    """The model's forward plan: two GEMM kernels (h stored once) if cheaper than the fused kernel."""
    return (modelled_seconds(["hidden", "fc2"], C, D, dtype, precision, machine)
            < modelled_seconds(["fwd"], C, D, dtype, precision, machine))


def two_pass_hidden_backward(C: int, D: int, dtype: str, precision: str = "ieee", machine=MACHINES[90]) -> bool:
    """The model's hidden backward where pre is not at hand: fc1_pre + the one-accumulator pass if cheaper."""
    return (modelled_seconds(["fc1_pre", "hidden_bwd_pre"], C, D, dtype, precision, machine)
            < modelled_seconds(["hidden_bwd"], C, D, dtype, precision, machine))
