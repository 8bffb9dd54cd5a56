"""fastconvnext.checkpoint against transformers (random weights, small configs) as the oracle.

timm and original-layout files are built here by renaming a transformers state dict key by key
(DESIGN.md's table), independently of the module's rename rules; timm itself is not needed.
"""
import json
import os
import re
import shlex
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fastconvnext
from fastconvnext import checkpoint
from fastconvnext.checkpoint import (
    convert_state_dict,
    from_transformers,
    infer_config,
    load_pretrained,
    save_pretrained,
)

SMALL = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
NUM_LABELS = 5
OURS = {
    "ConvNextModel": fastconvnext.ConvNextModel,
    "ConvNextForImageClassification": fastconvnext.ConvNextForImageClassification,
    "ConvNextBackbone": fastconvnext.ConvNextBackbone,
}


# ---- helpers -----------------------------------------------------------------------------------


def hf_model(cls_name="ConvNextForImageClassification", **config_fields):
    """A transformers model whose every tensor is random (layer scale and norms included), in eval mode."""
    config = transformers.ConvNextConfig(**{**SMALL, "num_labels": NUM_LABELS, **config_fields})
    model = getattr(transformers, cls_name)(config)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def pixels(num_channels=3):
    return torch.randn(2, num_channels, 64, 48, generator=torch.Generator().manual_seed(7))


def outputs_of(model, x):
    with torch.no_grad():
        out = model(x)
    if hasattr(out, "logits"):
        return [out.logits]
    if hasattr(out, "feature_maps"):
        return list(out.feature_maps)
    return [out.last_hidden_state, out.pooler_output]


def assert_same_outputs(ours, reference, num_channels=3):
    x = pixels(num_channels)
    got, want = outputs_of(ours, x), outputs_of(reference, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def canonical(state_dict):
    return {k.removeprefix("convnext."): v for k, v in state_dict.items()}


def timm_layout(hf, conv_mlp=False):
    """transformers -> timm names, written out per DESIGN.md's table."""
    sd, config, out = canonical(hf.state_dict()), hf.config, {}
    for p in ("weight", "bias"):
        out[f"stem.0.{p}"] = sd[f"embeddings.patch_embeddings.{p}"]
        out[f"stem.1.{p}"] = sd[f"embeddings.layernorm.{p}"]
        out[f"head.norm.{p}"] = sd[f"layernorm.{p}"]
        if f"classifier.{p}" in sd:
            out[f"head.fc.{p}"] = sd[f"classifier.{p}"]
        for i, depth in enumerate(config.depths):
            if i > 0:
                out[f"stages.{i}.downsample.0.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.0.{p}"]
                out[f"stages.{i}.downsample.1.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.1.{p}"]
            for j in range(depth):
                src, dst = f"encoder.stages.{i}.layers.{j}.", f"stages.{i}.blocks.{j}."
                out[f"{dst}conv_dw.{p}"] = sd[f"{src}dwconv.{p}"]
                out[f"{dst}norm.{p}"] = sd[f"{src}layernorm.{p}"]
                for fc, pw in (("fc1", "pwconv1"), ("fc2", "pwconv2")):
                    tensor = sd[f"{src}{pw}.{p}"]
                    out[f"{dst}mlp.{fc}.{p}"] = tensor[:, :, None, None] if conv_mlp and p == "weight" else tensor
                if p == "weight" and f"{src}layer_scale_parameter" in sd:
                    out[f"{dst}gamma"] = sd[f"{src}layer_scale_parameter"]
    assert len(out) == len(sd)
    return out


def original_layout(hf):
    """transformers -> facebookresearch/ConvNeXt names, per DESIGN.md's table."""
    sd, config, out = canonical(hf.state_dict()), hf.config, {}
    for p in ("weight", "bias"):
        out[f"downsample_layers.0.0.{p}"] = sd[f"embeddings.patch_embeddings.{p}"]
        out[f"downsample_layers.0.1.{p}"] = sd[f"embeddings.layernorm.{p}"]
        out[f"norm.{p}"] = sd[f"layernorm.{p}"]
        out[f"head.{p}"] = sd[f"classifier.{p}"]
        for i, depth in enumerate(config.depths):
            if i > 0:
                out[f"downsample_layers.{i}.0.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.0.{p}"]
                out[f"downsample_layers.{i}.1.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.1.{p}"]
            for j in range(depth):
                src, dst = f"encoder.stages.{i}.layers.{j}.", f"stages.{i}.{j}."
                for name in ("dwconv", "pwconv1", "pwconv2"):
                    out[f"{dst}{name}.{p}"] = sd[f"{src}{name}.{p}"]
                out[f"{dst}norm.{p}"] = sd[f"{src}layernorm.{p}"]
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            out[f"stages.{i}.{j}.gamma"] = sd[f"encoder.stages.{i}.layers.{j}.layer_scale_parameter"]
    assert len(out) == len(sd)
    return out


def save_transformers_file(hf, path):
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    return path


def init_warning(record):
    return next(str(w.message) for w in record if "newly initialized" in str(w.message))


def hf_from_pretrained(cls_name, directory, **kwargs):
    model, info = getattr(transformers, cls_name).from_pretrained(directory, output_loading_info=True, **kwargs)
    return model.eval(), info


# ---- transformers directories ------------------------------------------------------------------


def test_transformers_directory_safetensors(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(None, tmp_path)
    assert type(model) is fastconvnext.ConvNextForImageClassification
    assert not model.training
    assert model.config.to_dict()["hidden_sizes"] == SMALL["hidden_sizes"] and model.config.num_labels == NUM_LABELS
    assert model.config.layer_norm_eps == hf.config.layer_norm_eps == 1e-12
    assert_same_outputs(model, hf)


def test_transformers_directory_sharded_safetensors(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_same_outputs(fastconvnext.ConvNextForImageClassification.from_pretrained(tmp_path), hf)


def test_transformers_directory_pytorch_bin(tmp_path):
    # transformers 5 always writes safetensors, so the legacy .bin directory is written by hand.
    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_outputs(load_pretrained(None, tmp_path), hf)


def test_transformers_directory_sharded_pytorch_bin(tmp_path):
    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    state_dict = hf.state_dict()
    shards = {"pytorch_model-00001-of-00002.bin": {}, "pytorch_model-00002-of-00002.bin": {}}
    for n, (key, tensor) in enumerate(state_dict.items()):
        shards[sorted(shards)[n % 2]][key] = tensor
    weight_map = {key: name for name, shard in shards.items() for key in shard}
    for name, shard in shards.items():
        torch.save(shard, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_outputs(load_pretrained(None, tmp_path), hf)


def test_single_transformers_safetensors_file_infers_the_architecture(tmp_path):
    hf = hf_model(layer_scale_init_value=0.0, num_channels=1, patch_size=2)
    model = load_pretrained(None, save_transformers_file(hf, tmp_path / "weights.safetensors"))
    assert type(model) is fastconvnext.ConvNextForImageClassification
    config = model.config
    assert (config.num_channels, config.patch_size, config.layer_scale_init_value) == (1, 2, 0.0)
    assert (config.hidden_sizes, config.depths, config.num_labels) == (SMALL["hidden_sizes"], SMALL["depths"], 5)
    assert config.layer_norm_eps == 1e-12  # transformers' default: a transformers file does not record it
    assert_same_outputs(model, hf, num_channels=1)


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    hf = hf_model().to(torch.float64)
    path = save_transformers_file(hf, tmp_path / "weights.safetensors")
    assert load_pretrained(None, path).dtype == torch.float64
    as_float = load_pretrained(None, path, dtype="float32")
    assert as_float.dtype == torch.float32
    assert_same_outputs(as_float, hf.to(torch.float32))


@pytest.mark.parametrize("key, value", [("dtype", "float16"), ("torch_dtype", "bfloat16"), ("dtype", "float64"),
                                        (None, None)])
def test_dtype_auto_takes_config_json_dtype_as_transformers_does(tmp_path, key, value):
    """transformers' from_pretrained(dtype="auto") builds the model in config.json's "dtype" (or the older
    "torch_dtype") when it has one, and in the weights' dtype otherwise; the weights here are float32."""
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if key is not None:
        config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.ConvNextForImageClassification.from_pretrained(tmp_path, dtype="auto")
    ours = load_pretrained(None, tmp_path, dtype="auto")
    assert ours.dtype == theirs.dtype == (getattr(torch, value) if value else torch.float32)
    assert ours.config.dtype == theirs.config.dtype == ours.dtype
    assert fastconvnext.ConvNextForImageClassification.from_pretrained(tmp_path).dtype == theirs.dtype
    assert load_pretrained(None, tmp_path, dtype="float32").dtype == torch.float32  # an explicit dtype wins


def test_explicit_config_and_overrides(tmp_path):
    hf = hf_model(layer_norm_eps=1e-6)
    path = save_transformers_file(hf, tmp_path / "weights.safetensors")
    config = fastconvnext.ConvNextConfig(**SMALL, num_labels=NUM_LABELS, layer_norm_eps=1e-6)
    model = load_pretrained(fastconvnext.ConvNextForImageClassification, path, config=config)
    assert model.config is config
    assert_same_outputs(model, hf)
    relabeled = load_pretrained(None, path, config=config, id2label={i: f"class {i}" for i in range(NUM_LABELS)})
    assert relabeled.config.id2label[4] == "class 4" and relabeled.config.label2id["class 4"] == 4
    with pytest.raises(TypeError, match="num_label"):
        load_pretrained(None, path, num_label=3)
    with pytest.raises(TypeError, match="dtype"):
        load_pretrained(None, path, dtype="float33")


# ---- timm and original layouts -----------------------------------------------------------------


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_mlp", "conv_mlp_1x1"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_layout_file(tmp_path, conv_mlp, suffix):
    hf = hf_model(layer_norm_eps=1e-6)
    state_dict = timm_layout(hf, conv_mlp=conv_mlp)
    path = tmp_path / f"convnext_timm{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, str(path))
    model = load_pretrained(None, path)
    assert type(model) is fastconvnext.ConvNextForImageClassification
    assert model.config.layer_norm_eps == 1e-6 and model.convnext.layernorm.eps == 1e-6
    assert model.config.hidden_act == "gelu"
    assert_same_outputs(model, hf)


def test_timm_layout_with_state_dict_wrapper_and_no_head_gives_a_base_model(tmp_path):
    hf = hf_model("ConvNextModel", layer_norm_eps=1e-6, layer_scale_init_value=0.0)
    torch.save({"state_dict": timm_layout(hf), "epoch": 3}, tmp_path / "timm_base.pth")
    model = load_pretrained(None, tmp_path / "timm_base.pth")
    assert type(model) is fastconvnext.ConvNextModel
    assert model.config.layer_scale_init_value == 0.0 and model.layernorm.eps == 1e-6
    assert_same_outputs(model, hf)


def test_original_layout_with_model_wrapper(tmp_path):
    hf = hf_model(layer_norm_eps=1e-6)
    torch.save({"model": original_layout(hf)}, tmp_path / "convnext_tiny_1k_224_ema.pth")
    model = load_pretrained(None, tmp_path / "convnext_tiny_1k_224_ema.pth")
    assert type(model) is fastconvnext.ConvNextForImageClassification
    assert model.config.layer_norm_eps == 1e-6 and model.convnext.layernorm.eps == 1e-6
    assert_same_outputs(model, hf)


def test_convert_state_dict_and_infer_config():
    hf = hf_model(layer_norm_eps=1e-6)
    expected = hf.state_dict()
    for layout, fmt in ((timm_layout(hf, conv_mlp=True), "timm"), (original_layout(hf), "original")):
        converted, detected = convert_state_dict(layout)
        assert detected == fmt
        assert sorted(converted) == sorted(expected)
        for key, tensor in expected.items():
            assert torch.equal(converted[key], tensor), key
        config = infer_config(converted, fmt)
        assert (config.hidden_sizes, config.depths, config.num_labels) == (SMALL["hidden_sizes"], SMALL["depths"], 5)
        assert config.layer_norm_eps == 1e-6 and config.layer_scale_init_value > 0
        assert infer_config(layout).layer_norm_eps == 1e-6  # unconverted input works too
    same, detected = convert_state_dict(expected)
    assert detected == "transformers" and same.keys() == expected.keys()
    assert infer_config(expected, "transformers").layer_norm_eps == 1e-12


# ---- across classes ----------------------------------------------------------------------------


def test_base_checkpoint_into_classifier_initializes_and_warns_about_the_head(tmp_path):
    base = hf_model("ConvNextModel")
    base.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialized") as record:
        model = load_pretrained(fastconvnext.ConvNextForImageClassification, tmp_path, num_labels=NUM_LABELS)
    message = init_warning(record)
    assert "classifier.weight [5, 32]" in message and "classifier.bias [5]" in message
    assert "convnext.encoder" not in message
    x = pixels()
    with torch.no_grad():
        pooled = base(x).pooler_output
        torch.testing.assert_close(model.convnext(x).pooler_output, pooled, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(model.classifier.bias) == 0
    assert 0.005 < model.classifier.weight.std().item() < 0.05  # N(0, initializer_range=0.02)
    _, info = hf_from_pretrained("ConvNextForImageClassification", tmp_path, num_labels=NUM_LABELS)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}  # transformers does the same


def test_classifier_checkpoint_into_base_model_drops_the_head(tmp_path, recwarn):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(fastconvnext.ConvNextModel, tmp_path)
    assert not [w for w in recwarn if "newly initialized" in str(w.message)]
    assert "classifier.weight" not in model.state_dict()
    assert_same_outputs(model, hf.convnext)


def test_backbone_from_a_classifier_checkpoint_matches_transformers(tmp_path):
    hf_model().save_pretrained(tmp_path)
    stages = ["stage1", "stage3"]
    with pytest.warns(UserWarning, match="newly initialized") as record:
        model = load_pretrained(fastconvnext.ConvNextBackbone, tmp_path, out_features=stages)
    assert "hidden_states_norms.stage1.weight [8]" in init_warning(record)
    reference, info = hf_from_pretrained("ConvNextBackbone", tmp_path, out_features=stages)
    assert info["missing_keys"] == {f"hidden_states_norms.{s}.{p}" for s in stages for p in ("weight", "bias")}
    assert model.config.out_features == stages
    assert_same_outputs(model, reference)


def test_backbone_round_trip_with_its_own_norms(tmp_path):
    hf = hf_model("ConvNextBackbone", out_features=["stem", "stage2", "stage4"])
    hf.save_pretrained(tmp_path)
    model = load_pretrained(None, tmp_path)
    assert type(model) is fastconvnext.ConvNextBackbone
    assert_same_outputs(model, hf)
    inferred = load_pretrained(fastconvnext.ConvNextBackbone, save_transformers_file(hf, tmp_path / "bb.safetensors"))
    assert inferred.config.out_features == ["stem", "stage2", "stage4"]
    assert_same_outputs(inferred, hf)


# ---- saving and from_transformers --------------------------------------------------------------


@pytest.mark.parametrize("cls_name", sorted(OURS))
def test_save_pretrained_loads_in_transformers_without_any_key_trouble(tmp_path, cls_name):
    hf = hf_model(cls_name, **({"out_features": ["stage2", "stage4"]} if cls_name == "ConvNextBackbone" else {}))
    ours = from_transformers(hf)
    trunk = ours.convnext if cls_name == "ConvNextForImageClassification" else ours
    # Non-contiguous parameters (channels-last conv, transposed Linear) must still be written contiguous.
    stem = trunk.embeddings.patch_embeddings
    stem.weight.data = stem.weight.data.contiguous(memory_format=torch.channels_last)
    fc1 = trunk.encoder.stages[0].layers[0].pwconv1
    fc1.weight.data = fc1.weight.data.t().contiguous().t()
    assert not stem.weight.is_contiguous() and not fc1.weight.is_contiguous()
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [cls_name] and config["model_type"] == "convnext"
    reference, info = hf_from_pretrained(cls_name, tmp_path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert not info["error_msgs"]
    assert_same_outputs(reference, ours)
    assert_same_outputs(load_pretrained(None, tmp_path), ours)


def test_save_pretrained_bin_and_overwrite(tmp_path):
    ours = from_transformers(hf_model())
    save_pretrained(ours, tmp_path)
    with torch.no_grad():
        ours.classifier.bias.add_(1.0)
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    reference, info = hf_from_pretrained("ConvNextForImageClassification", tmp_path)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert_same_outputs(reference, ours)


def test_from_transformers_keeps_mode_weights_device_and_dtype():
    hf = hf_model().to(torch.float64).train()
    ours = from_transformers(hf)
    assert type(ours) is fastconvnext.ConvNextForImageClassification
    assert ours.training and ours.dtype == torch.float64 and ours.device == torch.device("cpu")
    hf_state = hf.state_dict()
    assert ours.state_dict().keys() == hf_state.keys()
    assert all(torch.equal(t, hf_state[k]) for k, t in ours.state_dict().items())
    assert from_transformers(hf.eval()).training is False
    assert_same_outputs(from_transformers(hf.to(torch.float32)), hf)
    with pytest.raises(TypeError, match="ConvNextModel"):
        from_transformers(torch.nn.Linear(2, 2))


# ---- errors --------------------------------------------------------------------------------


def edited_file(tmp_path, edit):
    state_dict = dict(hf_model().state_dict())
    edit(state_dict)
    return save_transformers_file_from(state_dict, tmp_path / "edited.safetensors")


def save_transformers_file_from(state_dict, path):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def test_missing_tensor_is_listed_with_its_shape(tmp_path):
    path = edited_file(tmp_path, lambda sd: sd.pop("convnext.encoder.stages.2.layers.1.pwconv1.weight"))
    with pytest.raises(ValueError, match="missing") as err:
        load_pretrained(None, path)
    assert "convnext.encoder.stages.2.layers.1.pwconv1.weight expected [96, 24]" in str(err.value)


def test_unexpected_tensor_is_listed_with_its_shape(tmp_path):
    path = edited_file(tmp_path, lambda sd: sd.update({"convnext.encoder.stages.0.layers.0.grn.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="unexpected") as err:
        load_pretrained(None, path)
    assert "convnext.encoder.stages.0.layers.0.grn.weight given [3]" in str(err.value)
    with pytest.warns(UserWarning, match="grn.weight"):
        load_pretrained(None, path, strict=False)


def test_unexpected_timm_tensor_is_named_as_in_the_file(tmp_path):
    layout = timm_layout(hf_model())
    layout["stages.1.blocks.0.mlp.extra.weight"] = torch.ones(64)  # (GRN tensors name the file ConvNeXt V2 instead)
    torch.save(layout, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.mlp\.extra\.weight given \[64\]"):
        load_pretrained(None, tmp_path / "extra.pth")


def test_wrong_shape_is_listed_expected_vs_given(tmp_path):
    bad_bias = {"convnext.encoder.stages.1.layers.0.pwconv2.bias": torch.ones(17)}
    path = edited_file(tmp_path, lambda sd: sd.update(bad_bias))
    with pytest.raises(ValueError, match=r"pwconv2\.bias: expected \[16\], given \[17\]"):
        load_pretrained(None, path)


def test_new_num_labels_needs_ignore_mismatched_sizes(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier\.weight: expected \[3, 32\], given \[5, 32\]"):
        load_pretrained(None, tmp_path, num_labels=3)
    with pytest.warns(UserWarning, match=r"classifier\.weight \[3, 32\]"):
        model = load_pretrained(None, tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.classifier.weight.shape == (3, 32)
    assert_same_outputs(model.convnext, hf.convnext)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_checkpoints_in_both_torch_save_formats_load(tmp_path, zip_format):
    """The zip archive torch.save writes since 1.6 and the legacy format before it (five pickles, then raw
    storages), both scanned for nesting before torch.load."""
    hf = hf_model()
    path = tmp_path / "weights.pth"
    torch.save({"model": hf.state_dict()}, path, _use_new_zipfile_serialization=zip_format)
    assert_same_outputs(load_pretrained(None, path), hf)


def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    torch.save({"model": {"stem.0.weight": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .*not plain tensors"):
        load_pretrained(None, tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_path_unsupported_and_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refuse_hub = lambda repo, *args, **kwargs: pytest.fail(f"hub asked for {repo}")  # noqa: E731
    monkeypatch.setattr(checkpoint, "_download_from_hub", refuse_hub)
    for missing in (tmp_path / "nothing.pth", "checkpoints/convnext.safetensors", "no_slash_here"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            load_pretrained(None, missing)
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported checkpoint file .*\.safetensors, \.pth"):
        load_pretrained(None, tmp_path / "weights.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="cannot read .* as safetensors"):
        load_pretrained(None, tmp_path / "broken.safetensors")
    torch.save({"stem.0.weight": torch.zeros(100)}, tmp_path / "whole.pth")
    truncated = (tmp_path / "whole.pth").read_bytes()[:300]
    for name, data in (("text.pth", b"not a pickle"), ("truncated.pth", truncated), ("damaged.pt", b"\x80\x02junk")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"cannot read .*{name} as a PyTorch checkpoint"):
            load_pretrained(None, tmp_path / name)
    (tmp_path / "empty_dir").mkdir()
    # transformers raises OSError for a directory without weights; FileNotFoundError is one
    with pytest.raises(FileNotFoundError, match="empty_dir holds none of model.safetensors"):
        load_pretrained(None, tmp_path / "empty_dir")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a ConvNeXt checkpoint"):
        load_pretrained(None, tmp_path / "resnet.pth")


# ---- Hugging Face Hub ----------------------------------------------------------------------


def test_hub_id_without_huggingface_hub_says_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    with pytest.raises(FileNotFoundError, match="needs huggingface_hub.*pass a local path"):
        load_pretrained(None, "facebook/convnext-tiny-224")


def test_hub_id_offline_says_pass_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the files are not in the cache")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="facebook/convnext-tiny-224.*failed.*pass a local path"):
        load_pretrained(None, "facebook/convnext-tiny-224")


def test_hub_id_downloads_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    hf = hf_model()
    snapshot = tmp_path / "snapshot"
    hf.save_pretrained(snapshot)
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.append((repo_id, allow_patterns, kwargs))
        return str(snapshot)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = fastconvnext.ConvNextForImageClassification.from_pretrained("facebook/convnext-tiny-224", revision="v1")
    assert len(requested) == 1  # safetensors found: no second call for pytorch_model.bin
    repo_id, patterns, options = requested[0]
    assert repo_id == "facebook/convnext-tiny-224" and "config.json" in patterns and options == {"revision": "v1"}
    assert "revision" not in model.config.to_dict()
    assert_same_outputs(model, hf)


# ---- loading options (issue 11), transformers as the oracle ----------------------------------------

INFO_CASES = [
    ("ConvNextModel", "ConvNextForImageClassification", {}),
    ("ConvNextForImageClassification", "ConvNextModel", {}),
    ("ConvNextForImageClassification", "ConvNextForImageClassification",
     {"num_labels": 3, "ignore_mismatched_sizes": True}),
    ("ConvNextBackbone", "ConvNextForImageClassification", {}),
]


@pytest.mark.parametrize("cls_name, saved_name, kwargs", INFO_CASES)
def test_output_loading_info_matches_transformers(tmp_path, cls_name, saved_name, kwargs, recwarn):
    hf_model(saved_name).save_pretrained(tmp_path)
    reference, want = hf_from_pretrained(cls_name, tmp_path, **kwargs)
    ours, got = OURS[cls_name].from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert got == want
    assert ours.training is False and type(ours) is OURS[cls_name]
    if not want["missing_keys"] and not want["mismatched_keys"]:
        assert_same_outputs(ours, reference)


def test_subfolder_matches_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "nested" / "model")
    reference = transformers.ConvNextForImageClassification.from_pretrained(tmp_path, subfolder="nested/model")
    ours = fastconvnext.ConvNextForImageClassification.from_pretrained(tmp_path, subfolder="nested/model")
    assert_same_outputs(ours, reference.eval())
    assert_same_outputs(load_pretrained(None, tmp_path / "nested", subfolder="model"), hf)
    with pytest.raises(FileNotFoundError, match="no subfolder 'elsewhere'"):
        load_pretrained(None, tmp_path, subfolder="elsewhere")
    for escaping in ("../nested", str(tmp_path / "nested")):
        with pytest.raises(ValueError, match="subfolder must be a relative path inside"):
            load_pretrained(None, tmp_path / "nested", subfolder=escaping)


def test_from_pretrained_none_with_config_and_state_dict_matches_transformers():
    hf = hf_model()
    config = transformers.ConvNextConfig(**SMALL, num_labels=NUM_LABELS)
    reference = transformers.ConvNextForImageClassification.from_pretrained(
        None, config=config, state_dict=hf.state_dict()
    )
    ours = fastconvnext.ConvNextForImageClassification.from_pretrained(
        None, config=fastconvnext.ConvNextConfig.from_dict(config.to_dict()), state_dict=hf.state_dict()
    )
    assert ours.training is False
    assert_same_outputs(ours, reference.eval())
    # the base class picks the class from the tensors, as for a directory
    chosen = fastconvnext.ConvNextPreTrainedModel.from_pretrained(None, config=config, state_dict=hf.state_dict())
    assert type(chosen) is fastconvnext.ConvNextForImageClassification
    with pytest.raises(TypeError, match="pass both"):
        fastconvnext.ConvNextModel.from_pretrained(None, config=config)
    with pytest.raises(TypeError, match="expected a mapping of tensor names to tensors, got list"):
        fastconvnext.ConvNextModel.from_pretrained(None, config=config, state_dict=[1, 2])


def test_state_dict_argument_replaces_the_weights_of_a_directory(tmp_path):
    saved, replacement = hf_model(), hf_model()
    with torch.no_grad():
        replacement.classifier.bias.add_(1.0)
    saved.save_pretrained(tmp_path)
    ours = load_pretrained(None, tmp_path, state_dict=replacement.state_dict())
    assert_same_outputs(ours, replacement)
