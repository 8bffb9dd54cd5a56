"""ConvNextConfig validation and config.json interop; the model's input errors."""
import json
import os

import pytest
import torch
import transformers

import fastconvnext
from helpers import SMALL, twin_models


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(hidden_sizes=[8, 16, 24]), ValueError, "hidden_sizes must have num_stages=4 entries, got 3"),
        (dict(depths=[1, 1, 1]), ValueError, "depths must have num_stages=4 entries, got 3"),
        (dict(depths="3393"), TypeError, "depths must be a list of 4 ints, got str '3393'"),
        (dict(hidden_act="gelu_typo"), ValueError, "hidden_act must be one of"),
        (dict(hidden_act=["gelu"]), TypeError, "hidden_act must be a string, one of"),
        (dict(hidden_sizes=[8, 0, 24, 32]), ValueError, "entry of hidden_sizes must be an int in [1, 16384], got 0"),
        (dict(depths=[1, -1, 1, 1]), ValueError, "every entry of depths must be an int in [0, 512], got -1"),
        (dict(depths=[1_000_000, 1, 1, 1]), ValueError, "entry of depths must be an int in [0, 512], got 1000000"),
        (dict(hidden_sizes=[10**9, 8, 8, 8]), ValueError, "hidden_sizes must be an int in [1, 16384], got 1000000000"),
        (dict(hidden_sizes=[8, 8, 8, 8.0]), TypeError, "entry of hidden_sizes must be an int in [1, 16384], got float"),
        (dict(hidden_sizes=[16384] * 4, depths=[512] * 4), ValueError, "parameters (hidden_sizes [16384, 16384"),
        (dict(patch_size=0), ValueError, "patch_size must be an int in [1, 64], got 0"),
        (dict(patch_size=10**6), ValueError, "patch_size must be an int in [1, 64], got 1000000"),
        (dict(patch_size=[4, 4]), ValueError, "patch_size must be one int (square patches), got [4, 4]"),
        (dict(num_stages=10**6), ValueError, "num_stages must be an int in [1, 16], got 1000000"),
        (dict(num_channels=2.5), TypeError, "num_channels must be an int in [1, 1024], got float 2.5"),
        (dict(num_channels=True), TypeError, "num_channels must be an int in [1, 1024], got bool True"),
        (dict(out_features=["stage7"]), ValueError, "out_features must be a subset of stage_names"),
        (dict(out_features="stage2"), TypeError, "out_features must be a list of stage names, got str"),
        (dict(out_indices=[9]), ValueError, "out_indices must index stage_names"),
        (dict(out_features=["stage2"], out_indices=[3]), ValueError, "name different stages"),
        (dict(out_features=["stage3", "stage1"]), ValueError, "in stage order"),
        (dict(drop_path_rate=1.5), ValueError, "drop_path_rate must be a finite number in [0.0, 1.0], got 1.5"),
        (dict(layer_norm_eps=-1e-6), ValueError, "layer_norm_eps must be a finite number in [0.0, inf], got -1e-06"),
        (dict(layer_norm_eps="1e-6"), TypeError, "layer_norm_eps must be a number in [0.0, inf], got str '1e-6'"),
        (dict(layer_scale_init_value=float("nan")), ValueError, "layer_scale_init_value must be a finite number"),
        (dict(initializer_range=float("inf")), ValueError, "initializer_range must be a finite number"),
        (dict(problem_type="ranking"), ValueError, "problem_type must be None or one of"),
        (
            dict(num_labels=1, problem_type="single_label_classification"), ValueError,
            "needs num_labels > 1, got num_labels=1",
        ),
        (dict(num_labels=3, id2label={0: "a"}), ValueError, "num_labels=3 but id2label has 1 entries"),
        (dict(num_labels=10**9), ValueError, "num_labels must be an int in [0, 100000], got 1000000000"),
        (dict(id2label=["a", "b"]), TypeError, "id2label must be a mapping from index to label, got list"),
        (dict(id2label={"x": "a"}), ValueError, "id2label keys must be int indices"),
        (dict(id2label={0: ["a"]}), TypeError, "id2label values must be labels (strings), got list ['a'] for index 0"),
        (dict(id2label={"0": {"x": 1}}), TypeError, "id2label values must be labels (strings), got dict"),
        (dict(id2label={0: "a"}, label2id={"a": [0]}), ValueError, "label2id must map labels to int indices, got "
                                                                    "{'a': list [0]}"),
        (dict(return_dict="yes"), TypeError, "return_dict must be true or false, got str 'yes'"),
        (dict(output_hidden_states=1), TypeError, "output_hidden_states must be true or false, got int 1"),
        (dict(dtype="complex64"), ValueError, "dtype must be None, 'auto' or one of"),
        (dict(image_size=[224, 224, 3]), ValueError, "image_size must be an int or a pair [height, width]"),
    ],
)
def test_bad_config_field_raises_one_clear_error(kwargs, error, message):
    with pytest.raises(error) as err:
        fastconvnext.ConvNextConfig(**kwargs)
    assert message in str(err.value)


def test_attribute_edits_are_checked_when_a_model_is_built():
    config = fastconvnext.ConvNextConfig(**SMALL)
    config.depths = [1, 1, 1_000_000, 1]
    with pytest.raises(ValueError, match=r"every entry of depths must be an int in \[0, 512\], got 1000000"):
        fastconvnext.ConvNextModel(config)


def test_bounds_admit_the_largest_published_convnext():
    # ConvNeXt-XXLarge (open_clip): the widest and deepest published ConvNeXt
    config = fastconvnext.ConvNextConfig(hidden_sizes=[384, 768, 1536, 3072], depths=[3, 4, 30, 3], num_labels=21841)
    assert config.depths == [3, 4, 30, 3]


@pytest.mark.parametrize("kind", ["ConvNextForImageClassification", "ConvNextModel", "ConvNextBackbone"])
def test_parameter_estimate_bounds_every_class(kind):
    """The parameter bound is computed, not allocated: the estimate must cover each class's true count."""
    config = dict(hidden_sizes=[8, 12, 20, 24], depths=[2, 0, 1, 3], num_labels=7, patch_size=3, num_channels=2,
                  out_features=["stem", "stage1", "stage2", "stage3", "stage4"])
    theirs = getattr(transformers, kind)(transformers.ConvNextConfig(**config))
    estimate = fastconvnext.configuration.estimated_parameters(fastconvnext.ConvNextConfig(**config))
    count = sum(p.numel() for p in theirs.parameters())
    if kind == "ConvNextForImageClassification":
        assert estimate == count
    else:
        assert estimate >= count


@pytest.mark.parametrize(
    "text, kind", [("[1, 2]", "list"), ('"convnext"', "str"), ("3", "int"), ("null", "null"), ("true", "bool")]
)
def test_config_json_that_is_not_an_object(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(TypeError) as err:
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path)
    assert f"config.json must hold a JSON object of ConvNextConfig fields, found {kind}" in str(err.value)
    with pytest.raises(TypeError, match=f"built from a JSON object of fields, got {kind}"):
        fastconvnext.ConvNextConfig.from_dict(json.loads(text))


def test_config_json_field_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"layer_norm_eps": "1e-6", "model_type": "convnext"}))
    with pytest.raises(TypeError) as err:
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "layer_norm_eps must be a number" in str(err.value)
    (tmp_path / "config.json").write_text('{"layer_scale_init_value": NaN}')
    with pytest.raises(ValueError, match="layer_scale_init_value must be a finite number"):
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path)


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


def test_unhashable_labels_in_config_json_are_a_clear_error_naming_it(tmp_path):
    """An id2label value that is a list used to crash the error handler itself ('NoneType' is not iterable)."""
    transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**SMALL, num_labels=2)).save_pretrained(
        tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": ["cat"], "1": "dog"}
    config.pop("label2id", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match=r"config\.json: id2label values must be labels \(strings\), got list") as err:
        fastconvnext.ConvNextForImageClassification.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    with pytest.raises(TypeError, match=r"config\.json: id2label values must be labels"):
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["c" * 250 + ".json", "é" * 125 + ".json"])
def test_config_json_files_with_long_names_are_written_atomically(tmp_path, name):
    """The staged name used to add ~40 bytes to the file name: a valid name over ~215 bytes got ENAMETOOLONG."""
    config = fastconvnext.ConvNextConfig(**SMALL)
    config.to_json_file(tmp_path / name)
    assert fastconvnext.ConvNextConfig.from_json_file(tmp_path / name) == config
    assert os.listdir(tmp_path) == [name]


def test_config_save_pretrained_replaces_the_file_and_keeps_its_link_target_alone(tmp_path):
    """save_pretrained writes a new file and renames it over config.json (no partial file, ever): a config.json
    that was a symlink becomes a regular file, and what it pointed to is not written through."""
    (tmp_path / "model").mkdir()
    (tmp_path / "shared.json").write_text("{}")
    (tmp_path / "model" / "config.json").symlink_to(tmp_path / "shared.json")
    fastconvnext.ConvNextConfig(**SMALL).save_pretrained(tmp_path / "model")
    assert (tmp_path / "shared.json").read_text() == "{}"
    assert not (tmp_path / "model" / "config.json").is_symlink()
    assert fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "model") == fastconvnext.ConvNextConfig(**SMALL)


def test_config_from_pretrained_reads_config_json_only_inside_the_folder(tmp_path):
    """As load_pretrained does: config.json may link within the folder, or from a Hugging Face cache snapshot
    to the cache's blobs, but not anywhere else."""
    fastconvnext.ConvNextConfig(**SMALL).save_pretrained(tmp_path / "elsewhere")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").symlink_to(tmp_path / "elsewhere" / "config.json")
    with pytest.raises(PermissionError, match=r"refusing to read .*model/config\.json: it resolves to .*elsewhere"):
        fastconvnext.ConvNextConfig.from_pretrained(tmp_path / "model")
    snapshot = tmp_path / "models--org--name" / "snapshots" / "0123abc"
    (tmp_path / "models--org--name" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (tmp_path / "elsewhere" / "config.json").rename(tmp_path / "models--org--name" / "blobs" / "f00d")
    (snapshot / "config.json").symlink_to("../../blobs/f00d")
    assert fastconvnext.ConvNextConfig.from_pretrained(snapshot) == fastconvnext.ConvNextConfig(**SMALL)


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
