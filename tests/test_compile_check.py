"""compile_check builds every kernel config for sm_80 and sm_90 without a GPU and flags spills.

Compiling needs a process without TRITON_INTERPRET (conftest.py sets it for the kernel tests),
so the checker runs in subprocesses here.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastconvnext.kernels import compile_check
from fastconvnext.kernels.compile_spec import CompileTarget

PRESENT = [m for m in compile_check.KERNEL_MODULES if compile_check.module_present(m)]
# CI has a 15-minute budget for install + the whole suite; a full compile of every target of both
# kernels for two archs takes about 8 minutes on its 2 cores. The suite compiles a fixed stride of
# each module's targets (spread over dtypes, buckets and configs); the full run
# (`python -m fastconvnext.kernels.compile_check --arch 80 90`) is required whenever kernels/ changes.
SAMPLE_EVERY = {"dwconv_layernorm_kernel": 1, "convnext_mlp_kernel": 2}


def compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_python(args, tmp_path, timeout):
    return subprocess.run(
        [sys.executable, *args], env=compiler_env(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("module", PRESENT)
def test_every_target_compiles_without_spills(module, tmp_path):
    report = tmp_path / "report.json"
    proc = run_python(
        ["-m", "fastconvnext.kernels.compile_check", "--arch", "80", "90", "--kernel", module, "--strict",
         "--sample", str(SAMPLE_EVERY[module]), "--json", str(report)],
        tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())
    # The targets as the kernel module lists them (labels are plain data, fine in the interpreter).
    listed = __import__(f"fastconvnext.kernels.{module}", fromlist=["compile_targets"]).compile_targets()
    targets = listed[:: SAMPLE_EVERY[module]]
    assert len(targets) >= 30, f"sample of {module} too small to mean anything: {len(targets)}"
    expected = sorted((t.kernel, t.label, t.dtype, arch) for t in targets for arch in (80, 90))
    assert sorted((r["kernel"], r["label"], r["dtype"], r["arch"]) for r in rows) == expected
    for target in targets:
        assert target.label in proc.stdout, f"table lacks {target.kernel} {target.label}"
    assert all(r["stack_bytes"] == 0 and r["local_bytes"] == 0 and r["registers"] > 0 for r in rows)


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
from fastconvnext.kernels.compile_check import check_target
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
    proc = run_python(["check.py", str(block)], tmp_path, timeout=300)
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
