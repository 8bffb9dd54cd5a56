"""Code written against transformers' ConvNeXt classes, run on fastconvnext's: transformers 5.23 is the oracle.

Config flags and fields, activations, the configs transformers accepts, backbone attributes, export and
vmap; and the sensible answer where transformers itself breaks (config.return_dict=False in the
classifier, drop_path_rate=1 in training).
"""
import json

import pytest
import torch
import transformers
from transformers.activations import ACT2CLS, ACT2FN

import fastconvnext
from fastconvnext.configuration import HIDDEN_ACTS, PARAMETRIC_ACTS
from fastconvnext.kernels.reference import ACTIVATIONS
from helpers import SMALL, twin_models
from tolerance import assert_each_within_rule, assert_fp32_within_rule, assert_grads_within_rule_of_their_dtypes, \
    float64_twin, float64_twin_keeping_low_precision, random_draws_as_in_float32, three_runs

ATOL = 1e-5
TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 1])


def assert_close(ours, theirs, what, atol=ATOL):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def _has_state(module):
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# ---- hidden_act -------------------------------------------------------------------------------------


def test_every_parameter_free_act2fn_entry_is_a_hidden_act():
    parameter_free = {name for name in ACT2CLS if not _has_state(ACT2FN[name])}
    assert parameter_free == set(HIDDEN_ACTS)
    assert set(ACT2CLS) - parameter_free == set(PARAMETRIC_ACTS)


@pytest.mark.parametrize("hidden_act", sorted(HIDDEN_ACTS))
def test_activation_equals_transformers_act2fn(hidden_act):
    x = torch.linspace(-30.0, 30.0, 4001, dtype=torch.float64)
    theirs = ACT2FN[hidden_act].double()(x)
    ours = ACTIVATIONS[HIDDEN_ACTS[hidden_act]](x)
    assert_close(ours, theirs, hidden_act, atol=1e-12)


# ---- configs transformers accepts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [dict(SMALL, depths=[1, 0, 2, 0]), dict(SMALL, layer_norm_eps=0.0), dict(SMALL, drop_path_rate=1.0)],
    ids=["depths-with-0", "eps-0", "drop-path-1"],
)
def test_configs_transformers_accepts_build_and_match_in_eval(config):
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, **config)
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "logits")
    assert_each_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")


def test_drop_path_rate_1_drops_the_last_block_in_training():
    """transformers divides by keep_prob = 0 there (NaN); a block dropped with probability 1 is skipped."""
    hf, ours = twin_models("ConvNextModel", hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 2], drop_path_rate=1.0)
    hf.train(), ours.train()
    last_block = hf.encoder.stages[3].layers[1]
    last_block.register_forward_hook(lambda module, inputs, output: inputs[0])  # the oracle: block skipped
    hf64 = float64_twin(hf)  # the hook comes with the copy
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(7)
    expected = hf(x).last_hidden_state
    torch.manual_seed(7)
    got = ours(x).last_hidden_state
    torch.manual_seed(7)
    with random_draws_as_in_float32():
        reference = hf64(x.double()).last_hidden_state
    assert torch.isfinite(got).all()
    assert_fp32_within_rule(got, expected, reference, "last_hidden_state with drop_path_rate=1")


def test_num_labels_1_with_single_label_classification_is_refused_as_in_transformers():
    kwargs = dict(num_labels=1, problem_type="single_label_classification")
    with pytest.raises(ValueError):
        transformers.ConvNextConfig(**kwargs)
    with pytest.raises(ValueError, match="needs num_labels > 1, got num_labels=1"):
        fastconvnext.ConvNextConfig(**kwargs)


def test_single_label_loss_with_one_label_set_after_construction_is_refused():
    _, ours = twin_models("ConvNextForImageClassification", num_labels=1, **TINY)
    ours.config.problem_type = "single_label_classification"
    with pytest.raises(ValueError, match="needs num_labels > 1"):
        ours(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 0]))


# ---- generic PretrainedConfig flags ----------------------------------------------------------------

READABLE = (
    "return_dict", "output_hidden_states", "output_attentions", "dtype", "torch_dtype", "id2label", "label2id",
    "num_labels", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "architectures",
    "name_or_path", "use_return_dict", "num_hidden_layers", "model_type", "stage_names", "out_features",
    "out_indices", "hidden_sizes", "depths", "image_size",
)
NEWER_CONFIG_ATTRIBUTES = ("num_hidden_layers",)  # absent from transformers 5.17's ConvNextConfig


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(TINY),
        dict(TINY, return_dict=False, output_hidden_states=True, output_attentions=True, dtype="bfloat16"),
        dict(TINY, dtype=torch.float16, num_labels=3, problem_type="regression", architectures=["X"]),
        dict(TINY, torch_dtype="float32", id2label={0: "cat", 1: "dog"}, out_indices=[1, 3], custom_key=5),
        dict(hidden_sizes=(8, 12, 20, 24), depths=(1, 1, 1, 1), chunk_size_feed_forward=4),
    ],
)
def test_generic_flags_are_kept_and_read_as_in_transformers(kwargs, tmp_path):
    theirs = transformers.ConvNextConfig(**kwargs)
    ours = fastconvnext.ConvNextConfig(**kwargs)
    for name in READABLE + tuple(k for k in kwargs if k not in ("torch_dtype",)):
        if not hasattr(theirs, name):  # a newer transformers' attribute: ours keeps the newest behaviour
            assert name in NEWER_CONFIG_ATTRIBUTES and hasattr(ours, name), name
            continue
        if name == "label2id" and theirs.label2id is None:  # transformers leaves it unset given id2label alone
            assert ours.label2id == {label: i for i, label in theirs.id2label.items()}
            continue
        expected = getattr(theirs, name)
        if isinstance(expected, tuple):  # fastconvnext stores hidden_sizes/depths as lists (see the backbone test)
            expected = list(expected)
        assert getattr(ours, name) == expected, name
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    from_theirs = fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "theirs")
    from_ours = transformers.ConvNextConfig.from_pretrained(tmp_path / "ours")
    for name in READABLE:
        if name not in ("name_or_path", "label2id") and hasattr(theirs, name):  # transformers' from_pretrained records the path it read
            assert getattr(from_theirs, name) == getattr(ours, name), f"{name} after transformers' save"
            assert getattr(from_ours, name) == getattr(from_theirs, name), f"{name} read back by transformers"


def test_config_from_pretrained_subfolder(tmp_path):
    transformers.ConvNextConfig(**TINY, num_labels=5).save_pretrained(tmp_path / "nested" / "model")
    theirs = transformers.ConvNextConfig.from_pretrained(tmp_path / "nested", subfolder="model")
    ours = fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "nested", subfolder="model")
    assert ours.hidden_sizes == theirs.hidden_sizes and ours.num_labels == theirs.num_labels == 5
    with pytest.raises(ValueError, match="points outside"):
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "nested", subfolder="../..")


def test_config_output_hidden_states_is_honoured_by_forward():
    config = dict(TINY, output_hidden_states=True)
    for kind in ("ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"):
        hf, ours = twin_models(kind, **config)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            got, expected, reference = three_runs(ours, hf, x)
            assert ours(x, output_hidden_states=False).hidden_states is None
        assert got.hidden_states is not None and len(got.hidden_states) == len(expected.hidden_states) == 5, kind
        assert_each_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states,
                                f"{kind} hidden_states")


@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_config_return_dict_false_returns_tuples(kind):
    """transformers 5.23 crashes in the classifier here (its trunk answers with a tuple); both work here.

    The oracle is transformers with return_dict=False passed to the call, which it handles."""
    hf, ours = twin_models(kind, **TINY)
    ours.config.return_dict = False
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x, return_dict=False), ours(x)
        reference = float64_twin(hf)(x.double(), return_dict=False)
        assert not isinstance(ours(x, return_dict=True), tuple)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for i, outputs in enumerate(zip(got, expected, reference, strict=True)):
        for j, (u, v, w) in enumerate(zip(*(t if isinstance(t, tuple) else (t,) for t in outputs))):
            assert_fp32_within_rule(u, v, w, f"{kind} output[{i}][{j}]")


def test_output_attentions_is_accepted_and_yields_no_attentions():
    for kind in ("ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"):
        hf, ours = twin_models(kind, **TINY)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            expected, got = hf(x, output_attentions=True), ours(x, output_attentions=True)
        assert list(got.keys()) == list(expected.keys()), kind
        assert getattr(got, "attentions", None) is None and getattr(expected, "attentions", None) is None


def test_default_config_builds_a_backbone():
    """transformers' default ConvNextConfig() keeps tuple hidden_sizes, which its ConvNextBackbone cannot
    concatenate; fastconvnext stores lists, so the default (convnext-tiny) backbone builds."""
    with pytest.raises(TypeError):
        transformers.ConvNextBackbone(transformers.ConvNextConfig())
    backbone = fastconvnext.ConvNextBackbone(fastconvnext.ConvNextConfig())
    theirs = transformers.ConvNextBackbone(transformers.ConvNextConfig(hidden_sizes=[96, 192, 384, 768]))
    assert backbone.channels == theirs.channels == [768]
    assert sorted(backbone.state_dict()) == sorted(theirs.state_dict())
    assert json.loads(fastconvnext.ConvNextConfig(hidden_sizes=(8, 12, 20, 24)).to_json_string())["hidden_sizes"] == [
        8, 12, 20, 24
    ]


# ---- backbone ---------------------------------------------------------------------------------------

BACKBONE_ATTRIBUTES = ("stage_names", "out_features", "out_indices", "out_feature_channels", "channels", "num_features")


def assert_backbones_agree(hf, ours, x, what):
    for name in BACKBONE_ATTRIBUTES:
        assert getattr(ours, name) == getattr(hf, name), f"{what}: {name}"
        assert getattr(ours.config, name, None) == getattr(hf.config, name, None), f"{what}: config.{name}"
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    assert len(got.feature_maps) == len(expected.feature_maps), what
    assert_each_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, f"{what}: feature_maps")


def test_backbone_attributes_match_transformers():
    hf, ours = twin_models("ConvNextBackbone", **dict(SMALL, out_indices=[0, 2, -1]))
    assert_backbones_agree(hf, ours, torch.randn(2, 3, 35, 40), "built")
    assert ours.has_attentions is hf.has_attentions is False
    with torch.no_grad():
        out = ours.forward_with_filtered_kwargs(torch.randn(1, 3, 32, 32), output_attentions=True)
    assert out.attentions is None and "attentions" in type(out).__dataclass_fields__


@pytest.mark.parametrize(
    "edit",
    [
        ("config", "out_features", ["stage4"]),
        ("config", "out_indices", [1, 4]),
        ("config", "out_indices", (-1,)),
        ("model", "out_features", ["stage1", "stage2"]),
        ("model", "out_indices", [2]),
    ],
    ids=lambda edit: f"{edit[0]}.{edit[1]}={edit[2]}",
)
def test_editing_out_features_after_construction_stays_aligned(edit):
    hf, ours = twin_models("ConvNextBackbone", **dict(TINY, out_features=["stage1", "stage2", "stage4"]))
    where, name, value = edit
    for model in (hf, ours):
        setattr(model.config if where == "config" else model, name, value)
    assert_backbones_agree(hf, ours, torch.randn(1, 3, 32, 32), f"after {where}.{name} = {value}")


def test_out_features_without_a_built_layernorm_is_a_clear_error():
    hf, ours = twin_models("ConvNextBackbone", **dict(TINY, out_features=["stage2", "stage4"]))
    x = torch.randn(1, 3, 32, 32)
    hf.config.out_features = ours.config.out_features = ["stage1", "stage4"]
    with pytest.raises(KeyError):  # transformers
        hf(x)
    with pytest.raises(ValueError, match=r"asks for \['stage1'\], but this backbone was built with LayerNorms for"):
        ours(x)


@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_base_model_is_the_trunk_as_in_transformers(kind):
    hf, ours = twin_models(kind, **TINY)
    assert type(ours.base_model).__name__ == type(hf.base_model).__name__
    assert (ours.base_model is ours) == (hf.base_model is hf)
    assert sorted(ours.base_model.state_dict()) == sorted(hf.base_model.state_dict())


# ---- torch.export, pytree, torch.func --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_outputs_flatten_as_pytrees_like_transformers(kind):
    hf, ours = twin_models(kind, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    leaves, spec = torch.utils._pytree.tree_flatten(got)
    expected_leaves, _ = torch.utils._pytree.tree_flatten(expected)
    assert len(leaves) == len(expected_leaves)
    reference_leaves = torch.utils._pytree.tree_leaves(reference)
    for i, (a, b, r) in enumerate(zip(leaves, expected_leaves, reference_leaves, strict=True)):
        assert_fp32_within_rule(a, b, r, f"{kind} leaf {i}")
    again = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert type(again) is type(got) and list(again.keys()) == list(got.keys())
    def paths(output):
        return [torch.utils._pytree.keystr(path) for path, _ in torch.utils._pytree.tree_flatten_with_path(output)[0]]

    assert paths(got) == paths(expected)


@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_torch_export_matches_transformers(kind):
    hf, ours = twin_models(kind, **TINY)
    program = torch.export.export(ours, (torch.randn(2, 3, 32, 32),))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x), program.module()(x)
        reference = float64_twin(hf)(x.double())
    assert type(got).__name__ == type(expected).__name__ and list(got.keys()) == list(expected.keys())
    for name in got.keys():
        leaves = (torch.utils._pytree.tree_leaves(output[name]) for output in (got, expected, reference))
        for i, (a, b, r) in enumerate(zip(*leaves, strict=True)):
            assert_fp32_within_rule(a, b, r, f"exported {kind}.{name}[{i}]")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no-grad", "grad"])
def test_vmap_over_the_model_matches_transformers(grad_enabled):
    hf, ours = twin_models("ConvNextModel", **TINY)
    x = torch.randn(3, 3, 32, 36)

    def per_sample(model):
        return lambda image: model(image.unsqueeze(0)).pooler_output.squeeze(0)

    with torch.set_grad_enabled(grad_enabled):
        expected = torch.func.vmap(per_sample(hf))(x)
        got = torch.func.vmap(per_sample(ours))(x)
        reference = torch.func.vmap(per_sample(float64_twin(hf)))(x.double())
    assert_fp32_within_rule(got, expected, reference, "vmap pooler_output")


def test_vmap_inference_takes_no_per_sample_onednn_path(monkeypatch):
    from fastconvnext.kernels import reference

    _, ours = twin_models("ConvNextModel", **TINY)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x).pooler_output
        taken = []
        monkeypatch.setattr(reference, "convnext_mlp_cpu_inference", lambda *a, **k: taken.append(a) or 1 / 0)
        got = torch.func.vmap(lambda image: ours(image.unsqueeze(0)).pooler_output.squeeze(0))(x)
    assert not taken
    assert_close(got, expected, "vmap pooler_output")


def test_func_grad_per_sample_matches_transformers():
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, **TINY)
    x = torch.randn(2, 3, 32, 32)

    def input_grads(model, images):
        score = lambda image: model(image.unsqueeze(0)).logits[0, 1]  # noqa: E731
        return torch.func.vmap(torch.func.grad(score))(images)

    assert_fp32_within_rule(input_grads(ours, x), input_grads(hf, x), input_grads(float64_twin(hf), x.double()),
                            "per-sample input gradients")


# ---- config methods ---------------------------------------------------------------------------------


def test_config_update_and_num_labels_setter_as_in_transformers():
    theirs = transformers.ConvNextConfig(**TINY, id2label={0: "a", 1: "b"})
    ours = fastconvnext.ConvNextConfig(**TINY, id2label={0: "a", 1: "b"})
    for config in (theirs, ours):
        config.num_labels = 2  # same count: labels kept
    assert ours.id2label == theirs.id2label == {0: "a", 1: "b"}
    for config in (theirs, ours):
        config.num_labels = 3
        config.update({"num_hidden_layers": 4, "depths": [1, 0, 2, 1], "hidden_sizes": [8, 8, 16, 16],
                       "torch_dtype": "float16", "custom": 5, "output_hidden_states": True})
    for name in ("id2label", "num_stages", "depths", "hidden_sizes", "custom", "output_hidden_states", "stage_names"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert theirs.dtype == "float16" and ours.dtype == torch.float16  # transformers leaves update()'s string as is
    with pytest.raises(ValueError, match="every entry of depths must be an int in"):
        ours.update({"depths": [1, -2, 1, 1]})


def test_config_copies_and_pickles_with_its_unknown_keys():
    import copy
    import pickle

    config = fastconvnext.ConvNextConfig(**TINY, custom=[1, 2], id2label={0: "a", 1: "b"})
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config and clone.custom == [1, 2]
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        config.missing


def test_outputs_read_and_write_like_transformers_model_output():
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x), ours(x)
        reference = float64_twin(hf)(x.double())
    assert list(got.keys()) == list(expected.keys()) and len(got) == len(expected)
    assert got.get("loss") is None and expected.get("loss") is None
    assert got.get("loss", 5) == expected.get("loss", 5) == 5
    assert_fp32_within_rule(dict(got)["logits"], dict(expected)["logits"], dict(reference)["logits"],
                            "dict(output)['logits']")
    for output in (got, expected):
        output["logits"] = torch.zeros(1, 3)
        assert torch.equal(output.logits, torch.zeros(1, 3)) and torch.equal(output[0], torch.zeros(1, 3))
    with pytest.raises(KeyError, match="has no field 'scores'"):
        got["scores"] = torch.zeros(1)


@pytest.mark.parametrize("selection", [[1, 3], [-1], (0,), 2, [7, -9, 4]], ids=str)
@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_output_hidden_states_selects_indices_as_transformers(kind, selection):
    hf, ours = twin_models(kind, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x, output_hidden_states=selection), ours(x, output_hidden_states=selection)
        reference = float64_twin(hf)(x.double(), output_hidden_states=True).hidden_states  # all of them
    with torch.no_grad():
        probe = [h is None for h in hf(x, output_hidden_states=[1, 3]).hidden_states]
    if probe != [True, False, True, False, True]:  # the stem and four stages, as transformers 5.25 selects
        pytest.skip(f"transformers {transformers.__version__} selects output_hidden_states otherwise ([1, 3] gives "
                    f"None at {[i for i, none in enumerate(probe) if none]}); fastconvnext follows newer transformers")
    assert len(got.hidden_states) == len(expected.hidden_states) == 5
    for i, (a, b, r) in enumerate(zip(got.hidden_states, expected.hidden_states, reference, strict=True)):
        assert (a is None) == (b is None), f"hidden_states[{i}]"
        if a is not None:
            assert_fp32_within_rule(a, b, r, f"hidden_states[{i}]")


def test_output_hidden_states_of_another_type_is_a_clear_error():
    _, ours = twin_models("ConvNextModel", **TINY)
    with pytest.raises(TypeError, match="output_hidden_states must be a bool, an int or a list of ints, got 'all'"):
        ours(torch.randn(1, 3, 32, 32), output_hidden_states="all")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("hidden_act", PARAMETRIC_ACTS)
def test_activations_with_parameters_match_transformers(hidden_act, tmp_path):
    """prelu and xielu carry parameters per block (act.weight; act.alpha_p/alpha_n in bfloat16 and the
    beta/eps buffers): same state dict, outputs and gradients as transformers."""
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, hidden_act=hidden_act,
                           drop_path_rate=0.3, **TINY)
    theirs_state = hf.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in ours.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in theirs_state.items()
    }
    assert any(".act." in k for k in theirs_state)
    hf.train(), ours.train()
    hf64 = float64_twin_keeping_low_precision(hf)  # xIELU's bf16 alpha_p/alpha_n stay bf16 in R as in E
    x, labels = torch.randn(2, 3, 32, 36), torch.tensor([0, 2])
    torch.manual_seed(3)
    expected = hf(x, labels=labels)
    torch.manual_seed(3)
    got = ours(x, labels=labels)
    torch.manual_seed(3)
    with random_draws_as_in_float32():
        reference = hf64(x.double(), labels=labels)
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "logits")
    expected.loss.backward()
    got.loss.backward()
    reference.loss.backward()
    assert_grads_within_rule_of_their_dtypes(ours, hf, hf64)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "kwargs", [dict(TINY), dict(TINY, num_labels=3, output_hidden_states=True, custom=2, problem_type="regression")]
)
def test_diff_json_as_transformers_writes_it(kwargs):
    theirs = json.loads(transformers.ConvNextConfig(**kwargs).to_json_string(use_diff=True))
    del theirs["transformers_version"]
    ours = fastconvnext.ConvNextConfig(**kwargs)
    assert json.loads(ours.to_json_string(use_diff=True)) == theirs
    assert fastconvnext.ConvNextConfig.from_dict(theirs) == ours
