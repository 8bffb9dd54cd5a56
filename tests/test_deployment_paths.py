"""The deployment tools a transformers user reaches for, on fastconvnext and on patched transformers: torch.jit.trace,
the TorchScript ONNX exporter (run in onnxruntime) and dynamic quantization give transformers' numbers (the oracle:
transformers itself with the same weights, through the same tool)."""
import warnings

import pytest
import torch
import transformers

import fastconvnext
from fastconvnext import patch
from helpers import randomize_, twin_models
from tolerance import assert_each_within_rule, assert_fp32_within_rule, float64_twin

TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1], layer_scale_init_value=0.5)
ATOL = 1e-5  # quantized models: no float64 twin to compare with


@pytest.fixture(autouse=True)
def _unpatched():
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()


def _inputs():
    return torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))


def _trace(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, (x,), strict=False)


def _patched_transformers(kind, hf):
    """transformers' own class with the same weights, built after patch_transformers()."""
    patch.patch_transformers()
    patched = getattr(transformers, kind)(hf.config)
    patched.load_state_dict(hf.state_dict())
    return patched.eval()


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("kind", ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"])
def test_jit_trace_gives_transformers_outputs(kind, backend):
    extra = dict(num_labels=3) if kind == "ConvNextForImageClassification" else {}
    extra = dict(out_features=["stage2", "stage4"]) if kind == "ConvNextBackbone" else extra
    hf, ours = twin_models(kind, **TINY, **extra)
    x = _inputs()
    expected = _trace(hf, x)(x)
    with torch.no_grad():
        reference = float64_twin(hf)(x.double())  # R: transformers' float64 twin, untraced
    with fastconvnext.use_backend(backend):
        got = _trace(ours, x)(x)
        from_patched = _trace(_patched_transformers(kind, hf), x)(x)
    for traced in (got, from_patched):
        assert type(traced) is type(expected) and list(traced) == list(expected)
        for key in expected:
            if isinstance(expected[key], tuple):  # feature maps (patched: transformers' own permuted views)
                assert_each_within_rule(traced[key], expected[key], reference[key], f"traced {key}")
            else:
                assert_fp32_within_rule(traced[key], expected[key], reference[key], f"traced {key}")


def test_jit_trace_with_return_dict_false_gives_the_tuple():
    # transformers 5.25's classifier fails with config.return_dict=False (README: a transformers bug fixed here),
    # so the oracle is its output object's logits.
    hf, ours = twin_models("ConvNextForImageClassification", **TINY, num_labels=3)
    ours.config.return_dict = False
    x = _inputs()
    got = _trace(ours, x)(x)
    with torch.no_grad():
        expected, reference = hf(x).logits, float64_twin(hf)(x.double()).logits
    assert isinstance(got, tuple) and len(got) == 1
    assert_fp32_within_rule(got[0], expected, reference, "traced tuple's logits")


def test_torchscript_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime  # the test extra installs it

    hf, ours = twin_models("ConvNextForImageClassification", **TINY, num_labels=3)
    x = _inputs()
    with torch.no_grad():
        expected, reference = hf(x).logits, float64_twin(hf)(x.double()).logits
    for name, model in (("ours", ours), ("patched", _patched_transformers("ConvNextForImageClassification", hf))):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["pixel_values"],
                              output_names=["logits"])
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"pixel_values": x.numpy()})
        assert_fp32_within_rule(torch.from_numpy(logits), expected, reference, f"{name} in onnxruntime")


@pytest.mark.parametrize("patched", [False, True])
def test_dynamic_quantization_matches_transformers_quantized(patched):
    config = transformers.ConvNextConfig(**TINY, num_labels=3)
    hf = randomize_(transformers.ConvNextForImageClassification(config)).eval()
    if patched:
        model = _patched_transformers("ConvNextForImageClassification", hf)
    else:
        model = fastconvnext.ConvNextForImageClassification(fastconvnext.ConvNextConfig(**TINY, num_labels=3))
        model.load_state_dict(hf.state_dict())
        model.eval()
    quantize = torch.ao.quantization.quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = quantize(hf, {torch.nn.Linear}), quantize(model, {torch.nn.Linear})
    assert any("quantized" in type(m).__module__ for m in ours.modules())
    x = _inputs()
    with torch.no_grad():
        expected, got = theirs(x).logits, ours(x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
