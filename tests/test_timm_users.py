"""How a timm user gets in: timm hub-style directories (timm's config.json + weights, as save_for_hf and the timm/*
repositories write them) load with timm's eps and labels, `fastconvnext.from_timm` takes a timm state dict (or model),
and ConvNeXt V2 weights in timm's layout (convnextv2_*) and the original release's load into ConvNextV2*.
timm-layout files are built by renaming a transformers state dict (test_checkpoint.timm_layout, v2_timm_layout
below), so timm itself is not needed; transformers with the same weights and eps is the oracle."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fastconvnext
from helpers import randomize_
from test_checkpoint import timm_layout

TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1], layer_scale_init_value=0.5)
LABELS = ["tench", "goldfish", "white shark"]


def _timm_weights(num_labels=3):
    hf = transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(**TINY, num_labels=num_labels, layer_norm_eps=1e-6))
    return randomize_(hf).eval()


def _timm_directory(tmp_path, hf, **config):
    directory = tmp_path / "timm-convnext"
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in timm_layout(hf).items()}, str(directory / "model.safetensors"))
    timm_config = {"architecture": "convnext_atto", "num_classes": hf.config.num_labels, "num_features": 24,
                   "global_pool": "avg", "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.95}, **config}
    (directory / "config.json").write_text(json.dumps(timm_config))
    return directory


def _same_logits(ours, hf):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_a_timm_directory_loads_with_timm_eps_and_labels(tmp_path):
    hf = _timm_weights()
    directory = _timm_directory(tmp_path, hf, label_names=LABELS)
    model = fastconvnext.ConvNextForImageClassification.from_pretrained(directory)
    assert model.config.layer_norm_eps == 1e-6
    assert model.config.id2label == dict(enumerate(LABELS))
    _same_logits(model, hf)
    assert type(fastconvnext.ConvNextPreTrainedModel.from_pretrained(directory)).__name__ == \
        "ConvNextForImageClassification"


def test_timm_labels_as_an_index_map_and_under_pretrained_cfg(tmp_path):
    hf = _timm_weights()
    by_index = _timm_directory(tmp_path / "a", hf, label_names={"0": "a", "1": "b", "2": "c"})
    assert fastconvnext.ConvNextForImageClassification.from_pretrained(by_index).config.id2label == {0: "a", 1: "b",
                                                                                                      2: "c"}
    nested = _timm_directory(tmp_path / "b", hf, pretrained_cfg={"label_names": LABELS})
    assert fastconvnext.ConvNextForImageClassification.from_pretrained(nested).config.id2label == dict(
        enumerate(LABELS))


@pytest.mark.parametrize("config,message", [
    (dict(num_classes=5), "num_classes is 5 but the weights' head has 3 outputs"),
    (dict(label_names=["a", "b"]), "label_names names 2 classes, the head has 3"),
    (dict(architecture="resnet50"), "'resnet50' is not a timm ConvNeXt"),
    (dict(architecture="convnextv2_atto"), "is ConvNeXt V2: load it with fastconvnext.ConvNextV2"),
])
def test_a_timm_directory_that_does_not_fit_is_a_clear_error(tmp_path, config, message):
    directory = _timm_directory(tmp_path, _timm_weights(), **config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fastconvnext.ConvNextForImageClassification.from_pretrained(directory)


def test_from_timm_takes_a_timm_state_dict():
    hf = _timm_weights()
    model = fastconvnext.from_timm(timm_layout(hf))
    assert type(model).__name__ == "ConvNextForImageClassification" and model.config.layer_norm_eps == 1e-6
    _same_logits(model, hf)
    trunk = {k: v for k, v in timm_layout(hf).items() if not k.startswith("head.fc.")}
    assert type(fastconvnext.from_timm(trunk)).__name__ == "ConvNextModel"


def test_from_timm_takes_a_module_with_timm_pretrained_cfg():
    hf = _timm_weights()

    class TimmLike(torch.nn.Module):  # what from_timm reads of a timm model: state_dict(), pretrained_cfg, training
        def __init__(self):
            super().__init__()
            self.pretrained_cfg = {"architecture": "convnext_atto", "label_names": LABELS}
            self.weights = timm_layout(hf)

        def state_dict(self, *args, **kwargs):
            return dict(self.weights)

    model = fastconvnext.from_timm(TimmLike().train())
    assert model.training and model.config.id2label == dict(enumerate(LABELS))
    _same_logits(model.eval(), hf)


def test_from_timm_refuses_what_is_not_timm():
    hf = _timm_weights()
    with pytest.raises(ValueError, match="not a timm ConvNeXt state dict"):
        fastconvnext.from_timm(hf.state_dict())
    with pytest.raises(TypeError, match="from_timm takes a timm model, a timm model name or a state dict"):
        fastconvnext.from_timm(3)


# ---- ConvNeXt V2: timm's convnextv2_* and the original release's files -----------------------------------------


def _v2_weights(num_labels=3):
    hf = transformers.ConvNextV2ForImageClassification(
        transformers.ConvNextV2Config(**V2_TINY, num_labels=num_labels, layer_norm_eps=1e-6))
    return randomize_(hf).eval()


V2_TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])


def v2_timm_layout(hf, conv_mlp=False):
    """transformers ConvNextV2 -> timm names (timm's GlobalResponseNorm keeps weight/bias as [4C]; conv_mlp
    variants such as convnextv2_atto hold fc1/fc2 as [out, in, 1, 1] convolutions)."""
    sd, out = {k.removeprefix("convnextv2."): v for k, v in hf.state_dict().items()}, {}
    for p in ("weight", "bias"):
        out[f"stem.0.{p}"] = sd[f"embeddings.patch_embeddings.{p}"]
        out[f"stem.1.{p}"] = sd[f"embeddings.layernorm.{p}"]
        out[f"head.norm.{p}"] = sd[f"layernorm.{p}"]
        if f"classifier.{p}" in sd:
            out[f"head.fc.{p}"] = sd[f"classifier.{p}"]
        for i, depth in enumerate(hf.config.depths):
            if i > 0:
                for k in (0, 1):
                    out[f"stages.{i}.downsample.{k}.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.{k}.{p}"]
            for j in range(depth):
                src, dst = f"encoder.stages.{i}.layers.{j}.", f"stages.{i}.blocks.{j}."
                out[f"{dst}conv_dw.{p}"] = sd[f"{src}dwconv.{p}"]
                out[f"{dst}norm.{p}"] = sd[f"{src}layernorm.{p}"]
                out[f"{dst}mlp.grn.{p}"] = sd[f"{src}grn.{p}"].reshape(-1)
                for fc, pw in (("fc1", "pwconv1"), ("fc2", "pwconv2")):
                    tensor = sd[f"{src}{pw}.{p}"]
                    out[f"{dst}mlp.{fc}.{p}"] = tensor[:, :, None, None] if conv_mlp and p == "weight" else tensor
    assert len(out) == len(sd)
    return out


def v2_original_layout(hf):
    """transformers ConvNextV2 -> facebookresearch/ConvNeXt-V2 names (GRN gamma/beta [1, 1, 1, 4C])."""
    sd, out = {k.removeprefix("convnextv2."): v for k, v in hf.state_dict().items()}, {}
    for p in ("weight", "bias"):
        out[f"downsample_layers.0.0.{p}"] = sd[f"embeddings.patch_embeddings.{p}"]
        out[f"downsample_layers.0.1.{p}"] = sd[f"embeddings.layernorm.{p}"]
        out[f"norm.{p}"] = sd[f"layernorm.{p}"]
        out[f"head.{p}"] = sd[f"classifier.{p}"]
        for i, depth in enumerate(hf.config.depths):
            if i > 0:
                for k in (0, 1):
                    out[f"downsample_layers.{i}.{k}.{p}"] = sd[f"encoder.stages.{i}.downsampling_layer.{k}.{p}"]
            for j in range(depth):
                src, dst = f"encoder.stages.{i}.layers.{j}.", f"stages.{i}.{j}."
                for name in ("dwconv", "pwconv1", "pwconv2"):
                    out[f"{dst}{name}.{p}"] = sd[f"{src}{name}.{p}"]
                out[f"{dst}norm.{p}"] = sd[f"{src}layernorm.{p}"]
                out[f"{dst}grn.{'gamma' if p == 'weight' else 'beta'}"] = sd[f"{src}grn.{p}"]
    assert len(out) == len(sd)
    return out


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_from_timm_takes_a_timm_convnext_v2_state_dict(conv_mlp):
    hf = _v2_weights()
    model = fastconvnext.from_timm(v2_timm_layout(hf, conv_mlp))
    assert type(model) is fastconvnext.ConvNextV2ForImageClassification and model.config.layer_norm_eps == 1e-6
    _same_logits(model, hf)
    trunk = {k: v for k, v in v2_timm_layout(hf).items() if not k.startswith("head.fc.")}
    model = fastconvnext.from_timm(trunk)
    assert type(model) is fastconvnext.ConvNextV2Model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output, hf.convnextv2(x).pooler_output, atol=1e-5, rtol=0)


def test_a_timm_convnext_v2_directory_loads_with_timm_eps_and_labels(tmp_path):
    hf = _v2_weights()
    directory = tmp_path / "timm-convnextv2"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in v2_timm_layout(hf, conv_mlp=True).items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(
        {"architecture": "convnextv2_atto", "num_classes": 3, "label_names": LABELS}))
    for load in (fastconvnext.ConvNextV2ForImageClassification.from_pretrained,
                 fastconvnext.ConvNextV2PreTrainedModel.from_pretrained,
                 lambda path: fastconvnext.checkpoint.load_pretrained(None, path)):
        model = load(directory)
        assert type(model) is fastconvnext.ConvNextV2ForImageClassification
        assert model.config.layer_norm_eps == 1e-6 and model.config.id2label == dict(enumerate(LABELS))
        _same_logits(model, hf)
    with pytest.raises(ValueError, match="ConvNeXt V2 .*load it with fastconvnext.ConvNextV2ForImageClassification"):
        fastconvnext.ConvNextForImageClassification.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"architecture": "convnext_atto", "num_classes": 3}))
    with pytest.raises(ValueError, match=r"config.json \(timm's\): architecture 'convnext_atto' is not a timm "
                                         r"ConvNeXt V2"):
        fastconvnext.ConvNextV2ForImageClassification.from_pretrained(directory)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_an_original_convnext_v2_release_file_loads(tmp_path, suffix):
    hf = _v2_weights(num_labels=4)
    path = tmp_path / f"convnextv2_tiny_1k_224_ema{suffix}"
    weights = v2_original_layout(hf)
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save({"model": weights}, path)  # the release wraps its state dict under "model"
    for model in (fastconvnext.ConvNextV2ForImageClassification.from_pretrained(path),
                  fastconvnext.checkpoint.load_pretrained(None, path)):
        assert type(model) is fastconvnext.ConvNextV2ForImageClassification
        assert model.config.layer_norm_eps == 1e-6 and model.config.depths == V2_TINY["depths"]
        _same_logits(model, hf)
    with pytest.warns(UserWarning, match="newly initialized"):  # the backbone's stage norms: not in the release
        backbone = fastconvnext.ConvNextV2Backbone.from_pretrained(path, out_features=["stage2", "stage4"])
    assert [m.shape[1] for m in backbone(torch.randn(1, 3, 32, 32)).feature_maps] == [12, 24]


def test_convert_state_dict_and_infer_config_name_convnext_v2():
    hf = _v2_weights()
    for layout in (v2_timm_layout(hf), v2_original_layout(hf)):
        converted, _ = fastconvnext.checkpoint.convert_state_dict(layout)
        assert set(converted) == set(hf.state_dict())
        for key, tensor in converted.items():
            torch.testing.assert_close(tensor, hf.state_dict()[key], atol=0, rtol=0)
        config = fastconvnext.checkpoint.infer_config(layout)
        assert type(config) is fastconvnext.ConvNextV2Config and config.depths == V2_TINY["depths"]


def test_v1_and_v2_files_in_each_others_classes_are_clear_errors(tmp_path):
    v2_path, v1_path = tmp_path / "convnextv2_atto.pth", tmp_path / "convnext_atto.pth"
    torch.save(v2_timm_layout(_v2_weights()), v2_path)
    torch.save(timm_layout(_timm_weights()), v1_path)
    with pytest.raises(ValueError, match="ConvNeXt V2 checkpoint in timm's layout .* load it with "
                                         "fastconvnext.ConvNextV2ForImageClassification"):
        fastconvnext.ConvNextForImageClassification.from_pretrained(v2_path)
    with pytest.raises(ValueError, match=r"ConvNeXt \(V1\) checkpoint in timm's layout .* load it with "
                                         "fastconvnext.ConvNextForImageClassification"):
        fastconvnext.ConvNextV2ForImageClassification.from_pretrained(v1_path)
    layout = v2_original_layout(_v2_weights())
    del layout["stages.0.0.grn.beta"]
    with pytest.raises(ValueError, match=r"missing: encoder.stages.0.layers.0.grn.bias \[1, 1, 1, 32\]"):
        fastconvnext.ConvNextV2ForImageClassification.from_pretrained(None, config=fastconvnext.ConvNextV2Config(
            **V2_TINY, num_labels=3), state_dict=layout)
