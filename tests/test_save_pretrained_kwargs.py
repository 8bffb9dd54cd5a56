"""save_pretrained takes transformers' arguments: sharded saves (max_shard_size) that transformers loads, a given
state_dict, is_main_process=False, and clear refusals of what cannot work here; sharded saves keep the
journaled guarantee (every crash point leaves the old or the new checkpoint whole)."""
import inspect
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastconvnext
from fastconvnext.checkpoint import load_pretrained, save_pretrained
from test_concurrent_saves import MODELS, check_each_crash_state, crash_states, hf_twin, which, write_checkpoint

INDEX = "model.safetensors.index.json"


def shard_names(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("model-"))


def test_the_signature_takes_every_argument_transformers_save_pretrained_takes():
    ours = inspect.signature(fastconvnext.ConvNextModel.save_pretrained)
    assert any(p.kind is p.VAR_KEYWORD for p in ours.parameters.values())
    theirs = inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    expected = [n for n, p in theirs.items() if p.kind is not p.VAR_KEYWORD]
    accepted = list(inspect.signature(save_pretrained).parameters)
    assert expected[0] == "self" and list(ours.parameters)[:2] == ["self", "save_directory"]
    assert [n for n in expected[2:] if n not in accepted] == []


def test_defaults_of_transformers_arguments_change_nothing(tmp_path):
    model = MODELS["old"]
    save_pretrained(model, tmp_path / "plain")
    model.save_pretrained(save_directory=tmp_path / "explicit", is_main_process=True, state_dict=None,
                          push_to_hub=False, max_shard_size="50GB", variant=None, token=None, save_peft_format=True,
                          save_original_format=True, distributed_checkpoint=False)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "explicit")) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("max_shard_size", ["20KB", 20_000, "0.02MB"])
def test_max_shard_size_writes_the_shards_and_index_transformers_writes(tmp_path, max_shard_size):
    model = MODELS["new"]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    model.save_pretrained(ours, max_shard_size=max_shard_size)
    hf_twin("new").save_pretrained(theirs, max_shard_size=max_shard_size)
    assert shard_names(ours) == shard_names(theirs) and len(shard_names(ours)) > 2
    assert not (ours / "model.safetensors").exists()
    our_index, their_index = (json.loads((d / INDEX).read_text()) for d in (ours, theirs))
    assert our_index == their_index
    for shard in shard_names(ours):
        ours_tensors, their_tensors = load_file(ours / shard), load_file(theirs / shard)
        assert ours_tensors.keys() == their_tensors.keys()
        assert all(torch.equal(ours_tensors[k], their_tensors[k]) for k in ours_tensors)
    assert which(transformers.ConvNextForImageClassification.from_pretrained(ours)) == "new"
    assert which(load_pretrained(None, ours)) == "new"


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard_as_in_transformers(tmp_path):
    MODELS["old"].save_pretrained(tmp_path / "ours", max_shard_size=100)
    hf_twin("old").save_pretrained(tmp_path / "theirs", max_shard_size=100)
    assert json.loads((tmp_path / "ours" / INDEX).read_text()) == json.loads((tmp_path / "theirs" / INDEX).read_text())


def test_a_single_file_save_replaces_a_sharded_one_and_back(tmp_path):
    folder = tmp_path / "model"
    MODELS["old"].save_pretrained(folder, max_shard_size="20KB")
    MODELS["new"].save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    MODELS["other"].save_pretrained(folder, max_shard_size="40KB")
    assert "model.safetensors" not in os.listdir(folder) and INDEX in os.listdir(folder)
    assert which(transformers.ConvNextForImageClassification.from_pretrained(folder)) == "other"


def test_fewer_shards_over_more_leave_no_stale_shard(tmp_path):
    folder = tmp_path / "model"
    MODELS["old"].save_pretrained(folder, max_shard_size="10KB")
    many = len(shard_names(folder))
    MODELS["new"].save_pretrained(folder, max_shard_size="40KB")
    index = json.loads((folder / INDEX).read_text())
    assert shard_names(folder) == sorted(set(index["weight_map"].values())) and len(shard_names(folder)) < many
    assert which(load_pretrained(None, folder)) == "new"


def test_sharded_bin_when_safe_serialization_is_false(tmp_path):
    MODELS["new"].save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=False)
    names = sorted(os.listdir(tmp_path))
    assert "pytorch_model.bin.index.json" in names and any(n.startswith("pytorch_model-00001-of-") for n in names)
    assert which(transformers.ConvNextForImageClassification.from_pretrained(tmp_path)) == "new"
    assert which(load_pretrained(None, tmp_path)) == "new"


@pytest.mark.parametrize("old_kind", ["safetensors", "sharded", "bin"])
def test_a_sharded_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, old_kind):
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", old_kind)
    with crash_states(monkeypatch, folder) as states:
        MODELS["new"].save_pretrained(folder, max_shard_size="25KB")
    outcomes = check_each_crash_state(states, tmp_path, {"old", "new"})
    assert outcomes[0] == "old" and outcomes[-1] == "new"


def test_is_main_process_false_writes_nothing(tmp_path):
    folder = tmp_path / "model"
    MODELS["old"].save_pretrained(folder, is_main_process=False)
    assert not folder.exists()
    MODELS["old"].save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    MODELS["new"].save_pretrained(folder, is_main_process=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_state_dict_is_saved_instead_of_the_models(tmp_path):
    """transformers writes the given dict (here: the 'new' weights through the 'old' model, whose config.json it
    keeps): both loaders read the given tensors."""
    given = MODELS["new"].state_dict()
    MODELS["old"].save_pretrained(tmp_path / "ours", state_dict=given)
    hf_twin("old").save_pretrained(tmp_path / "theirs", state_dict=given)
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(ours[k], v) for k, v in given.items())
    loaded = transformers.ConvNextForImageClassification.from_pretrained(tmp_path / "ours")
    assert loaded.config.id2label[0] == "old label 0"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in given.items())


def test_state_dict_of_a_dinov3_model_is_written_with_transformers_names(tmp_path):
    """The given dict carries the model's module names (the encoder under `model.`); transformers writes them
    without `model.`, and so must fastconvnext: the same file as transformers' save of the same dict."""
    config = fastconvnext.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    model = fastconvnext.DINOv3ConvNextModel(config).eval()
    given = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ours", state_dict=given)
    hf = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**config.to_dict()))
    hf.save_pretrained(tmp_path / "theirs", state_dict=given)
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    loaded = transformers.DINOv3ConvNextModel.from_pretrained(tmp_path / "ours").state_dict()
    assert loaded.keys() == given.keys() and all(torch.equal(loaded[k], given[k]) for k in given)


def test_a_state_dict_that_is_not_tensors_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="state_dict must map names to tensors"):
        MODELS["old"].save_pretrained(tmp_path, state_dict=[1, 2])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options, message", [
    (dict(push_to_hub=True), r"push_to_hub=True\) is not supported.*model.push_to_hub"),
    (dict(variant="fp16"), "variant='fp16'.*reads no variant files"),
    (dict(distributed_checkpoint=True), "distributed_checkpoint=True"),
])
def test_what_cannot_work_here_is_refused_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(NotImplementedError, match=message):
        MODELS["old"].save_pretrained(tmp_path / "model", **options)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("size", [0, -5, "5GiB", "lots", "MB", True, 1.5, None])
def test_a_bad_max_shard_size_names_what_is_expected(tmp_path, size):
    with pytest.raises(ValueError, match=f"max_shard_size must be .*got {size!r}"):
        MODELS["old"].save_pretrained(tmp_path / "model", max_shard_size=size)
    assert not (tmp_path / "model").exists()


def test_hub_only_keywords_are_ignored_with_a_warning(tmp_path, caplog):
    MODELS["old"].save_pretrained(tmp_path, commit_message="x", private=True)
    assert "commit_message" in caplog.text and "private" in caplog.text
    assert which(load_pretrained(None, tmp_path)) == "old"
