"""DINOv3-ConvNeXt against transformers' DINOv3ConvNext* (the oracle, random weights, small configs): outputs,
hidden states, backbone maps, gradients, drop path, state dicts both ways, config.json, from_pretrained /
save_pretrained through the checkpoint machinery (hostile folders included), patch_transformers, hooks, LoRA
and the eager fallback. Every fp32 comparison with transformers follows CONTRIBUTING's rule, with transformers in
float64 as R and in fp32 as E."""
import copy
import json
import time

import numpy as np
import peft
import pytest
import torch
import transformers
from torch import nn
from torch.nn.modules import module as torch_module

import fastconvnext
from fastconvnext import backend, dinov3_convnext, patch
from helpers import randomize_, transformers_selects_hidden_states
from tolerance import assert_each_within_rule, assert_fp32_within_rule, assert_grads_within_rule, \
    assert_sequences_within_rule, float64_twin, random_draws_as_in_float32, three_runs

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])
BLOCKS = sum(SMALL["depths"])

CONFIGS = {
    "small-nonsquare": (dict(SMALL), (2, 3, 45, 67)),
    "three-stages-gray-eps1e-5": (dict(hidden_sizes=[12, 20, 36], depths=[2, 1, 1], num_channels=1,
                                       layer_norm_eps=1e-5), (3, 1, 19, 33)),
    "gelu_new-tall": (dict(SMALL, hidden_act="gelu_new", layer_scale_init_value=0.5), (1, 3, 70, 33)),
    "relu-two-stages-odd": (dict(hidden_sizes=[10, 14], depths=[1, 3], hidden_act="relu"), (2, 3, 9, 13)),
}


@pytest.fixture(autouse=True)
def _unpatched():
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()


def twins(kind="DINOv3ConvNextModel", **config):
    hf = getattr(transformers, kind)(transformers.DINOv3ConvNextConfig(**config))
    randomize_(hf)
    ours = getattr(fastconvnext, kind)(fastconvnext.DINOv3ConvNextConfig(**config))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), ours.eval()


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("name", CONFIGS)
def test_model_outputs_and_hidden_states_match_transformers(name):
    config, shape = CONFIGS[name]
    hf, ours = twins(**config)
    x = torch.randn(shape)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    last = got.last_hidden_state
    h, w = expected.hidden_states[-1].shape[-2:]
    assert last.shape == (shape[0], 1 + h * w, config["hidden_sizes"][-1])
    for field in ("last_hidden_state", "pooler_output"):
        assert_fp32_within_rule(got[field], expected[field], reference[field], field)
    assert torch.equal(got.pooler_output, last[:, 0])
    assert len(got.hidden_states) == len(config["depths"]) + 1
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")
    with torch.no_grad():
        assert ours(x).hidden_states is None
        as_tuple = ours(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], last)


def test_hidden_state_selection_like_transformers():
    if not transformers_selects_hidden_states():
        pytest.skip(f"transformers {transformers.__version__} selects output_hidden_states otherwise; fastconvnext "
                    "follows newer transformers")
    hf, ours = twins(**SMALL)
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=[0, 2])
    assert [h is None for h in got.hidden_states] == [h is None for h in expected.hidden_states]
    assert [h is None for h in got.hidden_states] == [False, True, False, True, True]
    assert_fp32_within_rule(got.hidden_states[2], expected.hidden_states[2], reference.hidden_states[2],
                            "selected hidden state")


@pytest.mark.parametrize("out_features", [["stem", "stage2", "stage4"], ["stage1"], ["stage3", "stage4"]])
def test_backbone_feature_maps_match_transformers(out_features):
    hf, ours = twins("DINOv3ConvNextBackbone", out_features=out_features, **SMALL)
    x = torch.randn(2, 3, 41, 39)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    assert len(got.feature_maps) == len(out_features)
    assert_sequences_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, "feature_maps")
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")
    assert ours.channels == hf.channels and ours.out_features == hf.out_features == out_features
    assert ours.out_indices == list(hf.out_indices)
    with torch.no_grad():
        assert ours(x).hidden_states is None and hf(x).hidden_states is None


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", ["small-nonsquare", "three-stages-gray-eps1e-5"])
def test_gradients_match_transformers(name):
    config, shape = CONFIGS[name]
    hf, ours = twins(**config)
    hf64 = float64_twin(hf)
    x = torch.randn(shape)
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True), x.double().requires_grad_(True)]
    weights = torch.randn_like(hf(x).last_hidden_state)
    for model, inp in zip((ours, hf, hf64), xs):
        (model(inp).last_hidden_state * weights).sum().backward()
    assert_fp32_within_rule(*(inp.grad for inp in xs), "grad of pixel_values")
    assert_grads_within_rule(ours, hf, hf64)


def test_backbone_gradients_match_transformers():
    hf, ours = twins("DINOv3ConvNextBackbone", out_features=["stage2", "stage4"], **SMALL)
    hf64 = float64_twin(hf)
    x = torch.randn(2, 3, 37, 45)
    # a random weighting of the maps, not their sum of squares: that gave gradients ~400, where the rule's atol is
    # under one fp32 ulp and F and E, equally accurate, passed or failed it by chance
    weights = [torch.randn_like(m) for m in hf(x).feature_maps]
    for model in (ours, hf, hf64):
        maps = model(x.double() if model is hf64 else x).feature_maps
        sum((m * w).sum() for m, w in zip(maps, weights)).backward()
    theirs, exact = dict(hf.named_parameters()), dict(hf64.named_parameters())
    for pname, param in ours.named_parameters():
        if theirs[pname].grad is None:
            assert param.grad is None or not param.grad.any(), pname
            continue
        assert_fp32_within_rule(param.grad, theirs[pname].grad, exact[pname].grad, f"grad of {pname}")


def test_drop_path_rates_and_seeded_training_match_transformers():
    hf, ours = twins(drop_path_rate=0.5, **SMALL)
    hf.train(), ours.train()
    rates = [getattr(m.drop_path, "drop_prob", 0.0) for m in ours.modules()
             if isinstance(m, dinov3_convnext.DINOv3ConvNextLayer)]
    assert rates == np.linspace(0, 0.5, BLOCKS).tolist()  # exactly: float64 as transformers computes them
    assert dinov3_convnext.drop_path_rates(0.3, 7) == np.linspace(0, 0.3, 7).tolist()
    assert dinov3_convnext.drop_path_rates(0.3, 1) == np.linspace(0, 0.3, 1).tolist()
    hf64 = float64_twin(hf)
    x = torch.randn(6, 3, 32, 36)
    torch.manual_seed(123)
    expected = hf(x).last_hidden_state
    torch.manual_seed(123)
    got = ours(x).last_hidden_state
    torch.manual_seed(123)
    with random_draws_as_in_float32():
        reference = hf64(x.double()).last_hidden_state
    assert_fp32_within_rule(got, expected, reference, "training output with drop path")
    torch.manual_seed(124)
    assert not torch.allclose(ours(x).last_hidden_state, got), "drop path had no effect in training mode"


def test_gradient_checkpointing_gives_the_same_gradients():
    _, ours = twins(**SMALL)
    ours.train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enabled in (False, True):
        ours.zero_grad()
        ours._set_gradient_checkpointing(enabled)
        ours(x).last_hidden_state.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    assert ours.is_gradient_checkpointing
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ fused kernels


def test_fused_kernels_match_transformers_within_the_rule(monkeypatch):
    """Forced to 'triton' (the interpreter on CPU) every block runs both kernels; outputs against transformers in
    fp64 under the tolerance rule (fp32 fused vs fp64, bounded by fp32 eager's own error)."""
    from fastconvnext import kernels

    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp"):
        fused_op = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _op=op, _f=fused_op: calls.append(_op) or _f(*a), raising=False)
    hf, ours = twins(**SMALL)
    x = torch.randn(2, 3, 37, 34)
    with torch.no_grad():
        reference = float64_twin(hf)(x.double()).last_hidden_state
        eager = hf(x).last_hidden_state
        with fastconvnext.use_backend("triton"):
            fused = ours(x).last_hidden_state
    assert calls.count("dwconv_layernorm") == calls.count("convnext_mlp") == BLOCKS
    assert_fp32_within_rule(fused, eager, reference, "last_hidden_state through the kernels")


# ------------------------------------------------------------------------------------------ state dicts, config


@pytest.mark.parametrize("kind", ["DINOv3ConvNextModel", "DINOv3ConvNextBackbone"])
def test_state_dict_is_strict_both_ways(kind):
    hf, ours = twins(kind, **SMALL)
    assert list(ours.state_dict()) == list(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    randomize_(ours, generator_seed=3)
    hf.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    assert [n for n, _ in ours.named_modules()][:8] == [n for n, _ in hf.named_modules()][:8]


def test_config_json_matches_transformers():
    fields = dict(SMALL, out_features=["stage1", "stage3"], drop_path_rate=0.1, hidden_act="gelu_new")
    ours = fastconvnext.DINOv3ConvNextConfig(**fields).to_dict()
    theirs = transformers.DINOv3ConvNextConfig(**fields).to_dict()
    theirs.pop("transformers_version")
    theirs["id2label"] = {str(k): v for k, v in theirs["id2label"].items()}
    assert ours == theirs
    assert "patch_size" not in ours and "num_stages" not in ours
    back = fastconvnext.DINOv3ConvNextConfig.from_dict(transformers.DINOv3ConvNextConfig(**fields).to_dict())
    assert back.to_dict() == ours and back.num_stages == 4 and back.model_type == "dinov3_convnext"
    assert transformers.DINOv3ConvNextConfig.from_dict(ours).to_dict()["out_indices"] == [1, 3]


def test_config_refuses_what_the_architecture_cannot_be():
    with pytest.raises(ValueError, match="patch_size"):
        fastconvnext.DINOv3ConvNextConfig(patch_size=2)
    with pytest.raises(ValueError, match="num_stages"):
        fastconvnext.DINOv3ConvNextConfig(num_stages=3)
    with pytest.raises(ValueError, match="depths"):
        fastconvnext.DINOv3ConvNextConfig(hidden_sizes=[8, 16], depths=[1])
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.DINOv3ConvNextConfig.from_dict({"model_type": "convnext"})
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.ConvNextConfig.from_dict(fastconvnext.DINOv3ConvNextConfig().to_dict())
    with pytest.raises(TypeError, match="DINOv3ConvNextConfig"):
        fastconvnext.DINOv3ConvNextModel(fastconvnext.ConvNextConfig())
    assert fastconvnext.DINOv3ConvNextConfig().layer_norm_eps == 1e-6


# ------------------------------------------------------------------------------------------ from/save_pretrained


@pytest.mark.parametrize("kind", ["DINOv3ConvNextModel", "DINOv3ConvNextBackbone"])
def test_from_pretrained_of_a_transformers_directory(kind, tmp_path):
    hf, _ = twins(kind, out_features=["stage2", "stage4"], **SMALL)
    hf.save_pretrained(tmp_path)
    ours = getattr(fastconvnext, kind).from_pretrained(tmp_path)
    assert type(ours).__name__ == kind and not ours.training
    chosen = fastconvnext.DINOv3ConvNextPreTrainedModel.from_pretrained(tmp_path)
    assert type(chosen).__name__ == kind
    x = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    for key in expected.keys():
        if isinstance(expected[key], tuple):
            assert_sequences_within_rule(got[key], expected[key], reference[key], key)
        else:
            assert_fp32_within_rule(got[key], expected[key], reference[key], key)
    assert ours.config.out_features == ["stage2", "stage4"]


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_pretrained_is_read_by_transformers_without_missing_keys(safe_serialization, tmp_path):
    hf, ours = twins(**SMALL)
    ours.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dinov3_convnext" and config["architectures"] == ["DINOv3ConvNextModel"]
    theirs, info = transformers.DINOv3ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.save_pretrained(tmp_path / "hf")
    if safe_serialization:  # the same tensor names on disk as transformers writes
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as a, safe_open(tmp_path / "hf/model.safetensors", "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        # both are transformers' model with the same weights
        torch.testing.assert_close(theirs.eval()(x).last_hidden_state, hf(x).last_hidden_state, rtol=0, atol=0)
    again = fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_model_from_a_backbone_directory_and_back(tmp_path):
    hf_backbone, _ = twins("DINOv3ConvNextBackbone", **SMALL)
    hf_backbone.save_pretrained(tmp_path / "backbone")
    with pytest.warns(UserWarning, match="newly initialized"):
        model, info = fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "backbone", output_loading_info=True)
    assert info["missing_keys"] == {"layer_norm.weight", "layer_norm.bias"}
    assert torch.equal(model.layer_norm.weight, torch.ones(SMALL["hidden_sizes"][-1]))
    hf_model, _ = twins(**SMALL)
    hf_model.save_pretrained(tmp_path / "model")
    backbone, info = fastconvnext.DINOv3ConvNextBackbone.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert info["unexpected_keys"] == {"layer_norm.weight", "layer_norm.bias"}


def test_wrong_family_and_mismatches_are_refused(tmp_path):
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.ConvNextModel.from_pretrained(tmp_path / "dino")
    transformers.ConvNextModel(transformers.ConvNextConfig(**SMALL)).save_pretrained(tmp_path / "v1")
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "v1")
    with pytest.raises(ValueError, match="does not match"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "dino", hidden_sizes=[8, 12, 20, 28])
    with pytest.raises(ValueError, match="depths"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "dino", depths=[1, 3, 1, 1])


def test_a_tiny_folder_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(depths=[500, 500, 500, 500], hidden_sizes=[256, 256, 256, 256])
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="blocks absent"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5
    config.update(hidden_sizes=[10**6] * 4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_sizes"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)


def test_shards_and_links_outside_the_folder_are_refused(tmp_path):
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path / "model")
    outside = tmp_path / "outside.safetensors"
    (tmp_path / "model/model.safetensors").rename(outside)
    index = {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in ["layer_norm.weight"]}}
    (tmp_path / "model/model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, OSError), match="outside"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "model")
    (tmp_path / "model/model.safetensors.index.json").unlink()
    (tmp_path / "model/model.safetensors").symlink_to(outside)
    with pytest.raises((ValueError, OSError)):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path / "model")


# ------------------------------------------------------------------------------------------ patch_transformers


def test_patch_transformers_builds_fused_dinov3_blocks_with_the_same_outputs():
    hf, _ = twins(**SMALL)
    original = transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayer
    with fastconvnext.patch_transformers():
        patched = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**SMALL))
    assert transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayer is original
    layers = [m for m in patched.modules() if type(m).__name__ == "DINOv3ConvNextLayer"]
    assert len(layers) == BLOCKS and {type(m) for m in layers} == {patch.FusedDINOv3ConvNextLayer}
    patched.load_state_dict(hf.state_dict(), strict=True)
    patched.eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        got, expected, reference = three_runs(patched, hf, x, output_hidden_states=True)
    assert_fp32_within_rule(got.last_hidden_state, expected.last_hidden_state, reference.last_hidden_state,
                            "patched last_hidden_state")
    assert_each_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "patched hidden_states")
    patch.unpatch_model(patched)
    assert {type(m) for m in patched.modules() if type(m).__name__ == "DINOv3ConvNextLayer"} == {original}
    patch.patch_model(patched)
    assert {type(m) for m in patched.modules() if type(m).__name__ == "DINOv3ConvNextLayer"} == {
        patch.FusedDINOv3ConvNextLayer}


def test_patched_dinov3_calls_the_backend_ops_and_trains_like_the_original(monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    hf, _ = twins(drop_path_rate=0.4, **SMALL)
    patched = patch.patch_model(copy.deepcopy(hf))
    hf.train(), patched.train()
    exact = float64_twin(hf)
    x = torch.randn(4, 3, 32, 36)
    outs = []
    for model in (patched, hf, exact):
        torch.manual_seed(9)
        with random_draws_as_in_float32():  # changes only the float64 twin's draws
            outs.append(model(x.double() if model is exact else x).last_hidden_state)
        outs[-1].square().mean().backward()
    assert calls.count("dwconv_layernorm") == calls.count("convnext_mlp") == BLOCKS
    assert_fp32_within_rule(*outs, "patched training output")
    assert_grads_within_rule(patched, hf, exact)


# ------------------------------------------------------------------------------------------ hooks, adapters, fallback


def _count_backend_calls(monkeypatch):
    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp"):
        original = getattr(backend, op)
        monkeypatch.setattr(backend, op, lambda *a, _f=original, _op=op: calls.append(_op) or _f(*a))
    return calls


@pytest.mark.parametrize("implementation", ["fastconvnext", "patched"])
def test_a_forward_hook_fires_and_can_change_the_output(implementation, monkeypatch):
    hf, ours = twins(**SMALL)
    if implementation == "patched":
        ours = patch.patch_model(copy.deepcopy(hf))
    hf64 = float64_twin(hf)
    seen = []

    def halve(module, inputs, output):
        return output * 0.5

    def hook(module, inputs, output):
        seen.append(output.shape)
        return halve(module, inputs, output)

    for model, fn in ((hf, hook), (ours, hook), (hf64, halve)):
        model.model.stages[1].layers[1].pointwise_conv1.register_forward_hook(fn)
        model.model.stages[2].layers[0].layer_norm.register_forward_hook(fn)
    calls = _count_backend_calls(monkeypatch)
    x = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        got, expected = ours(x).last_hidden_state, hf(x).last_hidden_state
        reference = hf64(x.double()).last_hidden_state
    assert len(seen) == 4 and seen[0] == seen[2]
    assert_fp32_within_rule(got, expected, reference, "output with hooks")
    # the hooked halves call their sub-modules; the others keep their op
    assert calls.count("convnext_mlp") == BLOCKS - 1 and calls.count("dwconv_layernorm") == BLOCKS - 1


def test_a_global_module_hook_sends_every_block_through_its_sub_modules(monkeypatch):
    hf, ours = twins(**SMALL)
    calls = _count_backend_calls(monkeypatch)
    names = []
    handle = torch_module.register_module_forward_hook(lambda m, i, o: names.append(type(m).__name__))
    try:
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            expected, got = hf(x).last_hidden_state, ours(x).last_hidden_state
    finally:
        handle.remove()
    with torch.no_grad():
        reference = float64_twin(hf)(x.double()).last_hidden_state
    assert calls == []
    assert names.count("Linear") == 2 * 2 * BLOCKS  # both models' pointwise convs
    assert_fp32_within_rule(got, expected, reference, "output under a global hook")


def test_lora_on_the_pointwise_convs_matches_transformers():
    hf, ours = twins(**SMALL)
    config = dict(r=4, lora_alpha=8, target_modules=["pointwise_conv1", "pointwise_conv2"])
    theirs_lora = peft.get_peft_model(hf, peft.LoraConfig(**config))
    ours_lora = peft.get_peft_model(ours, peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        named = dict(theirs_lora.named_parameters())
        for name, param in ours_lora.named_parameters():
            if ".lora_" in name:
                value = 0.3 * torch.randn(param.shape, generator=gen)
                param.copy_(value), named[name].copy_(value)
    exact_lora = float64_twin(theirs_lora)  # the adapter attached, its weights set
    x = torch.randn(2, 3, 32, 36)
    with torch.no_grad():
        expected, got = theirs_lora(pixel_values=x).last_hidden_state, ours_lora(pixel_values=x).last_hidden_state
        reference = exact_lora(pixel_values=x.double()).last_hidden_state
        plain = ours_lora.get_base_model()
    assert_fp32_within_rule(got, expected, reference, "output with LoRA")
    with ours_lora.disable_adapter(), torch.no_grad():
        assert (plain(x).last_hidden_state - got).abs().max() > 1e-2, "the adapter must change the output"


@pytest.mark.parametrize("hidden_act", ["prelu", "silu", "gelu_python"])
def test_activations_without_a_fused_form_or_with_parameters_match(hidden_act):
    """prelu has a parameter (the MLP half runs eagerly, calling its modules); the others are fused by name."""
    hf, ours = twins(hidden_act=hidden_act, **SMALL)
    x = torch.randn(2, 3, 36, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    assert_fp32_within_rule(got.last_hidden_state, expected.last_hidden_state, reference.last_hidden_state,
                            f"{hidden_act} output")
    if hidden_act == "prelu":
        assert "model.stages.0.layers.0.activation_fn.weight" in ours.state_dict()


def test_eager_backend_matches_transformers(monkeypatch):
    hf, ours = twins(**SMALL)
    x = torch.randn(2, 3, 35, 41)
    with torch.no_grad(), fastconvnext.use_backend("eager"):
        got = ours(x).last_hidden_state
    with torch.no_grad():
        expected, reference = hf(x).last_hidden_state, float64_twin(hf)(x.double()).last_hidden_state
    assert_fp32_within_rule(got, expected, reference, "eager backend output")


def test_a_pickle_that_runs_code_in_a_dinov3_folder_is_refused_and_not_executed(tmp_path):
    import os
    import shlex

    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    torch.save({**hf.state_dict(), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)
    assert not marker.exists()


def test_from_pretrained_with_config_and_state_dict_takes_either_naming():
    hf, ours = twins(**SMALL)
    config = fastconvnext.DINOv3ConvNextConfig(**SMALL)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, reference = hf(x).last_hidden_state, float64_twin(hf)(x.double()).last_hidden_state
    for state_dict in (hf.state_dict(), dinov3_convnext.saved_state_dict(ours)):
        model = fastconvnext.DINOv3ConvNextModel.from_pretrained(None, config=config, state_dict=state_dict)
        with torch.no_grad():
            got = model(x).last_hidden_state
        assert_fp32_within_rule(got, expected, reference, "loaded from a state dict")
    both = {**hf.state_dict(), **dinov3_convnext.saved_state_dict(ours)}
    with pytest.raises(ValueError, match="both with and without"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(None, config=config, state_dict=both)
    with pytest.raises(ValueError, match="needs config"):  # a single file without config.json
        dinov3_convnext.load_checked(None, "a file", hf.state_dict(), None, None, {}, True, False, "auto",
                                     torch.device("cpu"))


@pytest.mark.parametrize("kind", ["DINOv3ConvNextModel", "DINOv3ConvNextBackbone"])
def test_from_transformers_gives_the_dinov3_twin(kind):
    config = dict(SMALL, out_features=["stem", "stage2", "stage4"]) if kind == "DINOv3ConvNextBackbone" else SMALL
    hf, _ = twins(kind, **config)
    ours = fastconvnext.from_transformers(hf.train())
    assert type(ours) is getattr(fastconvnext, kind) and ours.training
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        got, expected, reference = three_runs(ours.eval(), hf.eval(), x)
    if kind == "DINOv3ConvNextModel":
        assert_fp32_within_rule(got.last_hidden_state, expected.last_hidden_state, reference.last_hidden_state,
                                "last_hidden_state")
    else:
        assert_sequences_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, "feature_maps")


def test_a_folder_without_config_json_is_a_clear_error_naming_the_config_class(tmp_path):
    """transformers' DINOv3ConvNextModel.from_pretrained builds its DEFAULT config there (hidden_sizes 96..768) and
    then fails on every shape of a smaller model, or loads a default-sized one; fastconvnext never guesses the
    architecture of a folder (as for ConvNeXt) and DINOv3's cannot be read off its tensors: it asks for config=."""
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config.json; pass config=DINOv3ConvNextConfig\(...\) to say "
                                                r"which architecture the weights belong to$"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)
    model = fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path, config=fastconvnext.DINOv3ConvNextConfig(**SMALL))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(model, hf, x)
    assert_fp32_within_rule(got.last_hidden_state, expected.last_hidden_state, reference.last_hidden_state,
                            "loaded with config=")
