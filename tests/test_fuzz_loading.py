"""Fuzzing the loader (issue 12 item 7, checkpoint side): mutated safetensors (header and body), .bin and
.pth archives, config.json and shard indexes either load or raise one of the documented errors
(ValueError, TypeError, OSError), each within a deadline, and nothing outside the model's folder is read.

Reads are watched twice: an audit hook sees every Python-level open(), and a spy on the loader's single
entry point for weight files sees the paths handed to safetensors' Rust reader, which Python's audit
hooks cannot see. A canary file beside the model folder is what hostile shard names aim at.

Two more fuzzers cover what mutating bytes cannot reach: pickles whose tensors alias one another (stride-0,
shared, transposed and spaced views; exactly the overlapping ones must be refused, the rest load their values),
and a save into a folder with a load or a second save started in another thread at a drawn step of it, plus a
kill replayed at that step (every load returns one whole checkpoint). They synchronise on events and on
safe_io._on_lock_busy, never on sleeps.

Bounded for CI: derandomized (the same cases every run, so never flaky), a per-example deadline, and a
total time budget after which the remaining examples are skipped; the number of cases run is printed
(400 mutations, 60 aliased pickles, 24 concurrent interleavings: about 15 s on two idle cores).
FASTCONVNEXT_FUZZ_EXAMPLES=N runs N random cases of each instead (for changes to checkpoint.py or safe_io.py).
"""
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import fastconvnext
from fastconvnext import checkpoint, safe_io

DOCUMENTED_ERRORS = (ValueError, TypeError, OSError)
# FASTCONVNEXT_FUZZ_EXAMPLES=5000 runs that many random (not derandomized) cases with no time budget.
RANDOM_EXAMPLES = int(os.environ.get("FASTCONVNEXT_FUZZ_EXAMPLES", "0"))
TIME_BUDGET_S = float("inf") if RANDOM_EXAMPLES else 40.0
DEADLINE = timedelta(seconds=20)  # per example; a load here takes ~0.1 s on an idle machine
CONFIG = fastconvnext.ConvNextConfig(num_stages=2, hidden_sizes=[4, 8], depths=[1, 1], num_labels=3)
CANARY = "canary.safetensors"
HOSTILE_NAMES = [
    f"../{CANARY}", f"../../{CANARY}", "/etc/passwd", f"/proc/self/cwd/{CANARY}", "/dev/zero", "",
    "model-00001-of-00002.safetensors/..", "./model-00002-of-00002.safetensors", "\x00", "a" * 300,
    "model.safetensors.index.json", "config.json", "link-out.safetensors",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from([0, 1, -1, 10**6, 10**12, 1e-12, "gelu", "stage1", "float16", "complex64"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


class ReadWatch:
    """Files opened or handed to a weight reader while `active`; installed once (audit hooks stay)."""

    def __init__(self):
        self.active, self.paths = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))

    def outside(self, folder):
        """Paths read outside `folder` (Python's own library files, read by lazy imports, excepted)."""
        folder, library = folder.resolve(), [Path(p).resolve() for p in {sys.prefix, sys.base_prefix}]
        found = []
        for path in self.paths:
            resolved = Path(path).resolve()
            if not resolved.is_relative_to(folder) and not any(resolved.is_relative_to(p) for p in library):
                found.append(path)
        return found


WATCH = ReadWatch()


def tensors_of(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_templates(root):
    """The valid checkpoints the mutations start from, one folder each, with a canary beside them."""
    torch.manual_seed(0)
    model = fastconvnext.ConvNextForImageClassification(CONFIG)
    tensors = tensors_of(model)
    config_text = json.dumps(CONFIG.to_dict())
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = root / "sharded"
    sharded.mkdir()
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text(config_text)
    pickled = root / "pickled"
    pickled.mkdir()
    torch.save(tensors, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text(config_text)
    single = root / "single"
    single.mkdir()
    save_file(tensors, str(single / "weights.safetensors"))
    torch.save({"model": {k.replace("convnext.", ""): v for k, v in tensors.items()}}, single / "wrapped.pth")
    save_file({"x": torch.zeros(4)}, str(root / CANARY))
    return {"sharded": sharded, "pickled": pickled, "single": single}


@pytest.fixture(scope="module")
def templates():
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        folders = write_templates(root)
        for source in (folders["sharded"], folders["pickled"], folders["single"] / "weights.safetensors"):
            checkpoint.load_pretrained(None, source)  # every lazy import happens here, not under the watch
        yield root, folders


# ---- mutations ----------------------------------------------------------------------------------------

BYTE_EDITS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.floats(0, 1), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("header_length"), st.just(0.0), st.sampled_from([0, 7, 2**31, 2**63 - 1, 10**8])),
    ),
    min_size=1, max_size=4,
)


def edit_bytes(data, edits):
    data = bytearray(data)
    for kind, where, value in edits:
        position = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "set" and data:
            data[position] = value
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = value
        elif kind == "header_length" and len(data) >= 8:
            data[:8] = value.to_bytes(8, "little")
    return bytes(data)


def edit_json(value, path, replacement, delete):
    """`value` with the entry reached by following `path` (indices into keys/items) replaced or deleted."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return replacement
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[path[0] % len(keys)]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if delete and len(path) == 1:
        del copy[key]
        return copy
    copy[key] = edit_json(value[key], path[1:], replacement, delete)
    return copy


JSON_EDITS = st.tuples(st.lists(st.integers(0, 50), max_size=3), JSON_VALUES, st.booleans())
INDEX_EDITS = st.tuples(st.integers(0, 10**6), st.sampled_from(HOSTILE_NAMES) | st.text(max_size=40))
CASES = st.one_of(
    st.tuples(st.just("config.json"), st.sampled_from(["sharded", "pickled"]), JSON_EDITS),
    st.tuples(st.just("index json"), st.just("sharded"), JSON_EDITS),
    st.tuples(st.just("index entry"), st.just("sharded"), INDEX_EDITS),
    st.tuples(st.just("bytes"), st.sampled_from([
        "sharded/model-00001-of-00002.safetensors", "sharded/model.safetensors.index.json",
        "pickled/pytorch_model.bin", "single/weights.safetensors", "single/wrapped.pth", "sharded/config.json",
    ]), BYTE_EDITS),
)


def apply_case(case, folder):
    """Mutate the copy in `folder`; return what to load."""
    kind, target, edit = case
    if kind == "bytes":
        file = folder / target
        file.write_bytes(edit_bytes(file.read_bytes(), edit))
        return file if target.startswith("single/") else file.parent
    directory = folder / target
    if kind == "index entry":
        index_file = directory / "model.safetensors.index.json"
        index = json.loads(index_file.read_text())
        names = sorted(index["weight_map"])
        position, name = edit
        if name == "link-out.safetensors":
            (directory / name).symlink_to(folder / CANARY)
        index["weight_map"][names[position % len(names)]] = name
        index_file.write_text(json.dumps(index))
        return directory
    file = directory / ("config.json" if kind == "config.json" else "model.safetensors.index.json")
    path, replacement, delete = edit
    file.write_text(json.dumps(edit_json(json.loads(file.read_text()), path, replacement, delete)))
    return directory


def load_one_case(root, folders, case):
    """Copy the templates, apply `case`, load it under the watch; return 'loaded' or 'refused'."""
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        folder = Path(scratch)
        for name, source in folders.items():
            shutil.copytree(source, folder / name)
        shutil.copy(root / CANARY, folder / CANARY)  # what hostile names reach from inside a model folder
        source = apply_case(case, folder)
        model_folder = source if source.is_dir() else source.parent
        handed_to_readers = []
        original_read_file = checkpoint._read_file

        def spied_read_file(path, reader):
            handed_to_readers.append(str(path))
            return original_read_file(path, reader)

        WATCH.paths, WATCH.active = [], True
        checkpoint._read_file = spied_read_file
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checkpoint.load_pretrained(None, source)
            outcome = "loaded"
        except DOCUMENTED_ERRORS as err:
            assert str(model_folder) in str(err), f"{type(err).__name__} not naming {model_folder} for {case}: {err}"
            outcome = "refused"
        finally:
            WATCH.active = False
            checkpoint._read_file = original_read_file
        outside = WATCH.outside(model_folder) + [p for p in handed_to_readers if not Path(p).resolve().is_relative_to(
            model_folder.resolve())]
        assert outside == [], f"read outside {model_folder} for {case}"
        return outcome


def test_mutated_checkpoints_load_or_fail_with_documented_errors_inside_the_folder(templates):
    root, folders = templates
    counts = {"loaded": 0, "refused": 0, "skipped after the budget": 0}
    started = time.monotonic()

    @settings(max_examples=RANDOM_EXAMPLES or 400, deadline=DEADLINE, derandomize=not RANDOM_EXAMPLES, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=CASES)
    def run(case):
        if time.monotonic() - started > TIME_BUDGET_S:
            counts["skipped after the budget"] += 1
            assume(False)
        counts[load_one_case(root, folders, case)] += 1

    run()
    ran = counts["loaded"] + counts["refused"]
    print(f"fuzz cases run: {ran} in {time.monotonic() - started:.0f} s ({counts})")
    assert ran >= 25, f"the time budget left too few cases: {counts}"


# ---- pickles whose tensors alias one another ------------------------------------------------------------------

VIEWS = st.sampled_from(["own", "own", "expand", "shared", "transposed", "every other"])
ALIASED_CASES = st.tuples(
    st.lists(st.tuples(VIEWS, st.integers(0, 4096)), min_size=1, max_size=24),  # one (view, offset) per tensor
    st.booleans(),  # the zip archive torch.save writes, or the legacy format
    st.sampled_from(["direct", "under 'model'"]),
)


def aliased_state(template, views):
    """The template's tensors remade as the drawn views; returns (state dict, whether any elements overlap)."""
    names = sorted(template)
    assigned = [views[position % len(views)] for position in range(len(names))]
    shared_length = max([offset + template[n].numel() for n, (kind, offset) in zip(names, assigned) if kind == "shared"],
                        default=0)
    shared, regions, overlapping, state = torch.zeros(shared_length), [], False, {}
    for name, (kind, offset) in zip(names, assigned):
        tensor = template[name]
        if kind == "expand" and tensor.numel() > 1:
            state[name], overlapping = tensor.flatten()[:1].clone().expand(tensor.shape), True
        elif kind == "shared":
            view = shared[offset: offset + tensor.numel()]
            view.copy_(tensor.flatten())  # an earlier overlapping view's values are overwritten: the file holds these
            state[name] = view.view(tensor.shape)
            overlapping |= any(offset < end and start < offset + tensor.numel() for start, end in regions)
            regions.append((offset, offset + tensor.numel()))
        elif kind == "transposed" and tensor.dim() == 2:
            state[name] = tensor.t().contiguous().t()
        elif kind == "every other":
            spaced = torch.zeros(2 * tensor.numel())
            spaced[::2] = tensor.flatten()
            state[name] = spaced[::2].view(tensor.shape)
        else:
            state[name] = tensor.clone()
    return state, overlapping


def test_pickles_of_aliased_storages_load_only_what_they_hold(templates):
    """torch.save pickles with stride-0 views, views of one storage (overlapping or not), transposed and spaced
    views: exactly those whose elements overlap are refused, naming the file; the others load with their values,
    and what loads never declares more tensor bytes than the file holds."""
    root, _ = templates
    torch.manual_seed(0)
    template = tensors_of(fastconvnext.ConvNextForImageClassification(CONFIG))
    counts = {"loaded": 0, "refused": 0}

    @settings(max_examples=RANDOM_EXAMPLES or 60, deadline=DEADLINE, derandomize=not RANDOM_EXAMPLES, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=ALIASED_CASES)
    def run(case):
        views, zip_format, wrapping = case
        state, overlapping = aliased_state(template, views)
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            path = Path(scratch) / "aliased.pth"
            saved = {"model": state} if wrapping != "direct" else state
            torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = checkpoint.load_pretrained(None, path)
            except DOCUMENTED_ERRORS as err:
                assert overlapping, f"refused a checkpoint whose tensors do not overlap: {err}"
                assert str(path) in str(err) and ("repeats elements" in str(err) or "share storage" in str(err)), err
                counts["refused"] += 1
                return
            assert not overlapping, "loaded a checkpoint whose tensors overlap in memory"
            declared = sum(t.numel() * t.element_size() for t in state.values())
            assert declared <= path.stat().st_size
            loaded = model.state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in state.items())
            counts["loaded"] += 1

    run()
    print(f"aliased pickles: {counts}")
    assert counts["loaded"] and counts["refused"], counts


# ---- saves and loads of one folder at once, and kills at any step ---------------------------------------------

NAME_CHANGES = ("replace", "rename", "unlink", "link", "symlink", "open")
CONCURRENT_CASES = st.tuples(
    st.sampled_from(["safetensors", "bin"]),  # the format in the folder before
    st.sampled_from(["safetensors", "bin"]),  # the format the foreground save writes
    st.integers(0, 15),  # at which of the save's name changes the background starts (and a kill is replayed)
    st.sampled_from(["load", "save"]),  # what runs in the background: a load, or a save of a third model
    st.sampled_from(["safetensors", "bin"]),  # the background save's format
)


def labelled_model(tag, seed):
    config = fastconvnext.ConvNextConfig(num_stages=2, hidden_sizes=[4, 8], depths=[1, 1],
                                         id2label={i: f"{tag} {i}" for i in range(3)})
    torch.manual_seed(seed)
    return fastconvnext.ConvNextForImageClassification(config).eval()


def saved_by(model, references):
    """Which reference `model` was loaded from; a config.json of one beside the weights of another fails."""
    by_labels = model.config.id2label[0].split()[0]
    state = model.state_dict()
    by_weights = [tag for tag, reference in references.items()
                  if all(torch.equal(state[k], v) for k, v in reference.state_dict().items())]
    assert by_weights == [by_labels], f"config.json of {by_labels!r} beside the weights of {by_weights}"
    return by_labels


def folder_files(directory):
    files = {}
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as file:
                files[entry.name] = file.read()
    return files


def test_concurrent_saves_and_loads_always_see_one_whole_checkpoint(templates):
    """A save into a folder that already holds a checkpoint, with, started at a drawn step of it, a load or a
    second save in another thread (the foreground waits until that one finishes or waits for the folder's lock:
    events, no sleeps), and a kill replayed at the same step (the folder as it was then, loaded afresh). Every
    load returns one whole checkpoint; the folder ends with one."""
    root, _ = templates
    references = {"old": labelled_model("old", 1), "new": labelled_model("new", 2), "other": labelled_model("other", 3)}
    counts = {"background waited": 0, "background ran through": 0, "kill replays": 0}
    real = {name: getattr(os, name) for name in NAME_CHANGES}

    @settings(max_examples=RANDOM_EXAMPLES or 24, deadline=DEADLINE, derandomize=not RANDOM_EXAMPLES, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=CONCURRENT_CASES)
    def run(case):
        before, after, step, background_kind, background_format = case
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            folder = Path(scratch) / "model"
            folder.mkdir()
            references["old"].save_pretrained(folder, safe_serialization=before == "safetensors")
            outcome, settled, calls, replay = {}, threading.Event(), [], []

            def background():
                try:
                    if background_kind == "load":
                        outcome["loaded"] = saved_by(checkpoint.load_pretrained(None, folder), references)
                    else:
                        references["other"].save_pretrained(folder, safe_serialization=background_format == "safetensors")
                except BaseException as err:  # re-raised in the foreground
                    outcome["error"] = err
                finally:
                    settled.set()

            worker = threading.Thread(target=background, daemon=True)

            def busy(directory, exclusive):
                if threading.current_thread() is worker:
                    outcome["waited"] = True
                    settled.set()

            def watching(name):
                def call(*args, **kwargs):
                    in_folder = any(isinstance(a, (str, os.PathLike)) and Path(os.fsdecode(a)).parent == folder
                                    for a in args[:2])
                    changes = name != "open" or (len(args) > 1 and args[1] & os.O_CREAT)
                    if in_folder and changes and threading.current_thread() is not worker:
                        calls.append(name)
                        if len(calls) == step + 1:
                            replay.append(folder_files(folder))
                            worker.start()
                            assert settled.wait(120), "the background load/save neither finished nor waited"
                    return real[name](*args, **kwargs)
                return call

            real_busy = getattr(safe_io, "_on_lock_busy", None)
            safe_io._on_lock_busy = busy
            for name in NAME_CHANGES:
                setattr(os, name, watching(name))
            try:
                references["new"].save_pretrained(folder, safe_serialization=after == "safetensors")
            finally:
                for name in NAME_CHANGES:
                    setattr(os, name, real[name])
                safe_io._on_lock_busy = real_busy
            if not worker.is_alive() and not settled.is_set():  # the save made fewer changes than `step`
                worker.start()
            worker.join(120)
            assert not worker.is_alive()
            if "error" in outcome:
                raise outcome["error"]
            counts["background waited" if outcome.get("waited") else "background ran through"] += 1
            final = saved_by(checkpoint.load_pretrained(None, folder), references)
            if background_kind == "load":
                assert outcome["loaded"] in ("old", "new") and final == "new"
                if outcome.get("waited"):
                    assert outcome["loaded"] == "new"
            else:
                assert final in ("new", "other")
            for state in replay:
                crashed = Path(scratch) / "crashed"
                crashed.mkdir()
                for name, content in state.items():
                    (crashed / name).write_bytes(content)
                assert saved_by(checkpoint.load_pretrained(None, crashed), references) in ("old", "new")
                counts["kill replays"] += 1

    run()
    print(f"concurrent saves and loads: {counts}")
    assert counts["background waited"] and counts["background ran through"] and counts["kill replays"], counts
