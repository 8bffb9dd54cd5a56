"""The `auto` policy: per (op, C, H*W bucket, batch bucket, dtype, grad mode, arch), fused or eager.

Decisions come from a fake static-model table (the format of kernels/perf_table.py), so every expected
choice below follows from numbers written here; the roofline fallback is checked against
fastconvnext.kernels.roofline computed independently in the test.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastconvnext import backend
from fastconvnext.backend import Decision, PolicyKey
from helpers import KERNEL_DEVICE, gpu, gpu_shapes, interpreter_only, kernel_dtypes, kernel_shapes

MLP, DW = "convnext_mlp", "dwconv_layernorm"
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
def _fresh_policy(monkeypatch):
    monkeypatch.setattr(backend, "_cache_checked", True)  # never this machine's tuning cache
    saved = backend.tuned_decisions()
    backend.clear_policy()
    with backend.use_predicted_table(FAKE_TABLE):
        yield
    backend.clear_policy()
    backend.install_tuned(saved)


def key(op=MLP, arch=90, dtype="bf16", channels=96, hw=4096, batch=64, mode=FWD):
    return PolicyKey(op, arch, dtype, channels, hw, batch, mode)


def test_exact_table_points_follow_the_modelled_times():
    assert backend.decide(key()).fused
    assert not backend.decide(key(mode=TRAIN)).fused
    assert backend.decide(key(op=DW)).fused
    decision = backend.decide(key())
    assert (decision.source, decision.fused_us, decision.eager_us) == ("model", 50.0, 100.0)
    assert "(modelled)" in decision.reason and "C=96 H*W=3136 N=64" in decision.reason


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
    for arch in (75, 100):  # no modelled GPU of that generation, in the table or the roofline
        decision = backend.decide(key(arch=arch))
        assert not decision.fused and decision.source == "none"
        assert f"sm_{arch}" in decision.reason and "tune()" in decision.reason


def test_unknown_dtype_runs_eagerly_with_a_reason():
    decision = backend.decide(key(dtype="fp64"))
    assert decision == Decision(False, "none", "no fused kernel for fp64")


def test_without_a_table_entry_the_roofline_decides():
    from fastconvnext.kernels import roofline

    shape = roofline.StageShape("t", 0, 64, 64, 192)  # H*W bucket 4096 -> 64x64
    fused = roofline.traffic(DW, "fused", "fwd+bwd", shape, "fp16").seconds(roofline.H100_SXM) * 1e6
    eager = roofline.traffic(DW, "eager", "fwd+bwd", shape, "fp16").seconds(roofline.H100_SXM) * 1e6
    decision = backend.decide(key(op=DW, dtype="fp16", channels=192, mode=TRAIN))  # fp16 not in the table
    assert decision.source == "roofline"
    assert decision.fused_us == pytest.approx(fused) and decision.eager_us == pytest.approx(eager)
    assert decision.fused == (fused < backend.MODEL_WIN_FACTOR * eager)
    with backend.use_predicted_table(None):  # no kernels/perf_table.py at all
        assert backend.decide(key()).source == "roofline"


def test_a_malformed_table_falls_back_to_the_roofline_with_a_warning():
    broken = {(MLP, 90, "bf16", 96, 3136, 64, FWD): {"fused": 1.0}}
    with backend.use_predicted_table(broken), pytest.warns(UserWarning, match="perf_table.py has a malformed entry"):
        assert backend.decide(key()).source == "roofline"


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
    assert len(keys) == 16 and {k.channels for k in keys} == {96, 192, 384, 768}
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


@pytest.fixture()
def fake_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_kernels_usable", lambda device_type: (True, ""))
    monkeypatch.setitem(backend._arch_cache, 3, 90)


def test_auto_on_cuda_follows_the_policy_and_forced_backends_do_not(fake_gpu):
    wins, loses = FakeCudaTensor(64, 56, 56, 96), FakeCudaTensor(64, 7, 7, 768)
    with torch.no_grad(), backend.use_backend("auto"):
        assert backend._choose(MLP, wins, 96, ()) is True
        assert backend._choose(MLP, loses, 768, ()) is False
        assert backend._choose(MLP, wins, 96, (), unsupported_reason="odd kernel") is False
    with torch.no_grad(), backend.use_backend("triton"):
        assert backend._choose(MLP, loses, 768, ()) is True
    with torch.no_grad(), backend.use_backend("eager"):
        assert backend._choose(MLP, wins, 96, ()) is False


def test_tune_env_var_times_each_untuned_shape_once(fake_gpu, monkeypatch):
    tuned = []

    def fake_tune(op, key, call):
        tuned.append(key)
        backend.install_tuned({key: Decision(False, "tuned", "measured", 2.0, 1.0)})

    monkeypatch.setattr(backend, "_tune_call", fake_tune)
    x = FakeCudaTensor(64, 56, 56, 96)
    with torch.no_grad(), backend.use_backend("auto"):
        monkeypatch.delenv(backend.TUNE_ENV_VAR, raising=False)
        assert backend._choose(MLP, x, 96, (), call=(x,)) is True and tuned == []
        monkeypatch.setenv(backend.TUNE_ENV_VAR, "1")
        assert backend._choose(MLP, x, 96, (), call=(x,)) is False  # measured: eager is faster
        assert backend._choose(MLP, x, 96, (), call=(x,)) is False
    assert tuned == [key(hw=4096, batch=64)]
