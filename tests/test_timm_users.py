"""How a timm user gets in: timm hub-style directories (timm's config.json + weights, as save_for_hf and the timm/*
repositories write them) load with timm's eps and labels, `fastconvnext.from_timm` takes a timm state dict (or model),
and ConvNeXt V2 weights are named as such. timm-layout files are built by renaming a transformers state dict
(test_checkpoint.timm_layout), so timm itself is not needed; transformers with the same weights and eps is the
oracle."""
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
    (dict(architecture="convnextv2_atto"), "ConvNeXt V2: timm ConvNeXt V2 weights are not supported yet"),
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


def test_a_convnext_v2_timm_state_dict_is_named_as_such(tmp_path):
    layout = timm_layout(_timm_weights())
    layout["stages.0.blocks.0.mlp.grn.weight"] = torch.zeros(1, 1, 1, 32)
    layout["stages.0.blocks.0.mlp.grn.bias"] = torch.zeros(1, 1, 1, 32)
    with pytest.raises(ValueError, match="ConvNeXt V2 checkpoint in timm's layout"):
        fastconvnext.from_timm(layout)
    path = tmp_path / "convnextv2_atto.pth"
    torch.save(layout, path)
    with pytest.raises(ValueError, match="ConvNeXt V2 checkpoint in timm's layout"):
        fastconvnext.ConvNextForImageClassification.from_pretrained(path)
