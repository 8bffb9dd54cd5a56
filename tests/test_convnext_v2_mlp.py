"""Fused ConvNeXt V2 MLP (GRN) vs the eager reference, run in Triton's interpreter on CPU.

Oracle: kernels/reference.py `convnext_v2_mlp_reference` (transformers' ConvNextV2 block MLP arithmetic). The tolerance
rule (tests/tolerance.py) compares the fused result F and the eager result E in the tested dtype against R computed in
float64 from the same rounded inputs (for fp16/bf16 at least as strict as an fp32 R). The interpreter configs use
32-row tiles, so 5x3 (15 pixels) and 7x7 (49) images put one tile across two or three images; C = 24 and 40 and
D = 40 and 72 are not multiples of the 32-wide blocks, C = 40 needs two C tiles and two K steps.
"""
import math

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from fastconvnext.kernels import convnext_v2_mlp
from fastconvnext.kernels import convnext_v2_mlp_kernel as v2
from fastconvnext.kernels.reference import convnext_v2_mlp_reference
from helpers import dot_with_exact_bf16
from tolerance import assert_within_rule, max_abs_diff

GRAD_NAMES = ("x", "residual", "fc1_weight", "fc1_bias", "grn_weight", "grn_bias", "fc2_weight", "fc2_bias")


def make_inputs(shape, D, dtype, scale=None, seed=0):
    N, H, W, C = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen)

    return dict(
        x=randn(N, H, W, C).to(dtype),
        residual=randn(N, H, W, C).to(dtype),
        fc1_weight=(randn(D, C) / math.sqrt(C)).to(dtype),
        fc1_bias=(0.5 * randn(D)).to(dtype),
        grn_weight=(0.5 * randn(1, 1, 1, D)).to(dtype),  # transformers' shape
        grn_bias=(0.5 * randn(1, 1, 1, D)).to(dtype),
        fc2_weight=(randn(C, D) / math.sqrt(D)).to(dtype),
        fc2_bias=(0.5 * randn(C)).to(dtype),
        sample_scale=torch.tensor(scale, dtype=torch.float32) if scale is not None else None,
    )


def run_with_grads(fn, inputs, dy, cast=None, act="gelu"):
    """fn's output and the gradients of <out, dy> w.r.t. every trainable input (cast: dtype for all of them)."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        t = t.detach().clone() if cast is None or name == "sample_scale" else t.detach().to(cast)
        leaves[name] = t.requires_grad_(name in GRAD_NAMES)
    out = fn(**leaves, act=act)
    grads = torch.autograd.grad(out, [leaves[n] for n in GRAD_NAMES], dy.to(out.dtype))
    return out, dict(zip(GRAD_NAMES, grads))


def check_against_reference(inputs, dtype, act="gelu"):
    dy = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))
    fused, fused_grads = run_with_grads(convnext_v2_mlp, inputs, dy, act=act)
    eager, eager_grads = run_with_grads(convnext_v2_mlp_reference, inputs, dy, cast=dtype, act=act)
    ref, ref_grads = run_with_grads(convnext_v2_mlp_reference, inputs, dy, cast=torch.float64, act=act)
    assert fused.dtype == dtype
    assert_within_rule(fused, eager, ref, dtype, "out")
    for name, grad in fused_grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        assert torch.isfinite(grad).all(), f"d{name} not finite"
        assert_within_rule(grad, eager_grads[name], ref_grads[name], dtype, f"d{name}")
    return fused, fused_grads


CASES = [
    # shape [N, H, W, C], D, sample_scale
    ((2, 5, 3, 24), 40, [0.0, 1.25]),  # 15-pixel images: a 32-row tile spans three images; one sample dropped
    ((1, 7, 7, 40), 72, None),  # batch 1, 49 pixels: tiles span the image's end; two C tiles, two K steps
    ((3, 7, 7, 24), 40, [1.25, 1.25, 0.5]),  # three 49-pixel images: tiles across image boundaries
]


@pytest.fixture(params=[False, True], ids=["h-stored", "h-recomputed"])
def hidden_path(request, monkeypatch):
    """Both pass-2 paths at every dtype (the rule picks one per C and dtype)."""
    monkeypatch.setattr(v2, "_recomputes_hidden", lambda C, dtype: request.param)
    return request.param


@pytest.mark.parametrize("shape,D,scale", CASES)
def test_fp32_matches_reference(hidden_path, shape, D, scale):
    check_against_reference(make_inputs(shape, D, torch.float32, scale), torch.float32)


@pytest.mark.parametrize("shape,D,scale", CASES[:2])
def test_fp16_matches_reference(hidden_path, shape, D, scale):
    check_against_reference(make_inputs(shape, D, torch.float16, scale), torch.float16)


def round_to_nearest_bf16(original):
    """The interpreter's cast with fp32 -> bf16 rounded to nearest even, as compiled code rounds it (cvt.rn.bf16.f32):
    Triton's interpreter (3.4 to 3.9) truncates the mantissa instead, an error of up to 1 ulp where the GPU has 1/2."""
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    return cast_impl


def test_interpreter_truncates_bf16_casts_and_the_patch_rounds():
    # the reason for the patch in the bf16 tests: without it, bf16 results carry an extra half ulp of error
    builder_class = type(interpreter.interpreter_builder)
    x = np.array([1.0 + 2.0**-8 + 2.0**-12], dtype=np.float32)  # above the midpoint between two bf16 neighbours
    handle = interpreter.TensorHandle(x, tl.float32)
    nearest = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    patched = round_to_nearest_bf16(builder_class.cast_impl)(interpreter.interpreter_builder, handle, tl.bfloat16)
    assert np.array_equal(patched.data, nearest)
    assert not np.array_equal(interpreter.interpreter_builder.cast_impl(handle, tl.bfloat16).data, nearest)


@pytest.mark.parametrize("shape,D,scale", CASES[:2])
def test_bf16_matches_reference_with_exact_dot(monkeypatch, hidden_path, shape, D, scale):
    # Triton 3.9's interpreter multiplies bf16 dot operands' raw bits and truncates fp32 -> bf16 casts; everything
    # else of the bf16 path (loads, stores, the epilogue) runs as it would compiled, with a dot that reads bf16
    # correctly and casts rounded to nearest as the GPU rounds them
    monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", dot_with_exact_bf16)
    builder_class = type(interpreter.interpreter_builder)
    monkeypatch.setattr(builder_class, "cast_impl", round_to_nearest_bf16(builder_class.cast_impl))
    check_against_reference(make_inputs(shape, D, torch.bfloat16, scale), torch.bfloat16)


@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_other_activations(act):
    check_against_reference(make_inputs((2, 5, 3, 24), 40, torch.float32, [1.0, 2.0]), torch.float32, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_image_with_all_zero_hidden(dtype):
    # fc1 bias -40: image 1 (x = 0) has pre = -40 everywhere, so GELU gives exactly 0 (also in float64) and every
    # channel norm of that image is 0 (GRN's 1e-6 guard, vector_norm's gradient at 0); image 0 (x large) is not zero
    # but its channels 0-4 (zero fc1 rows) are: zero norms beside a nonzero mean
    inputs = make_inputs((2, 5, 3, 24), 40, dtype, [1.0, 1.0])
    inputs["fc1_bias"] = torch.full((40,), -40.0, dtype=dtype)
    inputs["fc1_weight"][:5] = 0
    inputs["x"][0] *= 40
    inputs["x"][1] = 0
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(inputs["x"].double(), inputs["fc1_weight"].double(),
                                                                 inputs["fc1_bias"].double()))
    assert torch.all(hidden[1] == 0) and torch.any(hidden[0] != 0)  # the case is what it claims
    assert torch.equal((hidden[0] == 0).all(0).all(0), torch.arange(40) < 5)
    check_against_reference(inputs, dtype)


def test_dropped_samples_return_the_residual_exactly():
    inputs = make_inputs((2, 5, 3, 24), 40, torch.float16, [0.0, 0.0])
    assert torch.equal(convnext_v2_mlp(**inputs), inputs["residual"])


def test_grn_parameters_of_shape_d():
    inputs = make_inputs((2, 5, 3, 24), 40, torch.float32, None)
    flat = dict(inputs, grn_weight=inputs["grn_weight"].reshape(40), grn_bias=inputs["grn_bias"].reshape(40))
    assert torch.equal(convnext_v2_mlp(**flat), convnext_v2_mlp(**inputs))


def test_bitwise_deterministic():
    inputs = make_inputs((3, 7, 7, 24), 40, torch.float16, [1.25, 0.0, 1.25])
    dy = torch.randn(inputs["x"].shape)
    out1, grads1 = run_with_grads(convnext_v2_mlp, inputs, dy)
    out2, grads2 = run_with_grads(convnext_v2_mlp, inputs, dy)
    assert torch.equal(out1, out2)
    for name in GRAD_NAMES:
        assert torch.equal(grads1[name], grads2[name]), name


def test_image_sums_follow_tile_order():
    # the reduction of the per-(tile, image slot) partials against a direct per-image sum, at spans of 1 to 33 images
    for HW in (1, 15, 32, 49, 64):
        N, D, tile_rows = 5, 7, 32
        M = N * HW
        values = torch.randn(M, D)
        tiles, span = math.ceil(M / tile_rows), v2._span(tile_rows, HW)
        part = torch.zeros(tiles * span, D)
        for t in range(tiles):
            rows = torch.arange(t * tile_rows, min(M, (t + 1) * tile_rows))
            slots = rows // HW - (t * tile_rows) // HW
            assert slots.max() < span
            for j in range(span):
                part[t * span + j] = values[rows[slots == j]].sum(0)
        sums = v2._image_sums(part, N, HW, span, D, tile_rows, 24, "fp32")
        torch.testing.assert_close(sums, values.view(N, HW, D).sum(1), rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    inputs = make_inputs((2, 5, 3, 24), 40, torch.float32, None)
    with pytest.raises(ValueError, match=r"grn_weight must have shape \(40,\) or \(1, 1, 1, 40\)"):
        convnext_v2_mlp(**dict(inputs, grn_weight=torch.zeros(41)))
    with pytest.raises(ValueError, match="act must be one of"):
        convnext_v2_mlp(**inputs, act="silu")
    with pytest.raises(ValueError, match="sample_scale must have shape"):
        convnext_v2_mlp(**dict(inputs, sample_scale=torch.ones(3)))


def test_interpreter_bf16_is_refused_not_garbage():
    inputs = make_inputs((2, 5, 3, 24), 40, torch.bfloat16, None)
    if v2._interpreter_bf16_dot_ok(interpreter.interpreter_builder.create_dot):
        pytest.skip("this Triton's interpreter multiplies bf16 correctly: bf16 runs (checked above)")
    with pytest.raises(TypeError, match="convnext_v2_mlp: bfloat16 cannot run in Triton's interpreter"):
        convnext_v2_mlp(**inputs)


def test_opcheck_registration():
    # schema, fake (meta) implementation and autograd registration as torch.library checks them
    inputs = make_inputs((1, 3, 3, 8), 16, torch.float32, [1.5])
    args = (inputs["x"], inputs["residual"], inputs["fc1_weight"].requires_grad_(), inputs["fc1_bias"],
            inputs["grn_weight"].reshape(16).requires_grad_(), inputs["grn_bias"].reshape(16), inputs["fc2_weight"],
            inputs["fc2_bias"], inputs["sample_scale"], "gelu")
    torch.library.opcheck(v2._v2_mlp_fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                               "test_autograd_registration"))


SHAPES = [(40, 56), (96, 56), (192, 28), (384, 14), (768, 7)]  # ConvNeXt-V2 Atto stage 1, Tiny's four stages


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_launch_plans_are_compiled_targets_with_the_launchers_configs(dtype):
    # every kernel launch_plans lists is a compile target (so compile_check covered it), with the config and the
    # pass-2 path the launchers take on a GPU
    targets = {(t.kernel, t.label, t.dtype) for t in v2.compile_targets()}
    for C, size in SHAPES:
        for training in (False, True):
            plans = v2.launch_plans(8, size, size, C, dtype, training)
            kernels = [p.target for p in plans if p.target is not None]
            assert [t.kernel.removeprefix("convnext_v2_mlp_") for t in kernels] == (
                ["fc1_sumsq", "image_sums", "grn_fc2"] + ["bwd_sums", "image_sums", "bwd_dpre"] * training)
            for target in kernels:
                assert (target.kernel, target.label, target.dtype) in targets, target.label
            fc2 = kernels[2]
            assert fc2.constexprs["RECOMPUTE"] == v2._recomputes_hidden(C, dtype)
            expected = v2._gpu_config("fc2_recompute" if fc2.constexprs["RECOMPUTE"] else "fc2", C, dtype)
            assert all(fc2.constexprs[k] == expected[k] for k in expected if k.startswith("BLOCK_"))
            assert (fc2.num_warps, fc2.num_stages) == (expected["num_warps"], expected["num_stages"])


def test_store_or_recompute_rule():
    # the module docstring's model: recompute while C fits one 128-wide tile in fp16/bf16, store beyond and in fp32
    assert [v2._recomputes_hidden(C, "bf16") for C, _ in SHAPES] == [True, True, False, False, False]
    assert [v2._recomputes_hidden(C, "fp16") for C in (128, 129)] == [True, False]
    assert not any(v2._recomputes_hidden(C, "fp32") for C, _ in SHAPES)


def test_fp16_autocast_runs_the_kernels_in_fp16_with_eagers_output_dtype():
    # fp32 model under CPU autocast(float16): eager runs the Linears in fp16 and GRN's affine in fp32 (its fp32
    # weight promotes), and residual + branch is fp32; the op runs its dots in fp16 and returns fp32 likewise
    inputs = make_inputs((2, 5, 3, 24), 40, torch.float32, [1.0, 0.5])
    dy = torch.randn(inputs["x"].shape)
    with torch.autocast("cpu", dtype=torch.float16):
        fused, fused_grads = run_with_grads(convnext_v2_mlp, inputs, dy)
        eager, eager_grads = run_with_grads(convnext_v2_mlp_reference, inputs, dy)
    ref, ref_grads = run_with_grads(convnext_v2_mlp_reference, inputs, dy, cast=torch.float64)
    assert fused.dtype == eager.dtype == torch.float32
    assert max_abs_diff(fused, convnext_v2_mlp(**inputs)) > 1e-4  # not the fp32 computation
    assert_within_rule(fused, eager, ref, torch.float16, "out under autocast")
    for name, grad in fused_grads.items():
        assert grad.dtype == torch.float32, name
        assert_within_rule(grad, eager_grads[name], ref_grads[name], torch.float16, f"d{name} under autocast")
