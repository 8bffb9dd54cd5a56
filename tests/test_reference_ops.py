"""The CPU inference fast path of the MLP (oneDNN post-ops) against the eager reference."""
import types

import pytest
import torch

from fastconvnext import backend
from fastconvnext.kernels import reference
from tolerance import assert_within_rule


def mlp_inputs(n=2, h=5, w=7, c=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    return make(n, h, w, c), make(n, h, w, c), make(4 * c, c) * 0.2, make(4 * c), make(c, 4 * c) * 0.2, make(c), make(c)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("with_gamma", [True, False])
def test_onednn_inference_path_matches_reference(act, with_gamma):
    x, res, w1, b1, w2, b2, gamma = mlp_inputs()
    gamma = gamma if with_gamma else None
    with torch.no_grad():
        assert reference.onednn_mlp_available(x, act, None)
        fast = reference.convnext_mlp_cpu_inference(x, res, w1, b1, w2, b2, gamma, act)
        eager = reference.convnext_mlp_reference(x, res, w1, b1, w2, b2, gamma, act)
        exact = reference.convnext_mlp_reference(
            *(t.double() for t in (x, res, w1, b1, w2, b2)), None if gamma is None else gamma.double(), act
        )
    assert_within_rule(fast, eager, exact, torch.float32, f"onednn mlp ({act}, gamma={with_gamma})")


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_onednn_v2_inference_path_matches_reference(act, monkeypatch):
    """ConvNeXt V2's MLP (GRN) on oneDNN: within the rule of the fp64 reference, one image all zero after the
    activation (the 1e-6 guard), and what the eager backend runs in fp32 CPU inference."""
    x, res, w1, b1, w2, b2, _ = mlp_inputs(n=3)
    gen = torch.Generator().manual_seed(5)
    grn_w, grn_b = torch.randn(1, 1, 1, 96, generator=gen), torch.randn(1, 1, 1, 96, generator=gen)
    x[1] = 0.0
    b1 = torch.where(torch.arange(96) % 2 == 0, b1, torch.full_like(b1, -50.0))  # half the channels dead
    args = (x, res, w1, b1, grn_w, grn_b, w2, b2, act)
    with torch.no_grad():
        fast = reference.convnext_v2_mlp_cpu_inference(*args)
        eager = reference.convnext_v2_mlp_reference(*args)
        exact = reference.convnext_v2_mlp_reference(*(t.double() for t in args[:-1]), act)
        assert_within_rule(fast, eager, exact, torch.float32, f"onednn v2 mlp ({act})")
        calls = []
        monkeypatch.setattr(reference, "convnext_v2_mlp_cpu_inference",
                            lambda *a: calls.append(a) or eager)
        with backend.use_backend("eager"):
            backend.convnext_v2_mlp(*args)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                backend.convnext_v2_mlp(*args)  # autocast: the reference, which autocast runs in bf16
    assert len(calls) == 1


def test_onednn_path_only_for_fp32_cpu_inference_without_drop_path():
    x, *_ = mlp_inputs()
    with torch.no_grad():
        assert not reference.onednn_mlp_available(x, "silu", None)
        assert not reference.onednn_mlp_available(x, "gelu", torch.ones(2))
        assert not reference.onednn_mlp_available(x.double(), "gelu", None)
    assert not reference.onednn_mlp_available(x, "gelu", None), "grad mode must take the autograd path"


def test_backend_eager_mlp_uses_fast_path_in_inference_and_reference_in_training():
    x, res, w1, b1, w2, b2, gamma = mlp_inputs()
    w1.requires_grad_()
    with backend.use_backend("eager"):
        out = backend.convnext_mlp(x, res, w1, b1, w2, b2, gamma, "gelu", None)
        assert out.grad_fn is not None
        with torch.no_grad():
            fast = backend.convnext_mlp(x, res, w1, b1, w2, b2, gamma, "gelu", None)
    torch.testing.assert_close(fast, out.detach(), atol=1e-5, rtol=1e-5)


def test_dispatch_runs_eager_where_the_fused_dwconv_does_not_apply(monkeypatch):
    monkeypatch.setattr(backend, "_kernels_usable", lambda device_type: (True, ""))
    wide = torch.zeros(reference.DWCONV_MAX_CHANNELS + 1, 1, 7, 7)
    even = torch.zeros(8, 1, 4, 4)
    with backend.use_backend("auto"):
        assert "up to 2048 channels, got 2049" in backend._dwconv_unsupported(wide)
        assert "square odd kernels up to 7" in backend._dwconv_unsupported(even)
        assert backend._dwconv_unsupported(torch.zeros(8, 1, 7, 7)) is None
        monkeypatch.setattr(backend, "_auto_prefers_fused", lambda *args: True)  # a policy that picks fused
        cuda_x = types.SimpleNamespace(device=torch.device("cuda"))  # only its device is read here
        assert backend._choose("dwconv_layernorm", cuda_x, 8, (), None) is True
        assert backend._choose("dwconv_layernorm", cuda_x, 2049, (), backend._dwconv_unsupported(wide)) is False


def test_onednn_path_under_autocast_only_for_bf16():
    x, *_ = mlp_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert not reference.onednn_mlp_available(x, "gelu", None)  # fp16 autocast: eager's linears in fp16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert reference.onednn_mlp_available(x, "gelu", None) == reference._ONEDNN_BF16
        assert reference.onednn_mlp_available(x.bfloat16(), "gelu", None) == reference._ONEDNN_BF16
        assert not reference.onednn_mlp_available(x.double(), "gelu", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not reference.onednn_mlp_available(x, "gelu", None), "grad mode must take the autograd path"


@pytest.mark.skipif(not reference._ONEDNN_BF16, reason="this CPU has no native bf16 for oneDNN")
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_gamma", [True, False])
def test_onednn_bf16_autocast_path_follows_eager_autocast(residual_dtype, with_gamma):
    """Same dtype as eager autocast gives (fp32 gamma promotes) and within the bf16 rule of the fp32 op."""
    x, res, w1, b1, w2, b2, gamma = mlp_inputs(c=32)
    gamma = gamma if with_gamma else None
    res = res.to(residual_dtype)
    with torch.no_grad():
        exact = reference.convnext_mlp_reference(x, res.float(), w1, b1, w2, b2, gamma)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = reference.convnext_mlp_cpu_inference(x.bfloat16(), res, w1, b1, w2, b2, gamma)
            eager = reference.convnext_mlp_reference(x.bfloat16(), res, w1, b1, w2, b2, gamma)
    assert fast.dtype == eager.dtype
    assert_within_rule(fast.float(), eager.float(), exact, torch.bfloat16, f"bf16 autocast mlp, gamma={with_gamma}")


def test_model_under_bf16_autocast_follows_transformers():
    """The whole model under bf16 autocast inference (the oneDNN bf16 MLP where available) against
    transformers under the same autocast, both measured from transformers in fp32."""
    from helpers import twin_models

    hf, ours = twin_models(hidden_sizes=[16, 24, 32, 40], depths=[1, 2, 1, 1])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = hf(pixels).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16), backend.use_backend("eager"):
            fast = ours(pixels).last_hidden_state
            eager = hf(pixels).last_hidden_state
    assert fast.dtype == eager.dtype
    assert_within_rule(fast.float(), eager.float(), exact, torch.bfloat16, "bf16 autocast model")

def _grads(op, tensors, grad_out):
    """Output and the gradients of every tensor input (None entries skipped) of one op call."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in tensors]
    out = op(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def _mlp_training_grads(op, tensors, act, sample_scale, grad_out):
    return _grads(lambda *leaves: op(*leaves, act, sample_scale), tensors, grad_out)


@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("with_gamma,with_biases,with_scale", [
    (True, True, False), (False, True, False), (True, False, False), (True, True, True),
])
def test_onednn_training_path_matches_reference(act, with_gamma, with_biases, with_scale):
    """Forward and every input's gradient of the oneDNN training path against the fp64 reference, with
    fp32 eager as the rule's E (with and without layer scale, bias-free linears, drop-path scale)."""
    x, res, w1, b1, w2, b2, gamma = mlp_inputs()
    tensors = (x, res, w1, b1 if with_biases else None, w2, b2 if with_biases else None,
               gamma if with_gamma else None)
    scale = torch.tensor([0.0, 1.25]) if with_scale else None
    grad_out = torch.randn(res.shape, generator=torch.Generator().manual_seed(5))
    assert reference.cpu_training_paths_apply(x.requires_grad_(True))
    fast = _mlp_training_grads(reference.convnext_mlp_cpu_training, tensors, act, scale, grad_out)
    eager = _mlp_training_grads(reference.convnext_mlp_reference, tensors, act, scale, grad_out)
    exact = _mlp_training_grads(
        reference.convnext_mlp_reference, [None if t is None else t.double() for t in tensors], act,
        None if scale is None else scale.double(), grad_out.double(),
    )
    assert len(fast) == len(exact)
    for i, (f, e, r) in enumerate(zip(fast, eager, exact)):
        assert f.dtype == torch.float32
        assert_within_rule(f, e, r, torch.float32, f"onednn training mlp, output/grad {i}")


def test_onednn_training_path_supports_double_backward():
    """Gradient of a gradient norm (as a gradient penalty takes) matches the reference's. The loss is scaled so the
    second-order gradients are O(1-10): unscaled they reach 1e5, where one fp32 ulp is 8e-3 and the rule's atol
    means nothing (under oneDNN's SSE4.1 kernels F's max error was 1.2x E's there, both under one ulp)."""
    x, res, w1, b1, w2, b2, gamma = mlp_inputs()

    def penalty(op, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (x, res, w1, b1, w2, b2, gamma)]
        out = op(*leaves, "gelu", None)
        (grad_x,) = torch.autograd.grad(0.01 * out.square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves[2:])

    fast, eager, exact = penalty(reference.convnext_mlp_cpu_training, torch.float32), \
        penalty(reference.convnext_mlp_reference, torch.float32), penalty(reference.convnext_mlp_reference, torch.float64)
    for i, (f, e, r) in enumerate(zip(fast, eager, exact)):
        assert_within_rule(f, e, r, torch.float32, f"second-order grad {i}")


def test_onednn_training_path_only_where_it_applies():
    x, *_ = mlp_inputs()
    assert reference.cpu_training_paths_apply(x)
    assert not reference.cpu_training_paths_apply(x.double())
    with torch.no_grad():
        assert not reference.cpu_training_paths_apply(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not reference.cpu_training_paths_apply(x)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not reference.cpu_training_paths_apply(x), "torch.backends.mkldnn disabled must be honoured"
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        assert not reference.cpu_training_paths_apply(dual)
    assert not torch.func.vmap(lambda t: torch.tensor(reference.cpu_training_paths_apply(t)))(x).any()


def test_backend_takes_the_onednn_training_path_in_cpu_training(monkeypatch):
    x, res, w1, b1, w2, b2, gamma = mlp_inputs()
    taken = []
    monkeypatch.setattr(reference, "convnext_mlp_cpu_training", lambda *a: taken.append(a) or res)
    with backend.use_backend("eager"):
        backend.convnext_mlp(x, res, w1, b1, w2, b2, gamma, "gelu", None)
        assert len(taken) == 1
        with torch.no_grad():
            backend.convnext_mlp(x, res, w1, b1, w2, b2, gamma, "gelu", None)
    assert len(taken) == 1


def dwconv_inputs(n=2, h=9, w=11, c=12, k=7):
    gen = torch.Generator().manual_seed(4)
    make = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = make(n, c, h, w).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return x, make(c, 1, k, k) * 0.2, make(c), 1 + 0.1 * make(c), make(c)


@pytest.mark.parametrize("with_bias,k", [(True, 7), (False, 7), (True, 3)])
def test_dwconv_training_path_matches_reference(with_bias, k):
    """Forward and every gradient of the CPU training dwconv+LayerNorm (bias gradient summed outside the
    conv backward) against the fp64 reference, fp32 eager as the rule's E."""
    x, w, b, ln_w, ln_b = dwconv_inputs(k=k)
    tensors = (x, w, b if with_bias else None, ln_w, ln_b)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    fast = _grads(reference.dwconv_layernorm_cpu_training, tensors, grad_out)
    eager = _grads(reference.dwconv_layernorm_reference, tensors, grad_out)
    exact = _grads(reference.dwconv_layernorm_reference, [None if t is None else t.double() for t in tensors],
                   grad_out.double())
    assert len(fast) == len(exact) == 5 + with_bias
    for i, (f, e, r) in enumerate(zip(fast, eager, exact)):
        assert_within_rule(f, e, r, torch.float32, f"dwconv training path, output/grad {i}")


def test_dwconv_training_path_supports_double_backward():
    tensors = dwconv_inputs()

    def penalty(op, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in tensors]
        (grad_x,) = torch.autograd.grad(op(*leaves).sin().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves[1:])

    fast, eager, exact = (penalty(reference.dwconv_layernorm_cpu_training, torch.float32),
                          penalty(reference.dwconv_layernorm_reference, torch.float32),
                          penalty(reference.dwconv_layernorm_reference, torch.float64))
    for i, (f, e, r) in enumerate(zip(fast, eager, exact)):
        assert_within_rule(f, e, r, torch.float32, f"dwconv second-order grad {i}")


def test_backend_takes_the_dwconv_training_path_in_cpu_training(monkeypatch):
    x, w, b, ln_w, ln_b = dwconv_inputs()
    taken = []
    monkeypatch.setattr(reference, "dwconv_layernorm_cpu_training", lambda *a: taken.append(a) or x)
    with backend.use_backend("eager"):
        backend.dwconv_layernorm(x, w, b, ln_w, ln_b)
        with torch.no_grad():
            backend.dwconv_layernorm(x, w, b, ln_w, ln_b)
        backend.dwconv_layernorm(x.double(), w.double(), b.double(), ln_w.double(), ln_b.double())
    assert len(taken) == 1
