"""Shared test helpers: twin models (transformers oracle + fastconvnext) with the same random weights."""
import contextlib

import torch

import fastconvnext

SMALL = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1])


def randomize_(model, generator_seed=0):
    """Give every parameter random values, so LayerNorm affine and layer scale matter in comparisons."""
    gen = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("layer_scale_parameter") or (".layernorm" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.3 * noise)
    return model


def twin_models(kind="ConvNextModel", **config):
    """A transformers model with random weights and the fastconvnext model holding the same weights."""
    import transformers

    hf = getattr(transformers, kind)(transformers.ConvNextConfig(**config))
    randomize_(hf)
    ours = getattr(fastconvnext, kind)(fastconvnext.ConvNextConfig(**config))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), ours.eval()


# ---------------------------------------------------------------------------------- kernel test device
# Kernel tests run in Triton's interpreter on CPU by default; with FASTCONVNEXT_TEST_DEVICE=cuda
# (see conftest.py) they run natively on the GPU. Put every kernel input on KERNEL_DEVICE, take the
# shapes from kernel_shapes(), and mark GPU-only tests with @gpu (skipped on CPU).
import os  # noqa: E402

import pytest  # noqa: E402

ON_GPU = os.environ.get("FASTCONVNEXT_TEST_DEVICE", "cpu").strip().lower() == "cuda"
KERNEL_DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")
gpu = pytest.mark.gpu
interpreter_only = pytest.mark.skipif(ON_GPU, reason="checks a behaviour of Triton's CPU interpreter")

# ConvNeXt-T's stage activations at 224x224 input, batch 8, as (N, H, W, C).
CONVNEXT_T_STAGES = ((8, 56, 56, 96), (8, 28, 28, 192), (8, 14, 14, 384), (8, 7, 7, 768))


def gpu_shapes():
    """Full ConvNeXt-T stage shapes (N, H, W, C) at batch 8: native runs only (the interpreter would take hours)."""
    return list(CONVNEXT_T_STAGES) if ON_GPU else []


def kernel_shapes(small):
    """The small interpreter shapes, plus the full stage shapes when running natively on the GPU."""
    return list(small) + gpu_shapes()


def kernel_dtypes():
    """Activation dtypes a kernel test can check here: bf16 only natively (the interpreter refuses it)."""
    return (torch.float32, torch.float16, torch.bfloat16) if ON_GPU else (torch.float32, torch.float16)


@contextlib.contextmanager
def cuda_autocast_dispatch(dtype):
    """Run CPU tensors through the AutocastCUDA dispatch key with CUDA autocast on (no GPU needed)."""
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.AutocastCUDA):
            yield
    finally:
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])


def dot_with_exact_bf16(a, b, d, input_precision, max_num_imprecise_acc):
    """tl.dot for Triton's interpreter that reads bf16 operands correctly (exact bf16 products, fp32 sums): monkeypatch
    it over `interpreter.interpreter_builder.create_dot`; Triton 3.9's own multiplies bf16's raw uint16 bits."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def as_float(handle):
        if handle.dtype.scalar == tl.bfloat16:  # the interpreter keeps bf16 as raw uint16 bits
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    result = np.matmul(as_float(a), as_float(b), dtype=d.data.dtype) + d.data
    return interpreter.TensorHandle(result, d.dtype.scalar)


# ------------------------------------------------------------------ what the installed transformers can do
# fastconvnext follows the newest transformers where versions differ (README: "Older transformers"). Against an
# older transformers, the tests of a behaviour it lacks skip, each naming the behaviour; detected from the
# installed transformers itself, never from a version number.
def transformers_composites_alpha_on_white() -> bool:
    """Whether the installed transformers' `convert_to_rgb` (in-memory images, `do_convert_rgb=True`) composites
    transparency onto white (5.25) or drops the alpha channel (5.17). Image files are another path: `load_image`
    drops the alpha (convert("RGB")) in both, and tests compare files with it directly."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    transparent_black = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    try:
        converted = convert_to_rgb(transparent_black, return_numpy=True)
    except TypeError:  # older signature without return_numpy
        converted = convert_to_rgb(transparent_black)
    import numpy as np

    return bool(np.asarray(converted).reshape(-1)[0] == 255)


_SELECTS = []


def transformers_selects_hidden_states() -> bool:
    """Whether the installed transformers selects hidden states by index as 5.25 does (output_hidden_states=[1, 3]
    gives the stem and four stages with None at 0, 2 and 4); 5.17 selects otherwise."""
    if not _SELECTS:
        import transformers

        hf = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 1]))
        with torch.no_grad():
            states = hf(torch.randn(1, 3, 32, 32), output_hidden_states=[1, 3]).hidden_states
        _SELECTS.append([s is None for s in states] == [True, False, True, False, True])
    return _SELECTS[0]
