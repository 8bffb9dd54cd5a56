"""The wall between what a forward or backward pass runs and the tooling that designs and measures it.

- No runtime module (the kernels, the dispatch, the model classes, tuning, loading) imports fastconvnext.tooling,
  statically or at run time: after fused forwards and backwards of both ops in Triton's interpreter, no tooling
  module is loaded.
- The kernels choose launch paths by rules stated in their own code; the performance model
  (fastconvnext.tooling.mlp_paths) must agree with each rule at every ConvNeXt width, on both modelled GPUs, wherever
  the model's margin exceeds its resolution (backend.MODEL_WIN_FACTOR: a difference under 5 % is no preference).
- The constants the kernels' launch plans carry for the model equal the model's.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastconvnext import backend
from fastconvnext.kernels import _triton_compat
from helpers import interpreter_only

ROOT = Path(__file__).resolve().parents[1]
TOOLING_ENTRY_POINTS = {"cli.py", "bench.py"}  # the commands that run the tooling, on request
# Every ConvNeXt width: atto, femto, pico, nano, T/S, B, L, XL, XXL stages.
CONVNEXT_WIDTHS = sorted({40, 80, 160, 320, 48, 96, 192, 384, 64, 128, 256, 512, 640, 768, 1024, 1536, 2048, 3072})
RESOLUTION = backend.MODEL_WIN_FACTOR


def _runtime_sources():
    files = [p for p in (ROOT / "fastconvnext").glob("*.py") if p.name not in TOOLING_ENTRY_POINTS]
    return files + sorted((ROOT / "kernels").glob("*.py"))


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_no_runtime_module_imports_the_tooling():
    offenders = {}
    for path in _runtime_sources():
        names = [n for n in _imported_modules(ast.parse(path.read_text())) if "tooling" in n.split(".")]
        names += [n for n in _imported_modules(ast.parse(path.read_text()))
                  if n.split(".")[-1] in ("roofline", "sass_report", "compile_check", "perf_table", "calibrate")]
        if names:
            offenders[str(path.relative_to(ROOT))] = sorted(set(names))
    assert not offenders, offenders


def test_the_scan_sees_a_tooling_import():
    tree = ast.parse("from fastconvnext.tooling import roofline\nimport fastconvnext.tooling.bench\n")
    assert {"fastconvnext.tooling", "fastconvnext.tooling.roofline", "fastconvnext.tooling.bench"} <= set(
        _imported_modules(tree))


FUSED_PASSES = r"""
import json, sys, torch
from fastconvnext import backend
from fastconvnext.modeling import ConvNextModel
from fastconvnext.configuration import ConvNextConfig

torch.manual_seed(0)
config = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)
model = ConvNextModel(config)
pixels = torch.randn(1, 3, 32, 32, requires_grad=True)
with backend.use_backend("triton"):
    model(pixels).last_hidden_state.sum().backward()
    with torch.no_grad():
        model(pixels)
with backend.use_backend("auto"):
    model(pixels).last_hidden_state.sum().backward()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fastconvnext"))))
"""


@interpreter_only
def test_fused_forward_and_backward_load_no_tooling_module():
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", FUSED_PASSES], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "fastconvnext.kernels.convnext_mlp_kernel" in loaded and "fastconvnext.kernels.dwconv_layernorm_kernel" in loaded
    assert [m for m in loaded if m.startswith("fastconvnext.tooling")] == []


# ------------------------------------------------------------------------------------- rules vs model

def _combos():
    return [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")]


def _disagreements(rule, model_ratio):
    """Widths where the rule's choice contradicts a model margin beyond the resolution; ratio = split / unsplit."""
    out = []
    for C in CONVNEXT_WIDTHS:
        ratio = model_ratio(C)
        if (ratio < RESOLUTION and not rule(C)) or (ratio > 1 / RESOLUTION and rule(C)):
            out.append((C, round(ratio, 3), rule(C)))
    return out


# Each rule of the MLP kernel with the launches of its two plans: (rule name, split plan, unsplit plan).
MLP_RULES = [
    ("_two_gemm_forward", ["hidden", "fc2"], ["fwd"]),
    ("_two_pass_hidden_backward", ["fc1_pre", "hidden_bwd_pre"], ["hidden_bwd"]),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("dtype, precision", _combos())
@pytest.mark.parametrize("rule, split, unsplit", MLP_RULES, ids=[r[0] for r in MLP_RULES])
def test_each_mlp_path_rule_agrees_with_the_model(rule, split, unsplit, arch, dtype, precision):
    from fastconvnext.kernels import convnext_mlp_kernel as mlp
    from fastconvnext.tooling import mlp_paths
    from fastconvnext.tooling.roofline import MACHINES

    def ratio(C):
        machine = MACHINES[arch]
        return (mlp_paths.modelled_seconds(split, C, 4 * C, dtype, precision, machine)
                / mlp_paths.modelled_seconds(unsplit, C, 4 * C, dtype, precision, machine))

    choose = getattr(mlp, rule)
    assert _disagreements(lambda C: choose(C, 4 * C, dtype, precision, gpu=True), ratio) == []


def test_the_rule_check_catches_a_contradiction():
    assert _disagreements(lambda C: False, lambda C: 0.5) == [(C, 0.5, False) for C in CONVNEXT_WIDTHS]
    assert _disagreements(lambda C: True, lambda C: 2.0) == [(C, 2.0, True) for C in CONVNEXT_WIDTHS]
    assert _disagreements(lambda C: C > 100, lambda C: 0.97 if C > 100 else 1.02) == []


def test_the_hidden_backward_rule_follows_the_release(monkeypatch):
    """16-bit: from C = 512 with Triton 3.9's wide tiles, at multiples of 512 with older releases' narrow ones; TF32
    from C = 256 on both; fp32 IEEE never."""
    from fastconvnext.kernels import convnext_mlp_kernel as mlp

    def split(C, dtype="bf16", precision="ieee"):
        return mlp._two_pass_hidden_backward(C, 4 * C, dtype, precision, True)

    monkeypatch.setattr(_triton_compat, "TRITON_VERSION", (3, 4, 0))
    assert [C for C in CONVNEXT_WIDTHS if split(C)] == [512, 1024, 1536, 2048, 3072]
    assert [C for C in CONVNEXT_WIDTHS if split(C, "fp32", "tf32")] == [C for C in CONVNEXT_WIDTHS if C >= 256]
    monkeypatch.setattr(_triton_compat, "TRITON_VERSION", (3, 9, 0))
    assert [C for C in CONVNEXT_WIDTHS if split(C)] == [C for C in CONVNEXT_WIDTHS if C >= 512]
    assert not any(split(C, "fp32", "ieee") for C in CONVNEXT_WIDTHS)


def test_launch_plan_constants_are_the_models():
    from fastconvnext.kernels import convnext_mlp_kernel as mlp, dwconv_layernorm_kernel as dw
    from fastconvnext.tooling.roofline import MACHINES

    h100 = MACHINES[90]
    assert dw.L2_BYTES == mlp._MODEL_L2_BYTES == h100.l2_size
    assert mlp._MODEL_SMS == h100.sms
