"""Hostile and broken checkpoints (issue 12): each ends in one clear error naming the file, fast and small.

The memory bound is measured in a subprocess (ru_maxrss after the imports vs after all loads); the time
bound is the subprocess timeout, generous for a loaded machine: the files here used to build models of a
million blocks, which runs out of memory or takes hours, so any bound catches a regression.
"""
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fastconvnext
from fastconvnext import checkpoint, safe_io
from fastconvnext.checkpoint import load_pretrained, save_pretrained

SMALL = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
MAX_FILE_BYTES = 2**20
MAX_RSS_GROWTH_MB = 500


def hf_classifier(seed=0, **fields):
    torch.manual_seed(seed)
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**{**SMALL, "num_labels": 5, **fields}))


def model_directory(path, model_fields=None, **config_changes):
    """A transformers directory of a small classifier, with config.json fields changed."""
    hf_classifier(**(model_fields or {})).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def same_outputs(a, b):
    """Logits agree to test_checkpoint's tolerance (fastconvnext vs transformers differ in rounding only)."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.allclose(a(x).logits, b(x).logits, atol=1e-5, rtol=1e-5)


# ---- hostile files: denial of service -------------------------------------------------------------


def timm_huge_block_index(path):
    tensors = {"stem.0.weight": torch.zeros(8, 3, 4, 4), "stem.0.bias": torch.zeros(8)}
    for name in ("conv_dw.weight", "mlp.fc1.weight", "mlp.fc2.weight", "gamma"):
        tensors[f"stages.0.blocks.1000000.{name}"] = torch.zeros(8)
    save_file(tensors, str(path))
    return path


def zero_width_blocks(path):
    """512 blocks of width 768 declared by zero-element tensors (a few hundred KB)."""
    tensors = {"embeddings.patch_embeddings.weight": torch.zeros(768, 3, 4, 4, dtype=torch.float16)}
    for block in range(512):
        tensors[f"encoder.stages.0.layers.{block}.dwconv.weight"] = torch.zeros(768, 0, 7, 7)
    save_file(tensors, str(path))
    return path


def one_tensor_per_block(path):
    """A real block 0, then 511 blocks that hold nothing but a layer scale (for strict=False)."""
    tensors = {"embeddings.patch_embeddings.weight": torch.zeros(8, 3, 4, 4),
               "encoder.stages.0.layers.0.dwconv.weight": torch.zeros(8, 1, 7, 7)}
    for block in range(1, 512):
        tensors[f"encoder.stages.0.layers.{block}.layer_scale_parameter"] = torch.zeros(8)
    save_file(tensors, str(path))
    return path


def huge_stage_index(path):
    save_file({"stem.0.weight": torch.zeros(8, 3, 4, 4), "stages.0.blocks.0.conv_dw.weight": torch.zeros(8, 1, 7, 7),
               "stages.999999999.downsample.1.weight": torch.zeros(8, 8, 2, 2)}, str(path))
    return path


def zip_bomb(path):
    """A torch.save archive re-packed with deflate plus 64 MB of zeros that compress to ~64 KB."""
    torch.save({"stem.0.weight": torch.zeros(8, 3, 4, 4)}, path.with_suffix(".plain"))
    with zipfile.ZipFile(path.with_suffix(".plain")) as plain, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bomb:
        for entry in plain.infolist():
            bomb.writestr(entry.filename, plain.read(entry.filename))
        with bomb.open("archive/data/1", "w") as padding:
            for _ in range(64):
                padding.write(bytes(2**20))
    path.with_suffix(".plain").unlink()
    return path


def lying_safetensors_header(path):
    header = json.dumps({"stem.0.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    return path


XL = dict(hidden_sizes=[256, 512, 1024, 2048], depths=[3, 3, 27, 3])  # ConvNeXt-XL: 350M parameters, 1.4 GB


def declared_layout(**config):
    """{name: shape} of every tensor of ConvNextModel(config), built on the meta device."""
    with torch.device("meta"):
        model = fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def stride_zero_views(path):
    """ConvNeXt-XL, every tensor a stride-0 view (torch.expand) of one 4-byte storage: a ~60 KB .pth."""
    one = torch.zeros(1)
    torch.save({k: one.expand(shape) for k, shape in declared_layout(**XL).items()}, path)
    return path


def views_of_one_storage(path):
    """512 blocks of width 128 (71M parameters, 283 MB), every tensor a view of one 256 KB storage: ~0.7 MB."""
    layout = declared_layout(hidden_sizes=[128] * 4, depths=[128] * 4)
    base = torch.zeros(max(math.prod(shape) for shape in layout.values()))
    torch.save({k: base[: math.prod(shape)].view(shape) for k, shape in layout.items()}, path)
    return path


def nested_wrappers(path, depth=1500):
    """A real state dict under `depth` {"model": ...} wrappers (28 KB for 1,500)."""
    nested = {"embeddings.patch_embeddings.weight": torch.zeros(8, 3, 4, 4)}
    for _ in range(depth):
        nested = {"model": nested}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * depth))  # the pickler recurses once per level
    try:
        torch.save(nested, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def with_data_pickle(path, pickle_bytes):
    """A torch.save zip archive whose data.pkl is `pickle_bytes` (entries stored, as torch.save writes them)."""
    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buffer)
    with zipfile.ZipFile(buffer) as plain, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as crafted:
        for entry in plain.infolist():
            data = pickle_bytes if entry.filename.endswith("/data.pkl") else plain.read(entry.filename)
            crafted.writestr(entry.filename, data)
    return path


def deep_tuple_key(path, depth=1_000_000):
    """A dict whose key is a tuple nested a million deep (TUPLE1 opcodes, 1 MB): hashing it to store the key
    recursed in C until the process died with SIGSEGV."""
    pickle_bytes = b"\x80\x02}q\x00(" + b"J\x00\x00\x00\x00" + b"\x85" * depth + b"X\x01\x00\x00\x00vu."
    return with_data_pickle(path, pickle_bytes)


def v2_timm_huge_block_index(path):
    """ConvNeXt V2 in timm's layout (GRN tensors route it to ConvNextV2*) declaring block 1e6 of stage 0."""
    tensors = {"stem.0.weight": torch.zeros(8, 3, 4, 4), "stem.0.bias": torch.zeros(8)}
    for name in ("conv_dw.weight", "mlp.fc1.weight", "mlp.grn.weight", "mlp.grn.bias", "mlp.fc2.weight"):
        tensors[f"stages.0.blocks.1000000.{name}"] = torch.zeros(8)
    save_file(tensors, str(path))
    return path


def v2_original_zero_width_blocks(path):
    """The original ConvNeXt-V2 release's layout, 512 blocks of width 768 declared by zero-element tensors."""
    tensors = {"downsample_layers.0.0.weight": torch.zeros(768, 3, 4, 4, dtype=torch.float16)}
    for block in range(512):
        tensors[f"stages.0.{block}.dwconv.weight"] = torch.zeros(768, 0, 7, 7)
        tensors[f"stages.0.{block}.grn.gamma"] = torch.zeros(1, 1, 1, 0)
    save_file(tensors, str(path))
    return path


def v2_directory(path, **config_changes):
    """A transformers ConvNeXt V2 directory of a small classifier, with config.json fields changed."""
    torch.manual_seed(0)
    transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**SMALL, num_labels=5)).save_pretrained(
        path)
    config = json.loads((path / "config.json").read_text())
    config.update(config_changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def stage_index_beside_config_json(path, stage=99_999_999):
    """A transformers directory (config.json given) whose weights add one tensor of stage 1e8: the mismatch report
    once listed the blocks of every stage up to that index (1.8 GB and 48 s for 1e8)."""
    model_directory(path)
    tensors = {k: v.contiguous() for k, v in load_file(str(path / "model.safetensors")).items()}
    tensors[f"convnext.encoder.stages.{stage}.layers.0.dwconv.weight"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def hostile_cases(root):
    """[(id, path, load_pretrained kwargs)] of small files that used to allocate without bound."""
    def directory(name, **changes):
        return model_directory(root / name, **changes)

    return [
        ("timm block index 1e6", timm_huge_block_index(root / "timm_block.safetensors"), {}),
        ("stage index 1e9", huge_stage_index(root / "stage.safetensors"), {}),
        ("zero-width blocks", zero_width_blocks(root / "zero_width.safetensors"), {}),
        ("one tensor per block", one_tensor_per_block(root / "one_tensor.safetensors"), {"strict": False}),
        ("depths 1e6", directory("depths", depths=[1_000_000, 1, 2, 1]), {}),
        ("hidden_sizes 1e9", directory("hidden", hidden_sizes=[10**9, 16, 24, 32]), {}),
        ("patch_size 1e6", directory("patch", patch_size=10**6), {}),
        ("num_labels 1e6", directory("labels", num_labels=1_000_000, id2label=None, label2id=None), {}),
        ("zip bomb", zip_bomb(root / "bomb.pth"), {}),
        ("lying safetensors header", lying_safetensors_header(root / "lying.safetensors"), {}),
        ("stride-0 views of ConvNeXt-XL", stride_zero_views(root / "stride0.pth"), {}),
        ("views of one storage", views_of_one_storage(root / "aliased.pth"), {}),
        ("1,500 nested wrappers", nested_wrappers(root / "nested.pth"), {}),
        ("tuple nested 1e6 deep", deep_tuple_key(root / "deep_tuple.pth"), {}),
        ("stage index 1e8 beside config.json", stage_index_beside_config_json(root / "stage_config"), {}),
        ("V2 timm block index 1e6", v2_timm_huge_block_index(root / "v2_timm_block.safetensors"), {}),
        ("V2 original zero-width blocks", v2_original_zero_width_blocks(root / "v2_zero_width.safetensors"), {}),
        ("V2 depths 1e6", v2_directory(root / "v2_depths", depths=[1_000_000, 1, 2, 1]), {}),
        ("V2 hidden_sizes 1e9", v2_directory(root / "v2_hidden", hidden_sizes=[10**9, 16, 24, 32]), {}),
    ]


def test_hostile_small_files_fail_clearly_in_bounded_memory(tmp_path):
    cases = hostile_cases(tmp_path)
    for _, path, _ in cases:
        weights = path if path.is_file() else next(path.glob("*.safetensors"))
        assert weights.stat().st_size <= MAX_FILE_BYTES, weights
    script = textwrap.dedent("""
        import json, resource, sys, time
        import fastconvnext.modeling  # imports are not part of what a load costs
        from fastconvnext.checkpoint import load_pretrained
        cases = json.loads(sys.argv[1])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results = []
        for path, kwargs in cases:
            start = time.perf_counter()
            try:
                load_pretrained(None, path, **kwargs)
                outcome = ("loaded", "")
            except (ValueError, TypeError, OSError) as err:
                outcome = (type(err).__name__, str(err))
            results.append([*outcome, time.perf_counter() - start])
        growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({"results": results, "growth_mb": growth_mb}))
    """)
    argument = json.dumps([[str(path), kwargs] for _, path, kwargs in cases])
    done = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for (case_id, path, _), (kind, message, seconds) in zip(cases, report["results"]):
        assert kind != "loaded", f"{case_id}: {path} loaded"
        assert str(path) in message, f"{case_id}: the error does not name {path}: {message}"
        print(f"{case_id}: {kind} in {seconds:.3f} s")
    assert report["growth_mb"] < MAX_RSS_GROWTH_MB, report


@pytest.mark.parametrize("field, value, error, expected", [
    ("depths", [1_000_000, 1, 2, 1], ValueError, r"depths must be an int in \[0, 512\], got 1000000"),
    ("hidden_sizes", [10**9, 16, 24, 32], ValueError, "hidden_sizes must be an int"),
    ("patch_size", 10**6, ValueError, "patch_size must be an int"),
    ("layer_norm_eps", "small", TypeError, "layer_norm_eps must be a number"),
    ("hidden_act", ["gelu"], TypeError, "hidden_act must be a string"),
    ("layer_scale_init_value", float("nan"), ValueError, "layer_scale_init_value must be a finite number"),
])
def test_bad_config_fields_name_config_json_and_the_field(tmp_path, field, value, error, expected):
    directory = model_directory(tmp_path / "model", **{field: value})
    with pytest.raises(error, match=expected) as raised:
        load_pretrained(None, directory)
    assert str(directory / "config.json") in str(raised.value)


def test_huge_timm_block_index_names_the_file_and_the_indices(tmp_path):
    path = timm_huge_block_index(tmp_path / "tiny.safetensors")
    assert path.stat().st_size < 4096
    with pytest.raises(ValueError, match=r"tiny\.safetensors.*stage 0 has block indices \[1000000\]"):
        load_pretrained(None, path)


def test_strict_false_initializes_a_few_absent_blocks_but_not_hundreds(tmp_path):
    with pytest.raises(ValueError, match=r"512 encoder blocks lack tensors.*at most 64"):
        load_pretrained(None, one_tensor_per_block(tmp_path / "sparse.safetensors"), strict=False)


def test_new_head_larger_than_the_checkpoint_is_refused(tmp_path):
    wide_head = dict(hidden_sizes=[8, 16, 24, 512])
    directory = model_directory(tmp_path / "model", wide_head, num_labels=100_000, id2label=None, label2id=None)
    expected = r"would initialize 51,300,000 parameters the checkpoint does not provide \(at most 16,777,216"
    with pytest.raises(ValueError, match=expected):
        load_pretrained(None, directory, ignore_mismatched_sizes=True)


def test_compressed_torch_archive_is_refused_before_inflating(tmp_path):
    with pytest.raises(ValueError, match=r"bomb\.pth as a PyTorch checkpoint: entries .* are compressed"):
        load_pretrained(None, zip_bomb(tmp_path / "bomb.pth"))


# ---- shard indexes --------------------------------------------------------------------------------


def sharded_directory(path):
    """A transformers directory with the weights split over two safetensors shards."""
    hf = hf_classifier()
    hf.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return hf, index


def write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def redirect_first_shard(model, index, target):
    """Point every entry of the first shard at `target` (a string written into the index)."""
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    write_index(model, index)
    return first


@pytest.mark.parametrize("where", ["dotdot", "absolute", "proc_self_cwd", "symlink_out"])
def test_shard_entries_resolving_outside_the_model_are_refused(tmp_path, monkeypatch, where):
    model = tmp_path / "model"
    _, index = sharded_directory(model)
    outside = tmp_path / "outside.safetensors"
    first = sorted(set(index["weight_map"].values()))[0]
    outside.write_bytes((model / first).read_bytes())
    monkeypatch.chdir(tmp_path)
    entry = {
        "dotdot": "../outside.safetensors",
        "absolute": str(outside),
        "proc_self_cwd": "/proc/self/cwd/outside.safetensors",
        "symlink_out": "link.safetensors",
    }[where]
    if where == "symlink_out":
        (model / "link.safetensors").symlink_to(outside)
    redirect_first_shard(model, index, entry)
    with pytest.raises(PermissionError, match=f"refusing.*{entry}") as raised:
        load_pretrained(None, model)
    assert "model.safetensors.index.json" in str(raised.value)


def test_weights_file_linking_outside_the_model_is_refused(tmp_path):
    model = tmp_path / "model"
    hf_classifier().save_pretrained(model)
    (model / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (model / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(PermissionError, match=r"refusing to read .*model\.safetensors: it resolves to .*elsewhere"):
        load_pretrained(None, model)


def test_shards_reached_through_symlinks_inside_the_model_load(tmp_path):
    """The hub cache's layout: a symlinked model directory and shards that link within it."""
    hf, index = sharded_directory(tmp_path / "real")
    first = redirect_first_shard(tmp_path / "real", index, "alias.safetensors")
    (tmp_path / "real" / "alias.safetensors").symlink_to(tmp_path / "real" / first)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    assert same_outputs(load_pretrained(None, tmp_path / "linked"), hf.eval())


@pytest.mark.parametrize("content, found", [
    ([1, 2], "found a list"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "found weight_map a list"),
    ({"weight_map": {"classifier.weight": 3}}, "found weight_map an object"),
])
def test_malformed_index_is_refused_with_what_was_found(tmp_path, content, found):
    sharded_directory(tmp_path)
    write_index(tmp_path, content)
    with pytest.raises(ValueError, match=f"index.json must be a JSON object whose 'weight_map'.*{found}"):
        load_pretrained(None, tmp_path)


def test_index_listing_tensors_no_shard_holds_is_refused(tmp_path):
    _, index = sharded_directory(tmp_path)
    index["weight_map"]["convnext.encoder.stages.9.layers.0.dwconv.weight"] = index["weight_map"]["classifier.weight"]
    write_index(tmp_path, index)
    with pytest.raises(ValueError, match=r"lists tensors its shards do not hold: 'convnext\.encoder\.stages\.9"):
        load_pretrained(None, tmp_path)


def test_shard_holding_tensors_the_index_does_not_list_is_refused(tmp_path):
    _, index = sharded_directory(tmp_path)
    del index["weight_map"]["classifier.bias"]
    write_index(tmp_path, index)
    with pytest.raises(ValueError, match=r"holds tensors that .*index\.json does not assign to it: 'classifier\.bias'"):
        load_pretrained(None, tmp_path)


# ---- config.json of a transformers directory -------------------------------------------------------
# An error, not a guess: transformers' defaults (gelu, eps 1e-12) silently differ from timm-trained
# weights; the file itself can still be loaded (its layout defines the inferred fields) or config= given.


@pytest.mark.parametrize("state, error, expected", [
    ("missing", FileNotFoundError, "has weights but no config.json"),
    ("null", ValueError, "config.json must hold a JSON object of ConvNextConfig fields, found null"),
    ("list", ValueError, "config.json must hold a JSON object of ConvNextConfig fields, found a list"),
    ("directory", IsADirectoryError, "config.json is not a file"),
])
def test_directory_without_a_usable_config_json_is_an_error(tmp_path, state, error, expected):
    hf = hf_classifier()
    hf.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config_file.unlink()
    if state in ("null", "list"):
        config_file.write_text({"null": "null", "list": "[1, 2]"}[state])
    elif state == "directory":
        config_file.mkdir()
    with pytest.raises(error, match=expected) as raised:
        load_pretrained(None, tmp_path)
    assert "pass config=ConvNextConfig" in str(raised.value)
    config = fastconvnext.ConvNextConfig.from_dict(hf.config.to_dict())
    assert same_outputs(load_pretrained(None, tmp_path, config=config), hf.eval())


# ---- dtype and map_location --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int8, torch.bool, "complex64", "float8", 3])
def test_non_floating_dtypes_are_refused(tmp_path, dtype):
    hf_classifier().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"dtype must be 'auto' or one of float32, float16, bfloat16, float64"):
        load_pretrained(None, tmp_path, dtype=dtype)


def test_map_location_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    hf_classifier().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="map_location='cuda' asks for CUDA, but PyTorch sees no CUDA device"):
        load_pretrained(None, tmp_path, map_location="cuda")
    with pytest.raises(ValueError, match="map_location='gpu please' is not a device name"):
        load_pretrained(None, tmp_path, map_location="gpu please")
    with pytest.raises(TypeError, match="map_location must be a device name"):
        load_pretrained(None, tmp_path, map_location={"cuda:0": "cpu"})


# ---- atomic save_pretrained ------------------------------------------------------------------------


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def saved_pair(tmp_path, safe_serialization=True):
    """(directory holding a saved classifier, a changed model to save over it: other weights and other labels, so
    that both config.json and the weights change)."""
    old = fastconvnext.ConvNextForImageClassification(fastconvnext.ConvNextConfig(**SMALL, num_labels=5))
    save_pretrained(old, tmp_path, safe_serialization=safe_serialization)
    labels = {i: f"new label {i}" for i in range(5)}
    new = fastconvnext.ConvNextForImageClassification(fastconvnext.ConvNextConfig(**SMALL, id2label=labels))
    with torch.no_grad():
        new.classifier.bias.add_(1.0)
    return old, new


def test_unserialisable_config_leaves_the_previous_checkpoint_untouched(tmp_path):
    old, new = saved_pair(tmp_path)
    before = snapshot(tmp_path)
    new.config.extra["note"] = {"a set", "is not JSON"}
    with pytest.raises(TypeError, match="config of ConvNextForImageClassification cannot be written as JSON"):
        save_pretrained(new, tmp_path)
    assert snapshot(tmp_path) == before
    assert same_outputs(load_pretrained(None, tmp_path), old)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_write_failing_mid_file_leaves_the_previous_checkpoint_untouched(tmp_path, monkeypatch, safe_serialization):
    old, new = saved_pair(tmp_path, safe_serialization=not safe_serialization)  # the other format is stale
    before = snapshot(tmp_path)

    def half_then_disk_full(tensors, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"\x00" * 1000)
        raise OSError(28, "No space left on device")

    if safe_serialization:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", half_then_disk_full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(new, tmp_path, safe_serialization=safe_serialization)
    assert snapshot(tmp_path) == before  # no temporary file left, old weights and config as they were
    assert same_outputs(load_pretrained(None, tmp_path), old)


def test_failed_rename_of_config_keeps_the_old_config_and_no_stray_files(tmp_path, monkeypatch):
    """The weights are renamed first: a config rename that then fails must put the old weights back."""
    old, new = saved_pair(tmp_path)
    before = snapshot(tmp_path)

    class OsWhoseConfigRenameFails:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(source, target):
            if str(target).endswith("config.json"):
                raise OSError(5, "Input/output error")
            os.replace(source, target)

    monkeypatch.setattr(safe_io, "os", OsWhoseConfigRenameFails())
    with pytest.raises(OSError, match="Input/output error"):
        save_pretrained(new, tmp_path)
    assert snapshot(tmp_path) == before
    assert same_outputs(load_pretrained(None, tmp_path), old)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process killed halfway through writing the new weights (SIGKILL: no cleanup runs)."""
    old, _ = saved_pair(tmp_path)
    before = snapshot(tmp_path)
    script = textwrap.dedent("""
        import os, signal, sys
        import safetensors.torch
        import fastconvnext

        def write_half_then_die(tensors, path, *args, **kwargs):
            with open(path, "wb") as file:
                file.write(bytes(1000))
                file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = write_half_then_die
        config = fastconvnext.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5)
        fastconvnext.ConvNextForImageClassification(config).save_pretrained(sys.argv[1])
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(safe_io.TEMP_PREFIX)} == before
    assert same_outputs(load_pretrained(None, tmp_path), old)


def test_saving_over_another_format_removes_the_stale_weights_only_after(tmp_path):
    old, new = saved_pair(tmp_path, safe_serialization=False)
    save_pretrained(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reference = transformers.ConvNextForImageClassification.from_pretrained(tmp_path).eval()
    assert same_outputs(new.eval(), reference)


def test_save_pretrained_into_a_file_path_is_refused(tmp_path):
    model, _ = saved_pair(tmp_path / "model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_pretrained(model, tmp_path / "file")


# ---- the mismatch message (issue 13.5) ---------------------------------------------------------------


def test_mismatch_message_names_the_files_keys_and_the_existing_option(tmp_path):
    base = transformers.ConvNextModel(transformers.ConvNextConfig(**SMALL))
    base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError) as raised:
        load_pretrained(fastconvnext.ConvNextModel, tmp_path, hidden_sizes=[8, 16, 24, 40])
    message = str(raised.value)
    assert "ignore_mismatched_sizes=True" in message and "--ignore-mismatched-sizes" in message
    assert "encoder.stages.3.layers.0.dwconv.weight: expected [40, 1, 7, 7], given [32, 1, 7, 7]" in message
    assert "convnext." not in message, "the file and the model have no convnext. prefix"
    assert config["architectures"] == ["ConvNextModel"]
    state = {k: v for k, v in base.state_dict().items()}
    state["encoder.stages.0.layers.0.extra.weight"] = torch.ones(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected.*\n    encoder\.stages\.0\.layers\.0\.extra\.weight given \[2\]"):
        load_pretrained(fastconvnext.ConvNextForImageClassification, tmp_path)


# ---- the import circle ---------------------------------------------------------------------------------


def test_checkpoint_module_does_not_import_modeling():
    script = (
        "import sys, fastconvnext.checkpoint as c, fastconvnext.safe_io\n"
        "assert 'fastconvnext.modeling' not in sys.modules, 'imported modeling'\n"
        "import ast, inspect\n"
        "tree = ast.parse(inspect.getsource(c))\n"
        "names = [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]\n"
        "modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]\n"
        "assert 'modeling' not in names and 'fastconvnext.modeling' not in names + modules, (names, modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pytorch_bin_index_entries_are_contained_too(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    hf = hf_classifier()
    hf.config.save_pretrained(model)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, model / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_outputs(load_pretrained(None, model), hf.eval())
    (tmp_path / "outside.bin").write_bytes((model / "pytorch_model-00001-of-00002.bin").read_bytes())
    weight_map.update({k: "../outside.bin" for k in shards["pytorch_model-00001-of-00002.bin"]})
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(PermissionError, match=r"refusing shard entry '\.\./outside\.bin' in .*bin\.index\.json"):
        load_pretrained(None, model)


def test_a_later_save_removes_what_a_killed_save_left_and_nothing_else(tmp_path):
    old, new = saved_pair(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=300)
    dead_pid, live_pid = int(gone.stdout), os.getpid()
    host = safe_io._HOST_TAG
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    stale = [f".tmp-{host}-{dead_pid}-{'a' * 12}-model.safetensors", f".tmp-{host}-{dead_pid}-{'b' * 12}-old-config.json"]
    kept = [f".tmp-{host}-{live_pid}-{'c' * 12}-model.safetensors",  # a save in progress in a live process
            f".tmp-{other_host}-{dead_pid}-{'d' * 12}-model.safetensors",  # another host's (shared file system)
            ".tmp-notes.txt", "my.tmp-file"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".tmp-{host}-{dead_pid}-{'e' * 12}-dir").mkdir()  # not a file: left alone
    kept.append(f".tmp-{host}-{dead_pid}-{'e' * 12}-dir")
    save_pretrained(new, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(stale)
    assert set(kept) <= names
    assert names - set(kept) == {"config.json", "model.safetensors"}
    assert same_outputs(load_pretrained(None, tmp_path), new)


# ---- pickles: tensors that overlap in memory, deep nesting -----------------------------------------------


def pickled_classifier(path, edit=None):
    """(path, reference model): a small classifier's state dict saved with torch.save, after `edit(state)`."""
    model = fastconvnext.ConvNextForImageClassification(fastconvnext.ConvNextConfig(**SMALL, num_labels=5)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if edit is not None:
        edit(state)
    torch.save(state, path)
    return path, model


def expand_one(state):
    key = "convnext.encoder.stages.3.layers.0.pwconv1.weight"
    state[key] = torch.zeros(1).expand(state[key].shape)


def alias_two(state):
    state["convnext.encoder.stages.2.layers.1.pwconv2.weight"] = state["convnext.encoder.stages.2.layers.0.pwconv2.weight"]


def overlapping_slices(state):
    first, second = "convnext.encoder.stages.3.layers.0.pwconv1.weight", "convnext.encoder.stages.3.layers.0.pwconv2.weight"
    base = torch.zeros(state[first].numel() + 10)
    state[first] = base[: state[first].numel()].view(state[first].shape)
    state[second] = base[10: 10 + state[second].numel()].view(state[second].shape)


def overlapping_strides(state):
    key = "convnext.encoder.stages.0.layers.0.dwconv.weight"  # [8, 1, 7, 7]: rows that share 42 of 49 elements
    state[key] = torch.zeros(8 * 7 + 49).as_strided(state[key].shape, (7, 49, 7, 1))


@pytest.mark.parametrize("edit, expected", [
    (expand_one, r"tensor 'convnext\.encoder\.stages\.3\.layers\.0\.pwconv1\.weight' \(shape \[128, 32\], strides "
                 r"\[0, 0\]\) repeats elements in memory"),
    (overlapping_strides, r"tensor 'convnext\.encoder\.stages\.0\.layers\.0\.dwconv\.weight' .* repeats elements"),
    (alias_two, r"tensors 'convnext\.encoder\.stages\.2\.layers\.0\.pwconv2\.weight' and "
                r"'convnext\.encoder\.stages\.2\.layers\.1\.pwconv2\.weight' share storage bytes"),
    (overlapping_slices, r"tensors .*pwconv1\.weight' and .*pwconv2\.weight' share storage bytes"),
])
def test_pickled_tensors_that_overlap_in_memory_are_refused(tmp_path, edit, expected):
    """A pickle can give many large tensors one small storage; each such file declared more parameters than it
    held and loaded (all the elements of a stride-0 view, every alias, allocated anew in the model)."""
    path, _ = pickled_classifier(tmp_path / "aliased.pth", edit)
    with pytest.raises(ValueError, match=expected) as raised:
        load_pretrained(None, path)
    assert str(path) in str(raised.value)


def test_pickled_tensors_that_share_a_storage_without_overlapping_still_load(tmp_path):
    """Views are refused only when elements overlap: a transposed (non-contiguous) weight, a channels_last conv
    and two disjoint slices of one storage are what some training code saves, and load as they are."""
    def distinct_views(state):
        key = "convnext.encoder.stages.1.layers.0.pwconv1.weight"
        state[key] = state[key].t().contiguous().t()
        key = "convnext.embeddings.patch_embeddings.weight"
        state[key] = state[key].contiguous(memory_format=torch.channels_last)
        first, second = "convnext.encoder.stages.3.layers.0.pwconv1.weight", "convnext.encoder.stages.3.layers.0.pwconv2.weight"
        base = torch.cat([state[first].flatten(), state[second].flatten()])
        state[first] = base[: state[first].numel()].view(state[first].shape)
        state[second] = base[state[first].numel():].view(state[second].shape)

    path, reference = pickled_classifier(tmp_path / "views.pth", distinct_views)
    assert not torch.load(path)["convnext.encoder.stages.1.layers.0.pwconv1.weight"].is_contiguous()
    assert same_outputs(load_pretrained(None, path), reference)


@pytest.mark.parametrize("depth, expected", [
    (1500, r"its pickle nests containers more than 100 deep"),
    (10, r"nests its state dict under more than 4 'model' / 'state_dict' wrappers"),
])
def test_deeply_nested_pickles_fail_clearly(tmp_path, depth, expected):
    """1,500 wrappers (28 KB) used to end in RecursionError; nesting is now measured from the opcodes, before
    anything is unpickled."""
    path = nested_wrappers(tmp_path / "nested.pth", depth)
    with pytest.raises(ValueError, match=expected) as raised:
        load_pretrained(None, path)
    assert str(path) in str(raised.value)


def test_keys_that_would_recurse_when_printed_are_reported_briefly(tmp_path):
    """A non-string key nested 60 deep (within the nesting bound) is reported through a bounded repr."""
    key = 0
    for _ in range(60):
        key = (key,)
    torch.save({key: torch.zeros(1)}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys.pth holds tensors under keys that are not strings: \[\(\(\(\.\.\.") \
            as raised:
        load_pretrained(None, tmp_path / "keys.pth")
    assert len(str(raised.value)) < 400


def test_pickle_nesting_is_measured_without_unpickling():
    """The opcode walk against pickle itself: the depth of what pickle.loads would build, exactly where each
    container has its own opcode (protocol 4+), never less where older protocols build sets through REDUCE."""
    import pickle

    cases = {"flat": {"a": 1}, "tuples": ((((1,),),),), "list in dict": {"a": [[1, 2], [3]]}, "set": {frozenset({1})},
             "shared": [[1]] * 3}
    expected = {"flat": 1, "tuples": 4, "list in dict": 3, "set": 2, "shared": 2}
    for name, value in cases.items():
        for protocol in (0, 2, 4, 5):
            depth = checkpoint._pickle_nesting(io.BytesIO(pickle.dumps(value, protocol=protocol)), 100)
            assert depth == expected[name] if protocol >= 4 else depth >= expected[name], (name, protocol, depth)
    with pytest.raises(checkpoint._DamagedPickle):
        checkpoint._pickle_nesting(io.BytesIO(b"\x80\x02t."), 100)  # TUPLE without a MARK


def test_fifos_and_other_special_files_fail_clearly_in_bounded_time(tmp_path):
    """A FIFO as the checkpoint, as config.json or as a weights file used to block the load forever (open()
    waits for a writer); opened non-blocking and checked with fstat, each is an error naming it."""
    fifo_file = tmp_path / "checkpoint.pth"
    os.mkfifo(fifo_file)
    config_fifo = tmp_path / "config_fifo"
    hf_classifier().save_pretrained(config_fifo)
    (config_fifo / "config.json").unlink()
    os.mkfifo(config_fifo / "config.json")
    weights_fifo = tmp_path / "weights_fifo"
    hf_classifier().save_pretrained(weights_fifo)
    (weights_fifo / "model.safetensors").unlink()
    os.mkfifo(weights_fifo / "model.safetensors")
    script = textwrap.dedent("""
        import json, sys
        from fastconvnext.checkpoint import load_pretrained
        from fastconvnext.configuration import ConvNextConfig
        calls = {
            "load the FIFO": lambda p: load_pretrained(None, p),
            "load the folder": lambda p: load_pretrained(None, p),
            "config from the FIFO": lambda p: ConvNextConfig.from_json_file(p),
        }
        results = []
        for what, path in json.loads(sys.argv[1]):
            try:
                calls[what](path)
                results.append([what, "loaded", ""])
            except (ValueError, TypeError, OSError) as err:
                results.append([what, type(err).__name__, str(err)])
        print(json.dumps(results))
    """)
    cases = [("load the FIFO", fifo_file), ("load the folder", config_fifo), ("load the folder", weights_fifo),
             ("config from the FIFO", config_fifo / "config.json")]
    argument = json.dumps([[what, str(path)] for what, path in cases])
    done = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for (what, path), (_, kind, message) in zip(cases, json.loads(done.stdout.strip().splitlines()[-1])):
        assert kind != "loaded", (what, path)
        assert str(path) in message, (what, message)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert "is a FIFO (named pipe), expected a regular file" in results[0][2]
    assert "holds none of model.safetensors" in results[2][2]


# ---- symbolic links swapped in after the check --------------------------------------------------------------


def swap_for_link_after_check(monkeypatch, target_name, outside):
    """Right after checkpoint._require_inside approves `target_name`, replace it with a symlink to `outside` (an
    attacker who wins the race between the check and the open)."""
    real_check, swapped = checkpoint._require_inside, []

    def check_then_swap(root, path, what):
        result = real_check(root, path, what)
        if Path(path).name == target_name and not swapped:
            os.unlink(path)
            os.symlink(outside, path)
            swapped.append(path)
        return result

    monkeypatch.setattr(checkpoint, "_require_inside", check_then_swap)
    return swapped


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "shard"])
def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path, monkeypatch, target):
    model = tmp_path / "model"
    if target == "shard":
        _, index = sharded_directory(model)
        target = sorted(set(index["weight_map"].values()))[0]
    else:
        hf_classifier().save_pretrained(model)
    outside = tmp_path / f"outside-{target}"
    outside.write_bytes((model / target).read_bytes())  # a well-formed file of the same kind, outside the folder
    swapped = swap_for_link_after_check(monkeypatch, target, outside)
    with pytest.raises(PermissionError, match=f"refusing to read .*{target}.* outside the model directory") as raised:
        load_pretrained(None, model)
    assert swapped and str(model) in str(raised.value)


class OsThatSwapsBeforeOpening:
    """safe_io's os module, whose first os.open of `victim` is preceded by `swap()`."""

    def __init__(self, victim, swap):
        self.victim, self.swap, self.done = str(victim), swap, False

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, *args, **kwargs):
        if not self.done and os.fspath(path) == self.victim:
            self.done = True
            self.swap()
        return os.open(path, *args, **kwargs)


def test_open_regular_file_refuses_a_final_component_swapped_for_a_symlink(tmp_path, monkeypatch):
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (tmp_path / "secret.json").write_text('{"secret": 1}')

    def swap():
        (root / "config.json").unlink()
        (root / "config.json").symlink_to(tmp_path / "secret.json")

    monkeypatch.setattr(safe_io, "os", OsThatSwapsBeforeOpening((root / "config.json").resolve(), swap))
    with pytest.raises(PermissionError, match=r"config\.json became a symbolic link after it was checked"):
        safe_io.open_regular_file(root / "config.json", root.resolve())


def test_open_regular_file_refuses_a_directory_swapped_for_a_symlink(tmp_path, monkeypatch):
    """O_NOFOLLOW guards the last component only; the kernel's path of the opened file catches the rest."""
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "config.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text('{"secret": 1}')

    def swap():
        (root / "sub").rename(root / "moved")
        (root / "sub").symlink_to(tmp_path / "elsewhere")

    monkeypatch.setattr(safe_io, "os", OsThatSwapsBeforeOpening((root / "sub" / "config.json").resolve(), swap))
    with pytest.raises(PermissionError, match=r"the file opened is .*elsewhere/config\.json, outside the model"):
        safe_io.open_regular_file(root / "sub" / "config.json", root.resolve())


# ---- writes: file names near NAME_MAX, a full disk ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a" * 250 + ".json", "é" * 120 + ".json"])
def test_atomic_writes_keep_the_staged_name_within_name_max(tmp_path, name):
    """The staged name adds ~40 bytes of prefix; a valid name over ~215 bytes used to fail with ENAMETOOLONG."""
    assert len(os.fsencode(name)) <= 255
    safe_io.write_text_atomically(tmp_path / name, "{}")
    assert (tmp_path / name).read_text() == "{}"
    assert os.listdir(tmp_path) == [name]
    staged = safe_io.staged_name(tmp_path, name)
    assert len(os.fsencode(staged)) <= 255 and staged.startswith(safe_io.TEMP_PREFIX)


def test_a_full_disk_is_a_clear_oserror_and_leaves_the_old_files_whole(tmp_path):
    """RLIMIT_FSIZE makes every write past 4 KB fail with EFBIG, as a full disk fails with ENOSPC. safetensors
    reported it as SafetensorError, torch.save as RuntimeError, and ConvNextConfig.save_pretrained truncated the
    old config.json; now each is an OSError naming the file, and the previous files are untouched."""
    script = textwrap.dedent("""
        import json, resource, signal, sys
        from pathlib import Path
        import fastconvnext
        from fastconvnext.configuration import ConvNextConfig
        folder = Path(sys.argv[1])
        small = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5)
        fastconvnext.ConvNextForImageClassification(ConvNextConfig(**small)).save_pretrained(folder / "model")
        ConvNextConfig(**small).save_pretrained(folder / "config")
        before = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        labels = {i: f"a longer label number {i}" for i in range(500)}
        bigger = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], id2label=labels)
        model = fastconvnext.ConvNextForImageClassification(bigger)
        results = []
        for what, call in [
            ("safetensors", lambda: model.save_pretrained(folder / "model")),
            ("bin", lambda: model.save_pretrained(folder / "model", safe_serialization=False)),
            ("config save_pretrained", lambda: bigger.save_pretrained(folder / "config")),
            ("config to_json_file", lambda: bigger.to_json_file(folder / "config" / "config.json")),
        ]:
            try:
                call()
                results.append([what, "saved", ""])
            except Exception as err:
                results.append([what, type(err).__name__, str(err)])
        after = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        print(json.dumps({"results": results, "unchanged": after == before}))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"safetensors": "model/model.safetensors: File too large", "bin": "model/pytorch_model.bin",
                "config save_pretrained": "config/config.json: File too large",
                "config to_json_file": "config/config.json: File too large"}
    for what, kind, message in report["results"]:
        assert kind in ("OSError", "FileTooLargeError"), (what, kind, message)
        assert f"cannot write {tmp_path}/{expected[what]}" in message, (what, message)
    assert report["unchanged"], "a failed save changed the previous files"
