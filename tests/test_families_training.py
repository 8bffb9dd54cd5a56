"""Training ConvNeXt V2 and DINOv3-ConvNeXt as V1 trains: drop path and gradient checkpointing against
transformers (the oracle) and against the same model without checkpointing, and torch.compile(fullgraph=True)
on CPU (one graph; a training step through the eager ops and through the kernels' custom ops equal to the
uncompiled step). DINOv3-ConvNeXt has no classifier: its loss is a fixed projection of pooler_output."""
import copy

import pytest
import torch
import transformers

import fastconvnext
from fastconvnext.training import SavedTensorBytes
from helpers import randomize_
from tolerance import assert_fp32_within_rule, float64_twin, random_draws_as_in_float32

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])
FAMILIES = {
    "v2": ("ConvNextV2ForImageClassification", "ConvNextV2Config", dict(num_labels=5)),
    "dinov3": ("DINOv3ConvNextModel", "DINOv3ConvNextConfig", dict(layer_scale_init_value=0.5)),
}


def twins(family, **overrides):
    kind, config_name, extra = FAMILIES[family]
    fields = dict(SMALL, **extra, **overrides)
    hf = randomize_(getattr(transformers, kind)(getattr(transformers, config_name)(**fields)))
    ours = getattr(fastconvnext, kind)(getattr(fastconvnext, config_name)(**fields))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def loss_of(model, pixels, labels):
    if "Classification" in type(getattr(model, "_orig_mod", model)).__name__:  # a compiled model: its module
        return model(pixels, labels=labels).loss
    pooled = model(pixels).pooler_output
    projection = torch.linspace(-1, 1, pooled.shape[-1], dtype=pooled.dtype)
    return ((pooled * projection).sum(-1) - labels.to(pooled.dtype)).square().mean()


def step(model, pixels, labels, seed=3):
    """(loss, {name: grad}) of one seeded training step (drop path draws from the seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_of(model, pixels, labels)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def batch(size=4, shape=(45, 37), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, *shape, generator=gen), torch.randint(0, 5, (size,), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_path_and_gradient_checkpointing_match_transformers(family):
    hf, ours = twins(family, drop_path_rate=0.4)
    hf.train(), ours.train()
    pixels, labels = batch()
    exact = float64_twin(hf)
    expected_loss, expected = step(hf, pixels, labels)
    with random_draws_as_in_float32():  # R: the float64 twin, seeded alike, dropping the same samples
        exact_loss, exact_grads = step(exact, pixels.double(), labels)
    plain_loss, plain = step(ours, pixels, labels)
    with SavedTensorBytes(exclude=ours.parameters()) as plain_meter:
        step(ours, pixels, labels)
    ours.gradient_checkpointing_enable()
    assert ours.is_gradient_checkpointing
    with SavedTensorBytes(exclude=ours.parameters()) as checkpointed_meter:
        loss, grads = step(ours, pixels, labels)
    assert 0 < checkpointed_meter.nbytes < plain_meter.nbytes / 2
    assert torch.equal(loss, plain_loss)
    assert_fp32_within_rule(loss, expected_loss, exact_loss, "loss")
    assert set(grads) == set(expected) == set(plain) == set(exact_grads)
    for name in expected:
        assert torch.equal(grads[name], plain[name]), f"{name}: checkpointing changed the gradient"
        assert_fp32_within_rule(grads[name], expected[name], exact_grads[name], f"grad of {name}")
    with torch.no_grad():  # drop path was active
        assert not torch.allclose(loss_of(ours.eval(), pixels, labels), loss, atol=1e-4)


def _graph_count(model, *args):
    explained = torch._dynamo.explain(model)(*args)
    return explained.graph_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_graph_in_inference_and_in_training(family):
    torch._dynamo.reset()
    _, ours = twins(family, drop_path_rate=0.3)
    pixels, _ = batch(size=2, shape=(32, 35))
    with torch.no_grad():
        assert _graph_count(ours.eval(), pixels) == (1, [])
    assert _graph_count(ours.train(), pixels) == (1, [])
    torch._dynamo.reset()


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_fullgraph_training_step_equals_the_uncompiled_one(family, backend_name):
    """'triton' on CPU is the interpreter: the kernels' custom ops (GRN's too for V2) trace into one graph with
    their backward."""
    _, ours = twins(family, depths=[1, 1, 1, 1], drop_path_rate=0.3)
    ours.train()
    pixels, labels = batch(size=2, shape=(32, 35))
    with fastconvnext.use_backend(backend_name):
        expected_loss, expected = step(ours, pixels, labels)
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
        loss, grads = step(compiled, pixels, labels)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_inference_equals_transformers(family):
    hf, ours = twins(family)
    pixels, _ = batch(size=2, shape=(33, 47))
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(ours).eval(), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, expected = compiled(pixels), hf.eval()(pixels)
        reference = float64_twin(hf)(pixels.double())
    torch._dynamo.reset()
    field = "logits" if family == "v2" else "last_hidden_state"
    assert_fp32_within_rule(got[field], expected[field], reference[field], f"compiled {field}")
