"""fastconvnext.patch: transformers' own ConvNeXt classes, pipeline() included, running fastconvnext's ops."""
import numpy as np
import pytest
import torch
import transformers
from transformers.models.convnext import modeling_convnext

import fastconvnext
from fastconvnext import backend, patch
from fastconvnext.configuration import HIDDEN_ACTS
from fastconvnext.kernels.reference import FUSED_ACTS
from helpers import randomize_
from tolerance import assert_each_within_rule, assert_fp32_within_rule, float64_twin, \
    random_draws_as_in_float32

ORIGINAL_LAYER = modeling_convnext.ConvNextLayer
TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1], layer_scale_init_value=0.5)


@pytest.fixture(autouse=True)
def _restore_transformers():
    """Every test starts and ends with transformers unpatched."""
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()
    assert modeling_convnext.ConvNextLayer is ORIGINAL_LAYER


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, ORIGINAL_LAYER)]


def _tiny_classifier(**overrides):
    config = transformers.ConvNextConfig(**dict(TINY, num_labels=4, **overrides))
    return randomize_(transformers.ConvNextForImageClassification(config))


def _count_backend_calls(monkeypatch):
    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp"):
        original = getattr(backend, op)
        monkeypatch.setattr(backend, op, lambda *a, _f=original, _op=op: calls.append(_op) or _f(*a))
    return calls


def test_patch_makes_transformers_build_fused_blocks_and_unpatch_restores():
    assert not patch.is_patched()
    patch.patch_transformers()
    patch.patch_transformers()  # idempotent
    assert patch.is_patched()
    fused_class = patch.FusedConvNextLayer
    assert modeling_convnext.ConvNextLayer is fused_class
    assert issubclass(fused_class, ORIGINAL_LAYER) and fused_class.__module__ == "fastconvnext.patch"
    model = _tiny_classifier()
    assert {type(b) for b in _blocks(model)} == {fused_class}
    assert len(_blocks(model)) == sum(TINY["depths"])

    patch.unpatch_transformers()
    patch.unpatch_transformers()  # idempotent too
    assert not patch.is_patched()
    assert modeling_convnext.ConvNextLayer is ORIGINAL_LAYER
    assert {type(b) for b in _blocks(_tiny_classifier())} == {ORIGINAL_LAYER}
    assert {type(b) for b in _blocks(model)} == {fused_class}, "models built while patched keep fused blocks"


def test_context_manager_restores_the_state_it_found():
    with fastconvnext.patch.patch_transformers() as handle:
        assert patch.is_patched()
        with patch.patch_transformers():
            assert patch.is_patched()
        assert patch.is_patched(), "the inner block found transformers patched and must leave it so"
    assert not patch.is_patched()
    assert "active=False" in repr(handle)


def test_top_level_exports():
    assert fastconvnext.patch_transformers is patch.patch_transformers
    assert fastconvnext.unpatch_transformers is patch.unpatch_transformers


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_patched_model_trains_like_the_original(hidden_act, monkeypatch):
    """Same state dict, same seeded training step (drop path active) -> same loss, grads and new weights."""
    original = _tiny_classifier(hidden_act=hidden_act, drop_path_rate=0.4).train()
    with patch.patch_transformers():
        patched = transformers.ConvNextForImageClassification(original.config).train()
    assert patched.state_dict().keys() == original.state_dict().keys()
    patched.load_state_dict(original.state_dict())
    exact = float64_twin(original)
    calls = _count_backend_calls(monkeypatch)
    pixels, labels = torch.randn(4, 3, 37, 45), torch.tensor([0, 3, 1, 2])

    results = []
    for model in (original, patched, exact):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(7)
        with random_draws_as_in_float32():  # changes only the float64 twin's draws
            out = model(pixel_values=pixels.double() if model is exact else pixels, labels=labels,
                        output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        results.append((out, grads, {n: p.detach().clone() for n, p in model.named_parameters()}))

    fused_act = hidden_act != "silu"  # the fused MLP has no SiLU: those blocks run transformers' forward
    assert calls.count("convnext_mlp") == (sum(TINY["depths"]) if fused_act else 0)
    (ref_out, ref_grads, ref_params), (out, grads, params), (exact_out, exact_grads, exact_params) = results
    for field in ("loss", "logits"):
        assert_fp32_within_rule(out[field], ref_out[field], exact_out[field], field)
    assert_each_within_rule(out.hidden_states, ref_out.hidden_states, exact_out.hidden_states, "hidden_states")
    assert set(grads) == set(ref_grads) == set(exact_grads)
    for name in ref_grads:
        assert_fp32_within_rule(grads[name], ref_grads[name], exact_grads[name], f"grad of {name}")
        assert_fp32_within_rule(params[name], ref_params[name], exact_params[name], f"{name} after the step")


@pytest.mark.parametrize("hidden_act", sorted(HIDDEN_ACTS))
def test_patched_forward_equals_the_original_for_every_hidden_act(hidden_act, monkeypatch):
    """Fused where the MLP kernel has the activation, transformers' own block otherwise: same output."""
    original = _tiny_classifier(hidden_act=hidden_act).eval()
    patched = patch.patch_model(_tiny_classifier(hidden_act=hidden_act).eval())
    patched.load_state_dict(original.state_dict())
    calls = _count_backend_calls(monkeypatch)
    pixels = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        expected, got = original(pixels).logits, patched(pixels).logits
        reference = float64_twin(original)(pixels.double()).logits
    fused = HIDDEN_ACTS[hidden_act] in FUSED_ACTS
    assert calls.count("convnext_mlp") == (sum(TINY["depths"]) if fused else 0)
    assert_fp32_within_rule(got, expected, reference, f"{hidden_act} logits")


def test_drop_path_is_active_in_that_comparison():
    """Guard for the test above: with this seed the training forward really drops samples."""
    model = _tiny_classifier(drop_path_rate=0.4)
    pixels = torch.randn(4, 3, 37, 45)
    with torch.no_grad():
        eval_logits = model.eval()(pixels).logits
        torch.manual_seed(7)
        train_logits = model.train()(pixels).logits
    assert not torch.allclose(eval_logits, train_logits, atol=1e-3)


def test_patch_model_converts_an_existing_model_in_place():
    model = _tiny_classifier().eval()
    pixels = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        expected, reference = model(pixels).logits, float64_twin(model)(pixels.double()).logits
        assert patch.patch_model(model) is model
        assert {type(b) for b in _blocks(model)} == {patch.FusedConvNextLayer}
        assert_fp32_within_rule(model(pixels).logits, expected, reference, "logits patched in place")
        patch.unpatch_model(model)
    assert {type(b) for b in _blocks(model)} == {ORIGINAL_LAYER}
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch.patch_model("not a model")


def _save_tiny_checkpoint(directory):
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    labels = {0: "zero", 1: "one", 2: "two", 3: "three"}
    label2id = {v: k for k, v in labels.items()}
    config = transformers.ConvNextConfig(**TINY, num_labels=4, id2label=labels, label2id=label2id)
    torch.manual_seed(0)
    randomize_(transformers.ConvNextForImageClassification(config)).save_pretrained(directory)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}).save_pretrained(directory)


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (50 + 7 * i, 71 - 5 * i, 3), dtype=np.uint8)) for i in range(3)]


def test_pipeline_gives_the_same_results_patched(tmp_path, monkeypatch):
    _save_tiny_checkpoint(tmp_path)
    images = _images()
    plain = transformers.pipeline("image-classification", model=str(tmp_path))
    assert {type(b) for b in _blocks(plain.model)} == {ORIGINAL_LAYER}
    expected = plain(images, top_k=4)
    exact = transformers.pipeline("image-classification", model=str(tmp_path), dtype=torch.float64)
    reference = exact(images, top_k=4)  # R: the same pipeline in float64

    calls = _count_backend_calls(monkeypatch)
    with patch.patch_transformers():
        fused = transformers.pipeline("image-classification", model=str(tmp_path))
        got = fused(images, top_k=4)
    assert {type(b) for b in _blocks(fused.model)} == {patch.FusedConvNextLayer}
    assert calls.count("dwconv_layernorm") == len(images) * sum(TINY["depths"])
    assert len(got) == len(expected) == len(images)
    for i, (ours, theirs, truth) in enumerate(zip(got, expected, reference)):
        labels = [r["label"] for r in theirs]
        assert [r["label"] for r in ours] == labels

        def scores(result, dtype):
            by_label = {r["label"]: r["score"] for r in result}
            return torch.tensor([by_label[label] for label in labels], dtype=dtype)

        assert_fp32_within_rule(scores(ours, torch.float32), scores(theirs, torch.float32),
                                scores(truth, torch.float64), f"scores of image {i}")
    assert len({tuple(r["label"] for r in result) for result in expected}) > 1 or expected[0][0]["score"] < 0.99, (
        "the tiny model must not be degenerate (same confident answer for every image)"
    )


def test_patched_blocks_run_the_fused_kernels():
    """Forced to 'triton' (the interpreter on CPU), a patched transformers block matches the original."""
    original = _tiny_classifier(hidden_act="gelu_new").eval()
    block = original.convnext.encoder.stages[1].layers[0]
    x = torch.randn(2, 12, 6, 9)
    with torch.no_grad():
        expected, reference = block(x), float64_twin(block)(x.double())
        patch.patch_model(block)
        with fastconvnext.use_backend("triton"):
            got = block(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_fp32_within_rule(got, expected, reference, "a patched block through the kernels")


def test_patched_model_runs_under_vmap_and_export_like_the_original():
    original = _tiny_classifier().eval()
    patched = patch.patch_model(_tiny_classifier().eval())
    patched.load_state_dict(original.state_dict())
    pixels = torch.randn(3, 3, 32, 36)

    def per_sample_logits(model):
        return torch.func.vmap(lambda image: model(image.unsqueeze(0)).logits.squeeze(0))(pixels)

    with torch.no_grad():
        expected, reference = original(pixels).logits, float64_twin(original)(pixels.double()).logits
        assert_fp32_within_rule(per_sample_logits(patched), per_sample_logits(original), reference, "vmap logits")
        exported = torch.export.export(patched, (pixels,)).module()(pixels).logits
    assert_fp32_within_rule(exported, expected, reference, "exported logits")
