"""kernels/_triton_compat.py: the Triton-version-gated pieces (supported floor, approx divide, the interpreter's
runtime-integer shim, compiling without a GPU, per-release configs), checked for the running Triton and, where a
choice depends on the release, for mocked releases."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastconvnext.kernels import _triton_compat as compat
from fastconvnext.tooling import compile_check

ALL_RELEASES = [(3, 4, 0), (3, 5, 1), (3, 6, 0), (3, 7, 1), (3, 8, 0), (3, 9, 0), (3, 10, 0)]


def compiler_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_python(code: str, tmp_path):
    """Run code as a script file (Triton reads a @jit function's source from its file) without TRITON_INTERPRET."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=compiler_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


# ------------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize("text, parsed", [
    ("3.6.0", (3, 6, 0)), ("3.4.0+git1a2b3c4", (3, 4, 0)), ("3.7.0rc1", (3, 7, 0)), ("3.10", (3, 10, 0)),
])
def test_version_parsing(text, parsed):
    assert compat.parse_version(text) == parsed


def test_version_parsing_refuses_junk():
    with pytest.raises(ValueError, match="cannot read a Triton version"):
        compat.parse_version("nightly")


def test_installed_release_is_supported():
    assert compat.TRITON_VERSION == compat.parse_version(triton.__version__)
    assert compat.TRITON_VERSION[:2] >= compat.MIN_TRITON
    assert compat.support_problem() is None
    compat.require_supported()


@pytest.mark.parametrize("old", [(3, 3, 1), (3, 2, 0), (2, 3, 1)])
def test_an_older_release_is_refused_naming_both_releases(old):
    with pytest.raises(ImportError) as error:
        compat.require_supported(old)
    message = str(error.value)
    assert ".".join(map(str, old)) in message and "triton >= 3.4" in message.lower()


def test_floor_release_is_accepted():
    assert compat.support_problem((3, 4, 0)) is None and compat.MIN_TRITON == (3, 4)


def test_kernel_modules_refuse_to_import_on_a_too_old_triton(tmp_path):
    """A fresh process whose triton claims 3.3.1: importing either kernel module raises the compat ImportError."""
    proc = run_python("""
        import triton
        triton.__version__ = "3.3.1"
        for name in ("dwconv_layernorm_kernel", "convnext_mlp_kernel"):
            try:
                __import__("fastconvnext.kernels." + name)
            except ImportError as error:
                print(name, "REFUSED", error)
            else:
                print(name, "IMPORTED")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert " REFUSED " in line and "3.3.1" in line and ">= 3.4" in line, line


# ------------------------------------------------------------------------------------- approx divide


@pytest.mark.parametrize("version", ALL_RELEASES)
@pytest.mark.parametrize("interpreter", [False, True])
def test_approx_divide_helper_per_release_and_mode(version, interpreter):
    helper = compat.approx_div_helper(version, interpreter)
    if version[:2] >= (3, 9):
        expected = compat._approx_div_fdiv  # tl.fdiv(approx=True): 3.9's own spelling, both modes
    elif interpreter:
        expected = compat._approx_div_plain  # no PTX in the interpreter
    else:
        expected = compat._approx_div_ptx  # inline div.approx.f32
    assert helper is expected


def test_bound_helper_is_the_running_releases():
    assert compat.approx_div is compat.approx_div_helper(compat.TRITON_VERSION, compat.interpreting())
    from fastconvnext.kernels import convnext_mlp_kernel

    assert convnext_mlp_kernel.approx_div is compat.approx_div


@triton.jit
def _divide_kernel(x_ptr, y_ptr, out_ptr, HELPER: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    if HELPER == "bound":
        out = compat.approx_div(x, y)
    else:
        out = compat._approx_div_plain(x, y)
    tl.store(out_ptr + offs, out)


@pytest.mark.skipif(not compat.interpreting(), reason="the interpreter path (CPU tensors)")
@pytest.mark.parametrize("helper", ["bound", "plain"])
def test_interpreter_approx_divide_is_fp32_division(helper):
    y = torch.tensor([1.0, 3.0, 7.0, -0.1, 1e-30, 3e37, 1.2345678, -5.5] * 4, dtype=torch.float32)
    x = torch.linspace(-3, 3, y.numel(), dtype=torch.float32)
    x[0] = 1.0
    out = torch.empty_like(y)
    _divide_kernel[(1,)](x, y, out, HELPER=helper, N=y.numel())
    assert torch.equal(out, x / y)
    assert out[0].item() == np.float32(1.0) / np.float32(1.0)


def test_compiled_approx_divide_is_div_approx_f32(tmp_path):
    """Natively every release gets PTX div.approx.f32: the inline-asm helper (Triton < 3.9) and, where it exists,
    tl.fdiv(approx=True) (3.9), compiled for sm_80 without a GPU."""
    proc = run_python("""
        import re
        import triton, triton.language as tl
        from fastconvnext.kernels import _triton_compat as compat

        @triton.jit
        def k(y_ptr, out_ptr, HELPER: tl.constexpr):
            offs = tl.arange(0, 128)
            y = tl.load(y_ptr + offs)
            if HELPER == "ptx":
                out = compat._approx_div_ptx(1.0, 1.0 + 0.5 * y)
            else:
                out = compat.approx_div(1.0, 1.0 + 0.5 * y)
            tl.store(out_ptr + offs, out)

        for helper in ("ptx", "bound"):
            c = compat.compile_for_arch(k, {"y_ptr": "*fp32", "out_ptr": "*fp32", "HELPER": "constexpr"},
                                        {"HELPER": helper}, {}, 80, {"num_warps": 4, "enable_fp_fusion": True})
            divides = sorted(set(re.findall(r"\\b(div\\.[a-z0-9.]+|rcp\\.[a-z0-9.]+)", c.asm["ptx"])))
            print(helper, divides)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["ptx ['div.approx.f32']", "bound ['div.approx.f32']"], proc.stdout


# ------------------------------------------------------------------------- interpreter runtime integers


@pytest.mark.parametrize("version, numpy_rejects, needed", [
    ((3, 4, 0), True, True), ((3, 6, 0), True, True), ((3, 6, 0), False, False), ((3, 7, 0), True, False),
    ((3, 9, 0), True, False),
])
def test_index_shim_needed_only_below_3_7_with_a_strict_numpy(version, numpy_rejects, needed):
    assert compat.interpreter_index_patch_needed(version, numpy_rejects) is needed


def test_index_shim_applied_exactly_where_needed():
    assert compat.INTERPRETER_INDEX_PATCHED == compat.interpreter_index_patch_needed()
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang_tensor, "_fastconvnext_index_patch", False) == \
        compat.INTERPRETER_INDEX_PATCHED


@triton.jit
def _count_kernel(out_ptr, n, start, STEP: tl.constexpr):
    total = 0
    for i in range(start, n, STEP):  # runtime bounds: the interpreter turns them into Python ints
        total += i
    tl.store(out_ptr, total)


@pytest.mark.skipif(not compat.interpreting(), reason="the interpreter path (CPU tensors)")
def test_interpreter_loops_over_runtime_integers():
    out = torch.zeros(1, dtype=torch.int32)
    _count_kernel[(1,)](out, 11, 2, STEP=3)
    assert out.item() == 2 + 5 + 8


# ------------------------------------------------------------------------------ per-release configs


def test_config_choice_rows_are_newest_first_and_cover_the_floor():
    assert compat.CONFIG_CHOICES, "no per-release knobs: drop this test with the table"
    for knob, rows in compat.CONFIG_CHOICES.items():
        releases = [tuple(since) for since, _ in rows]
        assert releases == sorted(releases, reverse=True), knob
        assert releases[-1] <= compat.MIN_TRITON, f"{knob}: no value for the floor release"
        for version in ALL_RELEASES:
            compat.config_choice(knob, version)


def test_config_choice_picks_by_release(monkeypatch):
    monkeypatch.setitem(compat.CONFIG_CHOICES, "test.knob", (((3, 9), "new"), ((3, 4), "old")))
    assert [compat.config_choice("test.knob", v) for v in ALL_RELEASES] == ["old"] * 5 + ["new"] * 2
    with pytest.raises(ValueError, match="no value for triton 3.3"):
        compat.config_choice("test.knob", (3, 3, 1))


@pytest.fixture
def mocked_release(monkeypatch):
    """Pretend another Triton release for the config rules (the MLP's path rules read them on every call)."""

    def use(version):
        monkeypatch.setattr(compat, "TRITON_VERSION", version)

    return use


@pytest.mark.parametrize("version", [(3, 4, 0), (3, 6, 0), (3, 9, 0)])
def test_mlp_configs_follow_the_release(mocked_release, version):
    from fastconvnext.kernels import convnext_mlp_kernel as mlp

    mocked_release(version)
    old, before_3_6 = version[:2] < (3, 9), version[:2] < (3, 6)
    assert mlp._fc2_configs(384, 1536, "bf16")[0]["BLOCK_M"] == (128 if old else 256)
    assert mlp._fc2_configs(96, 384, "fp32")[0]["BLOCK_D"] == (16 if old else 32)
    assert mlp._gemm_configs(384, 1536, "bf16")[0]["BLOCK_M"] == 256  # the shared GEMM rule itself is 3.9's
    dx = mlp._dx_configs(96, 384, "fp16")[0]
    assert (dx["BLOCK_K"], dx["BLOCK_D"]) == ((16, 32) if before_3_6 else (128, 64))
    dw = mlp._dw_configs(768, 3072, "bf16")[0]
    assert (dw["BLOCK_C"], dw["BLOCK_D"]) == ((128, 128) if before_3_6 else (128, 256))
    assert mlp._hidden_bwd_pre_configs(384, 1536, "bf16")[0]["BLOCK_D"] == (128 if old else 256)
    assert mlp._fc1_pre_configs(768, 3072, "bf16")[0]["BLOCK_D"] == (128 if old else 256)
    assert mlp._hidden_configs(768, 3072, "bf16")[0]["BLOCK_D"] == 256  # fc1 + act keeps 3.9's tile from C = 384
    assert mlp._hidden_configs(192, 768, "bf16")[0]["BLOCK_D"] == (128 if old else 256)
    assert mlp._dx_gemm_configs(768, 3072, "bf16")[0]["BLOCK_M"] == (128 if old else 256)
    assert mlp._dx_gemm_configs(192, 768, "bf16")[0]["BLOCK_M"] == 128  # one 256-wide C tile: 128x256 on every release
    assert mlp._hidden_bwd_configs(768, 3072, "bf16")[0]["BLOCK_K"] == (32 if old else 64)


@pytest.mark.parametrize("version", [(3, 4, 0), (3, 6, 0), (3, 9, 0)])
def test_compile_targets_list_what_each_release_launches(mocked_release, version):
    """compile_check checks the configs the running release picks: every launch a stage shape makes is a target."""
    from fastconvnext.kernels import convnext_mlp_kernel as mlp

    mocked_release(version)

    def key(target):
        blocks = tuple(sorted((k, v) for k, v in target.constexprs.items() if k.startswith("BLOCK_")))
        return target.kernel, target.dtype, target.constexprs["C"], blocks, target.num_warps, target.num_stages

    compiled = {key(t) for t in mlp.compile_targets()}
    for dtype in ("bf16", "fp16", "fp32"):
        for C, size in ((96, 56), (192, 28), (384, 14), (768, 7)):
            for plan in mlp.launch_plans(256, size, size, C, dtype, True):
                if plan.target is not None:
                    assert key(plan.target) in compiled, (version, plan.target.label)


# The MLP targets whose config a per-release knob decides, each at the arch where an older release spilled it:
# (kernel, dtype, label fragments, arch)
KNOB_TARGETS = [
    ("convnext_mlp_bwd_hidden_saved_pre", "bf16", ("C=384 ", "HAS_SCALE"), 80),
    ("convnext_mlp_bwd_fc1_pre", "fp16", ("C=768 ",), 80),
    ("convnext_mlp_fc2", "bf16", ("C=384 ", "HAS_SCALE SAVE_Y2"), 80),
    ("convnext_mlp_fc2", "fp32", ("C=96 ", "tf32", "HAS_SCALE SAVE_Y2"), 90),
    ("convnext_mlp_bwd_dx", "fp16", ("C=96 ", "act=gelu ", "HAS_SCALE"), 80),
    ("convnext_mlp_bwd_dw", "bf16", ("C=384 ", "HAS_SCALE"), 80),
]


def test_per_release_mlp_configs_compile_without_spills(tmp_path):
    """The knob-decided configs, as compile_targets lists them for the running Triton, compile for a GPU with no
    spill (as the launcher specializes them; compile_check runs every target, both specializations). The dwconv
    tile kernels' knobs are left to compile_check: one compile takes 15-20 s."""
    proc = run_python(f"""
        import json
        from fastconvnext.kernels import convnext_mlp_kernel as mlp
        from fastconvnext.tooling import compile_check

        rows = []
        for kernel, dtype, parts, arch in {KNOB_TARGETS!r}:
            target = next((t for t in mlp.compile_targets()
                           if t.kernel == kernel and t.dtype == dtype and all(p in t.label + " " for p in parts)), None)
            if target is None:  # this release's path choice launches no such kernel at that C
                continue
            for variant in compile_check.int_specializations(target, "launcher"):
                r = compile_check.check_target(variant, arch)
                rows.append([variant.kernel, variant.label, arch, r.registers, r.stack_bytes + r.local_bytes,
                             r.failures])
        print(json.dumps(rows))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) >= len(KNOB_TARGETS) - 2, rows
    for kernel, label, arch, registers, spill, failures in rows:
        assert registers > 0 and spill == 0 and not failures, (kernel, label, arch, registers, spill, failures)


@pytest.mark.parametrize("version", [(3, 4, 0), (3, 6, 0), (3, 9, 0)])
def test_dwconv_tile_configs_follow_the_release(mocked_release, version):
    from fastconvnext.kernels import dwconv_layernorm_kernel as dw

    mocked_release(version)
    old = version[:2] < (3, 9)
    for x_bytes in (2, 4):  # C = 96 forward: one warp, 3 x 8 tiles on 3.9, 2 x 8 before
        consts, warps = dw._forward_config(96, x_bytes)
        assert warps == 1 and (consts["TILE_H"], consts["TILE_W"]) == ((2, 8) if old else (3, 8))
    assert dw._forward_config(768, 4)[0]["TILE_H"] == 3  # other widths keep 3.9's tiles
    # C = 1536, fp32 x (16 warps): 3 x 4 tiles from 3.6, 2 x 4 on 3.4/3.5; 16-bit x keeps 3 x 4
    assert dw._forward_config(1536, 4)[0]["TILE_H"] == (2 if version[:2] < (3, 6) else 3)
    assert dw._forward_config(1536, 2)[0]["TILE_H"] == 3
    for c in (192, 384):  # the LayerNorm backward tile with fp32 x: 1 row before 3.9
        assert dw._norm_bwd_tile_config(c, 4)[0]["TILE_H"] == (1 if old else 2)
        assert dw._norm_bwd_tile_config(c, 2)[0]["TILE_H"] == 2
    assert dw._norm_bwd_tile_config(96, 4)[0]["TILE_H"] == 2
    labels = {t.label for t in dw.compile_targets()}
    for c in (96, 192, 384, 768, 1536):
        for x_dtype, x_bytes in (("fp32", 4), ("bf16", 2)):
            assert dw._forward_target(x_dtype, x_dtype, 7, *dw._forward_config(c, x_bytes)).label in labels
            assert dw._norm_bwd_tile_target(x_dtype, x_dtype, 7, *dw._norm_bwd_tile_config(c, x_bytes)).label in labels


def test_an_older_triton_makes_auto_eager_and_a_forced_backend_say_why(monkeypatch):
    """Below the floor the dispatch reports the release instead of failing in the first fused call."""
    import torch

    from fastconvnext import backend

    monkeypatch.setattr(compat, "TRITON_VERSION", (3, 2, 0))
    usable, why = backend._kernels_usable("cuda")
    assert not usable and "needs Triton >= 3.4" in why and "triton 3.2.0 is installed" in why
    x = torch.zeros(1, 2, 2, 4)
    with backend.use_backend("triton"), pytest.raises(RuntimeError, match="needs Triton >= 3.4"):
        backend.dwconv_layernorm(x, torch.zeros(4, 1, 7, 7), torch.zeros(4), torch.ones(4), torch.zeros(4))
    monkeypatch.setattr(compat, "TRITON_VERSION", (3, 4, 0))
    assert backend._kernels_usable("cuda") == (True, "")
