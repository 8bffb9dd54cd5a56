"""The GEMM kernels with the GPU's 32K-element output tiles, whose epilogues run one column half or quarter at a time
(`_SPLIT_TILE`: fc1's activation and h store by quarters, fc2's bias, y2, gamma, drop path and residual by quarters
when it stores y2 (training) and by halves otherwise, the dx GEMM's store by halves, the hidden-backward kernel's
act, act', h, dpre and db1 sums by quarters, with pre recomputed or read back from the forward), in the interpreter.

The interpreter's own configs (32x32 tiles) never reach that branch, so these tests hand the interpreter the tile
shapes the GPU configs use (fc1 + act 128x256, fc2 256x128) and compare with the eager reference under the
tolerance rule. The shapes leave the right half of a tile partly and wholly outside C and D, and M below one row
tile, so a half written to the wrong columns, or a mask lost in the split, shows.
"""
import pytest
import torch

from fastconvnext.kernels import convnext_mlp_kernel as mlp
from fastconvnext.kernels.reference import convnext_mlp_reference
from test_convnext_mlp import check_against_reference, make_inputs
from tolerance import assert_within_rule


@pytest.fixture
def gpu_sized_tiles(monkeypatch):
    """The interpreter launches the two-GEMM forward kernels with tiles of _SPLIT_TILE elements."""
    table = dict(mlp._KERNEL_TABLE)
    fn, configs, _ = table["hidden"]
    table["hidden"] = (fn, configs, mlp._hidden_cfg(128, 256, 32, 1, 1))
    fn, configs, _ = table["hidden_bwd"]
    table["hidden_bwd"] = (fn, configs, mlp._hidden_cfg(128, 128, 32, 1, 1))
    for kind in ("hidden_bwd_pre", "fc1_pre"):
        fn, configs, _ = table[kind]
        table[kind] = (fn, configs, mlp._hidden_cfg(128, 256, 32, 1, 1))
    for kind in ("fc2", "dx_gemm"):
        fn, configs, _ = table[kind]
        table[kind] = (fn, configs, mlp._cfg(256, 128, 32, 32, 1, 1))
    monkeypatch.setattr(mlp, "_KERNEL_TABLE", table)
    for kind in ("hidden", "fc2", "dx_gemm"):
        cfg = mlp._config(kind, 192, 320, "fp32")
        assert cfg["BLOCK_M"] * cfg.get("BLOCK_N", cfg.get("BLOCK_D")) >= mlp._SPLIT_TILE.value
    cfg = mlp._config("hidden_bwd", 192, 320, "fp32")  # two accumulators
    assert 2 * cfg["BLOCK_M"] * cfg["BLOCK_D"] >= mlp._SPLIT_TILE.value
    cfg = mlp._config("hidden_bwd_pre", 192, 320, "fp32")  # one accumulator, pre loaded per quarter
    assert cfg["BLOCK_M"] * cfg["BLOCK_D"] >= mlp._SPLIT_TILE.value


def _forward(inputs, act, **kwargs):
    return mlp.convnext_mlp(**inputs, act=act, **kwargs)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_split_epilogues_match_reference_fp32(gpu_sized_tiles, act):
    # C = 192: the second 128-wide fc2 tile has columns 256..319 (right half) wholly and 128..255 partly past C;
    # D = 320: the second 256-wide hidden tile's right half (384..511) lies wholly past D
    assert mlp._kinds(192, 320, "fp32", "ieee", training=False)[:2] == ["hidden", "fc2"]
    inputs = make_inputs((2, 3, 5, 192), 320, torch.float32, scale=[0.0, 1.5])
    with torch.no_grad():
        fused = _forward(inputs, act)
        eager = convnext_mlp_reference(**inputs, act=act)
        ref = convnext_mlp_reference(**{k: v.double() if v is not None and k != "sample_scale" else v
                                        for k, v in inputs.items()}, act=act)
    assert_within_rule(fused, eager, ref, torch.float32, "out")


@pytest.mark.parametrize("pre", ["recomputed", "saved", "first_pass"])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_split_epilogues_with_gradients(gpu_sized_tiles, monkeypatch, act, pre):
    """Training saves y2 from the split fc2 epilogue (dgamma needs it); backward takes the hidden-backward kernel
    (h, dpre and the db1 row-group sums stored per column quarter; pre recomputed beside dh, or stored by fc1's
    eighths in the forward, or by a first backward pass's quarters, and read back per quarter) and the dx GEMM:
    gradients match the reference."""
    saved_pre = pre == "saved"
    if not saved_pre:
        monkeypatch.setattr(mlp, "_SAVED_PRE_PER_IMAGE", 0)
    monkeypatch.setattr(mlp, "_two_pass_hidden_backward", lambda *args: pre == "first_pass")
    assert mlp._saves_pre(4 * 5, 192, 320, "fp32", "ieee") == saved_pre
    kinds = {"recomputed": ["hidden_bwd"], "saved": ["hidden_bwd_pre"], "first_pass": ["fc1_pre", "hidden_bwd_pre"]}
    kind = kinds[pre][0]
    assert mlp._kinds(192, 320, "fp32", "ieee", True, saved_pre=saved_pre)[2:] == kinds[pre] + ["dx_gemm", "dw"]
    launched = []
    real = mlp._launch
    monkeypatch.setattr(mlp, "_launch", lambda k, *a, **kw: launched.append(k) or real(k, *a, **kw))
    check_against_reference(make_inputs((1, 4, 5, 192), 320, torch.float32, scale=[1.5]), act, torch.float32)
    assert kind in launched
