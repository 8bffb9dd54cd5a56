"""Fused depthwise conv + LayerNorm kernel in Triton's interpreter (CPU) against eager PyTorch.

Oracle: kernels/reference.py evaluated in float64 (R) and in the tested dtype (E); the kernel (F)
must satisfy DESIGN.md's rule max|F-R| <= 2*max|E-R| + atol(dtype) for the output and all five
gradients. float64 is used for R as a stricter stand-in for the rule's fp32 reference, so that
fp32 runs have a meaningful E (the fp32 eager op) as well.
"""
import inspect
import os

import pytest
import torch

from fastconvnext.kernels import dwconv_layernorm
from fastconvnext.kernels import dwconv_layernorm_kernel as kernel_module
from fastconvnext.kernels.reference import dwconv_layernorm_reference
from tolerance import assert_within_rule

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must enable Triton's interpreter"

NAMES = ("output", "d_x", "d_dw_weight", "d_dw_bias", "d_ln_weight", "d_ln_bias")


def make_case(n, h, w, c, k, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    # x comes from a channels_last NCHW tensor seen as NHWC, as in the model.
    x = rand(n, c, h, w).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return dict(
        x=x,
        dw_weight=rand(c, 1, k, k) * 0.3,
        dw_bias=rand(c) if bias else None,
        ln_weight=1.0 + 0.3 * rand(c),
        ln_bias=0.3 * rand(c),
        dy=rand(n, h, w, c),
    )


def run(fn, case, x_dtype, param_dtype):
    """Output and gradients w.r.t. (x, dw_weight, dw_bias, ln_weight, ln_bias); None for no bias."""
    x = case["x"].to(x_dtype).requires_grad_()
    params = [None if case[k] is None else case[k].to(param_dtype).requires_grad_()
              for k in ("dw_weight", "dw_bias", "ln_weight", "ln_bias")]
    y = fn(x, *params)
    leaves = [t for t in (x, *params) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, case["dy"].to(y.dtype)))
    return [y] + [None if t is None else next(grads) for t in (x, *params)]


def check_against_reference(case, dtype, param_dtype=None):
    param_dtype = param_dtype or dtype
    fused = run(dwconv_layernorm, case, dtype, param_dtype)
    eager = run(dwconv_layernorm_reference, case, dtype, dtype)
    exact = run(dwconv_layernorm_reference, case, torch.float64, torch.float64)
    for name, f, e, r in zip(NAMES, fused, eager, exact):
        if r is None:
            assert f is None, f"{name}: expected no gradient without a conv bias"
            continue
        expected_dtype = dtype if name in ("output", "d_x") else param_dtype
        assert f.dtype == expected_dtype, f"{name}: dtype {f.dtype}, expected {expected_dtype}"
        assert_within_rule(f, e, r, dtype, name)
    return fused


# (N, H, W, C, K, bias): C not a power of two, odd H/W, H or W below K, N 1 and 2, K 3/5/7, no bias.
SHAPES = [
    (2, 5, 3, 24, 7, True),  # H, W < K: every tap of a pixel crosses a border somewhere
    (1, 9, 7, 5, 3, False),  # C=5, no conv bias
    (2, 4, 5, 40, 5, True),
    (1, 11, 8, 80, 7, True),  # C > 64: two channel blocks in the weight-gradient kernel, 6 pixel tiles
]


@pytest.mark.parametrize("n,h,w,c,k,bias", SHAPES)
def test_forward_and_gradients_fp32(n, h, w, c, k, bias):
    check_against_reference(make_case(n, h, w, c, k, bias), torch.float32)


@pytest.mark.parametrize("n,h,w,c,k,bias", [SHAPES[0], SHAPES[1]])
def test_forward_and_gradients_fp16(n, h, w, c, k, bias):
    check_against_reference(make_case(n, h, w, c, k, bias, seed=1), torch.float16)


def test_forward_and_gradients_bf16():
    # The kernel has no tl.dot, so the interpreter's bf16 tl.dot problem does not apply here.
    check_against_reference(make_case(2, 5, 3, 24, 7, True, seed=2), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params_with_low_precision_activations(dtype):
    """Mixed precision: fp32 master params, fp16/bf16 x; param grads come back in fp32."""
    check_against_reference(make_case(1, 6, 5, 40, 7, True, seed=3), dtype, torch.float32)


@pytest.mark.parametrize("c", [600, 1030])
def test_widest_channel_classes(c):
    """C > 512 (BLOCK_C 1024 and 2048): the LayerNorm backward runs narrower strips there."""
    assert kernel_module._norm_bwd_config(kernel_module._block_c(c))[0] < kernel_module.BLOCK_W
    check_against_reference(make_case(1, 3, 6, c, 3, True, seed=12), torch.float32)


def test_multi_tile_partial_reductions(monkeypatch):
    """Several row groups in both backward kernels, each grid-striding over rows / row tiles, with a
    tail (a row, a tile) entirely past the image: the partials and their fixed-order sums stay exact."""
    monkeypatch.setattr(kernel_module, "PARTIAL_PROGRAMS", 4)
    grids = kernel_module._backward_grids(9, 9, 24, 3)
    monkeypatch.setattr(kernel_module, "PARTIAL_ELEMENTS", 2 * grids["strips"] * 9 * 24)
    grids = kernel_module._backward_grids(9, 9, 24, 3)
    # 9 rows in 2 strips: 2 groups of 5 rows (the last one dead); 3 row tiles: 2 groups of 2 tiles.
    assert (grids["norm_groups"], grids["rows_per_program"]) == (2, 5)
    assert (grids["conv_groups"], grids["tiles_per_program"]) == (2, 2)
    check_against_reference(make_case(1, 9, 9, 24, 3, True, seed=4), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bits(monkeypatch, dtype):
    """Two runs give the same bits, with several partial programs per gradient. The interpreter runs
    programs one after another, so float atomics would look deterministic here: the kernels must not
    use any (gradients are reduced through per-program partials summed in a fixed order)."""
    for kernel in (kernel_module._dwconv_ln_bwd_norm_kernel, kernel_module._dwconv_bwd_conv_kernel,
                   kernel_module._sum_rows_kernel, kernel_module._dwconv_ln_fwd_kernel, kernel_module._conv_strip):
        fn = kernel.fn  # the Python function under triton.jit (or the interpreter's wrapper)
        assert "atomic" not in inspect.getsource(fn), f"{fn.__name__} uses an atomic"
    monkeypatch.setattr(kernel_module, "PARTIAL_PROGRAMS", 3)
    strips = kernel_module._backward_grids(10, 6, 24, 5)["strips"]
    monkeypatch.setattr(kernel_module, "PARTIAL_ELEMENTS", 2 * strips * 25 * 24)  # 2 row groups
    case = make_case(2, 5, 6, 24, 5, True, seed=5)
    first = run(dwconv_layernorm, case, dtype, torch.float32)
    second = run(dwconv_layernorm, case, dtype, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_no_grad_and_inference_mode():
    case = make_case(1, 5, 4, 24, 3, True, seed=6)
    args = [case[k].float() for k in ("x", "dw_weight", "dw_bias", "ln_weight", "ln_bias")]
    expected = dwconv_layernorm_reference(*args)
    with torch.no_grad():
        y_no_grad = dwconv_layernorm(*args)
    with torch.inference_mode():
        y_inference = dwconv_layernorm(*args)
    assert not y_no_grad.requires_grad
    assert_within_rule(y_no_grad, expected, expected, torch.float32, "no_grad output")
    assert torch.equal(y_no_grad, y_inference)


def test_only_params_require_grad():
    case = make_case(1, 4, 5, 24, 3, True, seed=7)
    x = case["x"].float()
    weight = case["dw_weight"].float().requires_grad_()
    args = [case[k].float() for k in ("dw_bias", "ln_weight", "ln_bias")]
    y = dwconv_layernorm(x, weight, *args)
    (grad,) = torch.autograd.grad(y, weight, case["dy"].float())
    weight_ref = case["dw_weight"].float().requires_grad_()
    (grad_ref,) = torch.autograd.grad(dwconv_layernorm_reference(x, weight_ref, *args), weight_ref, case["dy"].float())
    assert_within_rule(grad, grad_ref, grad_ref, torch.float32, "d_dw_weight")


# ------------------------------------------------------------------------------- bad inputs


def good_args(c=8, k=3):
    return dict(
        x=torch.randn(1, 4, 4, c), dw_weight=torch.randn(c, 1, k, k), dw_bias=torch.randn(c),
        ln_weight=torch.ones(c), ln_bias=torch.zeros(c),
    )


BAD_INPUTS = [
    ("rank 3 x", dict(x=torch.randn(4, 4, 8)), ValueError, "4-D"),
    ("int x", dict(x=torch.ones(1, 4, 4, 8, dtype=torch.int32)), TypeError, "dtype"),
    ("float64 x", dict(x=torch.randn(1, 4, 4, 8, dtype=torch.float64)), TypeError, "dtype"),
    ("weight C mismatch", dict(dw_weight=torch.randn(6, 1, 3, 3)), ValueError, r"\[8, 1, K, K\]"),
    ("even K", dict(dw_weight=torch.randn(8, 1, 4, 4)), ValueError, "odd K"),
    ("K > 7", dict(dw_weight=torch.randn(8, 1, 9, 9)), ValueError, "odd K <= 7"),
    ("non-square kernel", dict(dw_weight=torch.randn(8, 1, 3, 5)), ValueError, "odd K"),
    ("bias shape", dict(dw_bias=torch.randn(7)), ValueError, "dw_bias"),
    ("ln_weight shape", dict(ln_weight=torch.ones(8, 1)), ValueError, "ln_weight"),
    ("int ln_bias", dict(ln_bias=torch.zeros(8, dtype=torch.int64)), TypeError, "ln_bias"),
    ("param on another device", dict(ln_bias=torch.zeros(8, device="meta")), ValueError, "device"),
    ("NCHW-contiguous x", dict(x=torch.randn(1, 8, 4, 4).permute(0, 2, 3, 1)), ValueError, "contiguous"),
    ("empty x", dict(x=torch.randn(0, 4, 4, 8)), ValueError, "non-empty"),
    ("C too large", dict(c=4096), ValueError, "C must be <="),
]


@pytest.mark.parametrize("what,change,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_rejected_before_launch(what, change, error, match):
    change = dict(change)
    args = good_args(c=change.pop("c", 8))
    args.update(change)
    with pytest.raises(error, match=match):
        dwconv_layernorm(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dwconv_layernorm(**good_args())


# ---------------------------------------------------------------------------- torch.library


def test_opcheck_forward_and_backward_ops():
    case = make_case(1, 3, 4, 5, 3, True, seed=8)
    x = case["x"].float().contiguous()
    taps = case["dw_weight"].float().reshape(5, 9).t().contiguous()
    bias, ln_w, ln_b = (case[k].float() for k in ("dw_bias", "ln_weight", "ln_bias"))
    fwd_args = (x.requires_grad_(), taps.requires_grad_(), bias, ln_w.requires_grad_(), ln_b, 1e-6)
    torch.library.opcheck(torch.ops.fastconvnext.dwconv_layernorm_fwd, fwd_args)
    _, mean, rstd = torch.ops.fastconvnext.dwconv_layernorm_fwd(*fwd_args)
    bwd_args = (case["dy"].float(), x.detach(), taps.detach(), bias, ln_w.detach(), mean.detach(), rstd.detach())
    torch.library.opcheck(torch.ops.fastconvnext.dwconv_layernorm_bwd, bwd_args)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    case = make_case(1, 4, 5, 24, 3, True, seed=9)
    fused = run(torch.compile(dwconv_layernorm, fullgraph=True, backend="aot_eager"), case,
                torch.float32, torch.float32)
    eager = run(dwconv_layernorm, case, torch.float32, torch.float32)
    for name, a, b in zip(NAMES, fused, eager):
        assert torch.equal(a, b), f"{name}: compiled result differs from the uncompiled op"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_param_grads_keep_fp32_precision_with_low_precision_activations(dtype):
    """g (the gradient of the conv output) must stay fp32 between the LayerNorm backward and the tap
    gradient: rounding it to the activation dtype costs ~2^-9 relative per term of sum(g * x).

    Inputs are exactly representable in `dtype` and params are fp32, so the fused param grads (fp32,
    from fp32 statistics and g) must meet the fp32 rule: R = fp64 reference, E = fp32 reference, both
    on the same inputs. dx and y are in `dtype` by design and are checked elsewhere."""
    case = make_case(2, 6, 7, 24, 5, True, seed=11)
    for name in ("x", "dy"):
        case[name] = case[name].to(dtype).double()
    x = case["x"].to(dtype).requires_grad_()
    params = [case[k].float().requires_grad_() for k in ("dw_weight", "dw_bias", "ln_weight", "ln_bias")]
    y = dwconv_layernorm(x, *params)
    fused = torch.autograd.grad(y, params, case["dy"].to(y.dtype))
    eager = run(dwconv_layernorm_reference, case, torch.float32, torch.float32)[2:]
    exact = run(dwconv_layernorm_reference, case, torch.float64, torch.float64)[2:]
    for name, f, e, r in zip(NAMES[2:], fused, eager, exact):
        assert f.dtype == torch.float32, name
        assert_within_rule(f, e, r, torch.float32, f"{name} with {dtype} activations")
