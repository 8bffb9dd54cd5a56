"""The one autotune switch shared by both kernels (kernels/_env.py)."""
import torch

from kernels import _env


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
