"""`launch_plans` describes exactly the launches a real dwconv_layernorm call makes (autotune off).

Oracle: the launches recorded at the launcher's single exit (`_launch`) during a real forward + backward
in the interpreter; kernel, grid, constexprs, warps and every integer argument must match the plans.
"""
import pytest
import torch

from fastconvnext.kernels import dwconv_layernorm
from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module


def record_launches(monkeypatch, n, h, w, c, k):
    launches = []
    real_launch = kernel_module._launch

    def spy(kernel, grid, *args, **meta):
        launches.append((kernel, tuple(grid), args, meta))
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(kernel_module, "_launch", spy)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    params = [torch.randn(c, 1, k, k, generator=gen) * 0.2, torch.randn(c, generator=gen),
              1 + 0.1 * torch.randn(c, generator=gen), torch.randn(c, generator=gen)]
    x.requires_grad_()
    dwconv_layernorm(x, *params).sum().backward()
    return launches


@pytest.mark.parametrize("n,h,w,c,k", [(1, 5, 11, 24, 3), (2, 3, 9, 70, 5), (1, 2, 9, 96, 3), (2, 13, 3, 32, 3), (1, 2, 9, 600, 3),
                                       (1, 2, 9, 1030, 3)])
def test_plans_match_the_launches_of_a_real_call(monkeypatch, n, h, w, c, k):
    launches = record_launches(monkeypatch, n, h, w, c, k)
    plans = [p for p in kernel_module.launch_plans(n, h, w, c, torch.float32, True, kernel_size=k) if p.target]
    assert len(plans) == len(launches)
    for plan, (kernel, grid, args, meta) in zip(plans, launches):
        target = plan.target
        assert target.fn is kernel, (target.kernel, kernel)
        assert plan.grid == grid, target.kernel
        assert target.num_warps == meta["num_warps"] and target.num_stages == meta["num_stages"]
        assert {name: meta[name] for name in target.constexprs} == target.constexprs, target.kernel
        names = list(kernel.arg_names)
        for name, value in plan.int_args.items():
            assert args[names.index(name)] == value, (target.kernel, name)
        assert set(plan.int_args) == {n for n, kind in target.signature.items() if kind == "i32"}


def test_forward_only_plans_and_dtype_spellings():
    by_string = kernel_module.launch_plans(8, 56, 56, 96, "bf16", False)
    by_dtype = kernel_module.launch_plans(8, 56, 56, 96, torch.bfloat16, False)
    assert [p.phase for p in by_string] == ["forward", "forward"]
    assert by_string == by_dtype
    kernel_plan = by_string[1]
    # C is compiled in (STRIDE_C); the launch's integer arguments divisible by 16 are specialized as Triton does
    assert kernel_plan.target.dtype == "bf16" and kernel_plan.divisible_by_16 == ()
    assert kernel_module.launch_plans(8, 64, 48, 96, "bf16", False)[1].divisible_by_16 == ("H", "W")
    with pytest.raises(ValueError, match="dtype"):
        kernel_module.launch_plans(8, 56, 56, 96, torch.int8, False)


def test_forward_hbm_bytes_are_one_read_and_one_write_plus_stats():
    """At a ConvNeXt stage the halo is an L2 hit, so HBM traffic is x + y + fp32 mean/rstd + params."""
    n, h, w, c = 64, 56, 56, 96
    plan = kernel_module.launch_plans(n, h, w, c, "fp16", False)[1]
    pixels = n * h * w
    assert plan.hbm_bytes == 2 * pixels * c * 2 + 8 * pixels + (49 + 3 * c) * 4
    assert plan.l2_bytes > plan.hbm_bytes  # the K-row windows are requested once per output row
