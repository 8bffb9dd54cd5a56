"""Saves and loads of one folder at the same time, and saves killed at every step.

Every test here checks one invariant: whatever happens, the folder holds, and a load returns, ONE whole
checkpoint (config.json's labels and the weights of the same save), never a mix, never nothing.

Interleavings are forced, not hoped for: a save or load in a second thread is started at a chosen point of the
first one (a rename, a file read), and the first waits until the second has either finished or reported, through
safe_io._on_lock_busy, that it is waiting for the folder's lock. No sleep decides an outcome.

Crashes are replayed, not provoked: every call that changes a name in the folder (os.replace, os.rename,
os.unlink, os.link, os.symlink, os.open with O_CREAT) first copies the folder aside, which is exactly what a
process killed just before that call would leave on disk. Each copy must then load as the old or the new
checkpoint, with fastconvnext (which rolls back an interrupted save) and afterwards with transformers.
"""
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fastconvnext
from fastconvnext import checkpoint, safe_io
from fastconvnext.checkpoint import load_pretrained, save_pretrained

SMALL = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
SETTLE_TIMEOUT_S = 120  # a safety net only: reaching it fails the test
JOURNAL = ".fastconvnext-journal.json"  # JOURNAL


def classifier(tag, seed):
    """A small classifier whose labels say which save it is ("old label 0", ...) and whose weights are random."""
    config = fastconvnext.ConvNextConfig(**SMALL, id2label={i: f"{tag} label {i}" for i in range(5)})
    model = fastconvnext.ConvNextForImageClassification(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


MODELS = {"old": classifier("old", 1), "new": classifier("new", 2), "other": classifier("other", 3)}


def which(model):
    """'old', 'new' or 'other': the save `model` was loaded from; fails on a mix of two saves."""
    by_labels = model.config.id2label[0].split()[0]
    state = model.state_dict()
    by_weights = [tag for tag, reference in MODELS.items()
                  if all(torch.equal(state[k], v) for k, v in reference.state_dict().items())]
    assert by_weights == [by_labels], f"config.json of the {by_labels!r} save beside the weights of {by_weights}"
    return by_labels


def hf_twin(tag):
    """The transformers classifier with the weights and labels of MODELS[tag]."""
    ours = MODELS[tag]
    hf = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**ours.config.to_dict()))
    hf.load_state_dict(ours.state_dict())
    return hf.eval()


def write_checkpoint(directory, tag, kind):
    """MODELS[tag] saved in `directory` as kind: 'safetensors' / 'bin' (fastconvnext), 'sharded' (transformers'
    sharded safetensors) or 'sharded-bin' (two pytorch_model-*.bin shards and their index)."""
    if kind == "safetensors":
        save_pretrained(MODELS[tag], directory)
    elif kind == "bin":
        save_pretrained(MODELS[tag], directory, safe_serialization=False)
    elif kind == "sharded":
        hf_twin(tag).save_pretrained(directory, max_shard_size="60KB")
        assert (directory / "model.safetensors.index.json").is_file()
    else:
        hf_twin(tag).config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in MODELS[tag].state_dict().items()}
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[:12], "pytorch_model-00002-of-00002.bin": names[12:]}
        for shard, keys in shards.items():
            torch.save({k: state[k] for k in keys}, directory / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save(tag, directory, kind):
    save_pretrained(MODELS[tag], directory, safe_serialization=kind == "safetensors")


def visible_files(directory):
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(safe_io.TEMP_PREFIX))


def weights_files(kind):
    return {"safetensors": ["config.json", "model.safetensors"], "bin": ["config.json", "pytorch_model.bin"]}[kind]


# ---- forced interleavings ------------------------------------------------------------------------------


class Background:
    """Runs `function` in a thread. `settled` is set when it returns or raises, or when it reports (through
    safe_io._on_lock_busy) that it waits for the folder's lock held by the foreground."""

    def __init__(self, monkeypatch, function):
        self.function, self.result, self.error = function, None, None
        self.settled, self.waited = threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        monkeypatch.setattr(safe_io, "_on_lock_busy", self._busy, raising=False)

    def _busy(self, directory, exclusive):
        if threading.current_thread() is self.thread:
            self.waited = True
            self.settled.set()

    def _run(self):
        try:
            self.result = self.function()
        except BaseException as err:  # reported by join()
            self.error = err
        finally:
            self.settled.set()

    def start_and_settle(self):
        self.thread.start()
        assert self.settled.wait(SETTLE_TIMEOUT_S), "the background save/load neither finished nor waited"

    def join(self):
        self.thread.join(SETTLE_TIMEOUT_S)
        assert not self.thread.is_alive(), "the background save/load did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@contextmanager
def on_first_rename_of_a_final_name(monkeypatch, directory, action):
    """Run `action` once, just after the first os.replace that gives a file its final name in `directory`."""
    real_replace, done = os.replace, []

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        name = Path(os.fsdecode(target)).name
        if not done and Path(os.fsdecode(target)).parent == directory and not name.startswith(".") and \
                name.endswith((".safetensors", ".bin", ".json")):
            done.append(name)
            action()

    monkeypatch.setattr(os, "replace", replace)
    yield done
    monkeypatch.setattr(os, "replace", real_replace)
    assert done, "no file was renamed to its final name"


@pytest.mark.parametrize("first, second", [("safetensors", "bin"), ("bin", "safetensors")])
@pytest.mark.parametrize("point", ["at the first rename", "after the commit"])
def test_two_saves_into_one_folder_leave_one_whole_checkpoint(tmp_path, monkeypatch, first, second, point):
    """The second save starts while the first is committing (or has just committed, before anything else); each
    used to delete the other's fresh weights, leaving config.json alone, and both returned."""
    write_checkpoint(tmp_path, "old", first)
    second_save = Background(monkeypatch, lambda: save("other", tmp_path, second))
    if point == "at the first rename":
        with on_first_rename_of_a_final_name(monkeypatch, tmp_path, second_save.start_and_settle):
            save("new", tmp_path, first)
    else:
        real_commit = safe_io.StagedFiles.commit

        def commit_then_start_the_second(self, *args, **kwargs):
            written = real_commit(self, *args, **kwargs)
            if threading.current_thread() is not second_save.thread:
                second_save.start_and_settle()
            return written

        monkeypatch.setattr(safe_io.StagedFiles, "commit", commit_then_start_the_second)
        save("new", tmp_path, first)
    second_save.join()
    winner = which(load_pretrained(None, tmp_path))
    assert visible_files(tmp_path) == weights_files(second if winner == "other" else first)
    assert sorted(os.listdir(tmp_path)) == visible_files(tmp_path), "staged files or a journal left behind"
    assert which(transformers.ConvNextForImageClassification.from_pretrained(tmp_path)) == winner
    if second_save.waited:  # it waited for the first save's lock, so it ran last
        assert winner == "other"


@pytest.mark.parametrize("old_kind, new_kind", [("safetensors", "safetensors"), ("bin", "safetensors"),
                                                ("safetensors", "bin")])
def test_a_load_during_a_save_sees_one_whole_checkpoint(tmp_path, monkeypatch, old_kind, new_kind):
    """A load that starts when the save has renamed its weights but not yet its config.json used to return the
    new weights with the old labels; now it waits for the save's lock and sees the new checkpoint."""
    write_checkpoint(tmp_path, "old", old_kind)
    load = Background(monkeypatch, lambda: load_pretrained(None, tmp_path))
    with on_first_rename_of_a_final_name(monkeypatch, tmp_path, load.start_and_settle):
        save("new", tmp_path, new_kind)
    assert which(load.join()) == ("new" if load.waited else "old")
    assert which(load_pretrained(None, tmp_path)) == "new"


def test_a_save_during_a_load_waits_for_it(tmp_path, monkeypatch):
    """A save that commits between the load's read of the weights and of config.json used to hand the load the
    old weights with the new config.json; now the save waits for the load's shared lock."""
    write_checkpoint(tmp_path, "old", "safetensors")
    saver = Background(monkeypatch, lambda: save("new", tmp_path, "safetensors"))
    real_read_config = checkpoint._read_config_json

    def read_config_after_starting_a_save(*args, **kwargs):
        if not saver.thread.is_alive() and not saver.settled.is_set():
            saver.start_and_settle()
        return real_read_config(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_config_json", read_config_after_starting_a_save)
    assert which(load_pretrained(None, tmp_path)) == "old"
    saver.join()
    assert saver.waited
    assert which(load_pretrained(None, tmp_path)) == "new"


def test_a_load_reads_again_when_another_program_rewrites_the_folder_meanwhile(tmp_path, monkeypatch):
    """A writer that takes no lock (transformers' save_pretrained writes in place) changes the weights and
    config.json while the load is between them: the load notices (size, mtime, inode) and reads again."""
    write_checkpoint(tmp_path, "old", "safetensors")
    real_read_config, rewritten = checkpoint._read_config_json, []

    def read_config_after_a_foreign_rewrite(*args, **kwargs):
        if not rewritten:
            rewritten.append(True)
            weights = tmp_path / "model.safetensors"
            old_mtime = weights.stat().st_mtime_ns
            state = {k: v.contiguous() for k, v in MODELS["new"].state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt"})  # in place: same inode, same size
            # file systems stamp mtime with a coarse clock (~4 ms): say the rewrite came a second later
            os.utime(weights, ns=(old_mtime + 10**9, old_mtime + 10**9))
            (tmp_path / "config.json").write_text(MODELS["new"].config.to_json_string())
        return real_read_config(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_config_json", read_config_after_a_foreign_rewrite)
    assert which(load_pretrained(None, tmp_path)) == "new"


def test_a_load_that_meets_a_half_written_file_reads_again(tmp_path, monkeypatch):
    """A foreign writer is half way through the weights when the load reads them (an error), and done by the
    time it reads them again: the error was about a file that changed meanwhile, so the load retries."""
    write_checkpoint(tmp_path, "old", "safetensors")
    weights, config, calls = tmp_path / "model.safetensors", tmp_path / "config.json", []
    real_read = checkpoint._read_safetensors

    def later(path):  # file systems stamp mtime with a coarse clock: each write here comes a second later
        stamp = path.stat().st_mtime_ns + 10**9
        os.utime(path, ns=(stamp, stamp))

    def read_while_another_program_writes(path, file):
        calls.append(path.name)
        if len(calls) == 1:
            data = weights.read_bytes()
            with open(weights, "r+b") as handle:
                handle.truncate(len(data) // 2)
            later(weights)
        elif len(calls) == 2:
            state = {k: v.contiguous() for k, v in MODELS["new"].state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt"})
            later(weights)
            config.write_text(MODELS["new"].config.to_json_string())
        return real_read(path, file)

    monkeypatch.setattr(checkpoint, "_read_safetensors", read_while_another_program_writes)
    assert which(load_pretrained(None, tmp_path)) == "new"
    assert len(calls) == 3


def test_a_folder_rewritten_on_every_read_is_an_error_to_retry(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "old", "safetensors")
    real_read_config, tags = checkpoint._read_config_json, iter(["new", "old", "new", "old"])

    def read_config_after_a_foreign_rewrite(*args, **kwargs):
        state = {k: v.contiguous() for k, v in MODELS[next(tags)].state_dict().items()}
        save_file(state, str(tmp_path / "rewritten"), metadata={"format": "pt"})
        os.replace(tmp_path / "rewritten", tmp_path / "model.safetensors")
        return real_read_config(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_config_json", read_config_after_a_foreign_rewrite)
    with pytest.raises(OSError, match=r"model\.safetensors changed while being read, 3 times.*retry") as raised:
        load_pretrained(None, tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_a_lock_held_too_long_is_a_clear_timeout(tmp_path):
    write_checkpoint(tmp_path, "old", "safetensors")
    with safe_io.DirectoryLock(tmp_path, exclusive=True) as held:
        assert held.held is not None
        with pytest.raises(TimeoutError, match=f"waited 0.05 s for another process to finish saving the checkpoint "
                                               f"in {tmp_path}"):
            with safe_io.reading(tmp_path, timeout=0.05):
                pass
        with pytest.raises(TimeoutError, match="reading or saving"):
            safe_io.DirectoryLock(tmp_path, exclusive=True, timeout=0.05).acquire(exclusive=True)


# ---- every crash point -----------------------------------------------------------------------------------

CHANGES_NAMES = ("replace", "rename", "unlink", "remove", "link", "symlink", "open")


def folder_state(directory):
    """What is on disk in `directory`: {name: ("file", bytes) | ("link", target)}."""
    state = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_symlink():
            state[entry.name] = ("link", os.readlink(entry.path))
        elif entry.is_file():
            with open(entry.path, "rb") as file:
                state[entry.name] = ("file", file.read())
    return state


def materialize(state, directory):
    directory.mkdir(parents=True)
    for name, (kind, content) in state.items():
        if kind == "link":
            (directory / name).symlink_to(content)
        else:
            (directory / name).write_bytes(content)
    return directory


@contextmanager
def crash_states(monkeypatch, directory):
    """Yields the list of folder states a kill just before each name-changing call in `directory` would leave."""
    states, real = [], {name: getattr(os, name) for name in CHANGES_NAMES}

    def in_folder(argument):
        return isinstance(argument, (str, bytes, os.PathLike)) and \
            Path(os.fsdecode(argument)).parent == directory

    def wrapped(name):
        def call(*args, **kwargs):
            creates = name != "open" or (len(args) > 1 and args[1] & os.O_CREAT)
            if creates and any(in_folder(a) for a in args[:2]):
                state = folder_state(directory)
                if not states or states[-1] != state:
                    states.append(state)
            return real[name](*args, **kwargs)
        return call

    for name in CHANGES_NAMES:
        monkeypatch.setattr(os, name, wrapped(name))
    try:
        yield states
    finally:
        for name in CHANGES_NAMES:
            monkeypatch.setattr(os, name, real[name])
    states.append(folder_state(directory))


def check_each_crash_state(states, tmp_path, allowed):
    """Each state must load as one whole checkpoint of `allowed`, with fastconvnext (which rolls back an
    interrupted save), and then with transformers from the folder as fastconvnext left it."""
    outcomes, transformers_saw = [], {}
    for number, state in enumerate(states):
        folder = materialize(state, tmp_path / f"crash-{number}")
        try:
            ours = which(load_pretrained(None, folder))
            left = tuple((name, content) for name, content in folder_state(folder).items()
                         if not name.startswith(safe_io.TEMP_PREFIX))
            if left not in transformers_saw:  # the same files as an earlier state left: the same outcome
                transformers_saw[left] = which(transformers.ConvNextForImageClassification.from_pretrained(folder))
        except AssertionError as err:
            raise AssertionError(f"killed before change {number} ({sorted(state)}): {err}") from None
        assert ours == transformers_saw[left] and ours in allowed, (number, sorted(state), ours, transformers_saw[left])
        assert JOURNAL not in os.listdir(folder)
        outcomes.append(ours)
    return outcomes


@pytest.mark.parametrize("old_kind, new_kind", [
    ("safetensors", "bin"), ("bin", "safetensors"), ("sharded", "safetensors"), ("sharded-bin", "bin"),
    ("safetensors", "safetensors"),
])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, old_kind, new_kind):
    """Switching formats (.bin <-> safetensors, sharded -> single) used to commit the new config.json and weights
    and only then remove the old weights: killed in between, the folder loaded the new config.json with the old
    weights (safetensors shadows .bin), silently."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", old_kind)
    with crash_states(monkeypatch, folder) as states:
        save("new", folder, new_kind)
    outcomes = check_each_crash_state(states, tmp_path, {"old", "new"})
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert visible_files(folder) == weights_files(new_kind)


def test_a_rollback_killed_at_any_step_is_finished_by_the_next_load(tmp_path, monkeypatch):
    """The worst crash state (journal written, new weights in place, old ones removed) rolled back by a load that
    is itself killed at each of its steps: every such state still loads as the old checkpoint."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", "safetensors")
    with crash_states(monkeypatch, folder) as states:
        save("new", folder, "bin")
    halfway = [s for s in states if JOURNAL in s and "pytorch_model.bin" in s]
    assert halfway, "no crash state with the journal and the new weights"
    crashed = materialize(halfway[-1], tmp_path / "crashed")
    with crash_states(monkeypatch, crashed) as recovery_states:
        assert which(load_pretrained(None, crashed)) == "old"
    assert len(recovery_states) > 2
    assert set(check_each_crash_state(recovery_states, tmp_path / "recovery", {"old"})) == {"old"}


def test_a_journal_that_cannot_be_rolled_back_is_a_clear_error(tmp_path, monkeypatch):
    assert safe_io.JOURNAL_NAME == JOURNAL
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", "safetensors")
    with crash_states(monkeypatch, folder) as states:
        save("new", folder, "bin")
    halfway = [s for s in states if JOURNAL in s and "pytorch_model.bin" in s][-1]
    crashed = materialize(halfway, tmp_path / "crashed")

    def read_only_folder(directory):
        raise PermissionError(13, "Read-only file system", str(directory))

    monkeypatch.setattr(safe_io, "recover", read_only_folder)
    with pytest.raises(OSError, match=r"holds the journal of an interrupted save .* mix of two saves") as raised:
        load_pretrained(None, crashed)
    assert str(crashed) in str(raised.value)


def test_a_save_over_a_killed_save_rolls_it_back_first(tmp_path, monkeypatch):
    """A new save into a folder with a journal (the writer was killed) rolls back, then commits whole; the killed
    writer's staged files and backups are removed, and nothing else."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", "safetensors")
    with crash_states(monkeypatch, folder) as states:
        save("new", folder, "bin")
    halfway = [s for s in states if JOURNAL in s and "pytorch_model.bin" in s][-1]
    crashed = materialize(halfway, tmp_path / "crashed")
    dead_pid = 2**22 + 1  # above Linux's pid_max limit: never a live process
    for name in list(os.listdir(crashed)):  # the staged names of a writer that no longer exists
        if name.startswith(safe_io.TEMP_PREFIX):
            renamed = name.replace(f"-{os.getpid()}-", f"-{dead_pid}-", 1)
            os.rename(crashed / name, crashed / renamed)
    journal = json.loads((crashed / JOURNAL).read_text())
    journal["entries"] = [[f, b and b.replace(f"-{os.getpid()}-", f"-{dead_pid}-", 1)] for f, b in journal["entries"]]
    (crashed / JOURNAL).write_text(json.dumps(journal))
    (crashed / "notes.txt").write_text("kept")
    save("other", crashed, "safetensors")
    assert sorted(os.listdir(crashed)) == ["config.json", "model.safetensors", "notes.txt"]
    assert which(load_pretrained(None, crashed)) == "other"


def test_resaving_with_the_same_config_renames_only_the_weights(tmp_path, monkeypatch):
    """The common re-save (new weights, same config) is one rename: atomic even for readers that know nothing
    of the journal."""
    write_checkpoint(tmp_path, "old", "safetensors")
    config_before = (tmp_path / "config.json").stat()
    renamed = []
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        renamed.append(Path(os.fsdecode(target)).name)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    updated = classifier("old", 4)
    save_pretrained(updated, tmp_path)
    assert renamed == ["model.safetensors"]
    assert (tmp_path / "config.json").stat().st_ino == config_before.st_ino
    assert load_pretrained(None, tmp_path).classifier.weight.equal(updated.classifier.weight)


@pytest.mark.parametrize("entries", [
    [["train.py", None]],  # a file no save writes
    [["config.json", "../outside"]],  # a backup outside the folder
    [["../config.json", None]],
    "not a list",
])
def test_a_planted_journal_changes_nothing_outside_a_checkpoints_files(tmp_path, entries):
    """A journal arriving with a downloaded folder is applied only if it names a checkpoint's files and staged
    backups inside the folder; any other is an error naming the folder, and nothing is removed."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", "safetensors")
    (folder / "train.py").write_text("print('mine')")
    journal = {"format": "fastconvnext-rollback-journal", "version": 1, "host": "0" * 8, "pid": 1, "entries": entries}
    (folder / JOURNAL).write_text(json.dumps(journal))
    before = folder_state(folder)
    with pytest.raises(OSError, match=r"holds the journal of an interrupted save .*is not a rollback journal") as raised:
        load_pretrained(None, folder)
    assert str(folder) in str(raised.value)
    assert folder_state(folder) == before


def test_a_journal_linking_outside_the_folder_is_not_read(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_checkpoint(folder, "old", "safetensors")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"format": "fastconvnext-rollback-journal", "entries": []}))
    (folder / JOURNAL).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OSError, match=r"holds the journal of an interrupted save .*outside the model directory"):
        load_pretrained(None, folder)
