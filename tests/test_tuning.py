"""fastconvnext.tune on CPU with fake timers: which shapes it times, what it keeps, the JSON cache
(round trip, corrupt, stale, atomic), the CUDA-graph-capture guard, and rank agreement under gloo."""
import json
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastconvnext
from fastconvnext import backend, tuning
from fastconvnext.backend import PolicyKey
from helpers import KERNEL_DEVICE

HIDDEN = [8, 12, 20, 24]
CONFIG = dict(hidden_sizes=HIDDEN, depths=[1, 1, 1, 1])
BATCH, SIZE = 3, 32  # stage sides 8, 4, 2, 1 after the 4x4 stem and three 2x2 downsamples
ENV = {"gpu": "Fake GPU 80GB", "driver": "999.1", "torch": "2.13.0", "triton": "3.9.0", "fastconvnext": "0.1.0"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    saved = backend.tuned_decisions()
    backend.clear_policy()
    yield
    backend.clear_policy()
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
            for c, side in zip(HIDDEN, sides) for op in backend.OPS}


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
    assert {k.op for k in table} == set(backend.OPS) and len(timer.calls) == 4


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


def test_cache_round_trip_merges_and_leaves_no_temp_file(tmp_path):
    path = tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, ENV["gpu"])})
    tuning.save_cache(ENV, {OTHER: tuning.measured_decision(30.0, 20.0, ENV["gpu"])})
    assert path.parent == tmp_path / "cache" / "fastconvnext" and path.name == "tuned-policy-fake-gpu-80gb.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    loaded = tuning.load_cache(ENV)
    assert set(loaded) == {KEY, OTHER}
    assert loaded[KEY].fused and (loaded[KEY].fused_us, loaded[KEY].eager_us) == (10.0, 20.0)
    assert not loaded[OTHER].fused
    assert json.loads(path.read_text())["environment"] == ENV


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps([1, 2]),
    json.dumps({"format": 1, "environment": ENV, "entries": [{"op": "convnext_mlp"}]}),
    json.dumps({"format": 1, "environment": ENV, "entries": [
        {**KEY._asdict(), "fused_us": -5.0, "eager_us": 20.0}]}),
    json.dumps({"format": 1, "environment": ENV, "entries": [
        {**KEY._asdict(), "channels": "96", "fused_us": 5.0, "eager_us": 20.0}]}),
])
def test_a_corrupt_cache_is_ignored_with_a_warning(content):
    path = tuning.cache_path(ENV)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring the corrupt tuning cache"):
        assert tuning.load_cache(ENV) == {}
    tuning.save_cache(ENV, {KEY: tuning.measured_decision(10.0, 20.0, "x")})  # replaced by a good one
    assert set(tuning.load_cache(ENV)) == {KEY}


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
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


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


def test_nothing_is_tuned_inside_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    key = backend.policy_key("dwconv_layernorm", _call()[0], 8)
    tuning.tune_on_first_use("dwconv_layernorm", key, _call(), timer=_refuse)
    assert key not in backend.tuned_decisions()
    assert backend.decide(key) == backend.static_decision(key)  # the default policy
    with pytest.raises(RuntimeError, match="cannot run inside CUDA-graph capture: tune before capturing"):
        tuning.tune(_model(), _pixels(), timer=_refuse)


def test_capturing_is_false_without_a_gpu():
    assert tuning.capturing() is False or torch.cuda.is_available()


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
            "first_use_warning": any("does not tune under torch.distributed" in str(w.message) for w in caught)}
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
    assert rank0["cache_files"] == ["tuned-policy-cpu.json"] and rank1["cache_files"] == []
    assert rank0["first_use_warning"] and rank1["first_use_warning"]
