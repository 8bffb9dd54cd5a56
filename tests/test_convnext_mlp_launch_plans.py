"""launch_plans() of the fused MLP (kernels/sass_report.py consumes it): the kernel launches it lists must be
exactly those a real call makes at that shape with autotuning off (config, grid, flags, integer arguments),
and every config it names must be among compile_targets().

The real call is observed by running the launchers with the Triton kernels replaced by recorders (no GPU and
no interpreter needed: nothing is computed, only the launch arguments are kept).
"""
import math

import pytest
import torch

from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.kernels.compile_spec import LaunchPlan

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Recorder:
    def __init__(self, kind, log):
        self.kind, self.log = kind, log

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **constexprs):
            ints = {name: v for name, v in zip(("M", "HW", "SEGMENT_ROWS"), args[-3 if self.kind == "dw" else -2:])}
            self.log.append(dict(kind=self.kind, grid=tuple(grid), num_warps=num_warps, num_stages=num_stages,
                                 constexprs=constexprs, ints=ints))
        return launch


def _recorded_launches(monkeypatch, batch, size, C, dtype, training):
    log = []
    monkeypatch.setattr(mlp, "interpreting", lambda: False)
    monkeypatch.setattr(mlp, "autotune_enabled", lambda: False)
    table = {kind: (lambda kind=kind: _Recorder(kind, log), configs, interp)
             for kind, (_, configs, interp) in mlp._KERNEL_TABLE.items()}
    monkeypatch.setattr(mlp, "_KERNEL_TABLE", table)
    t = TORCH_DTYPES[dtype]
    D = 4 * C
    x = torch.empty(batch, size, size, C, dtype=t)
    w1, b1, w2, b2 = torch.empty(D, C, dtype=t), torch.empty(D, dtype=t), torch.empty(C, D, dtype=t), torch.empty(C, dtype=t)
    gamma = torch.empty(C, dtype=t)
    _, y2 = mlp._forward_impl(x, x, w1, b1, w2, b2, gamma, None, "gelu", training)
    if training:
        mlp._backward_impl(torch.empty_like(x), x, w1, b1, w2, b2, gamma, None, y2, "gelu", True, True)
    return log


def _kernel_plans(plans):
    return [p for p in plans if p.target is not None]


SHAPES = [(2, 7, 96, "fp16"), (3, 5, 384, "bf16"), (1, 4, 40, "fp32"), (2, 3, 768, "bf16")]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("batch,size,C,dtype", SHAPES)
def test_plans_are_the_launches_a_call_makes(monkeypatch, batch, size, C, dtype, training):
    plans = mlp.launch_plans(batch, size, size, C, dtype, training)
    launched = _recorded_launches(monkeypatch, batch, size, C, dtype, training)
    kernel_plans = _kernel_plans(plans)
    assert len(kernel_plans) == len(launched) == (3 if training else 1)
    for plan, real in zip(kernel_plans, launched):
        target = plan.target
        assert target.kernel.endswith(real["kind"])
        assert plan.grid == real["grid"]
        assert (target.num_warps, target.num_stages) == (real["num_warps"], real["num_stages"])
        expected = dict(real["constexprs"])
        assert {k: target.constexprs[k] for k in expected} == expected
        assert plan.int_args == real["ints"]
        assert set(plan.divisible_by_16) == {k for k, v in real["ints"].items() if v % 16 == 0}
        assert plan.phase == ("forward" if real["kind"] == "fwd" else "backward")
    assert [p.phase for p in plans] == sorted((p.phase for p in plans), key=["forward", "backward"].index)


def test_plans_accept_torch_dtypes_and_refuse_others():
    assert [p.target.label for p in _kernel_plans(mlp.launch_plans(2, 7, 7, 96, torch.float16, False))] == \
           [p.target.label for p in _kernel_plans(mlp.launch_plans(2, 7, 7, 96, "fp16", False))]
    with pytest.raises(ValueError, match="dtype"):
        mlp.launch_plans(2, 7, 7, 96, "int8", False)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("C,size", [(96, 56), (192, 28), (384, 14), (768, 7)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_planned_config_is_a_compile_target(C, size, dtype, training):
    """compile_check (and its zero-spill check) covers every config a stage shape launches."""
    def key(target):
        blocks = tuple(sorted((k, v) for k, v in target.constexprs.items() if k.startswith("BLOCK_")))
        return target.kernel, target.dtype, target.constexprs["C"], blocks, target.num_warps, target.num_stages

    compiled = {key(t) for t in mlp.compile_targets()}
    for plan in _kernel_plans(mlp.launch_plans(256, size, size, C, dtype, training)):
        assert key(plan.target) in compiled, plan.target.label


def test_modelled_bytes_count_each_tensor_at_least_once_and_l2_rereads():
    """HBM bytes >= the tensors each launch must touch; L2 bytes >= HBM bytes (a model, checked for sanity)."""
    batch, size, C, s = 64, 28, 192, 2
    M, D = batch * size * size, 4 * C
    act, weights = M * C * s, 2 * D * C * s
    plans = _kernel_plans(mlp.launch_plans(batch, size, size, C, "bf16", True))
    minimum = {"convnext_mlp_fwd": 4 * act + weights,  # x, residual in; out, y2 out
               "convnext_mlp_bwd_dx": 4 * act + weights,  # x, dy, y2 in; dx out
               "convnext_mlp_bwd_dw": 2 * act + weights}  # x, dy in
    for plan in plans:
        assert plan.hbm_bytes >= minimum[plan.target.kernel]
        assert plan.l2_bytes >= plan.hbm_bytes - weights
        assert plan.loop_trips >= plan.outer_trips >= 1
        assert plan.flops == 4 * M * C * D


def test_forward_x_rereads_reach_hbm_only_beyond_l2():
    """Several C tiles re-read x: from L2 while x and the weights fit in 50 MB, from HBM beyond."""
    def forward_plan(batch):
        return _kernel_plans(mlp.launch_plans(batch, 14, 14, 384, "bf16", False))[0]

    small, large = forward_plan(16), forward_plan(512)
    c_tiles = small.grid[1]
    assert c_tiles > 1 and large.grid[1] == c_tiles
    act = lambda batch: batch * 14 * 14 * 384 * 2  # noqa: E731
    weights = 2 * 1536 * 384 * 2
    assert act(16) + weights < 50e6 < act(512)
    # x once + residual + out (no y2 in inference) + weights + fp32 vectors
    vectors = (1536 + 2 * 384) * 4
    assert small.hbm_bytes == 3 * act(16) + weights + vectors
    assert large.hbm_bytes == (c_tiles + 2) * act(512) + weights + vectors


def test_matmul_units_in_the_notes_match_the_recompute_formula():
    for C, size in ((96, 56), (768, 7)):
        plans = _kernel_plans(mlp.launch_plans(64, size, size, C, "bf16", True))
        units = [int(p.note.rsplit("executes ", 1)[1].split()[0]) for p in plans]
        fwd, dx, dw = (p.target.constexprs for p in plans)
        assert units == [1 + math.ceil(C / fwd["BLOCK_N"]), 1 + 2 * math.ceil(C / dx["BLOCK_N"]),
                         2 + 2 * math.ceil(C / dw["BLOCK_C"])]


def test_plan_type():
    assert all(isinstance(p, LaunchPlan) for p in mlp.launch_plans(1, 7, 7, 96, "bf16", True))
