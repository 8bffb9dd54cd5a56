"""compile_check builds kernel configs for sm_80 and sm_90 without a GPU and flags spills.

Compiling needs a process without TRITON_INTERPRET (conftest.py sets it for the kernel tests),
so the checker runs in subprocesses here.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastconvnext.tooling import compile_check
from fastconvnext.kernels.compile_spec import CompileTarget

PRESENT = [m for m in compile_check.KERNEL_MODULES if compile_check.module_present(m)]
# The suite compiles a handful of each module's targets, spread over its list (dtypes, widths, kernels):
# under a minute on an idle 2-core machine. The full run (`python -m fastconvnext.tooling.compile_check
# --arch 80 90`) is required whenever kernels/ changes (CONTRIBUTING.md).
SPREAD = 3
# No test-level time limit below what a loaded machine needs: a compile is never flaky, only slow.
# A timeout kills the checker, and its pool workers die with it (PR_SET_PDEATHSIG, tested below).
GENEROUS_TIMEOUT = 3600


def compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_python(args, tmp_path, timeout=GENEROUS_TIMEOUT):
    return subprocess.run(
        [sys.executable, *args], env=compiler_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("module", PRESENT)
def test_a_spread_of_targets_compiles_without_spills(module, tmp_path):
    report = tmp_path / "report.json"
    proc = run_python(
        ["-m", "fastconvnext.tooling.compile_check", "--arch", "80", "90", "--kernel", module, "--strict",
         "--spread", str(SPREAD), "--json", str(report)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())
    # The targets as the kernel module lists them (labels are plain data, fine in the interpreter).
    listed = __import__(f"fastconvnext.kernels.{module}", fromlist=["compile_targets"]).compile_targets()
    targets = [t for _, t in compile_check.spread_targets([(module, t) for t in listed], SPREAD)]
    assert len(targets) == min(SPREAD, len(listed))
    assert targets[0] is listed[0] and targets[-1] is listed[-1]
    variants = [v for t in targets for v in compile_check.int_specializations(t)]
    assert any(v.label.endswith("ints%16") for v in variants), "no target compiled with divisible integers"
    expected = sorted((v.kernel, v.label, v.dtype, arch) for v in variants for arch in (80, 90))
    assert sorted((r["kernel"], r["label"], r["dtype"], r["arch"]) for r in rows) == expected
    for variant in variants:
        assert variant.label in proc.stdout, f"table lacks {variant.kernel} {variant.label}"
    assert all(r["stack_bytes"] == 0 and r["local_bytes"] == 0 and r["registers"] > 0 for r in rows)


def _children(pid):
    """PIDs whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# `python -m fastconvnext.tooling.compile_check ...` with SIGINT at its default disposition, as an interactive shell
# starts it. A job started with `&` from a script inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt: a test suite launched that way would see Ctrl-C ignored, not the checker's handling of it.
CHECKER_AS_A_SHELL_STARTS_IT = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('fastconvnext.tooling.compile_check', run_name='__main__', alter_sys=True)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_no_pool_worker_outlives_the_checker(how, tmp_path):
    """Kill the checker (SIGKILL as a timeout does, SIGINT as Ctrl-C does) while its pool compiles."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHECKER_AS_A_SHELL_STARTS_IT, "--arch", "80", "90", "--jobs", "2"],
        env=compiler_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600  # loading the kernel modules under load can take minutes
        workers = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = [pid for pid in _children(proc.pid) if "python" in open(f"/proc/{pid}/cmdline").read()]
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool never started"
        proc.send_signal(how)
        proc.wait(timeout=600)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "pool workers outlived the checker"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _idle_forever():
    time.sleep(3600)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork pool")
def test_an_interrupt_kills_a_worker_the_pool_had_not_recorded_yet():
    """Ctrl-C between a worker's fork and the pool's record of it: the checker must still kill that child, or
    multiprocessing's exit handler joins it forever (a CI run hung 600 s in the SIGINT case above)."""
    import multiprocessing

    stray = multiprocessing.get_context("fork").Process(target=_idle_forever)  # forked, unknown to the pool
    with pytest.raises(KeyboardInterrupt):
        with compile_check.worker_pool(2):
            stray.start()
            raise KeyboardInterrupt
    stray.join(timeout=30)
    assert stray.exitcode == -signal.SIGKILL


SPILLING_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def keep_everything_live(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    values = tl.load(x_ptr + offs)
    # Every loaded value must survive the reduction: 16384 fp32 in one warp = 512 per thread.
    tl.store(y_ptr + offs, values / tl.sum(values, axis=0))
'''

CHECK_SPILLING = '''
import json, sys
sys.path.insert(0, ".")
from spilling import keep_everything_live
from fastconvnext.tooling.compile_check import check_target
from fastconvnext.kernels.compile_spec import CompileTarget

target = CompileTarget(
    kernel="spill_demo", fn=keep_everything_live, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
    constexprs={"BLOCK": int(sys.argv[1])}, num_warps=1, num_stages=1, label="demo",
)
result = check_target(target, 90)
print(json.dumps({"ok": result.ok, "failures": result.failures, "stack": result.stack_bytes}))
'''


@pytest.mark.parametrize("block,spills", [(16384, True), (128, False)])
def test_checker_flags_a_spilling_config(block, spills, tmp_path):
    (tmp_path / "spilling.py").write_text(textwrap.dedent(SPILLING_KERNEL))
    (tmp_path / "check.py").write_text(CHECK_SPILLING)
    proc = run_python(["check.py", str(block)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is not spills, result
    if spills:
        assert result["stack"] > 0 and any("spill" in f for f in result["failures"]), result


def test_refuses_to_run_in_the_interpreter(capsys):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert compile_check.main(["--arch", "90"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_missing_module_is_skipped_or_strict_failure(monkeypatch, capsys):
    monkeypatch.setattr(compile_check, "KERNEL_MODULES", ("no_such_kernel_module",))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert compile_check.main(["--arch", "90"]) == 0
    assert "no_such_kernel_module: skipped: module not present" in capsys.readouterr().out
    assert compile_check.main(["--arch", "90", "--strict"]) == 1


def test_sampling_keeps_every_nth_target_of_each_module():
    targets = [("a", i) for i in range(5)] + [("b", i) for i in range(3)]
    assert compile_check.sample_targets(targets, 2) == [("a", 0), ("a", 2), ("a", 4), ("b", 0), ("b", 2)]
    assert compile_check.sample_targets(targets, 1) == targets
    with pytest.raises(ValueError, match="--sample must be >= 1, got 0"):
        compile_check.sample_targets(targets, 0)


def test_unknown_kernel_filter_fails(monkeypatch):
    # Fake targets: importing kernel modules here, with TRITON_INTERPRET unset, would leave
    # compiled-mode kernels behind for the interpreter tests of this session.
    fake = CompileTarget(kernel="fake_kernel", fn=None, signature={}, constexprs={})
    monkeypatch.setattr(compile_check, "load_targets", lambda modules: ([("fake_module", fake)], []))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert compile_check.main(["--arch", "90", "--kernel", "no_kernel_has_this_name"]) == 1


def test_sm90_low_precision_dots_must_be_wgmma():
    assert compile_check._tensor_core_ops(90, "fp16") == ("HGMMA",)
    assert compile_check._tensor_core_ops(90, "bf16") == ("HGMMA",)
    assert compile_check._tensor_core_ops(80, "bf16") == ("HMMA",)
    assert "HMMA" in compile_check._tensor_core_ops(90, "fp32")


def test_spread_keeps_n_evenly_spaced_targets_of_each_module():
    targets = [("a", i) for i in range(9)] + [("b", i) for i in range(2)]
    assert compile_check.spread_targets(targets, 3) == [("a", 0), ("a", 4), ("a", 8), ("b", 0), ("b", 1)]
    with pytest.raises(ValueError, match="--spread must be >= 1, got 0"):
        compile_check.spread_targets(targets, 0)


def _scale_kernel_target(**fields):
    import triton
    import triton.language as tl

    @triton.jit
    def scale(x_ptr, n, stride, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs * stride, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    signature = {"x_ptr": "*fp32", "n": "i32", "stride": "i32", "BLOCK": "constexpr"}
    return CompileTarget(kernel="scale", fn=scale, signature=signature, constexprs={"BLOCK": 16}, **fields)


def test_launch_specialization_marks_pointers_and_the_launchers_guaranteed_integers():
    plain = compile_check._launch_specialization(_scale_kernel_target())
    assert plain == {(0,): [["tt.divisibility", 16]]}
    guaranteed = compile_check._launch_specialization(_scale_kernel_target(divisible_by_16=("stride",)))
    assert guaranteed == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


@pytest.mark.parametrize("name", ["x_ptr", "BLOCK", "missing"])
def test_divisible_by_16_must_name_an_integer_argument(name):
    with pytest.raises(ValueError, match="not integer arguments"):
        compile_check._launch_specialization(_scale_kernel_target(divisible_by_16=(name,)))


def test_int_specializations_add_the_all_divisible_variant_once():
    base = _scale_kernel_target(label="B=16")
    launcher, divisible = compile_check.int_specializations(base)
    assert launcher is base and divisible.divisible_by_16 == ("n", "stride") and divisible.label == "B=16 ints%16"
    assert compile_check.int_specializations(base, "divisible") == [divisible]
    already = _scale_kernel_target(divisible_by_16=("n", "stride"))
    assert compile_check.int_specializations(already) == [already]
    with pytest.raises(ValueError, match="--ints"):
        compile_check.int_specializations(base, "some")
