"""The `auto` policy: per (op, C, H*W bucket, batch bucket, dtype, grad mode, arch), fused or eager.

The prior: decisions from a fake table (what backend.read_prior makes of fastconvnext/prior.json), so every expected
choice below follows from numbers written here; without a prior point, eager with the reason (no analytic fallback).
On a (mocked) CUDA device `auto` measures first: a fake timer decides there, and the tests count its calls.
"""
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastconvnext import backend, tuning
from fastconvnext.backend import Decision, PolicyKey
from helpers import KERNEL_DEVICE, gpu, gpu_shapes, interpreter_only, kernel_dtypes, kernel_shapes

MLP, DW, V2_MLP = "convnext_mlp", "dwconv_layernorm", "convnext_v2_mlp"
FWD, TRAIN = "forward", "forward_backward"

# (op, arch, dtype, channels, hw, batch, mode) -> modelled times; fused wins only where marked.
FAKE_TABLE = {
    (MLP, 90, "bf16", 96, 3136, 64, FWD): {"fused_us": 50.0, "eager_us": 100.0},  # fused
    (MLP, 90, "bf16", 96, 3136, 64, TRAIN): {"fused_us": 300.0, "eager_us": 200.0},  # eager
    (MLP, 90, "bf16", 768, 49, 64, FWD): {"fused_us": 90.0, "eager_us": 60.0},  # eager
    (MLP, 90, "bf16", 96, 49, 64, FWD): {"fused_us": 10.0, "eager_us": 9.0},  # eager
    (MLP, 90, "bf16", 96, 3136, 256, FWD): {"fused_us": 400.0, "eager_us": 300.0},  # eager
    (MLP, 80, "bf16", 96, 3136, 64, FWD): {"fused_us": 120.0, "eager_us": 100.0},  # eager
    (MLP, 90, "fp32", 96, 3136, 64, FWD): {"fused_us": 99.0, "eager_us": 100.0},  # within the margin: eager
    (DW, 90, "bf16", 96, 3136, 64, FWD): {"fused_us": 20.0, "eager_us": 60.0},  # fused
}


@pytest.fixture(autouse=True)
def _fresh_policy(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never this machine's tuning cache
    monkeypatch.delenv("FASTCONVNEXT_TUNE", raising=False)
    saved = backend.tuned_decisions()
    backend.clear_policy()
    tuning.reset()
    with backend.use_predicted_table(FAKE_TABLE):
        yield
    backend.clear_policy()
    tuning.reset()
    backend.install_tuned(saved)


def key(op=MLP, arch=90, dtype="bf16", channels=96, hw=4096, batch=64, mode=FWD):
    return PolicyKey(op, arch, dtype, channels, hw, batch, mode)


def test_exact_table_points_follow_the_modelled_times():
    assert backend.decide(key()).fused
    assert not backend.decide(key(mode=TRAIN)).fused
    assert backend.decide(key(op=DW)).fused
    decision = backend.decide(key())
    assert (decision.source, decision.fused_us, decision.eager_us) == ("model", 50.0, 100.0)
    assert "(MODEL)" in decision.reason and "C=96 H*W=3136 N=64" in decision.reason


def test_a_modelled_win_inside_the_margin_keeps_eager():
    decision = backend.decide(key(dtype="fp32"))
    assert decision.fused_us < decision.eager_us
    assert not decision.fused


def test_between_table_points_the_nearest_channels_hw_and_batch_decide():
    # C=128 is nearer 96 than 768 on a log scale; H*W bucket 4096 is nearer 3136 than 49.
    assert backend.decide(key(channels=128)).reason == backend.decide(key(channels=96)).reason
    assert not backend.decide(key(channels=512)).fused  # nearest C is 768 -> eager
    assert not backend.decide(key(hw=64)).fused  # nearest H*W is 49 -> eager
    assert not backend.decide(key(batch=512)).fused  # nearest batch is 256 -> eager
    assert backend.decide(key(batch=8)).fused  # nearest batch is 64 -> fused
    assert "N=256" in backend.decide(key(batch=512)).reason


def test_arch_maps_to_the_same_generation_or_falls_back():
    assert "sm_80" in backend.decide(key(arch=86)).reason  # Ampere consumer part -> the sm_80 point
    assert not backend.decide(key(arch=86)).fused
    assert backend.decide(key(arch=90)).fused
    for arch in (75, 100):  # no modelled GPU of that generation, in the table
        decision = backend.decide(key(arch=arch))
        assert not decision.fused and decision.source == "none"
        assert f"sm_{arch}" in decision.reason and "tune()" in decision.reason


def test_unknown_dtype_runs_eagerly_with_a_reason():
    decision = backend.decide(key(dtype="fp64"))
    assert decision == Decision(False, "none", "no fused kernel for fp64")


def test_without_a_prior_point_eager_decides_with_the_reason():
    decision = backend.decide(key(op=DW, dtype="fp16", channels=192, mode=TRAIN))  # fp16 not in the table
    assert (decision.fused, decision.source) == (False, "none") and "tune()" in decision.reason
    with backend.use_predicted_table(None):  # no prior at all
        assert backend.decide(key()).source == "none"
    decision = backend.decide(key(op=V2_MLP))  # FAKE_TABLE has no point of this op
    assert (decision.fused, decision.source) == (False, "none") and "tune()" in decision.reason


def test_a_malformed_table_falls_back_to_eager_with_a_warning():
    broken = {(MLP, 90, "bf16", 96, 3136, 64, FWD): {"fused": 1.0}}
    with backend.use_predicted_table(broken), pytest.warns(UserWarning, match="the prior has a malformed entry"):
        assert backend.decide(key()).source == "none"


def _prior_file(path, columns, rows):
    path.write_text(json.dumps({"columns": columns, "rows": rows}))
    return path


def test_the_shipped_prior_is_read_as_its_columns_say(tmp_path):
    columns = ["op", "arch", "dtype", "channels", "hw", "batch", "mode", "fused_us", "fused_pessimistic_us",
               "eager_us", "floor_us"]
    prior = backend.read_prior(_prior_file(tmp_path / "prior.json", columns,
                                           [[MLP, 90, "bf16", 96, 3136, 64, FWD, 50.0, 60.0, 100.0, 40.0]]))
    assert prior == {(MLP, 90, "bf16", 96, 3136, 64, FWD): {"fused_us": 50.0, "eager_us": 100.0}}  # the estimate
    with backend.use_predicted_table(prior):
        assert backend.decide(key()).fused


@pytest.mark.parametrize("columns, rows, match", [
    (["op", "arch"], [], "prior columns lack"),
    (["op", "arch", "dtype", "channels", "hw", "batch", "mode", "fused_us", "eager_us"],
     [[MLP, 90, "bf16", 96, 3136, 64, FWD, 50.0]], "has 8 values for 9 columns"),
    (["op", "arch", "dtype", "channels", "hw", "batch", "mode", "fused_us", "eager_us"],
     [[MLP, 90, "bf16", 96, 3136, 64, FWD, -1.0, 100.0]], "positive and finite"),
])
def test_a_malformed_prior_file_is_refused_naming_the_fault(tmp_path, columns, rows, match):
    with pytest.raises(ValueError, match=match):
        backend.read_prior(_prior_file(tmp_path / "prior.json", columns, rows))


def test_the_shipped_prior_covers_every_op_arch_dtype_and_mode():
    prior = backend.read_prior(backend.PRIOR_PATH)
    assert {(k[0], k[1], k[2], k[6]) for k in prior} == {
        (op, arch, dtype, mode) for op in (DW, MLP, V2_MLP) for arch in (80, 90) for dtype in ("bf16", "fp16", "fp32")
        for mode in (FWD, TRAIN)}
    assert set(backend.OPS) == {DW, MLP, V2_MLP}


def test_a_tuned_measurement_wins_over_the_model():
    measured = Decision(False, "tuned", "measured: fused 70 µs vs eager 60 µs", 70.0, 60.0)
    assert backend.decide(key()).fused
    backend.install_tuned({key(): measured})
    assert backend.decide(key()) == measured
    assert backend.decide(key(channels=128)).source == "model"  # tuning is per exact key
    backend.clear_policy()
    assert backend.decide(key()).fused


def test_policy_key_of_a_call():
    x = torch.zeros(5, 7, 9, 96, dtype=torch.bfloat16)
    w = torch.zeros(96, 1, 7, 7, requires_grad=True)
    assert backend.policy_key(DW, x, 96, (w,), arch=90) == key(op=DW, hw=64, batch=8, mode=TRAIN)
    with torch.no_grad():
        assert backend.policy_key(DW, x, 96, (w,), arch=90).mode == FWD
    assert backend.policy_key(DW, x, 96, (w.detach(),), arch=90).mode == FWD
    assert backend.policy_key(DW, x.double(), 96, (), arch=90).dtype == "float64"
    assert backend.policy_key(DW, x, 96).arch == backend.CPU_ARCH
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the ops compute fp32 inputs in the autocast dtype
        assert backend.policy_key(DW, x.float(), 96, (), arch=90).dtype == "bf16"
    assert backend.policy_key(DW, x.float(), 96, (), arch=90).dtype == "fp32"
    assert [backend.bucket(n) for n in (1, 2, 3, 49, 64, 65, 3136)] == [1, 2, 4, 64, 64, 128, 4096]


def test_the_decision_is_made_at_trace_time_under_torch_compile_with_dynamic_shapes(monkeypatch):
    """The dispatch path (policy_key + the constant-result lookup) compiles with fullgraph=True and
    dynamic sizes; a size in another bucket recompiles and decides again."""

    class DispatchLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(96, 384)  # C from a parameter's shape, as the ops take it

        def forward(self, x):
            weight = self.fc1.weight
            if backend._prefers_fused(MLP, 5, *backend._call_shape(x, weight.shape[1], (weight,))):
                return x * 2
            return x - 1

    monkeypatch.setitem(backend._arch_cache, 5, 90)  # a pretend sm_90 as CUDA device 5
    compiled = torch.compile(DispatchLike(), fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        fused_shape = torch.ones(64, 56, 56, 96, dtype=torch.bfloat16)  # table: fused
        eager_shape = torch.ones(64, 7, 7, 96, dtype=torch.bfloat16)  # table: eager
        assert compiled(fused_shape)[0, 0, 0, 0].item() == 2
        assert compiled(eager_shape)[0, 0, 0, 0].item() == 0
        assert compiled(fused_shape[:, :50, :50])[0, 0, 0, 0].item() == 2  # same bucket


def test_policy_table_rows_and_describe():
    backend.decide(key())
    rows = backend.policy_table()
    assert rows == [(key().label, "fused", "model", 50.0, 100.0, backend.decide(key()).reason)]
    report = backend.describe()
    assert report[f"policy {key().label}"].startswith("fused (model: ")
    assert key().label == "convnext_mlp C=96 H*W<=4096 N<=64 bf16 forward sm_90"
    text = backend.format_policy_table().splitlines()
    assert text[0].split() == ["shape", "choice", "source", "fused", "µs", "eager", "µs", "why"]
    assert text[1].startswith(key().label) and " fused " in text[1] and " 50.0 " in text[1]


def test_default_report_keys_are_convnext_t_stages_when_nothing_ran():
    keys = backend.default_report_keys()
    assert len(keys) == 24 and {k.channels for k in keys} == {96, 192, 384, 768}
    assert {k.op for k in keys} == {DW, MLP, V2_MLP}
    assert {(k.hw, k.batch) for k in keys if k.channels == 96} == {(4096, 64)}


# ---------------------------------------------------------------------------- GPU test mode (conftest)


@gpu
def test_gpu_mode_runs_kernels_natively_on_cuda():
    assert KERNEL_DEVICE.type == "cuda" and torch.cuda.is_available()
    assert os.environ.get("TRITON_INTERPRET") is None
    assert gpu_shapes() == [(8, 56, 56, 96), (8, 28, 28, 192), (8, 14, 14, 384), (8, 7, 7, 768)]


@interpreter_only
def test_cpu_mode_keeps_the_interpreter_and_small_shapes():
    assert KERNEL_DEVICE == torch.device("cpu") and os.environ.get("TRITON_INTERPRET") == "1"
    assert kernel_shapes([(1, 5, 5, 8)]) == [(1, 5, 5, 8)] and torch.bfloat16 not in kernel_dtypes()


def test_gpu_mode_without_a_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "gpu_mode_runs"],
                          env={**env, "FASTCONVNEXT_TEST_DEVICE": "cuda"}, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage-error exit code
    assert "FASTCONVNEXT_TEST_DEVICE=cuda but torch sees no CUDA device" in done.stdout + done.stderr


# ------------------------------------------------------------------------------- the dispatch wiring


class FakeCudaTensor:
    """Just what the dispatch reads of an activation: device, dtype, shape, requires_grad."""

    def __init__(self, *shape, dtype=torch.bfloat16, requires_grad=False):
        self.device, self.dtype, self.shape, self.requires_grad = torch.device("cuda", 3), dtype, shape, requires_grad


FAKE_GPU = "Fake GPU 80GB"


def _refuse(run, key, impl):
    raise AssertionError(f"timed {impl} {key.label}")


class CountingTimer:
    """Returns the given times; records each (key, impl) it was asked to time."""

    def __init__(self, fused_us, eager_us):
        self.times, self.calls = {"fused": fused_us, "eager": eager_us}, []

    def __call__(self, run, key, impl):
        self.calls.append((key, impl))
        return self.times[impl]


@pytest.fixture()
def fake_gpu(monkeypatch):
    """CUDA device 3, an sm_90 with 80 GiB free, as far as the dispatch and tuning ask; nothing is timed unless a
    test sets tuning.first_use_timer."""
    monkeypatch.setattr(backend, "_kernels_usable", lambda device_type: (True, ""))
    monkeypatch.setitem(backend._arch_cache, 3, 90)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_device_identity", lambda index: (FAKE_GPU, "999.1"))
    monkeypatch.setattr(tuning, "_free_memory", lambda device: 80 << 30)
    monkeypatch.setattr(tuning, "first_use_timer", _refuse)


def mlp_call(x):
    """The arguments backend.convnext_mlp passes on: real (CPU) weights, only their shapes are read."""
    c = x.shape[-1]
    return (x, x, torch.zeros(4 * c, c), torch.zeros(4 * c), torch.zeros(c, 4 * c), torch.zeros(c), torch.zeros(c),
            "gelu", None)


def choose(x, call=None):
    call = mlp_call(x) if call is None else call
    return backend._choose(MLP, x, x.shape[-1], call[1:7], None, call)


WINS = key(hw=4096, batch=64)  # FAKE_TABLE: fused 50 vs eager 100 -> the prior says fused


def cached_file():
    return tuning.cache_path(tuning.environment(torch.device("cuda", 3)))


def write_cache(decisions):
    env = tuning.environment(torch.device("cuda", 3))
    assert tuning.save_cache(env, decisions) == cached_file()


def test_auto_on_cuda_follows_the_policy_and_forced_backends_do_not(fake_gpu, monkeypatch):
    monkeypatch.setenv(backend.TUNE_ENV_VAR, "0")  # the static model's decisions, without measuring first
    wins, loses = FakeCudaTensor(64, 56, 56, 96), FakeCudaTensor(64, 7, 7, 768)
    with torch.no_grad(), backend.use_backend("auto"):
        assert backend._choose(MLP, wins, 96, ()) is True
        assert backend._choose(MLP, loses, 768, ()) is False
        assert backend._choose(MLP, wins, 96, (), unsupported_reason="odd kernel") is False
    with torch.no_grad(), backend.use_backend("triton"):
        assert backend._choose(MLP, loses, 768, ()) is True
    with torch.no_grad(), backend.use_backend("eager"):
        assert backend._choose(MLP, wins, 96, ()) is False


def test_each_new_shape_is_timed_once_by_default(fake_gpu, monkeypatch):
    tuned = []

    def fake_tune(op, key, call):
        tuned.append(key)
        backend.install_tuned({key: Decision(False, "tuned", "measured", 2.0, 1.0)})

    monkeypatch.setattr(backend, "_tune_call", fake_tune)
    x = FakeCudaTensor(64, 56, 56, 96)
    with torch.no_grad(), backend.use_backend("auto"):
        assert choose(x) is False  # measured: eager is faster (the prior said fused)
        assert choose(x) is False
        assert tuned == [WINS]
        monkeypatch.setenv(backend.TUNE_ENV_VAR, "off")
        assert choose(FakeCudaTensor(256, 56, 56, 96)) is False and tuned == [WINS]  # the prior, not timed


@pytest.mark.parametrize("fused_us, eager_us", [(30.0, 60.0), (90.0, 60.0)], ids=["fused-faster", "eager-faster"])
def test_auto_on_cuda_times_the_first_use_keeps_the_faster_and_caches_it(fake_gpu, monkeypatch, fused_us, eager_us):
    timer = CountingTimer(fused_us, eager_us)
    monkeypatch.setattr(tuning, "first_use_timer", timer)
    x = FakeCudaTensor(64, 56, 56, 96)
    with torch.no_grad(), backend.use_backend("auto"):
        assert choose(x) is (fused_us < eager_us)
        assert timer.calls == [(WINS, "fused"), (WINS, "eager")]
        assert choose(x) is (fused_us < eager_us) and len(timer.calls) == 2  # decided: not timed again
    decision = backend.decide(WINS)
    assert (decision.source, decision.fused_us, decision.eager_us) == ("tuned", fused_us, eager_us)
    assert f"measured on {FAKE_GPU}" in decision.reason
    stored = json.loads(cached_file().read_text())
    assert stored["environment"]["gpu"] == FAKE_GPU and stored["environment"]["driver"] == "999.1"
    assert stored["entries"] == [{**WINS._asdict(), "fused_us": fused_us, "eager_us": eager_us}]

    backend.clear_policy()  # a fresh policy, as in a new process: the cache answers, nothing is timed
    tuning.reset()
    monkeypatch.setattr(tuning, "first_use_timer", _refuse)
    with torch.no_grad(), backend.use_backend("auto"):
        assert choose(x) is (fused_us < eager_us)
    assert backend.decide(WINS).source == "tuned" and len(timer.calls) == 2


def test_training_calls_time_forward_and_backward(fake_gpu, monkeypatch):
    timer = CountingTimer(30.0, 60.0)
    monkeypatch.setattr(tuning, "first_use_timer", timer)
    x = FakeCudaTensor(64, 56, 56, 96, requires_grad=True)
    with backend.use_backend("auto"):
        assert choose(x) is True
    assert [k.mode for k, _ in timer.calls] == [TRAIN, TRAIN]
    with torch.no_grad(), backend.use_backend("auto"):  # the same shape in inference is another key
        choose(x)
    assert [k.mode for k, _ in timer.calls] == [TRAIN, TRAIN, FWD, FWD]


@pytest.mark.parametrize("raw", ["0", "off", "FALSE", " no "])
def test_tune_0_never_times_and_ignores_the_cache(fake_gpu, monkeypatch, raw):
    write_cache({WINS: tuning.measured_decision(90.0, 60.0, FAKE_GPU)})  # measured: eager; the prior: fused
    monkeypatch.setenv(backend.TUNE_ENV_VAR, raw)
    with torch.no_grad(), backend.use_backend("auto"):
        assert choose(FakeCudaTensor(64, 56, 56, 96)) is True  # the prior alone
        assert choose(FakeCudaTensor(64, 7, 7, 768)) is False
    assert backend.decide(WINS).source == "model"
    assert backend.describe()["tuning"].startswith("off (FASTCONVNEXT_TUNE=0)")


def test_a_bad_tune_value_is_a_clear_error_at_dispatch(fake_gpu, monkeypatch):
    monkeypatch.setenv(backend.TUNE_ENV_VAR, "sometimes")
    with torch.no_grad(), backend.use_backend("auto"), pytest.raises(ValueError) as caught:
        choose(FakeCudaTensor(64, 56, 56, 96))
    assert str(caught.value) == ("FASTCONVNEXT_TUNE must be one of ('1', '0', 'true', 'false', 'yes', 'no', 'on', "
                                 "'off'), got 'sometimes' (any case; unset or empty: on)")


def _cannot_time(situation, monkeypatch):
    if situation == "capture":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    elif situation == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif situation == "memory":
        monkeypatch.setattr(tuning, "_free_memory", lambda device: 1 << 20)
    elif situation == "oom":
        def oom(run, key, impl):
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(tuning, "first_use_timer", oom)
    else:
        raise AssertionError(situation)


WARNS = {"memory": "not enough free GPU memory to time", "oom": "ran out of memory while timing"}


@pytest.mark.parametrize("situation", ["capture", "compile", "memory", "oom"])
def test_where_timing_is_impossible_the_cache_decides_else_the_prior(fake_gpu, monkeypatch, situation):
    _cannot_time(situation, monkeypatch)
    x = FakeCudaTensor(64, 56, 56, 96)
    with torch.no_grad(), backend.use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose(x) is True  # no cache: the prior (fused)
        assert choose(x) is True
    assert backend.decide(WINS).source == "model" and WINS not in backend.tuned_decisions()
    assert not cached_file().exists()
    messages = [str(w.message) for w in caught]
    if situation in WARNS:  # one warning per process, not one per call or shape
        assert len(messages) == 1 and WARNS[situation] in messages[0], messages
    else:
        assert messages == []
    backend.clear_policy()
    tuning.reset()
    write_cache({WINS: tuning.measured_decision(90.0, 60.0, FAKE_GPU)})  # measured earlier: eager
    with torch.no_grad(), backend.use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose(x) is False  # the cached measurement
    assert backend.decide(WINS).source == "tuned" and caught == []


def v2_mlp_call(x):
    """The arguments backend.convnext_v2_mlp passes on: real (CPU) weights, only their shapes are read."""
    c = x.shape[-1]
    d = 4 * c
    return (x, x, torch.zeros(d, c), torch.zeros(d), torch.zeros(d), torch.zeros(d), torch.zeros(c, d), torch.zeros(c),
            "gelu", None)


@pytest.mark.parametrize("situation", ["capture", "compile"])
def test_an_untimed_v2_mlp_call_follows_the_shipped_prior(fake_gpu, monkeypatch, situation):
    """CUDA-graph capture or compile tracing with nothing cached: the shipped prior's V2 row decides, as for V1."""
    _cannot_time(situation, monkeypatch)
    shipped = backend.read_prior(backend.PRIOR_PATH)
    row = shipped[(V2_MLP, 90, "bf16", 96, 3136, 64, FWD)]
    x = FakeCudaTensor(64, 56, 56, 96)
    call = v2_mlp_call(x)
    with backend.use_predicted_table(shipped), torch.no_grad(), backend.use_backend("auto"):
        chosen = backend._choose(V2_MLP, x, 96, call[1:8], None, call)
        decision = backend.decide(key(op=V2_MLP))
    assert (decision.source, decision.fused_us, decision.eager_us) == ("model", row["fused_us"], row["eager_us"])
    assert chosen is decision.fused is (row["fused_us"] < backend.MODEL_WIN_FACTOR * row["eager_us"])
    assert V2_MLP not in {k.op for k in backend.tuned_decisions()}


def test_the_memory_check_compares_twice_the_modelled_need_with_what_is_free(fake_gpu, monkeypatch):
    x = FakeCudaTensor(64, 56, 56, 96)
    call = mlp_call(x)
    act = 64 * 56 * 56 * 96 * 2  # bf16 activations
    assert tuning.timing_memory_estimate(MLP, WINS, call) == 2 * (4 * act) + 3 * act  # hidden is 4x; interpreter:
    needed = tuning.MEMORY_HEADROOM * tuning.timing_memory_estimate(MLP, WINS, call)  # no autotune buffer
    timer = CountingTimer(30.0, 60.0)
    monkeypatch.setattr(tuning, "first_use_timer", timer)
    monkeypatch.setattr(tuning, "_free_memory", lambda device: int(needed) - 1)
    with torch.no_grad(), backend.use_backend("auto"), pytest.warns(UserWarning, match="not enough free GPU memory"):
        choose(x)
    assert timer.calls == []
    tuning.reset()
    monkeypatch.setattr(tuning, "_free_memory", lambda device: int(needed))
    with torch.no_grad(), backend.use_backend("auto"):
        choose(x)
    assert len(timer.calls) == 2
    train = WINS._replace(mode=TRAIN)
    assert tuning.timing_memory_estimate(MLP, train, call) == 2 * (11 * act) + sum(
        tuning._nbytes(v) for v in call)


def test_the_first_run_line_comes_at_the_first_dispatch_after_the_debounce(fake_gpu, monkeypatch, caplog):
    now = [50.0]
    monkeypatch.setattr(tuning, "clock", lambda: now[0])
    monkeypatch.setattr(tuning, "first_use_timer", CountingTimer(30.0, 60.0))
    caplog.set_level(logging.WARNING, logger="fastconvnext.tuning")
    x, other = FakeCudaTensor(64, 56, 56, 96), FakeCudaTensor(64, 7, 7, 768)
    with torch.no_grad(), backend.use_backend("auto"):
        choose(x)
        choose(other)
        choose(x)  # the same forward goes on: no line yet
        assert caplog.records == []
        now[0] += tuning.SUMMARY_DEBOUNCE_S
        choose(x)  # the next forward
        choose(x)
    assert [r.getMessage() for r in caplog.records] == [
        f"fastconvnext: measured 2 shapes in 0 ms on {FAKE_GPU}; decisions cached in {cached_file()}"]


def test_info_shows_the_cached_decisions_of_this_gpu_and_where_they_are(fake_gpu):
    write_cache({WINS: tuning.measured_decision(30.0, 60.0, FAKE_GPU),
                 key(op=DW, mode=TRAIN): tuning.measured_decision(90.0, 60.0, FAKE_GPU)})
    report = backend.describe()
    assert report["tuning cache"] == f"{cached_file()} (2 decisions measured on {FAKE_GPU})"
    assert report[f"cached {WINS.label}"] == "fused (measured: fused 30.0 µs vs eager 60.0 µs)"
    assert report[f"cached {key(op=DW, mode=TRAIN).label}"] == "eager (measured: fused 90.0 µs vs eager 60.0 µs)"
    assert report["tuning"].startswith("on first use: on CUDA, auto times fused against eager")
    assert report["env FASTCONVNEXT_TUNE"] == "on (unset; default on)"


def test_info_without_a_gpu_says_where_the_caches_go(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    report = backend.describe()
    assert report["tuning cache"] == (f"{tmp_path / 'cache' / 'fastconvnext'}{os.sep}tuned-policy-<gpu>.json, one per "
                                      f"GPU (no CUDA device here)")
