"""Eager PyTorch references for the fused ops.

One definition per op, used by the CPU/eager path of the model and as the oracle in the kernel
tests. Layouts match the fused kernels: activations are [N, H, W, C] (the channels-last block
tensor seen as NHWC).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Activation names understood by the ops. The fused MLP kernel implements FUSED_ACTS; the others
# (needed for transformers' hidden_act values such as "silu") only exist on the eager path.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
    "linear": lambda t: t,
    "gelu_10": lambda t: torch.clamp(F.gelu(t), -10.0, 10.0),
    "laplace": lambda t: 0.5 * (1.0 + torch.erf((t - 0.707107) / (0.282095 * 2.0**0.5))),
    "relu2": lambda t: torch.square(F.relu(t)),
    "sqrtsoftplus": lambda t: torch.sqrt(F.softplus(t)),
}
FUSED_ACTS = ("gelu", "gelu_tanh", "relu")
# What the fused depthwise-conv kernel implements: square odd kernels up to 7, up to 2048 channels
# (ConvNeXt-XL's widest stage). Beyond that the dispatcher runs the eager op.
DWCONV_MAX_KERNEL_SIZE = 7
DWCONV_MAX_CHANNELS = 2048


def dwconv_layernorm_reference(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """LayerNorm over C of depthwise_conv(x) + bias; x and result are [N, H, W, C]."""
    channels, kernel = x.shape[-1], dw_weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), dw_weight, dw_bias, padding=kernel // 2, groups=channels)
    return F.layer_norm(y.permute(0, 2, 3, 1), (channels,), ln_weight, ln_bias, eps)


def convnext_mlp_reference(
    x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu", sample_scale=None
):
    """residual + sample_scale[n] * gamma * (act(x W1^T + b1) W2^T + b2); x, residual are [N, H, W, C]."""
    y = F.linear(ACTIVATIONS[act](F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    if gamma is not None:
        y = gamma * y
    if sample_scale is not None:
        y = y * sample_scale.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return residual + y


# oneDNN post-op names for the activations it can fuse into a CPU linear layer: (name, algorithm).
_ONEDNN_ACTS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


# Read once at import: torch.compile refuses to trace torch.backends.mkldnn.is_available().
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_mlp_available(x, act, sample_scale):
    """Whether `convnext_mlp_cpu_inference` applies: fp32 CPU inference outside autocast and outside
    torch.compile (which fuses the reference itself), a fusable activation, no drop path."""
    return (
        not torch.compiler.is_compiling()
        and _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and act in _ONEDNN_ACTS
        and sample_scale is None
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # autocast would run eager's linears in low precision
    )


def convnext_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu"):
    """The same op as `convnext_mlp_reference`, for CPU inference, with oneDNN post-ops.

    fc1 carries bias + activation; fc2 carries the residual add, and the layer scale is folded into
    its weight and bias, so the 4C hidden is touched once and no elementwise pass follows fc2.
    """
    channels = x.shape[-1]
    if gamma is not None:
        fc2_weight, fc2_bias = gamma[:, None] * fc2_weight, gamma * fc2_bias
    name, algorithm = _ONEDNN_ACTS[act]
    hidden = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, channels), fc1_weight, fc1_bias, name, [], algorithm)
    out = torch.ops.mkldnn._linear_pointwise.binary(
        hidden, residual.reshape(-1, channels), fc2_weight, fc2_bias, "add"
    )
    return out.view(residual.shape)
