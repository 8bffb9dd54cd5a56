"""The CPU-checkable parts of benchmarks/gpu_acceptance.py: options, orchestration, report, exit code."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import KERNEL_DEVICE

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
acceptance = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = acceptance  # its dataclasses look their module up
spec.loader.exec_module(acceptance)
StepResult = acceptance.StepResult


def test_options(tmp_path):
    args = acceptance.parse_args(["--output", str(tmp_path)])
    assert args.steps == list(acceptance.STEPS) and args.train_steps == 50 and args.train_batch == 8
    assert acceptance.parse_args(["--output", "x", "--steps", "tune, training"]).steps == ["tune", "training"]


@pytest.mark.parametrize("argv,message", [
    (["--output", "x", "--steps", "tune,gpu"], "--steps takes a comma list out of kernel_tests, .*got 'tune,gpu'"),
    (["--output", "x", "--steps", ","], "--steps takes a comma list"),
    (["--output", "x", "--train-steps", "1"], "--train-steps must be >= 2"),
    (["--steps", "tune"], "the following arguments are required: --output"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        acceptance.parse_args(argv)
    assert exit_.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def fake_runner(name):
    if name == "training":
        return StepResult(name, False, 3.0, summary="losses diverged", error="fused and eager losses differ by 9%")
    if name == "tune":
        raise RuntimeError("CUDA error: illegal memory access")
    return StepResult(name, True, 1.0, summary=f"| {name} | table |", data={"x": 1})


def test_every_step_runs_and_failures_are_recorded():
    messages = []
    results = acceptance.orchestrate(acceptance.STEPS, fake_runner, progress=messages.append)
    assert [r.name for r in results] == list(acceptance.STEPS)
    assert [r.ok for r in results] == [True, True, False, False, True, True]
    assert results[3].error == "RuntimeError: CUDA error: illegal memory access"
    assert "[gpu_acceptance] training: FAILED fused and eager losses differ by 9% (3 s)" in messages


def test_report_files_and_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(acceptance, "subprocess_runner", lambda args: fake_runner)
    assert acceptance.main(["--output", str(tmp_path / "out")]) == 1
    md = (tmp_path / "out" / "gpu_acceptance.md").read_text()
    assert md.startswith("# GPU acceptance run: FAILED")
    assert "| training | FAILED: fused and eager losses differ by 9% | 3 |" in md
    assert "## modelled: ok" in md and "| modelled | table |" in md
    report = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())
    assert report["passed"] is False and [s["name"] for s in report["steps"]] == list(acceptance.STEPS)
    assert report["environment"]["torch"] == torch.__version__
    ok_runner = lambda name: StepResult(name, True, 1.0)  # noqa: E731
    monkeypatch.setattr(acceptance, "subprocess_runner", lambda args: ok_runner)
    assert acceptance.main(["--output", str(tmp_path / "ok"), "--steps", "tune"]) == 0
    assert (tmp_path / "ok" / "gpu_acceptance.md").read_text().startswith("# GPU acceptance run: PASSED")


def test_the_shell_command_fails_loudly_without_a_gpu(tmp_path):
    """Through the real subprocess runner: the step reports why it failed, the command exits non-zero."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run belongs on it, not in the unit tests")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), str(tmp_path), "--steps", "tune"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                           "PYTHON": sys.executable})
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["steps"][0]["name"] == "tune" and not report["steps"][0]["ok"]
    assert "RuntimeError: no CUDA device: the acceptance run needs a GPU" in report["steps"][0]["error"]
    assert (tmp_path / "steps" / "tune.log").is_file()


# ------------------------------------------------------- the steps themselves, shrunk to the interpreter


def _fast_timer(run, key, impl):
    run()  # one real run of each implementation
    return {"fused": 1.0, "eager": 2.0}[impl] if key.op == "convnext_mlp" else {"fused": 3.0, "eager": 2.0}[impl]


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    """The acceptance steps shrunk: fp32, one stage; on CPU in Triton's interpreter (TRITON_INTERPRET=1 from
    conftest), natively in the GPU test mode."""
    from fastconvnext import backend

    monkeypatch.setattr(acceptance, "SETUP", acceptance.Setup(
        device=KERNEL_DEVICE.type, model=dict(num_stages=1, hidden_sizes=[8], depths=[1]), image=8, stages=((4, 8),),
        modelled_batch=1, tune_batch=1, dtype="fp32", autocast=False, timer=_fast_timer))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    saved = backend.tuned_decisions()
    yield acceptance.parse_args(["--output", str(tmp_path), "--train-steps", "2", "--train-batch", "1"])
    backend.clear_policy()
    backend.install_tuned(saved)


def test_training_step_runs_fused_and_eager_from_one_initialization(tiny):
    result = acceptance.step_training(tiny)
    fused, eager = result.data["fused_losses"], result.data["eager_losses"]
    assert len(fused) == len(eager) == 2
    assert fused[0] == pytest.approx(eager[0], rel=1e-5)  # same weights, same batch, before any update
    assert result.ok, result.error


def test_training_verdict():
    assert acceptance.training_verdict([2.0, 1.9, 1.5, 1.4], [2.0, 1.91, 1.5, 1.41], cycle=2)[0]
    assert acceptance.training_verdict([2.0, float("nan")], [2.0, 1.9], cycle=2)[2] == "non-finite loss"
    assert "differ by 10.00%" in acceptance.training_verdict([2.2, 1.9], [2.0, 1.9], cycle=2)[2]
    assert "did not decrease" in acceptance.training_verdict([2.0, 1.9, 2.1, 2.0], [2.0, 1.9, 2.1, 2.0], cycle=2)[2]


def test_tune_and_modelled_steps(tiny):
    from fastconvnext import backend

    tuned = acceptance.step_tune(tiny)
    assert tuned.ok, tuned.error
    shapes = {row[0].split(" C=")[0] + " " + row[0].split()[-2] for row in tuned.data["rows"]}
    assert shapes == {f"{op} {mode}" for op in backend.OPS for mode in backend.MODES}
    assert all(row[1] == ("fused" if row[0].startswith("convnext_mlp") else "eager") for row in tuned.data["rows"])
    modelled = acceptance.step_modelled(tiny)
    assert modelled.ok and len(modelled.data["rows"]) == 4
    for row in modelled.data["rows"]:  # 1x4x4x8 is no table point: nothing modelled, nothing invented
        assert row[1] == "1x4x4x8" and row[4] == "not modelled" and row[5] == "n/a"


def test_calibrate_step_puts_the_table_in_the_report(tiny):
    result = acceptance.step_calibrate(tiny)  # off CUDA: calibrate_machine's interpreter dry run
    assert result.ok, result.error
    assert "DRY RUN (interpreter; NOT a measurement)" in result.summary
    assert [row[0] for row in result.data["rows"]][:2] == ["HBM read bandwidth", "L2->SM read bandwidth"]
    assert "roofline.Machine.l2_bytes_per_s" in result.data["suggested"]
