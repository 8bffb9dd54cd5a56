"""The CPU-checkable parts of benchmarks/gpu_acceptance.py/.sh: the stage plan against the GPU lease, options and
environment, the preflight's failure without CUDA (from this tree and from an uninstalled copy), the incremental
report (a stage killed half way keeps its figures), the orchestrator's time limit, and each stage's code on tiny
shapes in Triton's interpreter (TRITON_INTERPRET=1 from conftest)."""
import ast
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import conftest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
SHELL = ROOT / "benchmarks" / "gpu_acceptance.sh"
spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
acceptance = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = acceptance  # its dataclasses look their module up
spec.loader.exec_module(acceptance)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "PYTHONPATH")}
    return {**env, "PYTHON": sys.executable, **extra}


# ------------------------------------------------------------------------------------------------ the plan


def test_the_plan_fits_the_lease():
    names = [stage.name for stage in acceptance.STAGES]
    assert names == ["preflight", "1", "2", "3"] and acceptance.PLAN_ORDER == tuple(names)
    assert all(0 < s.expected_s < s.timeout_s < acceptance.COMMAND_LIMIT_S == 600
               for s in acceptance.STAGES + acceptance.EXTRA_STAGES)
    assert acceptance.STAGE_BY_NAME["1"].timeout_s <= 240
    assert sum(s.timeout_s for s in acceptance.STAGES) <= acceptance.DEVICE_BUDGET_S - acceptance.STARTUP_ALLOWANCE_S
    assert acceptance.DEVICE_BUDGET_S == 15 * 60 and acceptance.STARTUP_ALLOWANCE_S >= 120
    assert acceptance.plan_problems() == []
    assert "tests" not in acceptance.PLAN_ORDER  # the serial pytest run is no part of `all`


def test_plan_problems_name_what_does_not_fit():
    stage = acceptance.Stage
    bad = (stage("preflight", "", 50, 60, (), ""), stage("1", "", 300, 200, (), ""), stage("2", "", 600, 100, (), ""))
    problems = acceptance.plan_problems(bad)
    assert "stage preflight: expected 60 s is not under its limit" in problems
    assert "stage 1: limit 300 s is over 240 s" in problems
    assert "stage 2: limit 600 s is not under 600 s" in problems
    assert "the limits sum to 950 s, over 900 s less 180 s of start-up" in problems


def test_stage_1_and_2_share_compiles_and_stage_3_adds_none_by_the_launch_plans():
    counts = acceptance.planned_variants(acceptance.REAL)
    assert counts["1"] > 0 and counts["2 bf16"] == 0 and counts["3 (tune, inductor)"] == 0
    assert counts["2 fp32"] > 0 and counts["2 fp16"] > 0
    real = acceptance.REAL
    assert real.check_dtypes[0] == real.op_dtype and real.check_batch in real.op_batches
    rehearsal = acceptance.REHEARSAL
    assert rehearsal.check_dtypes[0] == rehearsal.op_dtype and rehearsal.check_batch in rehearsal.op_batches


def test_op_cases_run_batch_by_batch_every_shape_op_and_pass():
    cases = acceptance.op_cases(acceptance.REAL)
    assert len(cases) == 3 * 4 * 2 * 2 and [c[1] for c in cases] == [64] * 24 + [256] * 24
    assert cases[:6] == [(op, 64, 56, 96, pass_) for op in ("dwconv_layernorm", "convnext_mlp", "convnext_v2_mlp")
                         for pass_ in ("forward", "forward_backward")]


def test_v2_mlp_is_timed_beside_the_prior_and_checked_in_every_dtype():
    """ConvNeXt V2's MLP: stage 1 times it at every case the V1 ops have, each with a MODEL point in the prior; stage
    2 checks it at every shape in bf16 (stage 1's compiles) and, within the stage's budget, at the first and last
    stage shape in fp32 and fp16; the V1 ops keep every shape in every dtype; the preflight imports its module."""
    real = acceptance.REAL
    v2 = [c for c in acceptance.op_cases(real) if c[0] == "convnext_v2_mlp"]
    assert [c[1:] for c in v2] == [c[1:] for c in acceptance.op_cases(real) if c[0] == "convnext_mlp"]
    from fastconvnext.tooling.bench.ops_report import predicted_us

    for _, batch, side, channels, pass_ in v2:
        for arch in (80, 90):
            shape = (batch, side, side, channels)
            assert predicted_us("convnext_v2_mlp", shape, real.op_dtype, pass_, arch), (shape, pass_, arch)
    checks = acceptance.check_cases(real)
    shapes = {dtype: [(side, c) for d, op, side, c, pass_ in checks if d == dtype and op == "convnext_v2_mlp"
                      and pass_ == "forward"] for dtype in real.check_dtypes}
    assert shapes == {"bf16": list(acceptance.STAGES_T), "fp32": [(56, 96), (7, 768)], "fp16": [(56, 96), (7, 768)]}
    for op in acceptance.MODEL_OPS:
        assert len([c for c in checks if c[1] == op]) == 4 * 3 * 2
    assert acceptance._subset_note(real, "bf16") == ""
    assert acceptance._subset_note(real, "fp16") == " convnext_v2_mlp at C=96@56, C=768@7 only (the plan's budget)."
    rehearsed = {(dtype, op) for dtype, op, *_ in acceptance.check_cases(acceptance.REHEARSAL)}
    assert {("fp32", "convnext_v2_mlp"), ("fp16", "convnext_v2_mlp")} <= rehearsed
    assert "V2 MLP" in acceptance.STAGE_BY_NAME["1"].why and "C=96@56 and C=768@7" in acceptance.STAGE_BY_NAME["2"].why
    assert "convnext_v2_mlp_kernel" in acceptance.KERNEL_MODULES


# ------------------------------------------------------------------------------------- options, environment


def test_options(tmp_path):
    args = acceptance.parse_args(["--output", str(tmp_path)])
    assert args.stages == ("preflight", "1", "2", "3") and args.cache_dir == tmp_path.resolve() / "cache"
    assert acceptance.parse_args(["--output", "x", "--stage", "1, 3"]).stages == ("1", "3")
    assert acceptance.parse_args(["--output", "x", "--stage", "tests"]).stages == ("tests",)
    assert acceptance.parse_args(["--plan"]).output is None


@pytest.mark.parametrize("argv,message", [
    (["--output", "x", "--stage", "1,gpu"], "--stage takes 'all' or a comma list out of preflight, 1, 2, 3, tests, "
                                           "got '1,gpu'"),
    (["--output", "x", "--stage", ","], "--stage takes 'all'"),
    (["--output", "x", "--workers", "-1"], "--workers must be >= 0"),
    (["--stage", "1"], "the following arguments are required: --output"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        acceptance.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_stage_environment(tmp_path):
    args = acceptance.parse_args(["--output", str(tmp_path)])
    base = {"PYTHONPATH": f"/elsewhere{os.pathsep}{ROOT}", "TRITON_INTERPRET": "1", "FASTCONVNEXT_BACKEND": "eager"}
    env = acceptance.stage_environment(args, "1", base)
    assert env["PYTHONPATH"] == f"{ROOT}{os.pathsep}/elsewhere"  # the checkout first, once
    assert env["FASTCONVNEXT_AUTOTUNE"] == "0" and "TRITON_INTERPRET" not in env and "FASTCONVNEXT_BACKEND" not in env
    assert env["TRITON_CACHE_DIR"] == str(tmp_path.resolve() / "cache" / "triton")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "cache" / "inductor")
    assert acceptance.stage_environment(args, "1", {"TRITON_CACHE_DIR": "/shared"})["TRITON_CACHE_DIR"] == "/shared"
    assert acceptance.stage_environment(args, "tests", {})["FASTCONVNEXT_TEST_DEVICE"] == "cuda"
    rehearsal = acceptance.parse_args(["--output", str(tmp_path), "--rehearse"])
    assert acceptance.stage_environment(rehearsal, "2", {})["TRITON_INTERPRET"] == "1"
    assert "FASTCONVNEXT_TEST_DEVICE" not in acceptance.stage_environment(rehearsal, "tests", {
        "FASTCONVNEXT_TEST_DEVICE": "cuda"})


def test_the_shell_command(tmp_path):
    done = subprocess.run(["bash", str(SHELL), "--help"], capture_output=True, text=True, env=_env())
    assert done.returncode == 0 and "--stage 1 OUTPUT_DIR" in done.stdout
    done = subprocess.run(["bash", str(SHELL), "--bogus", str(tmp_path)], capture_output=True, text=True, env=_env())
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--stage", "1,2", "--print-limit"], capture_output=True,
                          text=True)
    assert done.stdout.strip() == str(240 + 170 + 30)


# ------------------------------------------------------------------------------------------------ preflight


def test_preflight_failure_message_names_expected_and_found():
    check = acceptance.Check
    assert acceptance.preflight_failure([check("torch", ">= 2.4", "2.13", True)]) == ""
    message = acceptance.preflight_failure([check("CUDA", "available", "False: a CPU-only build", False),
                                            check("triton", "importable", "not importable", False)])
    assert message == ("preflight FAILED: CUDA: expected available, found False: a CPU-only build; "
                       "triton: expected importable, found not importable")


def test_preflight_checks_here():
    env = {"TRITON_INTERPRET": "1", "FASTCONVNEXT_AUTOTUNE": "0", "TRITON_CACHE_DIR": ""}
    checks, facts = acceptance.preflight(rehearse=True, environ=env)
    by_name = {c.what: c for c in checks}
    assert by_name["fastconvnext"].ok and by_name["fastconvnext.kernels"].ok and by_name["CUDA"].ok
    assert not by_name["TRITON_CACHE_DIR"].ok  # unset
    assert facts["torch"] == torch.__version__ and "transformers" in facts and "numpy" in facts
    checks, _ = acceptance.preflight(rehearse=False, environ={**env, "TRITON_INTERPRET": "1"})
    assert not {c.what: c for c in checks}["TRITON_INTERPRET"].ok  # a native run must not interpret


@NO_GPU
def test_without_cuda_the_preflight_fails_fast_and_nothing_else_runs(tmp_path):
    begin = time.monotonic()
    done = subprocess.run(["bash", str(SHELL), "--stage", "all", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.monotonic() - begin < 60
    assert "preflight FAILED: CUDA: expected torch.cuda.is_available() True" in done.stdout
    assert f"found False: torch {torch.__version__}" in done.stdout
    assert "preflight failed: nothing else runs" in done.stdout
    status = json.loads((tmp_path / "stagepreflight.status.json").read_text())
    assert not status["ok"] and status["error"].startswith("preflight FAILED: CUDA")
    assert not (tmp_path / "stage1.jsonl").exists()
    report = (tmp_path / "gpu_acceptance.md").read_text()
    assert report.startswith("# GPU acceptance run: FAILED") and "| 1 | not run |" in report
    assert "| CUDA | torch.cuda.is_available() True" in report and "| FAILED |" in report
    # a single stage checks first too, and stops there
    done = subprocess.run(["bash", str(SHELL), "--stage", "2", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 1 and "preflight FAILED: CUDA" in done.stdout
    assert [r["kind"] for r in acceptance.read_records(tmp_path / "stage2.jsonl")] == ["note", "note"]


def test_preflight_from_an_uninstalled_copy_of_the_tree(tmp_path):
    """The box gets a plain copy of the checkout and installs nothing: a copy of the working tree (tracked files and
    those git does not ignore, as the box's copy is made), run by a venv that sees this venv's packages but not the
    editable install of fastconvnext, imports from the copy."""
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in files:
        if name and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    (venv_site / "packages.pth").write_text(str(site) + "\n")  # a path line: the .pth files there do not run
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import sys; print([type(f).__name__ for f in sys.meta_path])"],
                           capture_output=True, text=True, check=True)
    assert "editable" not in probe.stdout.lower()
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(copy / "benchmarks" / "gpu_acceptance.sh"), "--rehearse", "--stage",
                           "preflight", str(out)], capture_output=True, text=True, timeout=180,
                          env=_env(PYTHON=str(python)), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = {r["what"]: r for r in acceptance.read_records(out / "stagepreflight.jsonl") if "what" in r}
    assert figures["fastconvnext"]["found"] == str(copy / "fastconvnext") and figures["fastconvnext"]["ok"]
    assert f"__path__ ['{copy / 'kernels'}']" in figures["fastconvnext.kernels"]["found"]


# -------------------------------------------------------------------------------------- incremental reports


def test_figure_log_writes_each_figure_at_once_and_a_torn_line_is_dropped(tmp_path):
    log = acceptance.FigureLog(tmp_path, "9", echo=lambda text: None)
    log.section("ops", "Ops", "how", ("a", "b"))
    log.row((1, "x"), a=1)
    assert acceptance.read_records(tmp_path / "stage9.jsonl")[-1]["cells"] == ["1", "x"]  # before anything closes
    assert (tmp_path / "stage9.md").read_text().endswith("| a | b |\n|---|---|\n| 1 | x |\n")
    with pytest.raises(ValueError, match="1 cells for the 2 columns"):
        log.row((1,))
    with open(tmp_path / "stage9.jsonl", "a") as f:
        f.write('{"kind": "figure", "cells": ["2",')  # a kill in the middle of a write
    records = acceptance.read_records(tmp_path / "stage9.jsonl")
    assert [r["kind"] for r in records] == ["section", "figure"]
    (tmp_path / "stage9.jsonl").write_text('{"kind": "note"}\nnot json\n{"kind": "note"}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        acceptance.read_records(tmp_path / "stage9.jsonl")


def test_a_stage_killed_half_way_keeps_its_figures(tmp_path):
    """Stage 2 (rehearsal) killed with SIGKILL once two checks are written: both are there, parseable, and the
    summary reports the stage as cut off."""
    args = acceptance.parse_args(["--output", str(tmp_path), "--rehearse", "--workers", "1"])
    env = acceptance.stage_environment(args, "2")
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--run-stage", "2", "--rehearse", "--workers", "1",
                                "--output", str(tmp_path), "--cache-dir", str(args.cache_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            figures = [r for r in acceptance.read_records(tmp_path / "stage2.jsonl") if r["kind"] == "figure"]
            if len(figures) >= 2:
                break
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage finished before it was killed"
    figures = [r for r in acceptance.read_records(tmp_path / "stage2.jsonl") if r["kind"] == "figure"]
    assert len(figures) >= 2 and all(f["ok"] for f in figures[:2])
    assert figures[0]["op"] == "dwconv_layernorm" and figures[0]["dtype"] == "fp32"
    md = (tmp_path / "stage2.md").read_text()
    assert "| fp32 | dwconv_layernorm | 2 x 4 x 4 x 8 | forward |" in md
    assert not (tmp_path / "stage2.result.json").exists()
    report = acceptance.write_summary(tmp_path).read_text()
    assert "| 2 | FAILED: incomplete: no status (the run was cut off) |" in report
    assert "| fp32 | dwconv_layernorm | 2 x 4 x 4 x 8 | forward |" in report
    saved = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert len([r for r in saved["records"]["2"] if r["kind"] == "figure"]) == len(figures)


def _gone(pid, wait_s=10.0):
    """Whether a process ended within wait_s (dead, or a zombie its new parent has not reaped yet)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_the_orchestrator_kills_a_stage_and_its_children_at_the_limit(tmp_path):
    args = acceptance.parse_args(["--output", str(tmp_path), "--rehearse"])
    child = textwrap.dedent(f"""
        import importlib.util, subprocess, sys, time
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("ga", {str(SCRIPT)!r})
        ga = importlib.util.module_from_spec(spec); sys.modules["ga"] = ga; spec.loader.exec_module(ga)
        log = ga.FigureLog(Path({str(tmp_path)!r}), "1")
        log.section("ops", "Ops", "", ("case", "µs"))
        log.row(("a", "1.0"), case="a")
        log.row(("b", "2.0"), case="b")
        worker = subprocess.Popen(["sleep", "120"])
        Path({str(tmp_path / 'worker.pid')!r}).write_text(str(worker.pid))
        time.sleep(120)
    """)
    lines = []
    begin = time.monotonic()
    status = acceptance.run_stage_process("1", args, command=[sys.executable, "-c", child], timeout_s=8,
                                          echo=lines.append)
    assert time.monotonic() - begin < 30
    assert status["timed_out"] and not status["ok"] and status["limit_s"] == 8
    assert status["error"].startswith("timed out after 8 s and killed; the figures written before are kept")
    worker = int((tmp_path / "worker.pid").read_text())
    assert _gone(worker), "the stage's own child outlived it"
    assert [r["cells"] for r in acceptance.read_records(tmp_path / "stage1.jsonl") if r["kind"] == "figure"] == [
        ["a", "1.0"], ["b", "2.0"]]
    assert "  a | 1.0\n" in lines and (tmp_path / "stage1.log").read_text().count(" | ") == 2
    assert json.loads((tmp_path / "stage1.status.json").read_text())["timed_out"]
    report = acceptance.write_summary(tmp_path).read_text()
    assert report.startswith("# GPU acceptance run: FAILED") and "| 1 | FAILED: timed out after 8 s" in report
    assert "| b | 2.0 |" in report


# ---------------------------------------------------------------- GPU mode never runs interpreter-only code


def test_interpreter_only_lists_name_real_files_and_tests():
    tests = ROOT / "tests"
    for name in conftest.INTERPRETER_SUITES:
        assert (tests / name).is_file(), name
    for entry in conftest.INTERPRETER_TESTS:
        file_name, test = entry.split("::")
        functions = {node.name for node in ast.parse((tests / file_name).read_text()).body
                     if isinstance(node, ast.FunctionDef)}
        assert test.split("[")[0] in functions, entry
    assert conftest.interpreter_only_reason("test_kernel_env.py", "test_every_kernel_launch_asks_for_fma_contraction")
    assert conftest.interpreter_only_reason("test_training.py", "test_saved_bytes_of_one_block_match_a_hand_count"
                                            "[triton]", "test_saved_bytes_of_one_block_match_a_hand_count")
    assert conftest.interpreter_only_reason("test_training.py", "test_saved_bytes_of_one_block_match_a_hand_count"
                                            "[eager]", "test_saved_bytes_of_one_block_match_a_hand_count") is None
    assert conftest.interpreter_only_reason("test_kernels_native.py", "test_dwconv_layernorm_at_stage_shapes") is None


def test_gpu_mode_collects_no_interpreter_only_test_of_the_kernel_files(tmp_path):
    """The kernel test files in GPU mode (CUDA faked present, collection only): the interpreter spy is skipped, the
    native stage-shape tests and the device-neutral ones are kept."""
    plugin = tmp_path / "fake_cuda_plugin.py"
    plugin.write_text(textwrap.dedent("""
        import json, os
        import torch
        torch.cuda.is_available = lambda: True
        def pytest_collection_finish(session):
            with open(os.environ["COLLECTED_JSON"], "w") as f:
                json.dump({item.nodeid: [m.kwargs.get("reason") for m in item.iter_markers("skip")]
                           for item in session.items}, f)
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTCONVNEXT_TEST_DEVICE="cuda", COLLECTED_JSON=str(tmp_path / "items.json"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    files = [f"tests/{name}" for name in acceptance.KERNEL_TEST_FILES]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "fake_cuda_plugin", "-p",
                           "no:cacheprovider", *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    items = json.loads((tmp_path / "items.json").read_text())
    skipped = {node for node, reasons in items.items() if reasons}
    assert skipped == {"tests/test_kernel_env.py::test_every_kernel_launch_asks_for_fma_contraction"}
    assert sum(node.startswith("tests/test_kernels_native.py::") for node in items) == 24


# --------------------------------------------------------------------- the stages on tiny interpreter shapes


ONE_STAGE = dict(num_stages=1, hidden_sizes=[8], depths=[1])
TINY = dataclasses.replace(acceptance.REHEARSAL, op_batches=(1,), repeats=2, check_dtypes=("fp32",), workers=1,
                           model=ONE_STAGE, inductor_model=ONE_STAGE, image=8, compile_backend="aot_eager",
                           train_steps=2, train_cycle=2)


@pytest.fixture()
def ctx(monkeypatch, tmp_path):
    from fastconvnext import backend

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    saved = backend.tuned_decisions()
    log = acceptance.FigureLog(tmp_path, "t", echo=lambda text: None)
    yield acceptance.Context(tmp_path, TINY, log, workers=1)
    backend.clear_policy()
    backend.install_tuned(saved)


def _figures(ctx, part):
    return [r for r in acceptance.read_records(ctx.log.jsonl) if r["kind"] == "figure" and r["part"] == part]


def test_stage_1_writes_calibration_and_timed_ops(ctx):
    acceptance.stage_1(ctx)
    assert ctx.parts_done == ["prewarm", "calibrate", "ops"]
    calibration = _figures(ctx, "calibrate")
    assert [f["figure"] for f in calibration[:2]] == ["HBM read bandwidth", "L2->SM read bandwidth"]
    assert "DRY RUN (interpreter; NOT a measurement) median" in ctx.log.md.read_text()
    cases = acceptance.op_cases(TINY)
    ops = _figures(ctx, "ops")
    assert [(f["op"], f["pass_"]) for f in ops] == [(c[0], c[4]) for c in cases] and not ctx.failures
    assert [f["pass_"] for f in ops if f["op"] == "convnext_v2_mlp"] == list(acceptance.PASSES)
    for figure in ops:
        assert len(figure["fused_us"]) == len(figure["eager_us"]) == 2 and figure["fused_over_eager"] > 0
        assert figure["model"] is None and figure["cells"][-1] == "not modelled"  # no table point: nothing invented
    assert "Fused vs eager per op, fp32, REHEARSAL, NOT a measurement" in ctx.log.md.read_text()


def test_stage_2_checks_pass_and_a_wrong_kernel_fails(ctx, monkeypatch):
    acceptance.stage_2(ctx)
    figures = _figures(ctx, "check fp32")
    assert [(f["op"], f["pass_"]) for f in figures] == [(c[1], c[4]) for c in acceptance.check_cases(TINY)]
    assert [f["ok"] for f in figures] == [True] * 6 and not ctx.failures and ctx.parts_done == ["check fp32"]
    mlp, v2 = figures[3], figures[5]  # forward+backward: output + 7 gradients, V2's output + 8; a bitwise rerun
    assert (mlp["op"], mlp["cells"][4], v2["op"], v2["cells"][4]) == ("convnext_mlp", "8", "convnext_v2_mlp", "9")
    assert mlp["cells"][7] == v2["cells"][7] == "same"

    tolerance = acceptance._script_module(ROOT / "tests" / "tolerance.py")
    ctx.log.section("check", "Checks", columns=acceptance.CHECK_COLUMNS)

    from fastconvnext import kernels

    right = kernels.dwconv_layernorm
    monkeypatch.setattr(kernels, "dwconv_layernorm", lambda *a, **k: right(*a, **k) * 1.01, raising=False)
    acceptance.check_case(ctx, torch, tolerance, "dwconv_layernorm", 2, 4, 8, "fp32", "forward")
    assert not _figures(ctx, "check")[-1]["ok"] and ctx.failures[-1].startswith("fp32 dwconv_layernorm 2 x 4 x 4 x 8 forward")


def test_stage_3_parts_tune_train_and_compile(ctx):
    acceptance.tune_part(ctx, torch)
    tuned = _figures(ctx, "tune")
    assert len(tuned) == 2 * 2 and all(f["source"] == "tuned" for f in tuned)  # 2 ops x 2 passes
    acceptance.training_part(ctx, torch)
    runs = _figures(ctx, "training")
    assert [r["backend"] for r in runs] == ["triton", "eager"]
    assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0], rel=1e-5)  # one initialization, one batch
    acceptance.inductor_part(ctx, torch)
    assert [f["tensor"] for f in _figures(ctx, "inductor")] == ["pooler_output", "d stem weight"]
    assert not ctx.failures, ctx.failures


def test_training_prewarm_tasks_rebuild_the_recorded_calls(ctx):
    model = acceptance._convnext(torch, TINY, TINY.model, classify=True).train()
    pixels = torch.randn(TINY.batch, 3, TINY.image, TINY.image)
    tasks = acceptance.training_prewarm_tasks(torch, TINY, model, pixels)
    assert sorted(task[1] for _, task in tasks) == sorted(acceptance.MODEL_OPS)  # one stage, both V1 ops
    _, (kind, op, specs, pass_, autocast) = tasks[0]
    assert kind == "call" and pass_ == "forward_backward" and autocast is None
    assert specs[0][0] == "tensor" and specs[0][4] is True  # x, recorded with its strides and requires_grad
    task, seconds, error = acceptance.prewarm_task(tasks[0][1])  # in this process: the spec round trip
    assert error == "" and seconds > 0


def test_training_verdict():
    assert acceptance.training_verdict([2.0, 1.9, 1.5, 1.4], [2.0, 1.91, 1.5, 1.41], cycle=2)[0]
    assert acceptance.training_verdict([2.0, float("nan")], [2.0, 1.9], cycle=2)[2] == "non-finite loss"
    assert "differ by 10.00%" in acceptance.training_verdict([2.2, 1.9], [2.0, 1.9], cycle=2)[2]
    assert "did not decrease" in acceptance.training_verdict([2.0, 1.9, 2.1, 2.0], [2.0, 1.9, 2.1, 2.0], cycle=2)[2]
