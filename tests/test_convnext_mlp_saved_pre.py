"""The fused MLP's forward keeping pre = x W1^T + b1 for backward where the hidden per image is small
(`_SAVED_PRE_PER_IMAGE`: ConvNeXt's last stage), so that the hidden-backward kernel runs one K = C matmul (dh) instead
of two, with the layer scale folded into W2 by the launcher; elsewhere at wide C the backward's own first pass
(`fc1_pre`) recomputes pre for that kernel (`_two_pass_hidden_backward`).

In the interpreter the two-GEMM forward (the one that materialises pre) starts at C = 192, too wide for most tests
here, so they force it at C = 40 (`two_gemm`); the shapes leave M, C and D off the 32-wide interpreter tiles. Oracle:
the eager reference in the same dtype (E) and in float64 (R), under the tolerance rule (tests/tolerance.py).
"""
import pytest
import torch
from triton.runtime import interpreter

from fastconvnext.kernels import convnext_mlp
from fastconvnext.kernels import convnext_mlp_kernel as mlp
from helpers import dot_with_exact_bf16
from test_convnext_mlp import (GRAD_NAMES, check_against_reference, make_inputs,
                               run_twice_bitwise_equal, run_with_grads)
from test_convnext_mlp_fp32_intermediates import test_activation_derivative_times_dh_is_fp32 as _dpre_is_fp32


@pytest.fixture
def two_gemm(monkeypatch):
    """The two-GEMM forward at every C, and a record of the kernels each call launches."""
    monkeypatch.setattr(mlp, "_two_gemm_forward", lambda *args, **kwargs: True)
    launched = []
    real = mlp._launch
    monkeypatch.setattr(mlp, "_launch", lambda kind, *a, **k: launched.append((kind, k)) or real(kind, *a, **k))
    return launched


def _kinds(launched):
    return [kind for kind, _ in launched]


CASES = [
    # shape [N, H, W, C], D, act, gamma, sample_scale
    ((2, 3, 5, 40), 72, "gelu", True, [0.0, 1.25]),
    ((1, 5, 7, 40), 72, "gelu_tanh", True, None),
    ((3, 4, 3, 40), 40, "relu", False, [2.0, 0.5, 1.0]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,D,act,gamma,scale", CASES)
def test_saved_pre_path_matches_reference(two_gemm, shape, D, act, gamma, scale, dtype):
    check_against_reference(make_inputs(shape, D, dtype, gamma=gamma, scale=scale), act, dtype)
    assert _kinds(two_gemm) == ["hidden", "fc2", "hidden_bwd_pre", "dx_gemm", "dw"]
    fc1_flags, dh_flags = two_gemm[0][1], two_gemm[2][1]
    assert fc1_flags["STORE_PRE"] and not fc1_flags["LOAD_PRE"]
    assert dh_flags["LOAD_PRE"] and not dh_flags["HAS_GAMMA"]  # gamma is folded into W2
    assert dh_flags["HAS_SCALE"] == (scale is not None)


def test_saved_pre_path_bf16_with_exact_dot(monkeypatch, two_gemm):
    # pre kept in bf16 (as eager keeps its bf16 fc1 output); only the interpreter's dot is patched (see
    # test_convnext_mlp.test_interpreter_bf16_is_refused_not_garbage)
    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", dot_with_exact_bf16)
    check_against_reference(make_inputs((2, 3, 5, 40), 72, torch.bfloat16, scale=[1.0, 0.5]), "gelu", torch.bfloat16)
    assert "hidden_bwd_pre" in _kinds(two_gemm)


def test_saved_pre_path_is_deterministic_and_agrees_with_recomputing(monkeypatch, two_gemm):
    inputs = make_inputs((2, 3, 5, 40), 72, torch.float32, scale=[1.0, 2.0])
    dy = torch.randn(inputs["x"].shape)
    out1, grads1 = run_twice_bitwise_equal(inputs, dy)
    # pre recomputed in backward instead: fp32 sums in another order, so equal within rounding, not bitwise
    monkeypatch.setattr(mlp, "_SAVED_PRE_PER_IMAGE", 0)
    two_gemm.clear()
    out3, grads3 = run_with_grads(convnext_mlp, inputs, "gelu", dy)
    assert "hidden_bwd" in _kinds(two_gemm) and "hidden_bwd_pre" not in _kinds(two_gemm)
    assert torch.equal(out1, out3)
    for name in grads1:
        torch.testing.assert_close(grads3[name], grads1[name], rtol=1e-5, atol=1e-5, msg=name)


def test_activation_derivative_times_dh_is_fp32_with_saved_pre(two_gemm):
    """dpre = dh * act'(pre) in fp32 also when pre comes back from the forward's fp16 copy (pre is exact in fp16
    there, act'(pre) subnormal in fp16: see tests/test_convnext_mlp_fp32_intermediates.py)."""
    _dpre_is_fp32(40)
    assert "hidden_bwd_pre" in _kinds(two_gemm)


def _saved_shapes(fn):
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_pre_is_kept_only_for_a_backward_that_needs_it(monkeypatch, two_gemm):
    N, H, W, C, D = 2, 3, 5, 40, 72
    M = N * H * W
    inputs = make_inputs((N, H, W, C), D, torch.float32)
    leaves = {k: v.requires_grad_(k in GRAD_NAMES) for k, v in inputs.items() if v is not None}
    out, saved = _saved_shapes(lambda: convnext_mlp(**leaves))
    assert (M, D) in saved
    out.sum().backward()
    # only the residual trains: backward launches nothing that reads pre, so the forward does not keep it
    frozen = {k: v.detach().requires_grad_(k == "residual") for k, v in inputs.items() if v is not None}
    _, saved = _saved_shapes(lambda: convnext_mlp(**frozen))
    assert (M, D) not in saved
    # the hidden per image above the limit (earlier ConvNeXt stages): recomputed, nothing D-wide saved
    monkeypatch.setattr(mlp, "_SAVED_PRE_PER_IMAGE", H * W * D - 1)
    _, saved = _saved_shapes(lambda: convnext_mlp(**leaves))
    assert [shape for shape in saved if shape[-1] == D and shape not in ((C, D), (D,))] == [], saved  # fc2 W, fc1 b
    monkeypatch.setattr(mlp, "_SAVED_PRE_PER_IMAGE", H * W * D)
    _, saved = _saved_shapes(lambda: convnext_mlp(**leaves))
    assert (M, D) in saved


def test_saved_pre_rule_at_convnext_t_stages():
    """GPU configs, bf16: only stage 4 (7x7, C = 768) of ConvNeXt-T at 224x224 keeps pre; ConvNeXt-B's too."""
    def saves(HW, C):
        return mlp._saves_pre(HW, C, 4 * C, "bf16", "ieee", gpu=True)

    assert [saves(s * s, c) for s, c in ((56, 96), (28, 192), (14, 384), (7, 768))] == [False, False, False, True]
    assert [saves(s * s, c) for s, c in ((56, 128), (28, 256), (14, 512), (7, 1024))] == [False, False, False, True]


def test_fake_outputs_follow_the_rule(two_gemm):
    """The op's fake (FakeTensorMode: torch.compile, the memory benchmark) gives pre the shape the real op gives."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = make_inputs((2, 3, 5, 40), 72, torch.float32)
    args = [inputs[k] for k in ("x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma",
                                "sample_scale")]
    for save_pre in (False, True):
        real = mlp._mlp_fwd_op(*args, "gelu", True, None, save_pre)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = mlp._mlp_fwd_op(*args, "gelu", True, None, save_pre)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
        assert tuple(real[2].shape) == ((30, 72) if save_pre else (0,))


def test_opcheck_with_saved_pre(two_gemm):
    inputs = make_inputs((2, 3, 5, 40), 48, torch.float32, scale=[1.0, 0.5])
    args = tuple(inputs[k] for k in ("x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma",
                                     "sample_scale"))
    for t in args[:7]:
        t.requires_grad_()
    torch.library.opcheck(mlp._mlp_fwd_op, args + ("gelu", True, None, True))
    assert "hidden_bwd_pre" in _kinds(two_gemm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,D,act,gamma,scale", CASES)
def test_two_pass_hidden_backward_matches_reference(monkeypatch, shape, D, act, gamma, scale, dtype):
    """pre not saved (fused forward here), recomputed by the backward's first pass, read back by the second."""
    monkeypatch.setattr(mlp, "_two_pass_hidden_backward", lambda *args: True)
    launched = []
    real = mlp._launch
    monkeypatch.setattr(mlp, "_launch", lambda kind, *a, **k: launched.append((kind, k)) or real(kind, *a, **k))
    check_against_reference(make_inputs(shape, D, dtype, gamma=gamma, scale=scale), act, dtype)
    assert _kinds(launched) == ["fwd", "fc1_pre", "hidden_bwd_pre", "dx_gemm", "dw"]
    first = launched[1][1]
    assert first["STORE_PRE"] and not first["STORE_H"] and not first["IS_BACKWARD"]


def test_two_pass_rule_on_the_gpu_configs():
    """The rule splits the bf16 hidden backward from C = 512 (ConvNeXt-T's last stage, -B's last two), not at
    C = 192-384 where the 256-wide tiles' last one is half empty (tests/test_tooling_wall.py checks the rule against
    the performance model)."""
    def two_pass(C):
        return mlp._two_pass_hidden_backward(C, 4 * C, "bf16", "ieee", True)

    # Triton 3.9 takes 128x256 tiles for both passes; older releases 128x128 (kernels/_triton_compat.CONFIG_CHOICES),
    # with which the split pays only at multiples of 512.
    from fastconvnext.kernels._triton_compat import config_choice

    wide = config_choice("mlp.hidden_bwd_pre_wide") and config_choice("mlp.fc1_pre_wide")
    assert [two_pass(C) for C in (192, 384, 512, 768)] == ([False, False, True, True] if wide
                                                           else [False, False, True, False])
    if wide:
        kinds = mlp._kinds(768, 3072, "bf16", "ieee", True, gpu=True)
        assert kinds[2:] == ["fc1_pre", "hidden_bwd_pre", "dx_gemm", "dw"]
