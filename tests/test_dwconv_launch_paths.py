"""Launch-path defects of the fused dwconv + LayerNorm that only a real GPU launch would show (issue 10):
device guard, forward-mode AD, autocast rules (CPU and CUDA dispatch keys), bf16 in the interpreter.

Oracle: kernels/reference.py in float64 and in the tested dtype, judged by tests/tolerance.py's rule.
"""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from fastconvnext.kernels import dwconv_layernorm
from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module
from fastconvnext.kernels.reference import dwconv_layernorm_reference
from helpers import cuda_autocast_dispatch
from tolerance import assert_within_rule


def make_args(n=1, h=5, w=4, c=12, k=3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rand(n, c, h, w).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    params = [rand(c, 1, k, k) * 0.3, rand(c), 1.0 + 0.3 * rand(c), 0.3 * rand(c)]
    return [x.to(dtype)] + [p.to(dtype) for p in params]


# ------------------------------------------------------------------------------- device guard


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with kernel_module._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with kernel_module._device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "a CPU tensor must not touch the CUDA device state"


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Forward and backward launches all happen while the guard for x's device is entered."""
    guarded_devices, depth, launches = [], [0], []
    real_guard, real_launch = kernel_module._device_guard, kernel_module._launch

    @contextlib.contextmanager
    def spy_guard(device):
        guarded_devices.append(device)
        with real_guard(device):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    def spy_launch(kernel, grid, *args, **meta):
        launches.append(depth[0])
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(kernel_module, "_device_guard", spy_guard)
    monkeypatch.setattr(kernel_module, "_launch", spy_launch)
    x, *params = [t.requires_grad_() for t in make_args()]
    dwconv_layernorm(x, *params).sum().backward()
    assert launches and all(d == 1 for d in launches), f"launch outside the device guard: {launches}"
    assert set(guarded_devices) == {x.device} and len(guarded_devices) == 2  # forward, backward


# ------------------------------------------------------------------------- forward-mode AD


def _reference_jvp(args, tangents):
    return torch.func.jvp(dwconv_layernorm_reference, tuple(args), tuple(tangents))


def _assert_tangent_matches(fused, args, tangents, what):
    expected_out, expected_tangent = _reference_jvp([a.double() for a in args], [t.double() for t in tangents])
    eager_out, eager_tangent = _reference_jvp(args, tangents)
    assert fused[1].abs().max() > 0, f"{what}: zero tangent"
    assert_within_rule(fused[0], eager_out, expected_out, torch.float32, f"{what} primal")
    assert_within_rule(fused[1], eager_tangent, expected_tangent, torch.float32, f"{what} tangent")


def test_torch_func_jvp_gives_the_reference_tangent():
    args = make_args(seed=1)
    tangents = [torch.randn_like(a) for a in args]
    fused = torch.func.jvp(dwconv_layernorm, tuple(args), tuple(tangents))
    _assert_tangent_matches(fused, args, tangents, "torch.func.jvp")


def test_forward_ad_dual_tensors_give_the_reference_tangent():
    args = make_args(seed=2)
    tangents = [torch.zeros_like(a) for a in args]
    tangents[0] = torch.randn_like(args[0])  # only x carries a tangent
    with forward_ad.dual_level():
        y = dwconv_layernorm(forward_ad.make_dual(args[0], tangents[0]), *args[1:])
        primal, tangent = forward_ad.unpack_dual(y)
    assert tangent is not None, "forward_ad: the tangent was dropped"
    _assert_tangent_matches((primal, tangent), args, tangents, "forward_ad")


def test_jacfwd_matches_jacrev_of_the_fused_op():
    x, *params = make_args(h=3, w=3, c=4, seed=3)
    jac_fwd = torch.func.jacfwd(lambda t: dwconv_layernorm(t, *params))(x)
    jac_rev = torch.func.jacrev(lambda t: dwconv_layernorm(t, *params))(x)
    assert jac_fwd.abs().max() > 0
    assert_within_rule(jac_fwd, jac_rev, jac_rev, torch.float32, "jacfwd vs jacrev")


# -------------------------------------------------------------------------------- autocast


def _check_autocast_output(y, args, dtype):
    assert y.dtype == dtype, f"under autocast({dtype}) the output must be {dtype}, got {y.dtype}"
    exact = dwconv_layernorm_reference(*[a.double() for a in args])
    eager = dwconv_layernorm_reference(*[a.to(dtype) for a in args])
    assert_within_rule(y, eager, exact, dtype, f"autocast {dtype} output")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_rule_writes_the_autocast_dtype(dtype):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastconvnext::dwconv_layernorm_fwd", "AutocastCUDA")
    args = make_args(seed=4)
    x = args[0].requires_grad_()
    with cuda_autocast_dispatch(dtype):
        y = dwconv_layernorm(x, *args[1:])
    _check_autocast_output(y, args, dtype)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == torch.float32, "x's gradient keeps x's dtype"


def test_cpu_autocast_rule_and_gradients():
    args = make_args(seed=5)
    leaves = [a.clone().requires_grad_() for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv_layernorm(*leaves)
    _check_autocast_output(y, args, torch.bfloat16)
    grads = torch.autograd.grad(y.float().sum(), leaves)
    reference_leaves = [a.clone().requires_grad_() for a in args]
    reference_grads = torch.autograd.grad(dwconv_layernorm_reference(*reference_leaves).sum(), reference_leaves)
    for got, want, leaf in zip(grads, reference_grads, leaves):
        assert got.dtype == leaf.dtype
        # y was rounded to bf16, which dy = 1 does not see: the gradients are fp32-accurate.
        assert_within_rule(got, want, want, torch.float32, "autocast gradient")


def test_no_autocast_keeps_x_dtype():
    args = make_args(seed=6)
    assert dwconv_layernorm(*args).dtype == torch.float32


# ----------------------------------------------------------------------- bf16 in the interpreter


def test_bf16_interpreter_matches_the_fp32_reference():
    """The kernels have no tl.dot (whose bf16 interpreter path is broken): bf16 runs are right."""
    args = make_args(n=2, h=7, w=9, c=40, k=7, seed=7, dtype=torch.float32)
    y = dwconv_layernorm(args[0].to(torch.bfloat16), *args[1:])
    exact = dwconv_layernorm_reference(*[a.double() for a in args[:1]], *[a.double() for a in args[1:]])
    eager = dwconv_layernorm_reference(args[0].to(torch.bfloat16), *[a.to(torch.bfloat16) for a in args[1:]])
    assert y.dtype == torch.bfloat16 and y.abs().max() < 100
    assert_within_rule(y, eager, exact, torch.bfloat16, "bf16 output")
