"""The eager model against transformers' ConvNeXt (the oracle): outputs, gradients, losses, backbone. Every fp32
comparison follows CONTRIBUTING's rule, with transformers in float64 as R and in fp32 as E."""
import pytest
import torch

import fastconvnext
from fastconvnext.configuration import HIDDEN_ACTS
from helpers import SMALL, twin_models
from tolerance import assert_classifier_step_within_rule, assert_fp32_within_rule, assert_sequences_within_rule, \
    float64_twin, random_draws_as_in_float32, three_runs

CONFIGS = {
    "small-nonsquare": (dict(SMALL), (2, 3, 45, 67)),
    "no-layer-scale-gelu-new": (dict(SMALL, layer_scale_init_value=0.0, hidden_act="gelu_new"), (2, 3, 37, 50)),
    "three-stages-patch2-gray": (
        dict(num_stages=3, hidden_sizes=[12, 20, 36], depths=[2, 1, 1], patch_size=2, num_channels=1),
        (3, 1, 19, 33),
    ),
    "relu-eps-1e-6": (dict(SMALL, hidden_act="relu", layer_norm_eps=1e-6), (1, 3, 64, 33)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_model_outputs_match_transformers(name):
    config, shape = CONFIGS[name]
    hf, ours = twin_models("ConvNextModel", **config)
    x = torch.randn(shape)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    for field in ("last_hidden_state", "pooler_output"):
        assert_fp32_within_rule(got[field], expected[field], reference[field], field)
    assert len(got.hidden_states) == config.get("num_stages", 4) + 1
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")


@pytest.mark.parametrize("name", CONFIGS)
def test_classifier_gradients_match_transformers(name):
    config, shape = CONFIGS[name]
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=5, **config)
    x = torch.randn(shape)
    assert_classifier_step_within_rule(ours, hf, x, torch.randint(0, 5, (shape[0],)))


@pytest.mark.parametrize("hidden_act", sorted(HIDDEN_ACTS))
def test_every_hidden_act_matches_transformers(hidden_act):
    hf, ours = twin_models("ConvNextModel", hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 1], hidden_act=hidden_act)
    x = torch.randn(1, 3, 35, 41)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    assert_fp32_within_rule(got.pooler_output, expected.pooler_output, reference.pooler_output,
                            f"pooler_output with {hidden_act}")


@pytest.mark.parametrize(
    "num_labels, labels, problem_type",
    [
        (5, torch.tensor([0, 4]), "single_label_classification"),
        (1, torch.tensor([0.3, -1.2]), "regression"),
        (3, torch.tensor([[0.2, -0.1, 1.0], [0.0, 0.5, 0.3]]), "regression"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
        (4, torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]), None),
    ],
)
def test_losses_follow_problem_type(num_labels, labels, problem_type):
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=num_labels, problem_type=problem_type, **SMALL)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, labels=labels)
    assert_fp32_within_rule(got.loss, expected.loss, reference.loss, "loss")
    assert ours.config.problem_type == hf.config.problem_type


def test_no_classifier_when_num_labels_is_zero():
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=0, **SMALL)
    assert isinstance(ours.classifier, torch.nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x)
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "logits")


def test_drop_path_in_training_matches_transformers_under_the_same_seed():
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, drop_path_rate=0.5, **SMALL)
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
    layers = [m for m in ours.modules() if isinstance(m, fastconvnext.modeling.ConvNextLayer)]
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in layers]
    assert rates == pytest.approx(torch.linspace(0, 0.5, sum(SMALL["depths"])).tolist())


def test_backbone_matches_transformers():
    config = dict(SMALL, out_features=["stem", "stage2", "stage4"])
    hf, ours = twin_models("ConvNextBackbone", **config)
    x = torch.randn(2, 3, 41, 39)
    with torch.no_grad():
        got, expected, reference = three_runs(ours, hf, x, output_hidden_states=True)
    assert len(got.feature_maps) == 3
    assert_sequences_within_rule(got.feature_maps, expected.feature_maps, reference.feature_maps, "feature_maps")
    assert_sequences_within_rule(got.hidden_states, expected.hidden_states, reference.hidden_states, "hidden_states")
    assert ours.channels == hf.channels
    with torch.no_grad():
        assert ours(x).hidden_states is None


def test_outputs_index_like_tuples_and_return_dict_false():
    _, ours = twin_models("ConvNextForImageClassification", num_labels=3, **SMALL)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = ours(x, output_hidden_states=True)
        as_tuple = ours(x, output_hidden_states=True, return_dict=False)
    assert out[0] is out.logits and out["logits"] is out.logits
    assert len(out) == 2 and list(out.keys()) == ["logits", "hidden_states"]
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_nan_input_propagates_like_transformers():
    hf, ours = twin_models("ConvNextModel", **SMALL)
    x = torch.randn(2, 3, 32, 32)
    x[0, 1, 5, 7] = float("nan")
    with torch.no_grad():
        expected, got = hf(x), ours(x)
    assert torch.equal(torch.isnan(got.last_hidden_state), torch.isnan(expected.last_hidden_state))
    assert torch.isnan(got.pooler_output[0]).all() and not torch.isnan(got.pooler_output[1]).any()


def test_save_load_of_state_dict_is_strict_both_ways():
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, **SMALL)
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
