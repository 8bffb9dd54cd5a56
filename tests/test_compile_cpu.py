"""torch.compile of the whole model on CPU: one graph (no graph break) in inference and training, under
no_grad and inference_mode, with aot_eager and with the default inductor backend, through both custom ops.

Results are checked against transformers with the tolerance rule (fp32: R is transformers in float64,
E is transformers in fp32, F is the compiled fastconvnext model).
"""
import copy

import pytest
import torch

import fastconvnext
from helpers import twin_models
from tolerance import assert_within_rule

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])
TINY = dict(num_stages=2, hidden_sizes=[8, 12], depths=[1, 1])  # for inductor, whose C++ build dominates
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _pixels(batch=2, size=(32, 35), seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _oracle_outputs(hf, pixels):
    """(E, R): transformers in fp32 and in float64."""
    with torch.no_grad():
        eager = hf(pixels).last_hidden_state
        reference = copy.deepcopy(hf).double()(pixels.double()).last_hidden_state
    return eager, reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_mode", sorted(GRAD_MODES))
def test_fullgraph_compile_in_inference(grad_mode):
    """The CPU inference path asks whether oneDNN is available; dynamo refuses to trace that call, so
    fullgraph=True used to raise under no_grad/inference_mode."""
    hf, ours = twin_models(**SMALL)
    pixels = _pixels()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with GRAD_MODES[grad_mode]():
        out = compiled(pixels).last_hidden_state
    assert_within_rule(out, *_oracle_outputs(hf, pixels), torch.float32, f"compiled under {grad_mode}")


def _graph_count(model, *args):
    explained = torch._dynamo.explain(model)(*args)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    return explained.graph_count, reasons


def test_one_graph_in_inference():
    _, ours = twin_models(**SMALL)
    with torch.no_grad():
        count, reasons = _graph_count(ours, _pixels())
    assert (count, reasons) == (1, [])


def test_one_graph_in_training_with_drop_path():
    _, ours = twin_models(**SMALL, drop_path_rate=0.3)
    count, reasons = _graph_count(ours.train(), _pixels())
    assert (count, reasons) == (1, [])


def test_default_inductor_eager_path_inference():
    """Default backend (inductor) on CPU, eager ops: the path a CPU user compiles."""
    hf, ours = twin_models(**TINY)
    pixels = _pixels(size=(32, 32))
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        out = compiled(pixels).last_hidden_state
    assert_within_rule(out, *_oracle_outputs(hf, pixels), torch.float32, "inductor, eager ops")


def test_default_inductor_through_both_custom_ops_forward_and_backward():
    """Forced 'triton' (Triton's interpreter on CPU): inductor keeps both custom ops (dwconv+LN and the
    MLP, forward and backward) as calls in its graph; logits, loss and every parameter gradient of a
    training step follow the tolerance rule against transformers."""
    hf, ours = twin_models("ConvNextForImageClassification", **TINY, num_labels=5)
    pixels = _pixels(size=(32, 32))
    labels = torch.tensor([1, 4])
    compiled = torch.compile(ours, fullgraph=True)
    with fastconvnext.use_backend("triton"), torch.profiler.profile() as profile:
        fused = _training_step(compiled, ours, pixels, labels)
    called = {event.key for event in profile.key_averages()}
    for op in ("dwconv_layernorm_fwd", "dwconv_layernorm_bwd", "convnext_mlp_fwd", "convnext_mlp_bwd"):
        assert f"fastconvnext::{op}" in called, f"the compiled model never called {op}"
    eager = _training_step(hf, hf, pixels, labels)
    hf64 = copy.deepcopy(hf).double()
    reference = _training_step(hf64, hf64, pixels.double(), labels)
    for name in reference:
        assert_within_rule(fused[name], eager[name], reference[name], torch.float32, name)


def _training_step(model, module, pixels, labels):
    """Logits, loss and parameter gradients of one step; `module` holds the parameters of `model`."""
    out = model(pixels, labels=labels)
    out.loss.backward()
    results = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    results.update({f"grad {name}": p.grad for name, p in module.named_parameters()})
    return results
