"""Launch-path defects of the fused MLP that only a real GPU launch would show (issue 10): TF32 flags,
autotune switch and key, reproducibility across processes, forward-mode AD, autocast (CPU and CUDA dispatch
keys), device guard.

Oracle: kernels/reference.py `convnext_mlp_reference` in float64 and in the tested dtype, judged by
tests/tolerance.py's rule.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from fastconvnext.kernels import convnext_mlp
from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.kernels.reference import convnext_mlp_reference
from helpers import cuda_autocast_dispatch
from tolerance import assert_within_rule

ARG_NAMES = ("x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma")


def make_args(shape=(2, 3, 5, 24), D=40, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    N, H, W, C = shape
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    args = [rand(N, H, W, C), rand(N, H, W, C), rand(D, C) / math.sqrt(C), 0.5 * rand(D),
            rand(C, D) / math.sqrt(D), 0.5 * rand(C), 0.5 + torch.rand(C, generator=gen, dtype=torch.float64)]
    return [a.to(dtype) for a in args]


# ----------------------------------------------------------------------------------------- TF32


@contextlib.contextmanager
def restored_tf32_flags():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision, torch.backends.fp32_precision
    try:
        yield matmul
    finally:
        torch.backends.fp32_precision = saved[1]
        matmul.fp32_precision = saved[0]


@pytest.mark.parametrize("setting,expected", [
    ("matmul_new_tf32", "tf32"), ("matmul_new_ieee", "ieee"), ("global_new_tf32", "tf32"),
    ("legacy_true", "tf32"), ("legacy_false", "ieee"), ("float32_matmul_precision_high", "tf32"),
])
def test_tf32_is_read_through_either_api_without_raising(monkeypatch, setting, expected):
    monkeypatch.setattr(mlp, "interpreting", lambda: False)  # the interpreter always runs "ieee" dots
    with restored_tf32_flags() as matmul:
        if setting.startswith("matmul_new"):
            matmul.fp32_precision = setting.rsplit("_", 1)[1]
        elif setting == "global_new_tf32":
            torch.backends.fp32_precision = "tf32"
        elif setting.startswith("legacy"):
            matmul.allow_tf32 = setting == "legacy_true"
        else:
            torch.set_float32_matmul_precision("high")
        assert mlp._dot_precision(torch.float32) == expected
        assert mlp._dot_precision(torch.float16) == "ieee"


def test_fp32_call_with_new_tf32_api_runs_in_the_interpreter():
    args = make_args()
    with restored_tf32_flags() as matmul:
        matmul.fp32_precision = "tf32"
        out = convnext_mlp(*args)
    eager = convnext_mlp_reference(*args)
    exact = convnext_mlp_reference(*[a.double() for a in args])
    assert_within_rule(out, eager, exact, torch.float32)


# ------------------------------------------------------------------------------------ autotune


class _Spy:
    """Stands in for a jit kernel / autotuner: records how it was launched."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append((self.name, grid, meta))
        return launch


def _select_spy(monkeypatch, autotune):
    log = []
    monkeypatch.setattr(mlp, "interpreting", lambda: False)
    monkeypatch.setenv("FASTCONVNEXT_AUTOTUNE", "1" if autotune else "0")
    monkeypatch.setattr(mlp, "autotune_enabled", lambda: autotune)
    tuned_calls = []

    def fake_tuned(*key):
        tuned_calls.append(key)
        return _Spy(log, "tuned")

    monkeypatch.setattr(mlp, "_tuned", fake_tuned)
    return log, tuned_calls


def test_autotune_off_pins_the_first_config(monkeypatch):
    log, tuned_calls = _select_spy(monkeypatch, autotune=False)
    kernel, cfg = mlp._select("fwd", 96, 384, torch.float16, 200704, dict(HAS_GAMMA=True))
    assert tuned_calls == [] and cfg == mlp._fwd_configs(96, 384, "fp16")[0]
    assert kernel is mlp._mlp_fwd_kernel


def test_autotune_key_has_the_m_bucket_and_the_flags(monkeypatch):
    _, tuned_calls = _select_spy(monkeypatch, autotune=True)
    flags = dict(HAS_GAMMA=True, HAS_SCALE=False, ACT="gelu")
    for M in (49, 200704, 200000):
        kernel, cfg = mlp._select("fwd", 96, 384, torch.float16, M, flags)
        assert cfg is None
    mlp._select("fwd", 96, 384, torch.float16, 200704, dict(flags, HAS_SCALE=True))
    buckets = [key[4] for key in tuned_calls]
    assert buckets[0] != buckets[1] and buckets[1] == buckets[2] == buckets[3]
    assert tuned_calls[1][5] != tuned_calls[3][5], "HAS_SCALE must be part of the key"


def test_real_autotuner_buckets_are_separate_objects():
    flags = (("HAS_GAMMA", True),)
    small = mlp._tuned("fwd", 96, 384, "fp16", mlp._m_bucket(49), flags)
    large = mlp._tuned("fwd", 96, 384, "fp16", mlp._m_bucket(200704), flags)
    assert small is not large and small.fn is large.fn  # one jit function: compiled binaries shared
    assert small is mlp._tuned("fwd", 96, 384, "fp16", mlp._m_bucket(60), flags)


@pytest.mark.parametrize("kind", sorted(mlp._KERNEL_TABLE))
@pytest.mark.parametrize("C", [40, 96, 192, 384, 768])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_every_candidate_set_reduces_in_one_order(kind, C, dtype):
    configs = mlp._KERNEL_TABLE[kind][1](C, 4 * C, dtype)
    assert mlp._same_reduction_order(kind, configs), configs


_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_convnext_mlp_launch_paths import make_args
    from fastconvnext.kernels import convnext_mlp
    args = [a.requires_grad_() for a in make_args(shape=(2, 5, 7, 40), D=72, seed=11)]
    scale = torch.tensor([1.0, 1.5])
    out = convnext_mlp(*args, act="gelu", sample_scale=scale)
    grads = torch.autograd.grad(out, args, torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    print(json.dumps([t.detach().flatten().view(torch.int32).tolist() for t in (out, *grads)]))
""")


def test_two_processes_give_bitwise_identical_outputs_and_gradients():
    tests = os.path.dirname(os.path.abspath(__file__))
    results = []
    for autotune, hash_seed in (("0", "1"), ("1", "2")):
        env = dict(os.environ, TRITON_INTERPRET="1", FASTCONVNEXT_AUTOTUNE=autotune, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len(results[0]) == 8
    for i, (a, b) in enumerate(zip(*results)):
        assert a == b, f"tensor {i} differs between processes"


# ----------------------------------------------------------------------------- forward-mode AD


def _assert_tangent_matches(primal, tangent, args, tangents):
    expected = torch.func.jvp(convnext_mlp_reference, tuple(a.double() for a in args),
                              tuple(t.double() for t in tangents))
    eager = torch.func.jvp(convnext_mlp_reference, tuple(args), tuple(tangents))
    assert tangent is not None and tangent.abs().max() > 0, "zero tangent"
    assert_within_rule(primal, eager[0], expected[0], torch.float32, "primal")
    assert_within_rule(tangent, eager[1], expected[1], torch.float32, "tangent")


def test_torch_func_jvp_gives_the_reference_tangent():
    args = make_args(seed=1)
    tangents = [torch.randn_like(a) for a in args]
    primal, tangent = torch.func.jvp(convnext_mlp, tuple(args), tuple(tangents))
    _assert_tangent_matches(primal, tangent, args, tangents)


def test_forward_ad_dual_weight_gives_the_reference_tangent():
    args = make_args(seed=2)
    tangents = [torch.zeros_like(a) for a in args]
    tangents[4] = torch.randn_like(args[4])  # only fc2_weight carries a tangent
    with forward_ad.dual_level():
        dual = list(args)
        dual[4] = forward_ad.make_dual(args[4], tangents[4])
        primal, tangent = forward_ad.unpack_dual(convnext_mlp(*dual))
    _assert_tangent_matches(primal, tangent, args, tangents)


def test_jacfwd_matches_jacrev():
    args = make_args(shape=(1, 2, 2, 4), D=8, seed=3)
    fn = lambda x: convnext_mlp(x, *args[1:])  # noqa: E731
    jac_fwd = torch.func.jacfwd(fn)(args[0])
    jac_rev = torch.func.jacrev(fn)(args[0])
    assert jac_fwd.abs().max() > 0
    exact = torch.func.jacrev(lambda x: convnext_mlp_reference(x, *[a.double() for a in args[1:]]))(
        args[0].double())
    assert_within_rule(jac_fwd, jac_rev, exact, torch.float32, "jacfwd")


# ------------------------------------------------------------------------------------ autocast


def _autocast_eager(args, dtype, gamma_cast=False):
    """What eager autocast computes: the linears in dtype, gamma and the residual as given."""
    x, residual, w1, b1, w2, b2, gamma = args
    lowp = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
    return convnext_mlp_reference(lowp[0], residual, *lowp[1:], gamma.to(dtype) if gamma_cast else gamma)


def _spy_fwd_op(monkeypatch):
    """Records the dtypes the kernel's forward implementation receives."""
    seen = []
    real = mlp._forward_impl

    def spy(x, residual, w1, b1, w2, b2, gamma, scale, act, save_y2, out_dtype=None, save_pre=False):
        seen.append(dict(x=x.dtype, residual=residual.dtype, w1=w1.dtype, b2=b2.dtype,
                         gamma=None if gamma is None else gamma.dtype, out=out_dtype))
        return real(x, residual, w1, b1, w2, b2, gamma, scale, act, save_y2, out_dtype, save_pre)

    monkeypatch.setattr(mlp, "_forward_impl", spy)
    return seen


@pytest.mark.parametrize("with_gamma", [True, False])
def test_cuda_autocast_rule_computes_like_eager_linear(monkeypatch, with_gamma):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastconvnext::convnext_mlp_fwd", "AutocastCUDA")
    seen = _spy_fwd_op(monkeypatch)
    args = make_args(seed=4)
    if not with_gamma:
        args[6] = None
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    dtype = torch.float16  # the interpreter refuses bf16 dots
    with cuda_autocast_dispatch(dtype):
        out = convnext_mlp(*leaves)
    assert seen == [dict(x=dtype, residual=torch.float32, w1=dtype, b2=dtype,
                         gamma=torch.float32 if with_gamma else None, out=torch.float32)]
    eager = _autocast_eager(args, dtype)
    assert out.dtype == eager.dtype == torch.float32, "fp32 residual: eager's sum is fp32"
    exact = convnext_mlp_reference(*[a.double() if a is not None else None for a in args])
    assert_within_rule(out, eager, exact, dtype, "autocast output")
    trainable = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out.sum(), trainable)
    assert [g.dtype for g in grads] == [torch.float32] * len(trainable), "grads keep the leaves' dtype"


def test_cuda_autocast_with_low_precision_residual_and_no_gamma_stays_low_precision(monkeypatch):
    seen = _spy_fwd_op(monkeypatch)
    args = make_args(seed=5)
    args[1] = args[1].half()
    with cuda_autocast_dispatch(torch.float16):
        out = convnext_mlp(args[0].half(), args[1], *args[2:6], None)
    assert out.dtype == torch.float16 and seen[0]["out"] == torch.float16


def test_cpu_autocast_rule_and_gradients(monkeypatch):
    seen = _spy_fwd_op(monkeypatch)
    args = make_args(seed=6)
    leaves = [a.clone().requires_grad_() for a in args]
    scale = torch.tensor([1.0, 0.5])
    with torch.autocast("cpu", dtype=torch.float16):
        out = convnext_mlp(*leaves, sample_scale=scale)
    assert seen[0]["x"] == torch.float16 and seen[0]["gamma"] == torch.float32
    dy = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    eager_leaves = [a.clone().requires_grad_() for a in args]
    with torch.autocast("cpu", dtype=torch.float16):
        eager = convnext_mlp_reference(*eager_leaves, sample_scale=scale)
    eager_grads = torch.autograd.grad(eager, eager_leaves, dy.to(eager.dtype))
    exact_leaves = [a.double().requires_grad_() for a in args]
    exact = convnext_mlp_reference(*exact_leaves, sample_scale=scale.double())
    exact_grads = torch.autograd.grad(exact, exact_leaves, dy)
    assert out.dtype == eager.dtype
    assert_within_rule(out, eager, exact, torch.float16, "autocast output")
    for name, got, want, ref, leaf in zip(ARG_NAMES, grads, eager_grads, exact_grads, leaves):
        assert got.dtype == leaf.dtype
        assert_within_rule(got, want, ref, torch.float16, f"autocast d{name}")


def test_bf16_autocast_is_refused_in_the_interpreter():
    args = make_args(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16"):
        convnext_mlp(*args)


# -------------------------------------------------------------------------------- device guard


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    depth, launches, guarded = [0], [], []
    real_guard, real_launch = mlp._device_guard, mlp._launch

    @contextlib.contextmanager
    def spy_guard(device):
        guarded.append(device)
        with real_guard(device):
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1

    def spy_launch(*args, **kwargs):
        launches.append(depth[0])
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(mlp, "_device_guard", spy_guard)
    monkeypatch.setattr(mlp, "_launch", spy_launch)
    leaves = [a.requires_grad_() for a in make_args(seed=8)]
    convnext_mlp(*leaves).sum().backward()
    assert len(launches) == 3 and all(d == 1 for d in launches), launches
