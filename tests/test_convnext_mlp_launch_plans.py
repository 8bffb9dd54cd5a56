"""launch_plans() of the fused MLP (kernels/sass_report.py consumes it): the kernel launches it lists must be
exactly those a real call makes at that shape with autotuning off (config, grid, flags, integer arguments),
and every config it names must be among compile_targets().

The real call is observed by running the launchers with the Triton kernels replaced by recorders (no GPU and
no interpreter needed: nothing is computed, only the launch arguments are kept).
"""

import pytest
import torch

from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.kernels._triton_compat import config_choice
from fastconvnext.kernels.compile_spec import LaunchPlan, compile_options

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Recorder:
    def __init__(self, kind, log):
        self.kind, self.log = kind, log

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, enable_fp_fusion, **constexprs):
            ints = {name: v for name, v in zip(("M", "HW", "SEGMENT_ROWS"), args[-3 if self.kind == "dw" else -2:])}
            self.log.append(dict(kind=self.kind, grid=tuple(grid), num_warps=num_warps, num_stages=num_stages,
                                 enable_fp_fusion=enable_fp_fusion, constexprs=constexprs, ints=ints))
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
    w1, b1 = torch.empty(D, C, dtype=t), torch.empty(D, dtype=t)
    w2, b2 = torch.empty(C, D, dtype=t), torch.empty(C, dtype=t)
    gamma = torch.empty(C, dtype=t)
    _, y2, pre = mlp._forward_impl(x, x, w1, b1, w2, b2, gamma, None, "gelu", training, save_pre=training)
    if training:
        mlp._backward_impl(torch.empty_like(x), x, w1, b1, w2, b2, gamma, None, y2, pre, "gelu", True, True)
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
    assert [p.target.kernel for p in kernel_plans] == [mlp._KERNELS[r["kind"]][0] for r in launched]
    assert len(launched) >= (2 if training else 1)
    for plan, real in zip(kernel_plans, launched):
        target = plan.target
        assert plan.grid == real["grid"]
        assert (target.num_warps, target.num_stages) == (real["num_warps"], real["num_stages"])
        assert compile_options(target)["enable_fp_fusion"] is real["enable_fp_fusion"] is True  # modelled as launched
        expected = dict(real["constexprs"])
        assert {k: target.constexprs[k] for k in expected} == expected
        assert plan.int_args == real["ints"]
        assert set(plan.divisible_by_16) == {k for k, v in real["ints"].items() if v % 16 == 0}
        assert plan.phase == ("forward" if real["kind"] in ("fwd", "hidden", "fc2") else "backward")
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


def test_modelled_bytes_count_each_tensor_at_least_once():
    """HBM bytes >= the tensors each launch must touch; L2 bytes >= HBM bytes less the weights (a model)."""
    for C, size in ((96, 28), (384, 14), (768, 7)):  # 768 @ 7x7: pre saved by the forward
        batch, s = 64, 2
        M, D = batch * size * size, 4 * C
        act, hidden, weights = M * C * s, M * D * s, D * C * s
        minimum = {"convnext_mlp_fwd": 4 * act,  # x, residual in; out, y2 out
                   "convnext_mlp_fc1_act": act + hidden,  # x in, h out
                   "convnext_mlp_fc2": hidden + 3 * act,  # h, residual in; out, y2 out
                   "convnext_mlp_bwd_dx": 4 * act + 2 * hidden,  # x, dy, y2 in; dx, h, dpre out
                   "convnext_mlp_bwd_hidden": 2 * act + 2 * hidden,  # x, dy in; h, dpre out
                   "convnext_mlp_bwd_fc1_pre": act + hidden,  # x in; pre out
                   "convnext_mlp_bwd_hidden_saved_pre": act + 3 * hidden,  # dy, pre in; h, dpre out
                   "convnext_mlp_bwd_dx_gemm": hidden + act,  # dpre in, dx out
                   "convnext_mlp_bwd_dw": 2 * act + 2 * hidden}  # x, dy, h, dpre in
        for plan in _kernel_plans(mlp.launch_plans(batch, size, size, C, "bf16", True)):
            assert plan.hbm_bytes >= minimum[plan.target.kernel] + weights / 2, plan.target.kernel
            assert plan.l2_bytes >= plan.hbm_bytes - 2 * weights
            assert plan.loop_trips >= plan.outer_trips >= 1


def test_dw_segment_rereads_reach_hbm_only_beyond_l2():
    """The dW kernel's programs re-read their segment once per wave only when it does not fit in 50 MB."""
    def dw_plan(C, size):
        return [p for p in _kernel_plans(mlp.launch_plans(256, size, size, C, "bf16", True))
                if p.target.kernel == "convnext_mlp_bwd_dw"][0]

    narrow, wide = dw_plan(96, 56), dw_plan(768, 7)
    M96, M768 = 256 * 56 * 56, 256 * 7 * 7
    # C = 96: x, dy, h, dpre once each (db2/dgamma summed by the dx kernel), plus the fp32 partials
    segments = mlp._num_segments(M96)
    assert narrow.hbm_bytes == (2 * 96 + 2 * 384) * M96 * 2 + segments * 2 * 384 * 96 * 4
    # C = 768: a segment's x, dy, h, dpre (about 98 MB) exceed L2; 2 x 12 x 6 programs (128x256 tiles) per segment
    # run in 2 waves of 132 (Triton < 3.6 takes 128x128 tiles, _triton_compat "mlp.dw_wide_tiles": 2 x 24 x 6, 3 waves)
    streamed = (2 * 768 + 2 * 3072) * M768 * 2
    cfg = mlp._dw_configs(768, 3072, "bf16")[0]
    assert (cfg["BLOCK_C"], cfg["BLOCK_D"]) == ((128, 256) if config_choice("mlp.dw_wide_tiles") else (128, 128))
    assert wide.grid[0] * wide.grid[1] == 2 * (3072 // cfg["BLOCK_D"]) * (768 // cfg["BLOCK_C"])
    assert wide.hbm_bytes > 2 * streamed


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("C,size", [(40, 8), (96, 56), (192, 28), (384, 14), (768, 7), (1024, 7)])
def test_backward_executes_at_most_six_matmul_units(C, size, dtype):
    """Issue 9.4: at most 6 units of one M*C*4C matmul in backward at every C (eager: 4; these plans: 5), 2 forward
    at every C (fused while C fits one output tile, else two GEMMs)."""
    plans = _kernel_plans(mlp.launch_plans(64, size, size, C, dtype, True))
    units = {p.target.kernel: int(p.note.rsplit("executes ", 1)[1].split()[0]) for p in plans}
    backward = sum(u for p, u in zip(plans, units.values()) if p.phase == "backward")
    assert backward <= 6, units
    assert sum(u for p, u in zip(plans, units.values()) if p.phase == "forward") == 2, units


def test_forward_plan_follows_the_cost_model():
    """Fused forward while C fits one output tile; two GEMMs from C = 192 in fp16/bf16 (ConvNeXt widths: the fused
    kernel would recompute fc1 and re-read x from L2 per hidden chunk) and whenever fp32 ("ieee", FMA-bound) would
    recompute."""
    def kinds(C, dtype):
        return [p.target.kernel for p in _kernel_plans(mlp.launch_plans(8, 7, 7, C, dtype, False))]

    for dtype in ("bf16", "fp16"):
        assert kinds(96, dtype) == kinds(128, dtype) == ["convnext_mlp_fwd"]
        two_gemm = ["convnext_mlp_fc1_act", "convnext_mlp_fc2"]
        assert kinds(192, dtype) == kinds(384, dtype) == kinds(768, dtype) == kinds(1024, dtype) == two_gemm
    assert kinds(64, "fp32") == ["convnext_mlp_fwd"]
    assert kinds(96, "fp32") == ["convnext_mlp_fc1_act", "convnext_mlp_fc2"]


def test_plan_type():
    assert all(isinstance(p, LaunchPlan) for p in mlp.launch_plans(1, 7, 7, 96, "bf16", True))
