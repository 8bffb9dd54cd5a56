"""ConvNeXt V2 against transformers' ConvNextV2* (the oracle, random weights, small configs): outputs, hidden
states, logits, losses, gradients, backbone maps, drop path, GRN (all-zero hidden images included), state dicts
both ways, config.json, from_pretrained / save_pretrained, hooks. A standalone model runs the dwconv+LayerNorm half
through V1's op and the MLP with GRN eagerly; patched transformers blocks run both halves through the backend's ops
(the MLP with GRN has its fused kernel, kernels/convnext_v2_mlp_kernel.py). Every fp32 comparison with transformers
follows CONTRIBUTING's rule, with transformers in float64 as R and in fp32 as E."""
import copy
import json
import time

import pytest
import torch
import transformers
from transformers.models.convnextv2 import modeling_convnextv2

import fastconvnext
from fastconvnext import backend, convnext_v2
from helpers import randomize_
from tolerance import as_float64, assert_classifier_step_within_rule, assert_each_within_rule, \
    assert_fp32_within_rule, assert_grads_within_rule, assert_sequences_within_rule, float64_twin, \
    random_draws_as_in_float32, three_runs

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])
BLOCKS = sum(SMALL["depths"])

CONFIGS = {
    "small-nonsquare": (dict(SMALL), (2, 3, 45, 67)),
    "three-stages-patch2-gray": (dict(num_stages=3, hidden_sizes=[12, 20, 36], depths=[2, 1, 1], patch_size=2,
                                      num_channels=1), (3, 1, 19, 33)),
    "gelu_new-eps1e-6": (dict(SMALL, hidden_act="gelu_new", layer_norm_eps=1e-6), (1, 3, 70, 33)),
    "relu-two-stages": (dict(num_stages=2, hidden_sizes=[10, 14], depths=[1, 3], hidden_act="relu"), (2, 3, 9, 13)),
}


def twins(kind="ConvNextV2Model", **config):
    hf = getattr(transformers, kind)(transformers.ConvNextV2Config(**config))
    randomize_(hf)
    ours = getattr(fastconvnext, kind)(fastconvnext.ConvNextV2Config(**config))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), ours.eval()


def _count_backend_calls(monkeypatch):
    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp", "convnext_v2_mlp"):
        original = getattr(backend, op)
        monkeypatch.setattr(backend, op, lambda *a, _f=original, _op=op: calls.append(_op) or _f(*a))
    return calls


# ------------------------------------------------------------------------------------------ outputs, gradients


@pytest.mark.parametrize("name", CONFIGS)
def test_model_outputs_and_hidden_states_match_transformers(name, monkeypatch):
    config, shape = CONFIGS[name]
    hf, ours = twins(**config)
    calls = _count_backend_calls(monkeypatch)
    x = torch.randn(shape)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    for field in ("last_hidden_state", "pooler_output"):
        assert_fp32_within_rule(got[field], expected[field], reference[field], field)
    assert len(got.hidden_states) == len(config["depths"]) + 1
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")
    # the first half of every block through V1's op, the MLP (GRN) eagerly
    assert calls.count("dwconv_layernorm") == sum(config["depths"]) and calls.count("convnext_mlp") == 0


@pytest.mark.parametrize("name", ["small-nonsquare", "three-stages-patch2-gray"])
def test_classifier_logits_loss_and_gradients_match_transformers(name):
    config, shape = CONFIGS[name]
    hf, ours = twins("ConvNextV2ForImageClassification", num_labels=5, **config)
    x = torch.randn(shape)
    assert_classifier_step_within_rule(ours, hf, x, torch.randint(0, 5, (shape[0],)))
    grn_grads = [p.grad for n, p in ours.named_parameters() if ".grn." in n]
    assert grn_grads and all(g.abs().max() > 0 for g in grn_grads), "GRN must receive gradients"


def test_backbone_feature_maps_match_transformers():
    hf, ours = twins("ConvNextV2Backbone", out_features=["stem", "stage2", "stage4"], **SMALL)
    x = torch.randn(2, 3, 41, 39)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    assert len(got.feature_maps) == 3
    assert_sequences_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, "feature_maps")
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")
    assert ours.channels == hf.channels
    with torch.no_grad():
        assert ours(x).hidden_states is None


def test_drop_path_in_training_matches_transformers_under_the_same_seed():
    hf, ours = twins("ConvNextV2ForImageClassification", num_labels=3, drop_path_rate=0.5, **SMALL)
    hf.train(), ours.train()
    hf64 = float64_twin(hf)
    x = torch.randn(6, 3, 32, 36)
    torch.manual_seed(123)
    expected = hf(x).logits
    torch.manual_seed(123)
    got = ours(x).logits
    torch.manual_seed(123)
    with random_draws_as_in_float32():
        reference = hf64(x.double()).logits
    assert_fp32_within_rule(got, expected, reference, "logits with drop path")
    torch.manual_seed(124)
    assert not torch.allclose(ours(x).logits, got), "drop path had no effect in training mode"


# ------------------------------------------------------------------------------------------ GRN


def test_grn_matches_transformers_on_zero_tiny_and_ordinary_images():
    torch.manual_seed(3)
    ours, theirs = convnext_v2.ConvNextV2GRN(12), modeling_convnextv2.ConvNextV2GRN(12)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    exact = float64_twin(theirs)
    h = torch.randn(4, 5, 7, 12)
    h[1] = 0.0  # an all-zero hidden image: N = 0 / (0 + 1e-6) = 0, so GRN(h) = bias
    h[2] = 1e-9 * torch.randn(5, 7, 12)  # norms far below 1e-6: the guard decides N here
    h[3, :, :, :6] = 0.0  # some channels all zero
    h.requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    h64 = h.detach().double().requires_grad_(True)
    got, expected, reference = ours(h), theirs(h2), exact(h64)
    assert_fp32_within_rule(got, expected, reference, "GRN output")
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], ours.bias[0].expand(5, 7, 12))
    # image 2's norms (~1e-8) are far below the 1e-6 guard, so its weight * (h * N) term is ~100x smaller than
    # without the guard; the term is below fp32 resolution next to the bias, so it is compared with bias 0, and in
    # units of its own size (~1e-11: an absolute atol of 1e-5 would pass anything)
    tiny = h[2:3].detach()
    terms = []
    for module in (ours, theirs, exact):
        unbiased = copy.deepcopy(module)
        with torch.no_grad():
            unbiased.bias.zero_()
            terms.append(unbiased(as_float64(tiny) if module is exact else tiny) - tiny)
    scale = terms[2].abs().max()
    assert_fp32_within_rule(*(term / scale for term in terms), "GRN's guarded term / its size")
    norms = torch.linalg.vector_norm(tiny, dim=(1, 2), keepdim=True)
    unguarded = ours.weight.detach() * (tiny * norms / norms.mean(dim=-1, keepdim=True))
    assert terms[0].abs().max() < 0.1 * unguarded.abs().max()
    for out in (got, expected, reference):
        out.square().sum().backward()
    assert torch.isfinite(h.grad).all()
    assert_fp32_within_rule(h.grad, h2.grad, h64.grad, "GRN input gradient")


def test_a_block_whose_hidden_image_is_all_zero_matches_transformers():
    """pwconv1 zeroed in one block (relu): every hidden image entering that block's GRN is all zero."""
    hf, ours = twins("ConvNextV2ForImageClassification", num_labels=3, hidden_act="relu", **SMALL)
    for model in (hf, ours):
        block = getattr(model, "convnextv2").encoder.stages[1].layers[0]
        with torch.no_grad():
            block.pwconv1.weight.zero_(), block.pwconv1.bias.zero_()
    hf64 = float64_twin(hf)
    x = torch.randn(2, 3, 32, 40)
    labels = torch.tensor([0, 2])
    got, expected, reference = ours(x, labels=labels), hf(x, labels=labels), hf64(x.double(), labels=labels)
    assert torch.isfinite(got.logits).all()
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "logits")
    for out in (got, expected, reference):
        out.loss.backward()
    for pname, param in ours.named_parameters():
        assert torch.isfinite(param.grad).all(), pname
    assert_grads_within_rule(ours, hf, hf64)


# ------------------------------------------------------------------------------------------ the fused half, hooks


def test_first_half_through_the_kernel_within_the_rule(monkeypatch):
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
    assert calls.count("dwconv_layernorm") == BLOCKS and calls.count("convnext_mlp") == 0
    assert_fp32_within_rule(fused, eager, reference, "last_hidden_state, first halves through the kernel")


def test_hooks_fire_and_a_hooked_first_half_calls_its_modules(monkeypatch):
    hf, ours = twins(**SMALL)
    hf64 = float64_twin(hf)
    seen = []

    def halve(module, inputs, output):
        return output * 0.5

    def hook(module, inputs, output):
        seen.append(type(module).__name__)
        return halve(module, inputs, output)

    for model, fn in ((hf, hook), (ours, hook), (hf64, halve)):
        model.encoder.stages[1].layers[1].grn.register_forward_hook(fn)
        model.encoder.stages[2].layers[0].dwconv.register_forward_hook(fn)
    calls = _count_backend_calls(monkeypatch)
    x = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        got, expected = ours(x).last_hidden_state, hf(x).last_hidden_state
        reference = hf64(x.double()).last_hidden_state
    assert len(seen) == 4
    assert_fp32_within_rule(got, expected, reference, "output with hooks")
    assert calls.count("dwconv_layernorm") == BLOCKS - 1


# ------------------------------------------------------------------------------------------ state dicts, config, files


@pytest.mark.parametrize("kind", ["ConvNextV2Model", "ConvNextV2ForImageClassification", "ConvNextV2Backbone"])
def test_state_dict_is_strict_both_ways(kind):
    hf, ours = twins(kind, **SMALL)
    assert list(ours.state_dict()) == list(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    randomize_(ours, generator_seed=3)
    hf.load_state_dict(ours.state_dict(), strict=True)


def test_config_json_matches_transformers():
    fields = dict(SMALL, out_features=["stage1", "stage3"], drop_path_rate=0.1, num_labels=4)
    ours = fastconvnext.ConvNextV2Config(**fields).to_dict()
    theirs = transformers.ConvNextV2Config(**fields).to_dict()
    theirs.pop("transformers_version")
    theirs["id2label"] = {str(k): v for k, v in theirs["id2label"].items()}
    assert ours == theirs and "layer_scale_init_value" not in ours
    assert fastconvnext.ConvNextV2Config.from_dict(theirs).to_dict() == ours
    with pytest.raises(ValueError, match="layer scale"):
        fastconvnext.ConvNextV2Config(layer_scale_init_value=1e-6)
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.ConvNextV2Config.from_dict(fastconvnext.ConvNextConfig().to_dict())
    with pytest.raises(TypeError, match="ConvNextV2Config"):
        fastconvnext.ConvNextV2Model(fastconvnext.ConvNextConfig(**SMALL))


@pytest.mark.parametrize("kind", ["ConvNextV2Model", "ConvNextV2ForImageClassification", "ConvNextV2Backbone"])
def test_from_pretrained_of_a_transformers_directory_and_save_back(kind, tmp_path):
    hf, _ = twins(kind, num_labels=3, out_features=["stage2", "stage4"], **SMALL)
    hf.save_pretrained(tmp_path / "hf")
    ours = getattr(fastconvnext, kind).from_pretrained(tmp_path / "hf")
    assert type(fastconvnext.ConvNextV2PreTrainedModel.from_pretrained(tmp_path / "hf")).__name__ == kind
    x = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    for key in expected.keys():
        if isinstance(expected[key], tuple):
            assert_sequences_within_rule(got[key], expected[key], reference[key], key)
        else:
            assert_fp32_within_rule(got[key], expected[key], reference[key], key)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours/config.json").read_text())["model_type"] == "convnextv2"
    theirs, info = getattr(transformers, kind).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_wrong_family_and_a_tiny_folder_declaring_a_huge_model_are_refused(tmp_path):
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.ConvNextModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        fastconvnext.DINOv3ConvNextModel.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(depths=[500, 500, 500, 500], hidden_sizes=[256, 256, 256, 256])
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="blocks absent"):
        fastconvnext.ConvNextV2Model.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------ patch_transformers, twins


@pytest.fixture
def unpatched():
    from fastconvnext import patch

    patch.unpatch_transformers()
    yield patch
    patch.unpatch_transformers()


def test_patch_transformers_runs_v2_blocks_on_the_backend_ops(unpatched, monkeypatch):
    patch = unpatched
    hf, _ = twins("ConvNextV2ForImageClassification", num_labels=4, **SMALL)
    with fastconvnext.patch_transformers():
        assert modeling_convnextv2.ConvNextV2Layer is patch.FusedConvNextV2Layer
        patched = transformers.ConvNextV2ForImageClassification(hf.config)
    assert modeling_convnextv2.ConvNextV2Layer is not patch.FusedConvNextV2Layer  # restored on exit
    patched.load_state_dict(hf.state_dict(), strict=True)
    patched.eval()
    layers = [m for m in patched.modules() if isinstance(m, modeling_convnextv2.ConvNextV2Layer)]
    assert len(layers) == BLOCKS and all(type(m) is patch.FusedConvNextV2Layer for m in layers)
    hf64 = float64_twin(hf)
    calls = _count_backend_calls(monkeypatch)
    x = torch.randn(2, 3, 45, 67)
    xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True), x.double().requires_grad_(True)]
    labels = torch.tensor([1, 3])
    got, expected, reference = (model(inp, labels=labels, output_hidden_states=True)
                                for model, inp in zip((patched, hf, hf64), xs))
    assert calls.count("dwconv_layernorm") == calls.count("convnext_v2_mlp") == BLOCKS
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "patched logits")
    assert_each_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "patched hidden_states")
    for out in (got, expected, reference):
        out.loss.backward()
    assert_fp32_within_rule(*(inp.grad for inp in xs), "grad pixel_values")
    assert_grads_within_rule(patched, hf, hf64, "grad")
    patch.unpatch_model(patched)
    assert all(type(m) is modeling_convnextv2.ConvNextV2Layer for m in layers)
    patch.patch_model(patched)
    assert all(type(m) is patch.FusedConvNextV2Layer for m in layers)


def test_a_hooked_patched_v2_block_calls_its_modules(unpatched, monkeypatch):
    hf, _ = twins(**SMALL)
    patched = unpatched.patch_model(copy.deepcopy(hf))
    seen = []
    patched.encoder.stages[1].layers[0].layernorm.register_forward_hook(lambda *a: seen.append("layernorm"))
    calls = _count_backend_calls(monkeypatch)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(patched, hf, x)
    assert_fp32_within_rule(got.pooler_output, expected.pooler_output, reference.pooler_output, "hooked patched model")
    assert seen == ["layernorm"] and calls.count("dwconv_layernorm") == BLOCKS - 1
    assert calls.count("convnext_v2_mlp") == BLOCKS


def test_a_patched_v2_training_step_with_drop_path_matches_transformers(unpatched, monkeypatch):
    """Same weights, same seed, drop path 0.4 in training: same loss, gradients and dropped samples."""
    original, _ = twins("ConvNextV2ForImageClassification", num_labels=3, drop_path_rate=0.4, **SMALL)
    patched = unpatched.patch_model(copy.deepcopy(original)).train()
    original.train()
    exact = float64_twin(original)
    calls = _count_backend_calls(monkeypatch)
    x, labels = torch.randn(4, 3, 37, 45), torch.tensor([0, 2, 1, 2])
    losses = []
    for model in (patched, original, exact):
        torch.manual_seed(7)
        with random_draws_as_in_float32():  # changes only the float64 twin's draws
            losses.append(model(x.double() if model is exact else x, labels=labels).loss)
        losses[-1].backward()
    assert calls.count("convnext_v2_mlp") == BLOCKS
    assert_fp32_within_rule(*losses, "loss")
    assert_grads_within_rule(patched, original, exact, "grad")


@pytest.mark.parametrize("kind", ["ConvNextV2Model", "ConvNextV2ForImageClassification", "ConvNextV2Backbone"])
def test_from_transformers_gives_the_v2_twin(kind):
    config = dict(SMALL, out_features=["stage1", "stage3"]) if kind == "ConvNextV2Backbone" else dict(SMALL)
    hf, _ = twins(kind, **config)
    hf.train()
    ours = fastconvnext.from_transformers(hf)
    assert type(ours) is getattr(fastconvnext, kind) and ours.training
    assert ours.config.to_dict() == fastconvnext.ConvNextV2Config.from_dict(hf.config.to_dict()).to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(ours.eval(), hf.eval(), x)
    for field in ("logits", "pooler_output"):
        if field in expected:
            assert_fp32_within_rule(got[field], expected[field], reference[field], field)
    if "feature_maps" in expected:
        assert_sequences_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, "feature_maps")


def test_a_v2_folder_without_config_json_names_the_v2_config(tmp_path):
    hf, _ = twins(**SMALL)
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config.json; pass config=ConvNextV2Config\(...\)"):
        fastconvnext.ConvNextV2Model.from_pretrained(tmp_path)
    model = fastconvnext.ConvNextV2Model.from_pretrained(tmp_path, config=fastconvnext.ConvNextV2Config(**SMALL))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(model, hf, x)
    assert_fp32_within_rule(got.pooler_output, expected.pooler_output, reference.pooler_output, "loaded with config=")
