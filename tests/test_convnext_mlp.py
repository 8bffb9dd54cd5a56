"""Fused ConvNeXt MLP kernel vs the eager reference, run in Triton's interpreter on CPU.

Oracle: kernels/reference.py `convnext_mlp_reference`. The tolerance rule (tests/tolerance.py) compares the
fused result F and the eager result E in the tested dtype against a reference R computed in float64 from the
same (already rounded) inputs; for fp16/bf16 that is at least as strict as an fp32 R, and for fp32 it is the
only R that differs from E. Shapes are small but hit every masked edge of the interpreter config
(BLOCK_M = BLOCK_N = BLOCK_K = BLOCK_C = BLOCK_D = 32): C <= 32 takes the resident-x path, C = 40 the
streamed-K path with two C tiles, M and D are not multiples of the blocks.
"""
import math

import pytest
import torch
from triton.runtime import interpreter

from fastconvnext.kernels import convnext_mlp
from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.kernels.reference import convnext_mlp_reference
from helpers import dot_with_exact_bf16
from tolerance import assert_within_rule

GRAD_NAMES = ("x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma")


def make_inputs(shape, D, dtype, param_dtype=None, gamma=True, scale=None):
    N, H, W, C = shape
    param_dtype = param_dtype or dtype
    return dict(
        x=torch.randn(N, H, W, C).to(dtype),
        residual=torch.randn(N, H, W, C).to(dtype),
        fc1_weight=(torch.randn(D, C) / math.sqrt(C)).to(param_dtype),
        fc1_bias=(0.5 * torch.randn(D)).to(param_dtype),
        fc2_weight=(torch.randn(C, D) / math.sqrt(D)).to(param_dtype),
        fc2_bias=(0.5 * torch.randn(C)).to(param_dtype),
        gamma=(0.5 + torch.rand(C)).to(param_dtype) if gamma else None,
        sample_scale=torch.tensor(scale, dtype=torch.float32) if scale is not None else None,
    )


def run_twice_bitwise_equal(inputs, dy, act="gelu"):
    """The fused op's output and grads from two runs, asserted bitwise equal; returns the first run's."""
    out1, grads1 = run_with_grads(convnext_mlp, inputs, act, dy)
    out2, grads2 = run_with_grads(convnext_mlp, inputs, act, dy)
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name
    return out1, grads1


def run_with_grads(fn, inputs, act, dy, cast=None):
    """fn's output and the gradients of <out, dy> w.r.t. every trainable input (cast: dtype for all of them)."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().clone() if cast is None or name == "sample_scale" else t.detach().to(cast)
        leaves[name] = t.requires_grad_(name in GRAD_NAMES)
    out = fn(**leaves, act=act)
    trainable = [n for n in GRAD_NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in trainable], dy.to(out.dtype))
    return out, dict(zip(trainable, grads))


def check_against_reference(inputs, act, dtype, eager_dtype=None):
    dy = torch.randn(inputs["x"].shape)
    fused, fused_grads = run_with_grads(convnext_mlp, inputs, act, dy)
    eager, eager_grads = run_with_grads(convnext_mlp_reference, inputs, act, dy, cast=eager_dtype or dtype)
    ref, ref_grads = run_with_grads(convnext_mlp_reference, inputs, act, dy, cast=torch.float64)
    assert fused.dtype == inputs["x"].dtype
    assert_within_rule(fused, eager, ref, dtype, "out")
    for name, grad in fused_grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name} dtype {grad.dtype} != {inputs[name].dtype}"
        assert_within_rule(grad, eager_grads[name], ref_grads[name], dtype, f"d{name}")


CASES = [
    # shape [N, H, W, C], D, act, gamma, sample_scale
    ((2, 3, 5, 24), 96, "gelu", True, [0.0, 1.25]),
    ((1, 5, 7, 40), 72, "gelu_tanh", True, None),
    ((2, 3, 5, 5), 20, "relu", False, [2.0, 0.5]),
    ((3, 4, 3, 40), 72, "gelu", False, None),
]


@pytest.mark.parametrize("shape,D,act,gamma,scale", CASES)
def test_fp32_matches_reference(shape, D, act, gamma, scale):
    check_against_reference(make_inputs(shape, D, torch.float32, gamma=gamma, scale=scale), act, torch.float32)


@pytest.mark.parametrize("shape,D,act,gamma,scale", CASES)
def test_fp16_matches_reference(shape, D, act, gamma, scale):
    check_against_reference(make_inputs(shape, D, torch.float16, gamma=gamma, scale=scale), act, torch.float16)


def test_fp32_params_with_fp16_activations():
    # AMP with fp32 master weights: eager (autocast) would run the Linears with fp16 copies of the weights
    inputs = make_inputs((2, 3, 5, 40), 72, torch.float16, param_dtype=torch.float32, scale=[1.0, 0.0])
    check_against_reference(inputs, "gelu", torch.float16, eager_dtype=torch.float16)


def test_interpreter_bf16_is_refused_not_garbage(monkeypatch):
    # Triton 3.9's interpreter multiplies the raw uint16 bit patterns of bf16 dot operands (values ~1e10).
    # The op probes the interpreter's dot and refuses bf16 with a clear error before any launch. If the
    # probe starts passing, Triton fixed its interpreter and bf16 runs (the exact-dot tests below then
    # hold without their patch).
    from triton.runtime import interpreter as interp

    assert not mlp._interpreter_bf16_dot_ok(interp.interpreter_builder.create_dot)
    launches = []
    monkeypatch.setattr(mlp, "_launch", lambda *a, **k: launches.append(a))
    for param_dtype in (torch.bfloat16, torch.float32):
        inputs = make_inputs((2, 3, 5, 24), 96, torch.bfloat16, param_dtype=param_dtype)
        with pytest.raises(TypeError, match="bfloat16 cannot run in Triton's interpreter"):
            convnext_mlp(**inputs)
    assert launches == []


@pytest.mark.parametrize("shape,D,act,gamma,scale", [CASES[0], CASES[1]])
def test_bf16_matches_reference_with_exact_dot(monkeypatch, shape, D, act, gamma, scale):
    # Everything of the bf16 path runs as compiled (loads, casts of h/dpre/g to bf16, epilogue, stores);
    # only the interpreter's tl.dot is replaced by one that reads bf16 operands, see the test above.
    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", dot_with_exact_bf16)
    inputs = make_inputs(shape, D, torch.bfloat16, gamma=gamma, scale=scale)
    check_against_reference(inputs, act, torch.bfloat16)


def test_bf16_zero_drop_path_returns_residual_exactly(monkeypatch):
    # a dropped sample's branch is multiplied by 0: out is the residual, bit for bit
    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", dot_with_exact_bf16)
    inputs = make_inputs((2, 3, 5, 24), 96, torch.bfloat16, scale=[0.0, 0.0])
    out = convnext_mlp(**inputs)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, inputs["residual"])


def test_deterministic_with_several_weight_grad_segments(monkeypatch):
    # 70 rows in segments of 32: three per-segment partials of dW1/dW2/db1 summed by torch
    monkeypatch.setattr(mlp, "_SEGMENT_ROWS", 32)
    monkeypatch.setattr(mlp, "_SEGMENT_ALIGN", 32)
    assert mlp._segments(70) == (3, 32)
    inputs = make_inputs((2, 5, 7, 24), 40, torch.float32, scale=[1.0, 2.0])
    dy = torch.randn(inputs["x"].shape)
    _, grads1 = run_twice_bitwise_equal(inputs, dy)
    _, eager_grads = run_with_grads(convnext_mlp_reference, inputs, "gelu", dy)
    _, ref_grads = run_with_grads(convnext_mlp_reference, inputs, "gelu", dy, cast=torch.float64)
    for name in ("fc1_weight", "fc1_bias", "fc2_weight"):
        assert_within_rule(grads1[name], eager_grads[name], ref_grads[name], torch.float32, f"d{name}")


def test_forward_saves_no_hidden_and_inference_saves_nothing():
    N, H, W, C, D = 2, 3, 5, 24, 96
    M = N * H * W
    inputs = make_inputs((N, H, W, C), D, torch.float32, scale=[1.0, 1.0])
    leaves = {k: v.requires_grad_(k in GRAD_NAMES) for k, v in inputs.items() if v is not None}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = convnext_mlp(**leaves)
    assert (N, H, W, C) in saved  # x (and y2 for dgamma), C-wide
    for shape in saved:
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 0
        assert not (shape[-1] == D and rows >= M), f"a D-wide hidden {shape} was saved for backward"
    out.sum().backward()
    assert leaves["x"].grad is not None

    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = convnext_mlp(**leaves)
    assert saved == [] and not out.requires_grad
    with torch.inference_mode():
        out_inf = convnext_mlp(**leaves)
    assert torch.equal(out, out_inf)


def test_frozen_parameters_skip_the_weight_grad_kernel(monkeypatch):
    weight_side = []
    real = mlp._backward_dw
    monkeypatch.setattr(mlp, "_backward_dw", lambda *a, **k: weight_side.append(1) or real(*a, **k))
    inputs = make_inputs((2, 3, 5, 24), 96, torch.float32, scale=[1.0, 3.0])
    dy = torch.randn(inputs["x"].shape)
    x = inputs["x"].requires_grad_()
    (dx,) = torch.autograd.grad(convnext_mlp(**inputs), [x], dy)
    assert weight_side == []
    x64 = x.detach().double().requires_grad_()
    ref = convnext_mlp_reference(**{k: (v.detach().double() if v is not None else None) for k, v in inputs.items()
                                    if k != "x"}, x=x64)
    (ref_dx,) = torch.autograd.grad(ref, [x64], dy.double())
    (eager_dx,) = torch.autograd.grad(convnext_mlp_reference(**inputs), [x], dy)
    assert_within_rule(dx, eager_dx, ref_dx, torch.float32, "dx")


@pytest.mark.parametrize("C", [24, 40])  # interpreter: fused dx kernel at C <= 32, else hidden-backward + dx GEMM
def test_weight_gradients_without_x_gradient(monkeypatch, C):
    """Only the weights train (x frozen): the hidden-backward kernel feeds the dW GEMMs, no dx launch."""
    kinds = []
    real = mlp._launch
    monkeypatch.setattr(mlp, "_launch", lambda kind, *a, **k: kinds.append(kind) or real(kind, *a, **k))
    inputs = make_inputs((2, 3, 5, C), 72, torch.float16, scale=[1.0, 0.5])
    dy = torch.randn(inputs["x"].shape)
    names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma")
    leaves = {k: (v.clone().requires_grad_(k in names) if v is not None else None) for k, v in inputs.items()}
    out = convnext_mlp(**leaves)
    kinds.clear()
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dy.to(out.dtype))
    assert kinds == ["hidden_bwd", "dw"]
    _, eager = run_with_grads(convnext_mlp_reference, inputs, "gelu", dy)
    _, ref = run_with_grads(convnext_mlp_reference, inputs, "gelu", dy, cast=torch.float64)
    for name, grad in zip(names, grads):
        assert_within_rule(grad, eager[name], ref[name], torch.float16, f"d{name}")


def test_empty_batch():
    inputs = make_inputs((0, 3, 5, 24), 96, torch.float32, scale=[])
    x = inputs["x"].requires_grad_()
    out = convnext_mlp(**inputs)
    assert out.shape == (0, 3, 5, 24)
    out.sum().backward()
    assert x.grad.shape == x.shape


def _bad(**changes):
    inputs = make_inputs((2, 3, 5, 24), 96, torch.float32)
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    (dict(act="selu"), ValueError, "act must be one of"),
    (dict(x=torch.randn(30, 24)), ValueError, "x must be"),
    (dict(residual=torch.randn(2, 3, 5, 23)), ValueError, "residual must have shape"),
    (dict(fc1_weight=torch.randn(96, 23)), ValueError, "fc1_weight must have shape"),
    (dict(fc2_weight=torch.randn(96, 24)), ValueError, "fc2_weight must have shape"),
    (dict(fc1_bias=torch.randn(95)), ValueError, "fc1_bias must have shape"),
    (dict(gamma=torch.randn(23)), ValueError, "gamma must have shape"),
    (dict(sample_scale=torch.ones(3)), ValueError, "sample_scale must have shape"),
    (dict(x=torch.randn(2, 3, 5, 24).half()), TypeError, "residual dtype"),
    (dict(x=torch.zeros(2, 3, 5, 24, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(fc2_bias=torch.zeros(24, dtype=torch.int64)), TypeError, "fc2_bias must be float32"),
    (dict(fc1_bias=torch.zeros(96, device="meta")), ValueError, "fc1_bias is on meta"),
    (dict(x=torch.randn(2, 24, 3, 5).permute(0, 2, 3, 1)), ValueError, "x must be contiguous"),
    (dict(residual=torch.randn(2, 3, 24, 5).transpose(2, 3)), ValueError, "residual must be contiguous"),
    (dict(gamma=[1.0] * 24), TypeError, "gamma must be a torch.Tensor"),
]


@pytest.mark.parametrize("changes,exc,match", BAD_INPUTS)
def test_bad_input_raises_before_launch(monkeypatch, changes, exc, match):
    launches = []
    monkeypatch.setattr(mlp, "_launch", lambda *a, **k: launches.append(a))
    kwargs = _bad(**changes)
    act = kwargs.pop("act", "gelu")
    with pytest.raises(exc, match=match):
        convnext_mlp(**kwargs, act=act)
    assert launches == []


def test_opcheck():
    inputs = make_inputs((2, 3, 5, 5), 20, torch.float32, scale=[1.0, 0.5])
    args = tuple(inputs[k] for k in ("x", "residual", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma",
                                     "sample_scale"))
    for t in args[:7]:
        t.requires_grad_()
    torch.library.opcheck(mlp._mlp_fwd_op, args + ("gelu", True))


def test_torch_compile_fullgraph_no_graph_break():
    inputs = make_inputs((2, 3, 5, 5), 20, torch.float32, scale=[1.0, 0.0])
    for name in GRAD_NAMES:
        inputs[name].requires_grad_()

    def block(**kw):
        return convnext_mlp(**kw, act="gelu_tanh") * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(**inputs)
    grads = torch.autograd.grad(out.sum(), [inputs[n] for n in GRAD_NAMES])
    out_eager = block(**inputs)
    grads_eager = torch.autograd.grad(out_eager.sum(), [inputs[n] for n in GRAD_NAMES])
    assert torch.equal(out, out_eager)
    for name, a, b in zip(GRAD_NAMES, grads, grads_eager):
        assert torch.equal(a, b), name


def test_compile_targets_cover_every_config():
    targets = mlp.compile_targets()
    for dtype in ("fp32", "fp16", "bf16"):
        for C, D in mlp._BUCKETS:
            kinds = {k for p in ("ieee", "tf32") for k in mlp._kinds(C, D, dtype, p, training=True, gpu=True)}
            for kind in kinds:
                kernel, configs = mlp._KERNELS[kind][0], mlp._KERNEL_TABLE[kind][1]
                labels = [t.label for t in targets if t.kernel == kernel and t.dtype == dtype
                          and t.constexprs["C"] == C and t.constexprs["D"] == D]
                for cfg in configs(C, D, dtype):
                    blocks = " ".join(f"{k}={v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
                    assert any(label.startswith(blocks) for label in labels), (kernel, dtype, C, D, cfg)
    for t in targets:
        assert t.expects_tensor_cores == (t.dtype != "fp32" or t.constexprs["DOT_PRECISION"] == "tf32"), t.label


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_kernel_resident_rows_in_two_pieces(monkeypatch, dtype):
    """The fused dx kernel holds x and g rows of C = BLOCK_K / 2 + a power of two in two unpadded pieces (the GPU's
    C = 96: 64 + 32); here C = 48 = 32 + 16 under a 64-wide resident config, one C tile."""
    table = dict(mlp._KERNEL_TABLE)
    fn, configs, _ = table["dx"]
    table["dx"] = (fn, configs, mlp._cfg(32, 64, 64, 32, 1, 1))
    monkeypatch.setattr(mlp, "_KERNEL_TABLE", table)
    assert mlp._kinds(48, 80, "fp32", "ieee", training=True)[1:] == ["dx", "dw"]
    check_against_reference(make_inputs((2, 3, 5, 48), 80, dtype, scale=[0.0, 1.5]), "gelu", dtype)
