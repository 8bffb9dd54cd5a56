"""The switches shared by both kernels: autotune (kernels/_env.py) and FMA contraction (kernels/compile_spec.py)."""
import math

import torch
from triton.runtime import interpreter

from fastconvnext.kernels import convnext_mlp, dwconv_layernorm
from fastconvnext.kernels.compile_spec import CompileTarget, compile_options
from fastconvnext.kernels import _env


def _native(monkeypatch, capturing):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(_env.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)


def test_autotune_runs_natively_outside_capture(monkeypatch):
    _native(monkeypatch, capturing=False)
    assert _env.autotune_enabled()


def test_autotune_never_runs_inside_cuda_graph_capture(monkeypatch):
    _native(monkeypatch, capturing=True)
    assert not _env.autotune_enabled()


def test_autotune_switch_and_interpreter_turn_it_off(monkeypatch):
    _native(monkeypatch, capturing=False)
    monkeypatch.setenv(_env.AUTOTUNE_ENV, "0")
    assert not _env.autotune_enabled()
    monkeypatch.delenv(_env.AUTOTUNE_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _env.interpreting() and not _env.autotune_enabled()


# ----------------------------------------------------------------------------- FMA contraction


def test_compiles_ask_for_fma_contraction_explicitly():
    # Triton 3.10 turns its default off: the compile checks and the SASS model must not silently change with it.
    options = compile_options(CompileTarget("k", fn=None, signature={}, constexprs={}, num_warps=8, num_stages=2))
    assert options == {"num_warps": 8, "num_stages": 2, "enable_fp_fusion": True}


def _launch_options(monkeypatch):
    # Every interpreted launch (kernel[grid](...)) goes through GridExecutor.__call__ with the launch's options, on
    # every supported Triton (3.9 reaches it through InterpretedFunction.run, 3.4 directly from __getitem__).
    launches = []
    call = interpreter.GridExecutor.__call__

    def spy(self, *args, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", spy)
    return launches


def test_every_kernel_launch_asks_for_fma_contraction(monkeypatch):
    launches = _launch_options(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    n, h, w, c, d = 1, 5, 4, 12, 48
    x = torch.randn(n, c, h, w, generator=gen).to(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    x.requires_grad_(True)
    params = [torch.randn(c, 1, 3, 3, generator=gen) * 0.3, torch.randn(c, generator=gen), 1 + torch.rand(c),
              torch.randn(c, generator=gen)]
    dwconv_layernorm(x, *params).sum().backward()
    mlp_args = [torch.randn(n, h, w, c, generator=gen, requires_grad=True), torch.randn(n, h, w, c, generator=gen),
                torch.randn(d, c, generator=gen) / math.sqrt(c), torch.randn(d, generator=gen),
                torch.randn(c, d, generator=gen) / math.sqrt(d), torch.randn(c, generator=gen), torch.rand(c)]
    convnext_mlp(*mlp_args).sum().backward()
    names = {name for name, _ in launches}
    assert any("dwconv" in name for name in names) and any("mlp" in name for name in names), names
    assert [launch for launch in launches if launch[1] is not True] == []
