"""ConvNeXt V2 with transformers' class names, module tree, parameter names, config.json and outputs.

Each block runs as two backend ops: its first half (depthwise 7x7 conv + LayerNorm) as V1's `dwconv_layernorm`, its
MLP pwconv1 -> act -> GRN -> pwconv2 -> drop path -> + residual as `convnext_v2_mlp` (fused Triton kernels or the eager
reference, as backend.py decides; GRN(h) = weight * (h * N) + bias + h, N = ||h||_2 over (H, W) per image and channel,
divided by (its mean over channels + 1e-6)). With hooks on a sub-module, global module hooks, a replaced module
(LoRA, quantized linears) or an activation with parameters, that half calls its modules as transformers does. The
auto backend has no prior for the V2 MLP and does not measure it yet, so on CUDA it runs that op eagerly unless the
backend is 'triton'; V1's speed figures do not apply to V2.

V2 differs from V1 only in the block (GRN after the activation, no layer scale) and in names (`convnextv2.`
prefix of the classifier's trunk); embeddings, stages, drop path (float32 linspace rates), the final LayerNorm of
the pooled mean and the backbone's per-stage LayerNorms (eps 1e-6) are V1's, and reused from modeling.py.
Loading: from_pretrained reads through checkpoint.load_pretrained (dispatched by config model_type
"convnextv2"): transformers directories, timm's convnextv2_* files and directories and the original release's
files, with the same guarantees as V1's.
"""
from __future__ import annotations

import torch
from torch import nn

from fastconvnext import backend
from fastconvnext.configuration import ConvNextV2Config
from fastconvnext.modeling import (
    ConvNextDropPath,
    ConvNextEncoder,
    ConvNextLayerNorm,
    ConvNextPreTrainedModel,
    ConvNextStage,
    LinearClassifier,
    NormedBackbone,
    PooledTrunk,
    _DROP_PATHS,
    _activation_module,
    _branch_dtype,
    _draw_scale,
    _fused_act_name,
    _global_hooks_registered,
    _hooked,
    _nchw,
    _nhwc,
    _plain,
)

__all__ = [
    "ConvNextV2Backbone",
    "ConvNextV2Config",
    "ConvNextV2ForImageClassification",
    "ConvNextV2GRN",
    "ConvNextV2Model",
    "ConvNextV2PreTrainedModel",
]

GRN_EPS = 1e-6


class ConvNextV2GRN(nn.Module):
    """Global Response Normalization over [N, H, W, C]: weight * (h * N) + bias + h, N = the per-image, per-channel
    L2 norm over (H, W) divided by (its mean over channels + 1e-6). weight and bias are [1, 1, 1, C] (transformers'
    shapes), initialized to zero (GRN starts as the identity)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, h):
        norms = torch.linalg.vector_norm(h, ord=2, dim=(1, 2), keepdim=True)
        relative = norms / (norms.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.weight * (h * relative) + self.bias + h


class ConvNextV2Layer(nn.Module):
    """dwconv7x7 -> LayerNorm (V1's op) -> Linear(C, 4C) -> act -> GRN -> Linear(4C, C) -> drop path -> + input (the
    convnext_v2_mlp op)."""

    def __init__(self, config, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = _activation_module(config)
        self.grn = ConvNextV2GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = ConvNextDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        """Each half as one backend op where its sub-modules are the plain ones the op reproduces (exact classes, no
        hooks of their own, no global module hooks; the MLP also needs an activation without parameters and
        fastconvnext's drop path or none), else its modules called in transformers' order (V1's rule, see
        modeling.block_forward)."""
        return grn_block_parts_forward(x, self.dwconv, self.layernorm, self.pwconv1, self.act, self.grn, self.pwconv2,
                                       self.drop_path, ConvNextLayerNorm, ConvNextV2GRN, _fused_act_name,
                                       _DROP_PATHS, _draw_scale)


def grn_block_parts_forward(x, dwconv, layernorm, pwconv1, act, grn, pwconv2, drop_path, norm_class, grn_class,
                            fused_act, drop_path_classes, draw_scale):
    """A V2 block on its sub-modules passed one by one, for transformers' own ConvNextV2Layer under
    patch_transformers: ConvNextV2Layer.forward's dispatch with the classes the ops reproduce given as arguments
    (`norm_class` for the LayerNorm, `grn_class` for GRN, `fused_act(act)` the fused activation's name or None,
    `drop_path_classes`, and `draw_scale(drop_path, x, dtype)` for the drop-path scale), as
    modeling.block_parts_forward does for V1's blocks. x is channels-last NCHW."""
    global_hooks = _global_hooks_registered()
    residual = _nhwc(x)
    if not global_hooks and _plain(dwconv, nn.Conv2d) and _plain(layernorm, norm_class):
        y = backend.dwconv_layernorm(residual, dwconv.weight, dwconv.bias, layernorm.weight, layernorm.bias,
                                     layernorm.eps)
    else:
        y = layernorm(_nhwc(dwconv(x)))
    act_name = fused_act(act)
    if (act_name is not None and not global_hooks and _plain(pwconv1, nn.Linear) and _plain(grn, grn_class)
            and _plain(pwconv2, nn.Linear) and not _hooked(act) and type(drop_path) in drop_path_classes
            and not _hooked(drop_path)):
        out = backend.convnext_v2_mlp(y, residual, pwconv1.weight, pwconv1.bias, grn.weight, grn.bias,
                                      pwconv2.weight, pwconv2.bias, act_name,
                                      draw_scale(drop_path, x, _branch_dtype(x, None)))
        return _nchw(out)
    y = pwconv2(grn(act(pwconv1(y))))
    return x + drop_path(_nchw(y))


class ConvNextV2Stage(ConvNextStage):
    """Optional downsampling (LayerNorm + 2x2/2 conv), then `depth` V2 blocks."""

    layer_class = ConvNextV2Layer


class ConvNextV2Encoder(ConvNextEncoder):
    """V1's encoder (forward, gradient checkpointing, float32 drop-path rates) over V2 stages."""

    stage_class = ConvNextV2Stage


class ConvNextV2PreTrainedModel(ConvNextPreTrainedModel):
    config_class = ConvNextV2Config
    base_model_prefix = "convnextv2"

    def __init__(self, config):
        if not isinstance(config, ConvNextV2Config):
            raise TypeError(f"config must be a fastconvnext.ConvNextV2Config, got {type(config).__name__}")
        super().__init__(config)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConvNextV2GRN):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def model_classes(cls):
        return ConvNextV2Model, ConvNextV2ForImageClassification, ConvNextV2Backbone


class ConvNextV2Model(PooledTrunk, ConvNextV2PreTrainedModel):
    """`last_hidden_state` (stage-4 output) and `pooler_output` (LayerNorm of its spatial mean), as V1."""

    encoder_class = ConvNextV2Encoder


class ConvNextV2ForImageClassification(LinearClassifier, ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with a linear classifier on the pooled features; loss by config.problem_type (V1's rule)."""

    trunk_class = ConvNextV2Model


class ConvNextV2Backbone(NormedBackbone, ConvNextV2PreTrainedModel):
    """Feature maps of the stages in config.out_features, each through its own LayerNorm (eps 1e-6), as V1."""

    encoder_class = ConvNextV2Encoder


# ---- loading (called by checkpoint.load_pretrained for model_type "convnextv2") ----------------------------------

BASE_PREFIX = "convnextv2."


def _canonical(state_dict, source):
    """Names without the `convnextv2.` prefix the classifier gives its trunk: one key space for the three classes."""
    canonical = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(BASE_PREFIX)
        if name in canonical:
            raise ValueError(f"{source}: checkpoint holds {name!r} both with and without the {BASE_PREFIX!r} prefix")
        canonical[name] = tensor
    return canonical


def _model_key(cls, name):
    if issubclass(cls, ConvNextV2ForImageClassification) and not name.startswith("classifier."):
        return BASE_PREFIX + name
    return name


def _layout():
    import re

    from fastconvnext import checkpoint
    from fastconvnext.family_loading import Layout

    return Layout(
        config_class=ConvNextV2Config,
        classes={c.__name__: c for c in ConvNextV2PreTrainedModel.model_classes()},
        canonical=_canonical,
        model_key=_model_key,
        block_key=re.compile(r"^encoder\.stages\.(\d{1,9})\.layers\.(\d{1,9})\."),
        head_part=checkpoint._head_part,  # layernorm, classifier, hidden_states_norms.<stage>: V1's head parts
        default_class=lambda canonical: checkpoint._default_class_name(canonical).replace("ConvNext", "ConvNextV2", 1),
    )


def load_checked(cls, source, state_dict, config_dict, config, overrides, strict, ignore_mismatched_sizes, dtype,
                 device):
    """checkpoint.load_pretrained's entry for model_type "convnextv2": transformers' key layout, timm's
    convnextv2_* and the original release's files (renamed by checkpoint.v2_weights_and_config, which also reads
    the architecture off a lone file's tensors and timm's config.json)."""
    from fastconvnext import checkpoint
    from fastconvnext.family_loading import load_family_checked

    state_dict, config_dict = checkpoint.v2_weights_and_config(state_dict, config_dict, config, source)
    return load_family_checked(_layout(), cls, source, state_dict, config_dict, config, overrides, strict,
                               ignore_mismatched_sizes, dtype, device)
