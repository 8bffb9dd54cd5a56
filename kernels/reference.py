"""Eager PyTorch references for the fused ops.

One definition per op, used by the CPU/eager path of the model and as the oracle in the kernel
tests. Layouts match the fused kernels: activations are [N, H, W, C] (the channels-last block
tensor seen as NHWC).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._op_support import forward_mode_ad

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


# The memory layouts the depthwise conv can run in: the channels-last view of the [N, H, W, C] input (no copy),
# or an NCHW copy of it (transformers' layout). Same math; torch picks another conv kernel for each.
DWCONV_LAYOUTS = ("channels_last", "nchw")


def dwconv_layernorm_reference(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6, layout="channels_last"):
    """LayerNorm over C of depthwise_conv(x) + bias; x and result are [N, H, W, C]; the conv runs in `layout`."""
    channels, kernel = x.shape[-1], dw_weight.shape[-1]
    y = F.conv2d(_conv_input(x, layout), dw_weight, dw_bias, padding=kernel // 2, groups=channels)
    return F.layer_norm(y.permute(0, 2, 3, 1), (channels,), ln_weight, ln_bias, eps)


def dwconv_layernorm_cpu_training(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6, layout="channels_last"):
    """The same op as `dwconv_layernorm_reference`, for fp32 CPU training: the conv's bias gradient is a
    plain sum over the gradient, because asking torch's conv backward for it makes oneDNN run its
    weight-and-bias kernel, slower than the weight kernel plus that sum (3 ms a block at ConvNeXt-T s1)."""
    y = _DepthwiseConv.apply(_conv_input(x, layout), dw_weight, dw_bias)
    return F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[-1],), ln_weight, ln_bias, eps)


def _conv_input(x, layout):
    """[N, H, W, C] x as the conv's [N, C, H, W] input in `layout` (one of DWCONV_LAYOUTS)."""
    if layout not in DWCONV_LAYOUTS:
        raise ValueError(f"layout must be one of {DWCONV_LAYOUTS}, got {layout!r}")
    nchw = x.permute(0, 3, 1, 2)
    return nchw.contiguous() if layout == "nchw" else nchw


def convnext_mlp_reference(
    x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu", sample_scale=None
):
    """residual + sample_scale[n] * gamma * (act(x W1^T + b1) W2^T + b2); x, residual are [N, H, W, C]."""
    y = F.linear(ACTIVATIONS[act](F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return _scale_and_add(y, residual, gamma, sample_scale)


def _scale_and_add(y, residual, gamma, sample_scale):
    """residual + sample_scale[n] * gamma * y: the MLP's tail after fc2."""
    if sample_scale is not None:
        # one [N, 1, 1, C] factor: a single pass over y, forward and backward
        scale = sample_scale.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
        return torch.addcmul(residual, y, scale if gamma is None else scale * gamma)
    return residual + (y if gamma is None else gamma * y)


# oneDNN post-op names for the activations it can fuse into a CPU linear layer: (name, algorithm).
_ONEDNN_ACTS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


# Read once at import: torch.compile refuses to trace torch.backends.mkldnn.is_available().
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# bf16 linears through oneDNN only where the CPU computes bf16 natively (else oneDNN emulates it slowly).
_ONEDNN_BF16 = _ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _autocast_bf16():
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _onednn_usable(x):
    """oneDNN may run this CPU tensor's linears: built and enabled in torch, outside torch.compile (which
    fuses the reference itself), outside vmap/grad (which would run oneDNN per sample) and outside
    torch.jit tracing and scripting (the TorchScript ONNX exporter among them), which cannot record its op."""
    if torch.compiler.is_compiling() or not _ONEDNN_LINEAR or x.device.type != "cpu":
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return torch.backends.mkldnn.enabled and not torch._C._functorch.is_functorch_wrapped_tensor(x)


def onednn_mlp_available(x, act, sample_scale):
    """Whether `convnext_mlp_cpu_inference` applies: CPU inference in fp32 outside autocast, or under bf16
    autocast (fp32 or bf16 input), outside torch.compile (which fuses the reference itself), with a fusable
    activation and no drop path. Other autocast dtypes take the reference, which autocast runs in low precision."""
    if not _onednn_usable(x):
        return False
    if act not in _ONEDNN_ACTS or sample_scale is not None or torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):
        return _ONEDNN_BF16 and _autocast_bf16() and x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.float32


def convnext_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu"):
    """The same op as `convnext_mlp_reference`, for CPU inference, with oneDNN post-ops.

    fc1 carries bias + activation; fc2 carries the residual add, and the layer scale is folded into
    its weight and bias, so the 4C hidden is touched once and no elementwise pass follows fc2.
    Under bf16 autocast the bf16 variant runs instead.
    """
    if torch.is_autocast_enabled("cpu"):
        return _mlp_cpu_inference_bf16(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act)
    channels = x.shape[-1]
    if gamma is not None:
        fc2_weight, fc2_bias = gamma[:, None] * fc2_weight, gamma * fc2_bias
    name, algorithm = _ONEDNN_ACTS[act]
    hidden = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, channels), fc1_weight, fc1_bias, name, [], algorithm)
    out = torch.ops.mkldnn._linear_pointwise.binary(
        hidden, residual.reshape(-1, channels), fc2_weight, fc2_bias, "add"
    )
    return out.view(residual.shape)


def _mlp_cpu_inference_bf16(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act):
    """What eager computes under bf16 autocast, with the activation in fc1's oneDNN post-op.

    Both linears run in bf16 as autocast's would (bf16 copies of weights and biases, bf16 output);
    the layer scale and residual then follow in one addcmul with eager's type promotion (an fp32 gamma
    makes the result fp32, as gamma * y does in eager)."""
    bf16 = torch.bfloat16
    channels = x.shape[-1]
    name, algorithm = _ONEDNN_ACTS[act]
    hidden = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, channels).to(bf16), fc1_weight.to(bf16), _to_bf16(fc1_bias), name, [], algorithm
    )
    y = torch.ops.mkldnn._linear_pointwise(hidden, fc2_weight.to(bf16), _to_bf16(fc2_bias), "none", [], "")
    y = y.view(residual.shape)
    return residual + y if gamma is None else torch.addcmul(residual, y, gamma)


def _to_bf16(bias):
    return None if bias is None else bias.to(torch.bfloat16)


def cpu_training_paths_apply(x):
    """Whether `convnext_mlp_cpu_training` and `dwconv_layernorm_cpu_training` apply: fp32 CPU tensors
    with autograd recording, outside autocast and forward-mode AD (their autograd Functions have no
    forward-mode rule)."""
    if not torch.is_grad_enabled() or x.dtype != torch.float32 or not _onednn_usable(x):
        return False
    return not torch.is_autocast_enabled("cpu") and not forward_mode_ad(x)


def convnext_mlp_cpu_training(
    x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu", sample_scale=None
):
    """The same op as `convnext_mlp_reference`, for fp32 CPU training: both linears through oneDNN, which
    is faster than the BLAS matmul for these shapes on AVX-512 CPUs (forward and input gradient alike).
    Everything else is the reference's autograd graph."""
    channels = x.shape[-1]
    hidden = ACTIVATIONS[act](_OneDnnLinear.apply(x.reshape(-1, channels), fc1_weight, fc1_bias))
    y = _OneDnnLinear.apply(hidden, fc2_weight, fc2_bias).view(residual.shape)
    return _scale_and_add(y, residual, gamma, sample_scale)


class _OneDnnLinear(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T + bias [N] in fp32 through oneDNN. The input gradient is this same op
    (so double backward works); the weight gradient is torch.mm, faster than oneDNN for g^T x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _OneDnnLinear.apply(grad, weight.t(), None) if need_x else None  # oneDNN reads the view
        grad_weight = grad.t().mm(x) if need_weight else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise conv of x [N, C, H, W] with weight [C, 1, K, K] and bias [C], stride 1, "same" padding.
    Backward: torch's conv backward for x and weight, the bias gradient summed directly. Double backward
    works: both are differentiable ops."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        pad = weight.shape[-1] // 2
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], x.shape[1], [need_x, need_weight, False]
        )
        grad_bias = grad.sum((0, 2, 3)) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


# ConvNeXt V2's MLP ------------------------------------------------------------------------------------------------
GRN_EPS = 1e-6  # transformers' ConvNextV2GRN: N = G / (mean_c G + 1e-6)


def convnext_v2_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias,
                                  act="gelu"):
    """The same op as `convnext_v2_mlp_reference`, for fp32 CPU inference (where `onednn_mlp_available` holds outside
    autocast), with oneDNN post-ops: fc1 carries bias + activation, GRN is one addcmul (h * (1 + w * Nx) + b, the
    same affine regrouped), fc2 carries the residual add."""
    channels, hidden_width = x.shape[-1], fc1_weight.shape[0]
    name, algorithm = _ONEDNN_ACTS[act]
    h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, channels), fc1_weight, fc1_bias, name, [], algorithm)
    h = h.view(*x.shape[:-1], hidden_width)
    norms = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
    coef = 1 + grn_weight.reshape(-1) * (norms / (norms.mean(dim=-1, keepdim=True) + GRN_EPS))
    h = torch.addcmul(grn_bias.reshape(-1), h, coef).view(-1, hidden_width)
    out = torch.ops.mkldnn._linear_pointwise.binary(h, residual.reshape(-1, channels), fc2_weight, fc2_bias, "add")
    return out.view(residual.shape)


def convnext_v2_mlp_reference(
    x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act="gelu", sample_scale=None
):
    """residual + sample_scale[n] * (GRN(act(x W1^T + b1)) W2^T + b2); x, residual are [N, H, W, C].

    transformers' ConvNextV2 block arithmetic: GRN(h) = w * (h * Nx) + b + h, G = ||h||_2 over (H, W) per image and
    channel, Nx = G / (mean over channels of G + 1e-6); grn_weight/grn_bias [D] or [1, 1, 1, D]."""
    h = ACTIVATIONS[act](F.linear(x, fc1_weight, fc1_bias))
    norms = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
    relative = norms / (norms.mean(dim=-1, keepdim=True) + GRN_EPS)
    h = grn_weight * (h * relative) + grn_bias + h
    return _scale_and_add(F.linear(h, fc2_weight, fc2_bias), residual, None, sample_scale)
