"""The one place that decides, per call, whether an op runs as a fused Triton kernel or as eager PyTorch.

`auto` (default): fused kernels for CUDA tensors when Triton imports, eager ops otherwise.
`triton`: always the kernels; on CPU tensors that needs TRITON_INTERPRET=1 (Triton's interpreter).
`eager`: always the eager references from `fastconvnext.kernels.reference`.
Set with `set_backend(...)` or the environment variable FASTCONVNEXT_BACKEND (read at import).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

from fastconvnext.kernels import reference

BACKENDS = ("auto", "triton", "eager")
ENV_VAR = "FASTCONVNEXT_BACKEND"


def _checked(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)
_interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
_triton_importable = importlib.util.find_spec("triton") is not None
_warned = set()


def set_backend(name):
    """Choose the implementation of the fused ops: "auto", "triton" or "eager"."""
    global _backend
    _backend = _checked(name, "backend")


def get_backend():
    return _backend


@contextlib.contextmanager
def use_backend(name):
    """Temporarily run with another backend (restored on exit)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _kernels_usable(device_type):
    """Whether the Triton kernels can run on tensors of this device type; the reason when not."""
    if not _triton_importable:
        return False, "triton is not installed"
    if device_type == "cuda" or (device_type == "cpu" and _interpreting):
        return True, ""
    if device_type == "cpu":
        return False, "CPU tensors run the kernels only in Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"no Triton kernels for {device_type} tensors"


def _choose(device_type, unsupported_reason=None):
    """Return True for the fused kernel, False for eager, raising if `triton` is forced and impossible."""
    if _backend == "eager":
        return False
    usable, why = _kernels_usable(device_type)
    if _backend == "auto":
        return usable and device_type == "cuda" and unsupported_reason is None
    if not usable:
        raise RuntimeError(f"backend 'triton' is forced but cannot run here: {why}")
    if unsupported_reason is not None:
        if unsupported_reason not in _warned:
            _warned.add(unsupported_reason)
            warnings.warn(f"fastconvnext: {unsupported_reason}; that op runs eagerly", stacklevel=3)
        return False
    return True


def _dwconv_unsupported(dw_weight):
    channels, k = dw_weight.shape[0], dw_weight.shape[-1]
    if k % 2 == 0 or k > reference.DWCONV_MAX_KERNEL_SIZE or dw_weight.shape[-2] != k:
        return (f"the fused depthwise conv takes square odd kernels up to {reference.DWCONV_MAX_KERNEL_SIZE}, "
                f"got {tuple(dw_weight.shape[-2:])}")
    if channels > reference.DWCONV_MAX_CHANNELS:
        return f"the fused depthwise conv takes up to {reference.DWCONV_MAX_CHANNELS} channels, got {channels}"
    return None


def _mlp_unsupported(act):
    if act not in reference.FUSED_ACTS:
        return f"the fused MLP implements activations {reference.FUSED_ACTS}, not {act!r}"
    return None


def dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """LayerNorm over C of depthwise_conv(x) + bias, x as [N, H, W, C]."""
    if _choose(x.device.type, _dwconv_unsupported(dw_weight)):
        from fastconvnext.kernels import dwconv_layernorm as fused

        return fused(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return reference.dwconv_layernorm_reference(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)


def convnext_mlp(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu", sample_scale=None):
    """residual + sample_scale[n] * gamma * MLP(x), x and residual as [N, H, W, C]."""
    if _choose(x.device.type, _mlp_unsupported(act)):
        from fastconvnext.kernels import convnext_mlp as fused

        return fused(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale)
    if reference.onednn_mlp_available(x, act, sample_scale):
        return reference.convnext_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act)
    return reference.convnext_mlp_reference(
        x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale
    )


def describe():
    """Which implementation each op would use now, for CUDA and for CPU tensors (shown by `fastconvnext info`)."""
    report = {}
    for device_type in ("cuda", "cpu"):
        usable, why = _kernels_usable(device_type)
        if _backend == "eager":
            choice = "eager PyTorch (backend forced to 'eager')"
        elif usable and (device_type == "cuda" or _backend == "triton"):
            mode = " in Triton's interpreter" if device_type == "cpu" else ""
            choice = f"fused Triton kernel{mode}"
        elif _backend == "triton":
            choice = f"error: backend 'triton' forced but {why}"
        else:
            choice = f"eager PyTorch ({why or 'auto picks eager on CPU'})"
        for op in ("dwconv_layernorm", "convnext_mlp"):
            report[f"{op} [{device_type}]"] = choice
    report["convnext_mlp activations fused"] = ", ".join(reference.FUSED_ACTS)
    if torch.backends.mkldnn.is_available():
        report["convnext_mlp eager, fp32 CPU inference"] = "oneDNN linear with fused bias+act / layer scale+residual"
    return report
