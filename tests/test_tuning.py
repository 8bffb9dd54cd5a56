"""fastconvnext.tune on CPU with fake timers: which shapes it times, what it keeps, the JSON cache
(round trip, corrupt, stale, atomic, hostile files, concurrent writers), first-use timing (capture, OOM, a
failing kernel, the caller's RNG and checkpoint hooks untouched), the first-run line, and rank agreement
under gloo."""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastconvnext
from fastconvnext import backend, tuning
from fastconvnext.backend import PolicyKey
from fastconvnext.kernels import _env
from helpers import KERNEL_DEVICE

HIDDEN = [8, 12, 20, 24]
V1_BLOCK_OPS = ("dwconv_layernorm", "convnext_mlp")  # the two ops a ConvNeXt (V1) model meets
CONFIG = dict(hidden_sizes=HIDDEN, depths=[1, 1, 1, 1])
BATCH, SIZE = 3, 32  # stage sides 8, 4, 2, 1 after the 4x4 stem and three 2x2 downsamples
ENV = {"gpu": "Fake GPU 80GB", "driver": "999.1", "torch": "2.13.0", "triton": "3.9.0", "fastconvnext": "0.1.0"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTCONVNEXT_TUNE", raising=False)
    saved = backend.tuned_decisions()
    backend.clear_policy()
    tuning.reset()
    yield
    backend.clear_policy()
    tuning.reset()
    backend.install_tuned(saved)


def _model(device=KERNEL_DEVICE):
    torch.manual_seed(0)
    return fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig(**CONFIG)).eval().to(device)


def _pixels(device=KERNEL_DEVICE):
    return torch.randn(BATCH, 3, SIZE, SIZE, device=device)


def _arch(device=KERNEL_DEVICE):
    return backend.device_arch(device.index) if device.type == "cuda" else backend.CPU_ARCH


def expected_keys(mode, arch=None):
    sides = [SIZE // 4 // 2 ** i for i in range(4)]
    arch = _arch() if arch is None else arch
    return {PolicyKey(op, arch, "fp32", c, backend.bucket(side * side), backend.bucket(BATCH), mode)
            for c, side in zip(HIDDEN, sides) for op in V1_BLOCK_OPS}


class FakeTimer:
    """Fused is faster exactly for the MLP (a rule the test states); records what it was asked to time."""

    def __init__(self, run=False):
        self.calls, self.run = [], run

    def __call__(self, run, key, impl):
        self.calls.append((key, impl))
        if self.run:
            run()
        fused_faster = key.op == "convnext_mlp"
        return {"fused": 10.0, "eager": 20.0}[impl] if fused_faster else {"fused": 30.0, "eager": 20.0}[impl]


def _refuse(run, key, impl):
    raise AssertionError(f"timed {impl} {key.label} although it was cached")


# ------------------------------------------------------------------------------------------- tune


def test_tune_times_every_shape_of_the_model_once_and_keeps_the_faster():
    timer = FakeTimer()
    table = fastconvnext.tune(_model(), _pixels(), timer=timer)
    assert set(table) == expected_keys("forward")
    assert sorted(timer.calls) == sorted((k, impl) for k in table for impl in ("fused", "eager"))
    for key, decision in table.items():
        assert decision.source == "tuned"
        assert decision.fused == (key.op == "convnext_mlp")
        assert backend.decide(key) == decision  # installed into the dispatch policy
    rows = backend.policy_table()
    assert {row[0] for row in rows} == {k.label for k in table}


def test_training_tunes_the_forward_backward_pass():
    table = tuning.tune(_model().train(), (_pixels(),), training=True, timer=FakeTimer(), cache=False)
    assert set(table) == expected_keys("forward_backward")


def test_the_runners_execute_both_implementations_with_gradients():
    """One real run of each runner: the fused side in Triton's interpreter (tests set TRITON_INTERPRET=1)."""
    model = fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1]))
    timer = FakeTimer(run=True)
    table = tuning.tune(model.train().to(KERNEL_DEVICE), torch.randn(1, 3, 16, 16, device=KERNEL_DEVICE),
                        training=True, timer=timer, cache=False)
    assert {k.op for k in table} == set(V1_BLOCK_OPS) and len(timer.calls) == 4


def test_the_v2_mlp_is_timed_like_the_v1_ops():
    """A ConvNeXt V2 model: tune() meets the dwconv op and the fused GRN MLP, runs both implementations of each."""
    config = fastconvnext.ConvNextV2Config(num_stages=1, hidden_sizes=[8], depths=[1])
    model = fastconvnext.ConvNextV2Model(config).train().to(KERNEL_DEVICE)
    timer = FakeTimer(run=True)
    table = tuning.tune(model, torch.randn(1, 3, 16, 16, device=KERNEL_DEVICE), training=True, timer=timer,
                        cache=False)
    assert {k.op for k in table} == {"dwconv_layernorm", "convnext_v2_mlp"} and len(timer.calls) == 4


def test_second_tune_reads_the_cache_and_retune_measures_again():
    model, pixels = _model(), _pixels()
    first = tuning.tune(model, pixels, timer=FakeTimer())
    path = tuning.cache_path(tuning.environment(KERNEL_DEVICE))
    assert path.is_file()
    backend.clear_policy()
    assert tuning.tune(model, pixels, timer=_refuse) == first
    timer = FakeTimer()
    tuning.tune(model, pixels, timer=timer, retune=True)
    assert len(timer.calls) == 2 * len(first)


def test_bad_inputs_and_timer_values_are_clear_errors():
    with pytest.raises(TypeError, match="example_inputs must be a tensor.*got int"):
        tuning.tune(_model(), 3, timer=FakeTimer())
    with pytest.raises(ValueError, match="timer must return a positive time in µs, got -1.0"):
        tuning.tune(_model(), _pixels(), timer=lambda run, key, impl: -1.0, cache=False)


# ------------------------------------------------------------------------------------------ cache

KEY = PolicyKey("convnext_mlp", 90, "bf16", 96, 4096, 64, "forward")
OTHER = PolicyKey("dwconv_layernorm", 90, "bf16", 96, 4096, 64, "forward_backward")


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_cache_round_trip_merges_and_leaves_no_temp_file(tmp_path):
    path = tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, ENV["gpu"])})
    tuning.save_cache(ENV, {OTHER: tuning.measured_decision(30.0, 20.0, ENV["gpu"])})
    assert path.parent == tmp_path / "cache" / "fastconvnext" and path.name == "tuned-policy-fake-gpu-80gb.json"
    assert _names(path.parent) == [path.name, path.name + ".lock"]  # the lock file stays; no temp file does
    loaded = tuning.load_cache(ENV)
    assert set(loaded) == {KEY, OTHER}
    assert loaded[KEY].fused and (loaded[KEY].fused_us, loaded[KEY].eager_us) == (10.0, 20.0)
    assert not loaded[OTHER].fused
    assert json.loads(path.read_text())["environment"] == ENV


def _with_entry(**fields):
    return json.dumps({"format": 1, "environment": ENV, "entries": [
        {**KEY._asdict(), "fused_us": 5.0, "eager_us": 20.0, **fields}]})


HUGE = "9" * 400  # parses as an int (under Python's 4300-digit limit) that no float can hold


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"format": 1, "environment": ENV, "entries": [{"op": "convnext_mlp"}]}),
    _with_entry(fused_us=-5.0),
    _with_entry(channels="96"),
    _with_entry(channels=True),
    b'{"format": 1, "environment": {"gpu": "Fake \xff\xfe GPU"}, "entries": []}',  # not UTF-8
    "[" * 100_000 + "]" * 100_000,  # nested past the recursion limit
    '{"format": 1, "entries": ' + "[" * 5000 + "]" * 5000 + ', "environment": {}}',
    _with_entry(fused_us=0).replace('"fused_us": 0', f'"fused_us": {HUGE}'),
    _with_entry(channels=0).replace('"channels": 0', f'"channels": {HUGE}'),
    _with_entry(fused_us=0).replace('"fused_us": 0', f'"fused_us": {HUGE}.5'),  # a float: inf
    _with_entry(fused_us=0).replace('"fused_us": 0', '"fused_us": ' + "9" * 5000),  # past the int-string limit
    _with_entry(op=[[[[["x" * 10_000]]]]]),
], ids=lambda content: f"{len(content)}b")
def test_a_corrupt_cache_is_ignored_with_a_warning(content):
    path = tuning.cache_path(ENV)
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(UserWarning, match="ignoring the corrupt tuning cache") as caught:
        assert tuning.load_cache(ENV) == {}
    assert all(len(str(w.message)) < 1000 for w in caught)  # bounded, however large the bad value
    tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")})  # replaced by a good one
    assert set(tuning.load_cache(ENV)) == {KEY}


def _in_a_thread(function, timeout=60):
    """function() in a daemon thread: (finished, result, warning messages); a blocked read cannot hang pytest."""
    box = {}

    def target():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            box["result"] = function()
        box["warnings"] = [str(w.message) for w in caught]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("result"), box.get("warnings", [])


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_a_directory_at_the_cache_path_is_a_warning_and_a_new_measurement(kind):
    env = tuning.environment(KERNEL_DEVICE)
    path = tuning.cache_path(env)
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)  # with no writer, a plain open() would block for ever
    else:
        path.mkdir()
    finished, table, messages = _in_a_thread(lambda: tuning.load_cache(env))
    assert finished, f"reading a {kind} as the tuning cache blocked"
    assert table == {}
    assert messages == [f"fastconvnext: cannot read the tuning cache {path} (it is a {'FIFO' if kind == 'fifo' else 'directory'}, "
                        f"not a regular file); ignoring it, the shapes are measured again"]
    timer = FakeTimer()
    finished, table, messages = _in_a_thread(lambda: tuning.tune(_model(), _pixels(), timer=timer))
    assert finished
    assert len(timer.calls) == 2 * len(expected_keys("forward")) and set(table) == expected_keys("forward")
    if kind == "fifo":  # the FIFO is replaced by a regular file holding what was measured
        assert path.is_file() and set(tuning.load_cache(env)) == set(table)
    else:  # a directory cannot be replaced: the decisions stay in this process, with a warning
        assert path.is_dir() and any("could not write the tuning cache" in m for m in messages)


def test_an_oversized_cache_is_not_read(monkeypatch):
    path = tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")})
    monkeypatch.setattr(tuning, "MAX_CACHE_BYTES", path.stat().st_size - 1)
    with pytest.warns(UserWarning, match=r"cannot read the tuning cache .*more than the .* bytes a cache may"):
        assert tuning.load_cache(ENV) == {}
    monkeypatch.setattr(tuning, "MAX_CACHE_BYTES", path.stat().st_size)
    assert set(tuning.load_cache(ENV)) == {KEY}


def test_a_writer_waits_for_the_lock_and_merges_what_the_other_wrote(monkeypatch):
    """Deterministic: the first writer is held between its read and its write; the second must wait for the
    lock, then read the first one's entry and keep it. Without the lock the second writes {OTHER}, then the
    first overwrites it with {KEY} (read before), and an entry is lost."""
    inside, release = threading.Event(), threading.Event()
    write = tuning.write_text_atomically

    def held_write(path, text):
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(60)
        return write(path, text)

    monkeypatch.setattr(tuning, "write_text_atomically", held_write)
    first = threading.Thread(target=tuning.save_cache, name="first", daemon=True,
                             args=(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")}))
    second = threading.Thread(target=tuning.save_cache, name="second", daemon=True,
                              args=(ENV, {OTHER: tuning.measured_decision(30.0, 20.0, "x")}))
    first.start()
    assert inside.wait(60)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second writer did not wait for the first one's lock"
    release.set()
    first.join(60)
    second.join(60)
    assert not first.is_alive() and not second.is_alive()
    assert set(tuning.load_cache(ENV)) == {KEY, OTHER}


def test_a_lock_held_too_long_is_a_warning_not_a_hang(monkeypatch):
    import fcntl

    path = tuning.cache_path(ENV)
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(tuning, "LOCK_TIMEOUT_S", 0.2)
    with open(tuning.lock_path(path), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.warns(UserWarning, match="could not write the tuning cache .*held the lock .* for over 0.2 s"):
            assert tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")}) is None
    assert not path.exists()


WRITER = """
import sys
from fastconvnext import tuning
from fastconvnext.policy import PolicyKey
env = {"gpu": "Fake GPU 80GB", "driver": "999.1", "torch": "2.13.0", "triton": "3.9.0", "fastconvnext": "0.1.0"}
writer = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for i in range(15):
    key = PolicyKey("convnext_mlp", 90, "bf16", 8 * (writer * 100 + i + 1), 64, 8, "forward")
    assert tuning.save_cache(env, {key: tuning.measured_decision(1.0 + i, 2.0, "x")}) is not None
"""


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    try:
        for writer in writers:  # both imported and waiting: then both start at once
            assert writer.stdout.readline().strip() == "ready"
        for writer in writers:
            writer.stdin.write("go\n")
            writer.stdin.flush()
        for writer in writers:
            _, err = writer.communicate(timeout=240)
            assert writer.returncode == 0, err
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    table = tuning.load_cache(ENV)
    assert len(table) == 30
    assert {k.channels for k in table} == {8 * (w * 100 + i + 1) for w in (0, 1) for i in range(15)}


@pytest.mark.parametrize("field", tuning.ENVIRONMENT_FIELDS[1:])
def test_a_cache_from_other_versions_is_stale_and_ignored_with_a_warning(field):
    tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")})
    newer = {**ENV, field: "other"}
    with pytest.warns(UserWarning, match=f"stale tuning cache .*{field} '{ENV[field]}' -> 'other'"):
        assert tuning.load_cache(newer) == {}


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(monkeypatch):
    path = tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")})
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tuning.os, "replace", broken_replace)
    with pytest.warns(UserWarning, match="could not write the tuning cache .*disk full"):
        assert tuning.save_cache(ENV, {OTHER: tuning.measured_decision(1.0, 2.0, "x")}) is None
    assert path.read_text() == before
    assert _names(path.parent) == [path.name, path.name + ".lock"]


# ---------------------------------------------------------------------------- first use and capture


def _call():
    x = torch.randn(2, 4, 4, 8)
    return (x, torch.randn(8, 1, 7, 7), torch.randn(8), torch.randn(8), torch.randn(8), 1e-6)


def test_first_use_tuning_measures_installs_and_saves():
    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    timer = FakeTimer()
    tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=timer)
    assert [impl for _, impl in timer.calls] == ["fused", "eager"]
    assert backend.decide(key).source == "tuned" and not backend.decide(key).fused
    assert set(tuning.load_cache(tuning.environment("cpu"))) == {key}


def _training_call():
    x, *rest = _call()
    return (x, *(t.requires_grad_() for t in rest[:4]), rest[4])


def test_nothing_is_tuned_inside_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the one capturing() helper, kernels/_env.py
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=_refuse)
    assert key not in backend.tuned_decisions()
    assert backend.decide(key) == backend.static_decision(key)  # the default policy
    with pytest.raises(RuntimeError, match="cannot run inside CUDA-graph capture: tune before capturing"):
        tuning.tune(_model(), _pixels(), timer=_refuse)


def test_nothing_is_tuned_while_tracing_for_torch_compile(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=_refuse)
    assert key not in backend.tuned_decisions()


def test_one_capturing_helper():
    assert not hasattr(tuning, "capturing")
    assert _env.capturing() is False or torch.cuda.is_available()


def test_first_use_timing_leaves_the_callers_rng_alone():
    """The output gradient comes from a private generator: a checkpointed stage replays the RNG state it
    recorded, so timing in its forward must not move it (or its recomputed drop-path masks would differ)."""
    call = _training_call()
    key = backend.policy_key("dwconv_layernorm", call[0], 8, call[1:5])
    assert key.mode == "forward_backward"
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    timer = FakeTimer(run=True)  # runs both implementations, backward included (fused: the interpreter)
    tuning.tune_on_first_use("dwconv_layernorm", key, call, timer=timer)
    assert len(timer.calls) == 2 and backend.decide(key).source == "tuned"
    assert torch.equal(torch.get_rng_state(), state)


def test_first_use_timing_inside_a_checkpointed_region_does_not_recompute_it():
    """Under a non-reentrant checkpoint the region's saved-tensor hooks are on; timing's own backward must not
    unpack through them (that recomputes the whole region, inside the timing)."""
    call = _training_call()
    key = backend.policy_key("dwconv_layernorm", call[0], 8, call[1:5])
    runs = []

    def region(x):
        runs.append(1)
        if len(runs) == 1:
            tuning.tune_on_first_use("dwconv_layernorm", key, call, timer=FakeTimer(run=True))
        return (x * 2).sin()

    x = torch.randn(4, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)
    assert len(runs) == 1, "timing recomputed the checkpointed region"
    out.sum().backward()
    assert len(runs) == 2 and backend.decide(key).source == "tuned"


def test_out_of_memory_while_timing_releases_it_and_falls_back(monkeypatch):
    held, released = [], []

    def oom_timer(run, key, impl):
        block = torch.empty(1 << 16)  # what a real run would hold when it ran out
        held.append(weakref.ref(block))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tuning, "_release_memory", lambda: released.append(held[0]() is None))
    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    with pytest.warns(UserWarning, match=r"ran out of memory while timing dwconv_layernorm .*Tried to allocate 20.00 "
                                         r"GiB\): released what timing held"):
        tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=oom_timer)
    assert released == [True]  # the traceback (and the block its frame held) was gone before the cache was emptied
    assert key not in backend.tuned_decisions() and backend.decide(key) == backend.static_decision(key)
    assert not tuning.cache_path(tuning.environment("cpu")).exists()
    tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=_refuse)  # not timed again in this process


def test_a_kernel_failing_while_timed_runs_eagerly_with_a_warning():
    def failing(run, key, impl):
        if impl == "fused":
            raise RuntimeError("PTX compile failed for sm_120")
        return 5.0

    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    with pytest.warns(UserWarning, match="timing dwconv_layernorm .* failed \\(RuntimeError: PTX compile failed for "
                                         "sm_120\\); that shape runs eagerly in this process"):
        tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=failing)
    decision = backend.decide(key)
    assert (decision.fused, decision.source) == (False, "failed")
    assert not tuning.cache_path(tuning.environment("cpu")).exists()  # a failure is not a measurement


# ------------------------------------------------------------------------------------- first-run line


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _first_use(key_channels, clock, took_s):
    x = torch.randn(2, 4, 4, key_channels)
    call = (x, torch.randn(key_channels, 1, 7, 7), *(torch.randn(key_channels) for _ in range(3)), 1e-6)
    key = backend.policy_key("dwconv_layernorm", x, key_channels)

    def timer(run, key, impl):
        clock.now += took_s / 2
        return FakeTimer()(run, key, impl)

    tuning.tune_on_first_use("dwconv_layernorm", key, call, timer=timer)


def test_the_first_run_line_sums_the_measurements_and_is_emitted_once(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(tuning, "clock", clock)
    caplog.set_level(logging.WARNING, logger="fastconvnext.tuning")
    _first_use(8, clock, 0.25)
    _first_use(16, clock, 0.5)
    assert backend.policy.summary_pending
    clock.now += tuning.SUMMARY_DEBOUNCE_S - 0.01
    tuning.flush_summary()
    assert caplog.records == []  # a measurement ended less than the debounce ago: the forward may go on
    _first_use(24, clock, 0.25)  # a third shape of the same forward joins the line
    clock.now += tuning.SUMMARY_DEBOUNCE_S
    tuning.flush_summary()
    path = tuning.cache_path(tuning.environment("cpu"))
    assert [r.getMessage() for r in caplog.records] == [f"fastconvnext: measured 3 shapes in 1,000 ms on cpu; "
                                                        f"decisions cached in {path}"]
    assert caplog.records[0].levelno == logging.WARNING and not backend.policy.summary_pending
    _first_use(32, clock, 0.25)  # later measurements: no second line in this process
    clock.now += 10
    tuning.flush_summary(force=True)
    assert len(caplog.records) == 1


def test_the_first_run_line_says_when_the_cache_could_not_be_written(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(tuning, "clock", clock)
    monkeypatch.setattr(tuning, "save_cache", lambda env, decisions: None)
    _first_use(8, clock, 0.004)
    tuning.flush_summary(force=True)
    path = tuning.cache_path(tuning.environment("cpu"))
    assert [r.getMessage() for r in caplog.records] == [
        f"fastconvnext: measured 1 shape in 4 ms on cpu; could not write {path} (see the warning)"]


FIRST_RUN = """
import torch
from fastconvnext import backend, policy, tuning
x = torch.randn(2, 4, 4, 8)
call = (x, torch.randn(8, 1, 7, 7), torch.randn(8), torch.randn(8), torch.randn(8), 1e-6)
key = backend.policy_key("dwconv_layernorm", x, 8)
tuning.tune_on_first_use("dwconv_layernorm", key, call, timer=lambda run, key, impl: 3.0 if impl == "fused" else 4.0)
print("exiting", flush=True)
"""


def test_a_process_that_measured_prints_one_line_at_exit_if_nothing_came_after(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", FIRST_RUN], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exiting\n"
    lines = done.stderr.splitlines()
    path = tmp_path / "cache" / "fastconvnext" / "tuned-policy-cpu.json"
    assert len(lines) == 1 and lines[0].startswith("fastconvnext: measured 1 shape in "), done.stderr
    assert lines[0].endswith(f" ms on cpu; decisions cached in {path}")


# ---------------------------------------------------------------------------------- rank agreement


def _rank_worker(rank, port, cache_root, result_path):
    import os

    os.environ["XDG_CACHE_HOME"] = os.path.join(cache_root, f"rank{rank}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)

        def timer(run, key, impl):  # each rank alone would choose the opposite of the other
            fused_faster = (key.op == "convnext_mlp") == (rank == 0)
            return 10.0 if (impl == "fused") == fused_faster else 20.0

        table = tuning.tune(_model("cpu"), _pixels("cpu"), timer=timer)
        decided = {tuple(k): backend.decide(k).fused for k in table}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
            tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=_refuse)
        outcome = {"decided": decided, "cache_files": sorted(os.listdir(os.path.join(
            os.environ["XDG_CACHE_HOME"], "fastconvnext"))) if os.path.isdir(os.path.join(
                os.environ["XDG_CACHE_HOME"], "fastconvnext")) else [],
            "first_use_warning": any("not measured on first use under torch.distributed" in str(w.message)
                                     for w in caught)}
        # A CUDA dispatch (mocked) does not read this node's cache under torch.distributed: rank 1's file says
        # fused for KEY, the static model says eager, and both ranks must take the same (the model's) choice.
        torch.cuda.is_available = lambda: True
        torch.cuda.current_device = lambda: 0
        torch.cuda.is_current_stream_capturing = lambda: False
        tuning._device_identity = lambda index: ("Fake GPU 80GB", "999.1")
        backend._arch_cache[0] = KEY.arch
        env = tuning.environment(torch.device("cuda", 0))
        if rank == 1:
            tuning.save_cache(env, {KEY: tuning.measured_decision(1.0, 100.0, env["gpu"])})
        with backend.use_predicted_table({tuple(KEY): {"fused_us": 100.0, "eager_us": 50.0}}):
            outcome["cuda_key"] = (backend._prefers_fused(KEY.op, 0, *KEY[2:]), backend.decide(KEY).source)
        torch.save(outcome, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_zeros_choices(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "result"
    mp.start_processes(_rank_worker, args=(port, str(tmp_path), str(result)), nprocs=2, join=True,
                       start_method="spawn")
    rank0, rank1 = (torch.load(f"{result}.{r}") for r in (0, 1))
    assert rank0["decided"] == rank1["decided"]
    assert set(rank0["decided"]) == {tuple(k) for k in expected_keys("forward", backend.CPU_ARCH)}
    assert all(fused == (key[0] == "convnext_mlp") for key, fused in rank0["decided"].items())  # rank 0's timer
    assert rank0["cache_files"] == ["tuned-policy-cpu.json", "tuned-policy-cpu.json.lock"]
    assert rank1["cache_files"] == []
    assert rank0["first_use_warning"] and rank1["first_use_warning"]
    assert rank0["cuda_key"] == rank1["cuda_key"] == (False, "model")
