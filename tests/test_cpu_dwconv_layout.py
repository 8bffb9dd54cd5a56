"""The CPU dwconv+LayerNorm's layout choice: the NCHW-copy formulation gives the reference's numbers (forward and
every gradient, fp64 reference, tolerance rule), backend.cpu_dwconv_layout picks it only where the benchmark
measured it faster (fp32 CPU training, wide stage, few positions), and a model that takes it trains as
transformers does."""
import pytest
import torch

import fastconvnext
from fastconvnext import backend
from fastconvnext.kernels import reference
from helpers import randomize_
from tolerance import assert_within_rule


def dwconv_inputs(n=2, h=7, w=7, c=768, k=7, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x = make(n, c, h, w).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return x, make(c, 1, k, k, scale=0.2), make(c), 1 + make(c, scale=0.1), make(c)


def grads(op, tensors, grad_out, **options):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    out = op(*leaves, **options)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("op", ["dwconv_layernorm_reference", "dwconv_layernorm_cpu_training"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 768), (1, 4, 5, 40), (3, 6, 6, 24)])
def test_the_nchw_layout_gives_the_references_numbers(op, shape):
    n, h, w, c = shape
    tensors = dwconv_inputs(n, h, w, c)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3))
    nchw = grads(getattr(reference, op), tensors, grad_out, layout="nchw")
    eager = grads(reference.dwconv_layernorm_reference, tensors, grad_out)
    exact = grads(reference.dwconv_layernorm_reference, [t.double() for t in tensors], grad_out.double())
    for i, (f, e, r) in enumerate(zip(nchw, eager, exact)):
        assert_within_rule(f, e, r, torch.float32, f"{op} in NCHW, output/grad {i}")
    assert nchw[0].shape == eager[0].shape


def test_an_unknown_layout_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layout must be one of \('channels_last', 'nchw'\), got 'nhwc'"):
        reference.dwconv_layernorm_reference(*dwconv_inputs(1, 3, 3, 8), layout="nhwc")


def layout_of(n, h, w, c, dtype=torch.float32, grad=True):
    x = torch.zeros(n, h, w, c, dtype=dtype, requires_grad=grad)
    return backend.cpu_dwconv_layout(x, c, (torch.zeros(c, 1, 7, 7, dtype=dtype),))


def test_nchw_only_where_it_was_measured_faster():
    assert layout_of(1, 7, 7, 768) == "nchw"
    assert layout_of(2, 7, 7, 768) == "nchw"
    assert layout_of(4, 7, 7, 768) == "nchw"  # 196 positions
    assert layout_of(8, 7, 7, 768) == "channels_last"  # 392 positions
    assert layout_of(2, 7, 7, 384) == "channels_last"
    assert layout_of(1, 56, 56, 96) == "channels_last"
    assert layout_of(2, 7, 7, 1024) == "nchw"
    assert layout_of(2, 7, 7, 768, grad=False) == "channels_last"  # inference: channels-last was faster
    assert layout_of(2, 7, 7, 768, dtype=torch.float64) == "channels_last"  # not measured
    with torch.no_grad():
        assert layout_of(2, 7, 7, 768) == "channels_last"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layout_of(2, 7, 7, 768) == "channels_last"


def test_the_backend_passes_the_chosen_layout(monkeypatch):
    taken = []
    real_training, real_reference = reference.dwconv_layernorm_cpu_training, reference.dwconv_layernorm_reference
    monkeypatch.setattr(reference, "dwconv_layernorm_cpu_training",
                        lambda *a: taken.append(("training", a[-1])) or real_training(*a))
    monkeypatch.setattr(reference, "dwconv_layernorm_reference",
                        lambda *a: taken.append(("reference", a[-1])) or real_reference(*a))
    small = [t.requires_grad_(True) for t in dwconv_inputs(2, 7, 7, 768)]
    large = [t.requires_grad_(True) for t in dwconv_inputs(8, 7, 7, 768)]
    with backend.use_backend("eager"):
        backend.dwconv_layernorm(*small)
        backend.dwconv_layernorm(*large)
        with torch.no_grad():
            backend.dwconv_layernorm(*small)
    assert taken == [("training", "nchw"), ("training", "channels_last"), ("reference", "channels_last")]


def trained(model, pixels):
    output = model(pixels).pooler_output
    output.square().sum().backward()
    return output.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_a_model_on_the_nchw_path_trains_as_transformers(monkeypatch):
    """A stage of 768 channels on 2 x 2 x 2 positions takes the NCHW path in training. Output and every parameter
    gradient within the tolerance rule against fp64 transformers (R), with E both the channels-last formulation and
    fp32 transformers."""
    import transformers

    fields = dict(hidden_sizes=[8, 16, 24, 768], depths=[1, 1, 1, 1])
    hf = randomize_(transformers.ConvNextModel(transformers.ConvNextConfig(**fields))).train()
    exact = transformers.ConvNextModel(transformers.ConvNextConfig(**fields)).double().train()
    exact.load_state_dict(hf.state_dict())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def ours():
        model = fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig(**fields)).train()
        model.load_state_dict(hf.state_dict())
        return model

    chosen, real = [], backend.cpu_dwconv_layout
    monkeypatch.setattr(backend, "cpu_dwconv_layout", lambda *args: chosen.append(real(*args)) or chosen[-1])
    nchw_out, nchw_grads = trained(ours(), pixels)
    assert chosen == ["channels_last"] * 3 + ["nchw"]
    monkeypatch.setattr(backend, "cpu_dwconv_layout", lambda *args: "channels_last")
    cl_out, cl_grads = trained(ours(), pixels)
    exact_out, exact_grads = trained(exact, pixels.double())
    hf_out, hf_grads = trained(hf, pixels)
    for eager, out, grads in (("channels-last", cl_out, cl_grads), ("transformers", hf_out, hf_grads)):
        assert_within_rule(nchw_out, out, exact_out, torch.float32, f"pooler output, E: {eager}")
        for name, grad in nchw_grads.items():
            assert_within_rule(grad, grads[name], exact_grads[name], torch.float32, f"grad {name}, E: {eager}")
