"""The whole model through the fused kernels (Triton's interpreter on CPU) against the eager ops.

Logits, every hidden state, the loss and the gradient of every parameter must follow DESIGN.md's
tolerance rule, max|F - R| <= 2 max|E - R| + atol(dtype), with F = the fused kernels in the test
dtype, E = the eager ops in the test dtype and R = the eager ops in fp32 -- in fp64 when the test
dtype is fp32 itself, so that R is more accurate than E and the rule weighs the kernels' rounding
against eager's instead of demanding an absolute 1e-5 on values that reach ~1e2.
Shapes are tiny (the interpreter is slow) but hit every masked edge: channel counts that are not
powers of two, odd and unequal sides, maps smaller than the 7x7 window, a 1x1 last stage.
"""
import copy

import pytest
import torch

import fastconvnext
from fastconvnext import modeling
from helpers import randomize_
from tolerance import assert_within_rule

HIDDEN_SIZES = [8, 12, 20, 24]
# (patch size, image): stage maps 8x10, 4x5, 2x2, 1x1 and 9x12, 4x6, 2x3, 1x1.
GEOMETRIES = {"p4": (4, (35, 43)), "p2": (2, (19, 25))}
NUM_LABELS = 5


def _model(hidden_act="gelu", layer_scale=1e-6, depths=(1, 1, 1, 1), drop_path_rate=0.0, seed=0, patch=4):
    config = fastconvnext.ConvNextConfig(
        hidden_sizes=HIDDEN_SIZES, depths=list(depths), patch_size=patch, hidden_act=hidden_act,
        layer_scale_init_value=layer_scale, drop_path_rate=drop_path_rate, num_labels=NUM_LABELS,
    )
    torch.manual_seed(seed)
    return randomize_(fastconvnext.ConvNextForImageClassification(config), generator_seed=seed)


def _batch(image=GEOMETRIES["p4"][1], batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *image, generator=gen)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=gen)
    return pixels, labels


def _run(model, pixels, labels, backend, seed=None):
    """Logits, hidden states, loss and parameter gradients of one training step through `backend`."""
    model.zero_grad(set_to_none=True)
    with fastconvnext.use_backend(backend):
        if seed is not None:
            torch.manual_seed(seed)
        out = model(pixels, labels=labels, output_hidden_states=True)
        out.loss.backward()
    results = {"logits": out.logits, "loss": out.loss}
    results.update({f"hidden_states[{i}]": h for i, h in enumerate(out.hidden_states)})
    results.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    return {name: t.detach().clone() for name, t in results.items()}


def _reference_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def _round_through(model, dtype):
    """Make the parameters exactly representable in `dtype`, so R and F start from the same weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return model


def _assert_all_within_rule(fused, eager, reference, dtype):
    assert fused.keys() == reference.keys()
    for name in reference:
        assert_within_rule(fused[name], eager[name], reference[name], dtype, name)


CASES = {
    # hidden_act (transformers name), layer scale init, depths, geometry, dtype
    "gelu-layerscale-fp32": ("gelu", 1e-6, (1, 2, 1, 1), "p4", torch.float32),
    "gelu_new-no-layerscale-fp32": ("gelu_new", 0.0, (1, 1, 1, 1), "p2", torch.float32),
    "relu-layerscale-fp32": ("relu", 1e-6, (1, 1, 1, 1), "p4", torch.float32),
    "gelu-layerscale-fp16": ("gelu", 1e-6, (1, 1, 1, 1), "p2", torch.float16),
    "gelu_pytorch_tanh-layerscale-fp16": ("gelu_pytorch_tanh", 1e-6, (1, 1, 1, 1), "p4", torch.float16),
    "relu-no-layerscale-fp16": ("relu", 0.0, (1, 1, 1, 1), "p4", torch.float16),
}


@pytest.mark.parametrize("case", CASES)
def test_model_through_kernels_matches_eager(case):
    hidden_act, layer_scale, depths, geometry, dtype = CASES[case]
    patch, image = GEOMETRIES[geometry]
    model = _round_through(_model(hidden_act, layer_scale, depths, patch=patch), dtype).to(dtype)
    pixels, labels = _batch(image)
    pixels = pixels.to(dtype)
    ref_dtype = _reference_dtype(dtype)
    reference = _run(copy.deepcopy(model).to(ref_dtype), pixels.to(ref_dtype), labels, "eager")
    eager = _run(model, pixels, labels, "eager")
    fused = _run(model, pixels, labels, "triton")
    _assert_all_within_rule(fused, eager, reference, dtype)


def test_kernels_run_when_forced(monkeypatch):
    """Guard for the test above: forcing 'triton' really reaches both kernels, for every block."""
    from fastconvnext import kernels

    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp"):
        fused_op = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _op=op, _f=fused_op: calls.append(_op) or _f(*a), raising=False)
    model = _model(depths=(1, 2, 1, 1))
    pixels, labels = _batch()
    with fastconvnext.use_backend("triton"):
        model(pixels, labels=labels)
    assert calls.count("dwconv_layernorm") == calls.count("convnext_mlp") == 5


_DRAW_SCALE = modeling.ConvNextDropPath.sample_scale


def _record_drop_path_scales(monkeypatch, replay=None):
    """Record the per-sample scales the model draws; with `replay`, hand out those instead of drawing."""
    scales = []

    def recording(self, x, dtype=None):
        scale = _DRAW_SCALE(self, x, dtype) if replay is None else replay[len(scales)]
        scales.append(scale if scale is None else scale.clone())
        return scale if scale is None else scale.to(x.dtype)

    monkeypatch.setattr(modeling.ConvNextDropPath, "sample_scale", recording)
    return scales


def test_drop_path_drops_the_same_samples_through_kernels(monkeypatch):
    model = _model(depths=(1, 2, 1, 1), drop_path_rate=0.6).train()
    pixels, labels = _batch(batch=3)
    eager_scales = _record_drop_path_scales(monkeypatch)
    eager = _run(model, pixels, labels, "eager", seed=5)
    fused_scales = _record_drop_path_scales(monkeypatch)
    fused = _run(model, pixels, labels, "triton", seed=5)
    _record_drop_path_scales(monkeypatch, replay=eager_scales)
    reference = _run(copy.deepcopy(model).double(), pixels.double(), labels, "eager")

    drawn = [s for s in eager_scales if s is not None]
    assert len(drawn) == 4, "every block but the first (rate 0) draws a per-sample mask"
    assert any((s == 0).any() for s in drawn) and any((s > 0).any() for s in drawn), "seed must drop and keep"
    assert len(fused_scales) == len(eager_scales)
    for e, f in zip(eager_scales, fused_scales):
        assert torch.equal(e, f), "the fused run must draw the same masks in the same order"
    _assert_all_within_rule(fused, eager, reference, torch.float32)


def test_mixed_precision_block_fp32_params_fp16_activations():
    """One block with fp32 parameters fed fp16 activations under CPU autocast (as in AMP training)."""
    block = _model(depths=(1, 1, 1, 1)).convnext.encoder.stages[1].layers[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 9, 11, generator=gen).to(torch.float16).contiguous(memory_format=torch.channels_last)

    def run(backend, dtype, autocast):
        block.zero_grad(set_to_none=True)
        inp = x.to(dtype).clone().requires_grad_(True)
        with fastconvnext.use_backend(backend), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = block(inp)
        out.float().backward(torch.ones_like(out, dtype=torch.float32))
        grads = {f"grad {n}": p.grad for n, p in block.named_parameters()}
        return {"output": out.float(), "grad input": inp.grad.float(), **grads}

    reference = run("eager", torch.float32, autocast=False)
    eager = run("eager", torch.float16, autocast=True)
    fused = run("triton", torch.float16, autocast=True)
    assert fused["grad pwconv1.weight"].dtype == torch.float32
    _assert_all_within_rule(fused, eager, reference, torch.float16)
