"""transformers 5.25's model methods that training and deployment code calls, on fastconvnext's models: same
names and signatures as transformers' PreTrainedModel, the same effect (transformers as the oracle)."""
import inspect

import pytest
import torch
import transformers

import fastconvnext
from helpers import twin_models

TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 1], num_labels=3)
METHODS = ("activation_checkpointing_enable", "activation_checkpointing_disable", "enable_input_require_grads",
           "disable_input_require_grads", "get_memory_footprint", "push_to_hub", "from_pretrained")


FAMILIES = {"ConvNextForImageClassification": "ConvNextConfig", "ConvNextV2ForImageClassification": "ConvNextV2Config",
            "DINOv3ConvNextModel": "DINOv3ConvNextConfig"}


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_methods_take_transformers_parameter_names(name, kind):
    if not hasattr(getattr(transformers, kind), name):
        pytest.skip(f"transformers {transformers.__version__} has no {name} (newer releases do)")
    ours = inspect.signature(getattr(getattr(fastconvnext, kind), name)).parameters
    theirs = inspect.signature(getattr(getattr(transformers, kind), name)).parameters
    positional = [p.name for p in theirs.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name for p in theirs.values() if p.kind == p.KEYWORD_ONLY}
    assert [p.name for p in ours.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] == positional
    assert keywords <= set(ours) or any(p.kind == p.VAR_KEYWORD for p in ours.values()), (name, keywords - set(ours))


def test_activation_checkpointing_recomputes_and_gives_transformers_gradients():
    # transformers 5.25's ConvNeXt does not support checkpointing (supports_gradient_checkpointing False); fastconvnext
    # does, so the oracle is transformers' gradient without it.
    hf, ours = twin_models("ConvNextForImageClassification", **TINY)
    assert ours.supports_gradient_checkpointing is True
    ours.activation_checkpointing_enable()
    assert ours.is_activation_checkpointing and ours.is_gradient_checkpointing
    x = torch.randn(2, 3, 32, 32)
    hf.train(), ours.train()
    for model in (hf, ours):
        model.zero_grad()
        model(x).logits.sum().backward()
    torch.testing.assert_close(ours.classifier.weight.grad, hf.classifier.weight.grad, atol=1e-4, rtol=0)
    first = ours.convnext.encoder.stages[0].layers[0].pwconv1.weight.grad
    torch.testing.assert_close(first, hf.convnext.encoder.stages[0].layers[0].pwconv1.weight.grad, atol=1e-4, rtol=0)
    ours.activation_checkpointing_disable()
    assert not ours.is_activation_checkpointing
    with pytest.raises(NotImplementedError, match="every_n_layers"):
        ours.activation_checkpointing_enable(every_n_layers=2)


def test_enable_input_require_grads_lets_gradients_through_a_frozen_checkpointed_trunk():
    _, ours = twin_models("ConvNextForImageClassification", **TINY)
    ours.train()
    ours.requires_grad_(False)
    ours.classifier.requires_grad_(True)
    ours.base_model.encoder.stages[1].layers[0].pwconv1.weight.requires_grad_(True)  # an "adapter" inside
    ours.gradient_checkpointing_enable()
    ours.enable_input_require_grads()
    ours(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert ours.base_model.encoder.stages[1].layers[0].pwconv1.weight.grad is not None
    ours.disable_input_require_grads()
    assert ours._require_grads_hooks == []


def test_memory_footprint_equals_transformers():
    hf, ours = twin_models("ConvNextForImageClassification", **TINY)
    assert ours.get_memory_footprint() == hf.get_memory_footprint()
    assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)


def test_push_to_hub_offline_is_a_clear_hub_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, ours = twin_models("ConvNextForImageClassification", **TINY)
    with pytest.raises(Exception) as error:
        ours.push_to_hub("someone/tiny-convnext")
    assert "offline" in str(error.value).lower() or "HF_HUB_OFFLINE" in str(error.value)
    with pytest.raises(NotImplementedError, match="max_shard_size"):
        ours.push_to_hub("someone/tiny-convnext", max_shard_size="1GB")


@pytest.mark.parametrize("kind", FAMILIES)
def test_from_pretrained_takes_the_first_argument_by_transformers_name(kind):
    config = dict(TINY) if kind != "DINOv3ConvNextModel" else {k: v for k, v in TINY.items() if k != "num_labels"}
    hf = getattr(transformers, kind)(getattr(transformers, FAMILIES[kind])(**config))
    model = getattr(fastconvnext, kind).from_pretrained(
        pretrained_model_name_or_path=None, config=getattr(fastconvnext, FAMILIES[kind])(**config),
        state_dict=hf.state_dict())
    assert type(model) is getattr(fastconvnext, kind)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(hf.state_dict())
    assert all(torch.equal(loaded[key], value) for key, value in hf.state_dict().items())
