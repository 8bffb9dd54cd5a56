"""How `kernels/` reaches `fastconvnext.kernels`: never as a top-level `kernels` that shadows Hugging Face's
package of that name, and importable installed (wheel layout) and from a plain source tree on PYTHONPATH."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The editable install's finder is taken out first, so the child sees the project as uninstalled.
_FORGET_INSTALL = textwrap.dedent("""
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
""")


def run_python(code, cwd, pythonpath=None, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "convnext_mlp_kernel.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the folder a top-level package `kernels` that shadows Hugging Face's")


def test_an_installed_kernels_package_wins_over_the_folder_from_the_root(tmp_path):
    # A stand-in for Hugging Face's package, on sys.path after the repository root ('' for `python -c` there).
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\n")
    out = run_python("import kernels; print(kernels.__file__); print(kernels.CUDAProperties)", cwd=ROOT,
                     pythonpath=[ROOT, site])
    assert out.split() == [str(site / "kernels" / "__init__.py"), "stand-in"]


def test_transformers_activations_import_from_the_root():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed here (transformers < 5.25 does not require it)")
    out = run_python("import transformers.activations, kernels; print(kernels.__file__)", cwd=ROOT)
    assert not Path(out.strip()).resolve().is_relative_to(ROOT / "kernels"), out


def _source_tree_copy(tmp_path):
    tree = tmp_path / "tree"
    for folder in ("fastconvnext", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


RUN_BOTH_OPS = textwrap.dedent("""
    import torch
    import fastconvnext.kernels as package
    from fastconvnext.kernels import convnext_mlp, dwconv_layernorm, convnext_mlp_kernel
    from fastconvnext.kernels.reference import convnext_mlp_reference, dwconv_layernorm_reference
    print(package.__path__[0]); print(convnext_mlp_kernel.__file__)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 6, 8, generator=g)
    dw_w, dw_b = torch.randn(8, 1, 7, 7, generator=g), torch.randn(8, generator=g)
    ln_w, ln_b = 1 + 0.3 * torch.randn(8, generator=g), torch.randn(8, generator=g)
    w1, b1 = torch.randn(32, 8, generator=g) / 3, torch.randn(32, generator=g)
    w2, b2 = torch.randn(8, 32, generator=g) / 6, torch.randn(8, generator=g)
    y = dwconv_layernorm(x, dw_w, dw_b, ln_w, ln_b)
    out = convnext_mlp(y, x, w1, b1, w2, b2)
    y_ref = dwconv_layernorm_reference(x.double(), dw_w.double(), dw_b.double(), ln_w.double(), ln_b.double())
    y_eager = dwconv_layernorm_reference(x, dw_w, dw_b, ln_w, ln_b)
    out_ref = convnext_mlp_reference(y.double(), x.double(), w1.double(), b1.double(), w2.double(), b2.double())
    out_eager = convnext_mlp_reference(y, x, w1, b1, w2, b2)
    for fused, eager, ref in ((y, y_eager, y_ref), (out, out_eager, out_ref)):
        err, bound = (fused.double() - ref).abs().max().item(), 2 * (eager.double() - ref).abs().max().item() + 1e-5
        print(err <= bound, err, bound)
""")


def _check_ops_ran(out, package_dir):
    lines = out.splitlines()
    assert Path(lines[0]) == package_dir, lines[0]
    assert Path(lines[1]) == package_dir / "convnext_mlp_kernel.py", lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["True", "True"], lines[2:]


def test_fused_ops_run_from_a_plain_source_tree_on_pythonpath(tmp_path):
    tree = _source_tree_copy(tmp_path)
    out = run_python(_FORGET_INSTALL + RUN_BOTH_OPS, cwd=tmp_path, pythonpath=[tree], TRITON_INTERPRET="1")
    _check_ops_ran(out, tree / "kernels")


def test_kernel_tool_runs_as_a_module_from_a_plain_source_tree(tmp_path):
    tree = _source_tree_copy(tmp_path)
    code = _FORGET_INSTALL + textwrap.dedent("""
        import runpy, sys
        sys.argv = ["compile_check", "--help"]
        runpy.run_module("fastconvnext.tooling.compile_check", run_name="__main__", alter_sys=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "--arch" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_fused_ops_run_from_the_installed_layout(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named 'setuptools'" in proc.stderr + proc.stdout:
        pytest.skip("setuptools is not installed in this environment, so the wheel cannot be built offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (target / "kernels").exists(), "the wheel installed a top-level `kernels`"
    assert not (target / "fastconvnext" / "kernels" / "__init__.py").exists()
    out = run_python(_FORGET_INSTALL + RUN_BOTH_OPS, cwd=tmp_path, pythonpath=[target], TRITON_INTERPRET="1")
    _check_ops_ran(out, target / "fastconvnext" / "kernels")
    # the data the runtime and the tooling read ship in the wheel, and the dispatch reads its prior there
    assert (target / "fastconvnext" / "tooling" / "launches.json").is_file()
    prior = run_python(_FORGET_INSTALL + "from fastconvnext import backend\nprint(len(backend._shipped_prior()))",
                       cwd=tmp_path, pythonpath=[target])
    assert int(prior.split()[-1]) == len(json.loads((ROOT / "fastconvnext" / "prior.json").read_text())["rows"])
