"""ConvNextConfig validation and config.json interop; the model's input errors."""
import json

import pytest
import torch
import transformers

import fastconvnext
from helpers import SMALL, twin_models


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_sizes=[8, 16, 24]), "hidden_sizes must have num_stages=4 entries, got 3"),
        (dict(depths=[1, 1, 1]), "depths must have num_stages=4 entries, got 3"),
        (dict(hidden_act="gelu_typo"), "hidden_act must be one of"),
        (dict(hidden_sizes=[8, 0, 24, 32]), "every entry of hidden_sizes must be a positive int, got 0"),
        (dict(depths=[1, -1, 1, 1]), "every entry of depths must be a positive int, got -1"),
        (dict(patch_size=0), "patch_size must be a positive int, got 0"),
        (dict(num_channels=2.5), "num_channels must be a positive int, got 2.5"),
        (dict(out_features=["stage7"]), "out_features must be a subset of stage_names"),
        (dict(out_indices=[9]), "out_indices must index stage_names"),
        (dict(out_features=["stage2"], out_indices=[3]), "name different stages"),
        (dict(out_features=["stage3", "stage1"]), "in stage order"),
        (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1)"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be > 0"),
        (dict(problem_type="ranking"), "problem_type must be None or one of"),
        (dict(num_labels=3, id2label={0: "a"}), "num_labels=3 but id2label has 1 entries"),
    ],
)
def test_inconsistent_config_raises_when_built(kwargs, message):
    with pytest.raises(ValueError) as err:
        fastconvnext.ConvNextConfig(**kwargs)
    assert message in str(err.value)


def test_defaults_equal_transformers():
    ours = json.loads(fastconvnext.ConvNextConfig().to_json_string())
    theirs = json.loads(transformers.ConvNextConfig().to_json_string(use_diff=False))
    for key, value in ours.items():
        assert key in theirs, f"{key} is not a transformers ConvNextConfig field"
        assert theirs[key] == value, f"{key}: {value!r} != transformers' {theirs[key]!r}"
    for key in ("num_channels", "patch_size", "num_stages", "hidden_sizes", "depths", "hidden_act",
                "initializer_range", "layer_norm_eps", "layer_scale_init_value", "drop_path_rate", "image_size",
                "out_features", "out_indices", "id2label", "label2id"):
        assert key in ours, f"missing field {key}"


def test_config_json_round_trips_through_transformers(tmp_path):
    ours = fastconvnext.ConvNextConfig(
        **SMALL, num_labels=3, id2label={0: "cat", 1: "dog", 2: "eel"}, out_features=["stage1", "stage3"],
        problem_type="single_label_classification", layer_scale_init_value=0.0, hidden_act="gelu_new",
    )
    ours.save_pretrained(tmp_path)
    theirs = transformers.ConvNextConfig.from_pretrained(tmp_path)
    assert theirs.id2label == {0: "cat", 1: "dog", 2: "eel"} and theirs.out_indices == [1, 3]
    assert theirs.hidden_sizes == SMALL["hidden_sizes"] and theirs.hidden_act == "gelu_new"
    theirs.save_pretrained(tmp_path / "back")
    again = fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "back")
    assert again == ours
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "convnext"


def test_config_from_json_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'convnext', got 'vit'"):
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def model():
    return twin_models("ConvNextModel", **SMALL)[1]


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (torch.randn(1, 4, 32, 32), ValueError, "must have 3 channels (config.num_channels), got 4"),
        (torch.randn(3, 32, 32), ValueError, "[batch, channels, height, width], got 3-D"),
        (torch.randn(1, 1, 3, 32, 32), ValueError, "got 5-D"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point tensor, got dtype torch.uint8"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), TypeError, "got dtype torch.int64"),
        (torch.randn(0, 3, 32, 32), ValueError, "empty batch"),
        (torch.randn(1, 3, 31, 64), ValueError, "at least 32x32"),
        (torch.randn(1, 3, 64, 16), ValueError, "got 64x16"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError, "dtype torch.float64 but the model's parameters"),
        ([[1.0]], TypeError, "must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_names_expected_and_given(model, pixel_values, error, message):
    with pytest.raises(error) as err:
        model(pixel_values)
    assert message in str(err.value)


def test_missing_pixel_values(model):
    with pytest.raises(ValueError, match="specify pixel_values"):
        model()


def test_smallest_input_runs_and_floors_odd_sizes(model):
    hf, ours = twin_models("ConvNextModel", **SMALL)
    x = torch.randn(1, 3, 32, 47)
    with torch.no_grad():
        got, expected = ours(x).last_hidden_state, hf(x).last_hidden_state
    assert got.shape == expected.shape == (1, 24, 1, 1)


def test_bad_labels_type():
    _, ours = twin_models("ConvNextForImageClassification", num_labels=3, **SMALL)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        ours(torch.randn(1, 3, 32, 32), labels=[1])
