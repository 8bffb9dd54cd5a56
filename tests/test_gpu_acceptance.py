"""The CPU-checkable parts of benchmarks/gpu_acceptance.py: options, orchestration, report, exit code."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert [r.ok for r in results] == [True, True, False, False, True]
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
