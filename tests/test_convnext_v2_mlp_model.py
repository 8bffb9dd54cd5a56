"""ConvNeXt V2 blocks running the fused MLP with GRN (backend 'triton', Triton's interpreter) against transformers'
ConvNextV2 (random weights): outputs and parameter gradients by the tolerance rule, the hook fallback, drop path."""
import copy

import pytest
import torch
import transformers

import fastconvnext
from fastconvnext import kernels
from helpers import randomize_
from tolerance import assert_within_rule

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])
BLOCKS = sum(SMALL["depths"])


def twins(kind="ConvNextV2Model", **config):
    hf = getattr(transformers, kind)(transformers.ConvNextV2Config(**config))
    randomize_(hf)
    with torch.no_grad():  # GRN starts as the identity (zeros): give it weights that matter
        for name, p in hf.named_parameters():
            if ".grn." in name:
                p.copy_(0.5 * torch.randn_like(p))
    ours = getattr(fastconvnext, kind)(fastconvnext.ConvNextV2Config(**config))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), ours.eval()


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = kernels.convnext_v2_mlp
    monkeypatch.setattr(kernels, "convnext_v2_mlp", lambda *a: calls.append(a[0].shape) or original(*a), raising=False)
    return calls


def grads(model, x):
    out = model(x).last_hidden_state
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_blocks_run_the_fused_mlp_within_the_rule(fused_calls):
    hf, ours = twins(**SMALL)
    x = torch.randn(2, 3, 37, 34)
    ref_out, ref_grads = grads(copy.deepcopy(hf).double(), x.double())
    eager_out, eager_grads = grads(hf, x)
    with fastconvnext.use_backend("triton"):
        fused_out, fused_grads = grads(ours, x)
    assert len(fused_calls) == BLOCKS
    assert_within_rule(fused_out, eager_out, ref_out, torch.float32, "last_hidden_state")
    assert set(fused_grads) == set(ref_grads)
    for name, grad in fused_grads.items():
        assert_within_rule(grad, eager_grads[name], ref_grads[name], torch.float32, f"grad of {name}")


def test_a_hooked_grn_calls_its_modules_and_the_others_stay_fused(fused_calls):
    hf, ours = twins(**SMALL)
    seen = []

    def hook(module, inputs, output):
        seen.append(type(module).__name__)
        return output * 0.5

    for model in (hf, ours):
        model.encoder.stages[1].layers[1].grn.register_forward_hook(hook)
    x = torch.randn(2, 3, 33, 40)
    with torch.no_grad():
        reference = copy.deepcopy(hf).double()(x.double()).last_hidden_state
        eager = hf(x).last_hidden_state
        with fastconvnext.use_backend("triton"):
            fused = ours(x).last_hidden_state
    assert seen == ["ConvNextV2GRN"] * 3 and len(fused_calls) == BLOCKS - 1  # the float64 copy keeps the hook
    assert_within_rule(fused, eager, reference, torch.float32, "output with a hooked GRN")


def test_drop_path_drops_the_samples_transformers_drops(fused_calls):
    hf, ours = twins(**dict(SMALL, drop_path_rate=0.6))
    hf.train(), ours.train()
    x = torch.randn(4, 3, 33, 33)
    torch.manual_seed(5)
    expected = hf(x).last_hidden_state
    with fastconvnext.use_backend("triton"), torch.no_grad():
        torch.manual_seed(5)
        got = ours(x).last_hidden_state
    assert len(fused_calls) == BLOCKS
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=1e-4)
    with fastconvnext.use_backend("triton"), torch.no_grad():
        assert not torch.allclose(got, ours.eval()(x).last_hidden_state, atol=1e-2), "drop path had no effect"
