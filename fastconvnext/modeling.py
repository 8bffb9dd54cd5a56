"""ConvNeXt models with transformers' class names, module tree, parameter names and outputs.

Activations stay in channels-last memory from the stem to the head: a block sees its input as an
[N, H, W, C] view of the NCHW tensor, so nothing is permuted or copied between the fused ops.
Each block's two fused ops go through `fastconvnext.backend`, which picks Triton kernels or eager ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fastconvnext import backend
from fastconvnext.configuration import ConvNextConfig
from fastconvnext.kernels.reference import ACTIVATIONS
from fastconvnext.outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

BLOCK_NORM_EPS = 1e-6


def _nhwc(x):
    """The [N, H, W, C] view of a channels-last NCHW tensor (free when x is channels-last)."""
    return x.permute(0, 2, 3, 1)


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _channels_last(x):
    """x in channels-last memory. Inside torch.func transforms (vmap cannot query memory formats) x is
    left as it is: the eager ops read any layout, only speed depends on it."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return x
    return x.contiguous(memory_format=torch.channels_last)


class ConvNextLayerNorm(nn.LayerNorm):
    """LayerNorm over channels for [N, H, W, C] ("channels_last") or [N, C, H, W] ("channels_first") input."""

    def __init__(self, normalized_shape, eps=BLOCK_NORM_EPS, data_format="channels_last"):
        super().__init__(normalized_shape, eps=eps)
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.data_format = data_format

    def forward(self, x):
        if self.data_format == "channels_first":
            return _nchw(super().forward(_nhwc(x)))
        return super().forward(x)


class ConvNextActivation(nn.Module):
    """The MLP activation as a module (so the tree matches transformers'); the fused kernel reads `name`."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name](x)

    def extra_repr(self):
        return self.name


class ConvNextXIELU(nn.Module):
    """transformers' xIELU activation (hidden_act="xielu"): learnable alpha_p, alpha_n per block, kept in
    bfloat16 as transformers creates them, with the same names so state dicts match."""

    def __init__(self, alpha_p_init=0.8, alpha_n_init=0.8, beta=0.5, eps=-1e-6, dtype=torch.bfloat16):
        super().__init__()
        inverse_softplus = lambda v: torch.log(torch.expm1(torch.tensor(v, dtype=dtype))).unsqueeze(0)  # noqa: E731
        self.alpha_p = nn.Parameter(inverse_softplus(alpha_p_init))
        self.alpha_n = nn.Parameter(inverse_softplus(alpha_n_init - beta))
        self.register_buffer("beta", torch.tensor(beta, dtype=dtype))
        self.register_buffer("eps", torch.tensor(eps, dtype=dtype))

    def forward(self, x):
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        negative = (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n
        return torch.where(x > 0, alpha_p * x * x + self.beta * x, negative + self.beta * x)


def _activation_module(config):
    """The block's activation: parameter-free ones by name (fusable), the learnable ones as modules."""
    if config.hidden_act == "prelu":
        return nn.PReLU()
    if config.hidden_act == "xielu":
        return ConvNextXIELU()
    return ConvNextActivation(config.activation)


class ConvNextEmbeddings(nn.Module):
    """Patchify stem: a patch_size x patch_size conv with stride patch_size, then LayerNorm over channels."""

    def __init__(self, config):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_sizes[0], kernel_size=config.patch_size, stride=config.patch_size
        )
        self.layernorm = ConvNextLayerNorm(config.hidden_sizes[0], data_format="channels_first")
        self.num_channels = config.num_channels

    def forward(self, pixel_values):
        x = self.patch_embeddings(_channels_last(pixel_values))
        return self.layernorm(_channels_last(x))


def drop_path_scale(drop_prob, training, x, dtype=None):
    """Per-sample stochastic-depth scale for x (0 or 1/keep_prob), or None when nothing is dropped.

    Draws one uniform number per sample, in the same order and dtype as transformers (`dtype`, by default x's:
    that of the branch transformers hands to drop path), so a seeded run drops the same samples. The scale is
    applied inside the fused MLP epilogue.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    dtype = x.dtype if dtype is None else dtype
    keep = torch.floor(torch.rand(x.shape[0], dtype=dtype, device=x.device) + keep_prob)
    # drop_prob 1 drops every sample (transformers computes 0/0 there and returns NaN)
    return keep / keep_prob if keep_prob > 0 else keep


class ConvNextDropPath(nn.Module):
    """Stochastic depth: per-sample keep (scaled by 1/keep_prob) or drop, in training only."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def sample_scale(self, x, dtype=None):
        return drop_path_scale(self.drop_prob, self.training, x, dtype)

    def forward(self, x):
        """x (NCHW) with each sample kept and scaled by 1/keep_prob, or dropped: what a block runs when it
        calls its sub-modules (hooks or adapters attached); the fused path applies sample_scale() itself."""
        scale = self.sample_scale(x)
        return x if scale is None else x * scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self):
        return f"p={self.drop_prob}"


_module_state = torch.nn.modules.module  # where torch keeps its process-wide module hooks


def _global_hooks_registered():
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_forward_hook and
    friends) exist: the same four dicts nn.Module.__call__ checks before it skips hook handling."""
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
                or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks)


def _hooked(module):
    """Whether `module` has forward, forward-pre or backward hooks of its own (nn.Module.__call__'s test)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _plain(module, cls):
    """Whether `module` is exactly `cls` with no hooks of its own: then its tensors can be passed to a fused op
    instead of calling it. A subclass (a LoRA or quantized Linear, a parametrized module) or any hook means
    the module must be called, as transformers calls it."""
    return type(module) is cls and not _hooked(module)


def block_forward(block, x, norm_class, fused_act, drop_path_classes, draw_scale):
    """One ConvNeXt block; x is channels-last NCHW, so its NHWC view is free.

    `block` is any module with transformers' block attribute names (dwconv, layernorm, pwconv1, act,
    pwconv2, layer_scale_parameter, drop_path): fastconvnext's own, or transformers' patched one. Each
    half runs as one backend op (fused kernel or eager reference) when its sub-modules are the plain ones the
    op reproduces: dwconv an nn.Conv2d and layernorm a `norm_class`; pwconv1/pwconv2 nn.Linear, the
    activation one the fused MLP has (`fused_act(act)` gives its name, None if none) and drop_path one of
    `drop_path_classes`, none with hooks and no global module hooks. Otherwise that half calls its sub-modules
    in transformers' order, so hooks fire and adapters (LoRA, quantized linears) take part, with transformers'
    numbers. `draw_scale(drop_path, x, dtype)` gives the drop-path scale for the fused MLP (drawn after the first
    half, where transformers' order puts it). Only the block's own few sub-modules are inspected, on every
    call (hooks can come and go at any time).
    """
    # each sub-module read once (nn.Module.__getattr__ is the slow part of these checks)
    return block_parts_forward(
        x, block.dwconv, block.layernorm, block.pwconv1, block.act, block.pwconv2, block.layer_scale_parameter,
        block.drop_path, norm_class, fused_act, drop_path_classes, draw_scale,
    )


def block_parts_forward(x, dwconv, layernorm, pwconv1, act, pwconv2, gamma, drop_path, norm_class, fused_act,
                        drop_path_classes, draw_scale):
    """block_forward on a block's sub-modules passed one by one, for blocks that name them otherwise
    (DINOv3-ConvNeXt's depthwise_conv, layer_norm, pointwise_conv1, activation_fn, pointwise_conv2, gamma):
    the same arithmetic, dispatch and hook/adapter fallback. gamma may be None (no layer scale)."""
    global_hooks = _global_hooks_registered()
    residual = _nhwc(x)
    if not global_hooks and _plain(dwconv, nn.Conv2d) and _plain(layernorm, norm_class):
        y = backend.dwconv_layernorm(residual, dwconv.weight, dwconv.bias, layernorm.weight, layernorm.bias,
                                     layernorm.eps)
    else:
        y = layernorm(_nhwc(dwconv(x)))
    act_name = fused_act(act)
    if (act_name is not None and not global_hooks and _plain(pwconv1, nn.Linear) and _plain(pwconv2, nn.Linear)
            and not _hooked(act) and type(drop_path) in drop_path_classes and not _hooked(drop_path)):
        out = backend.convnext_mlp(y, residual, pwconv1.weight, pwconv1.bias, pwconv2.weight, pwconv2.bias, gamma,
                                   act_name, draw_scale(drop_path, x, _branch_dtype(x, gamma)))
        return _nchw(out)
    y = pwconv2(act(pwconv1(y)))
    if gamma is not None:
        y = gamma * y
    return x + drop_path(_nchw(y))


_DROP_PATHS = (ConvNextDropPath, nn.Identity)


def _fused_act_name(act):
    return act.name if type(act) is ConvNextActivation else None


def _draw_scale(drop_path, x, dtype):
    return drop_path.sample_scale(x, dtype) if isinstance(drop_path, ConvNextDropPath) else None


def _branch_dtype(x, gamma):
    """The dtype of what transformers hands to drop path, gamma * pwconv2(...): the autocast dtype where autocast
    runs the linear (else x's), promoted with layer scale's. Drop path draws its random numbers in it."""
    device_type = x.device.type
    autocast = device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast and x.dtype != torch.float64 else x.dtype
    return dtype if gamma is None else torch.promote_types(dtype, gamma.dtype)


class ConvNextLayer(nn.Module):
    """One ConvNeXt block: dwconv7x7 -> LayerNorm -> Linear(C, 4C) -> act -> Linear(4C, C) -> x gamma -> + input."""

    def __init__(self, config, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = _activation_module(config)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        init = config.layer_scale_init_value
        self.layer_scale_parameter = nn.Parameter(init * torch.ones(dim)) if init > 0 else None
        self.drop_path = ConvNextDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        """The fused ops where the sub-modules are plain; an activation with parameters (prelu, xielu) or any
        other than the fused MLP's runs its MLP half by calling pwconv1, act, pwconv2 (block_forward)."""
        return block_forward(self, x, ConvNextLayerNorm, _fused_act_name, _DROP_PATHS, _draw_scale)


class ConvNextStage(nn.Module):
    """Optional downsampling (LayerNorm + 2x2/2 conv), then `depth` blocks of `layer_class`."""

    layer_class = ConvNextLayer  # a family's stage (ConvNeXt V2) names its own block

    def __init__(self, config, in_channels, out_channels, kernel_size=2, stride=2, depth=2, drop_path_rates=None):
        super().__init__()
        layers = []
        if in_channels != out_channels or stride > 1:
            layers = [
                ConvNextLayerNorm(in_channels, data_format="channels_first"),
                nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride),
            ]
        self.downsampling_layer = nn.ModuleList(layers)
        rates = drop_path_rates or [0.0] * depth
        self.layers = nn.ModuleList(self.layer_class(config, out_channels, rates[j]) for j in range(depth))

    def forward(self, x):
        for module in self.downsampling_layer:
            x = module(x)
        x = _channels_last(x)
        for layer in self.layers:
            x = layer(x)
        return x


def _run_under_backend(name, stage, x):
    """stage(x) under use_backend(name): the checkpointed stage's forward and its recomputation in backward pick
    the same ops, whichever thread the autograd engine recomputes it in."""
    with backend.use_backend(name):
        return stage(x)


class ConvNextEncoder(nn.Module):
    stage_class = ConvNextStage  # a family's encoder (ConvNeXt V2) names its own stage

    def __init__(self, config):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").split(config.depths)
        self.stages = nn.ModuleList()
        previous = config.hidden_sizes[0]
        for i in range(config.num_stages):
            self.stages.append(
                self.stage_class(
                    config, previous, config.hidden_sizes[i], stride=2 if i > 0 else 1, depth=config.depths[i],
                    drop_path_rates=rates[i].tolist(),
                )
            )
            previous = config.hidden_sizes[i]
        self.gradient_checkpointing = False

    def forward(self, x, output_hidden_states=False):
        hidden_states = [x] if output_hidden_states else None
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                scoped = None if torch.compiler.is_compiling() else backend.scoped_backend()
                if scoped is None:
                    x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
                else:  # backward may recompute in another thread (CUDA's): take this thread's scope along
                    x = torch.utils.checkpoint.checkpoint(_run_under_backend, scoped, stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states


def _contiguous_nchw(tensors, selected=None):
    """Outputs are handed out in standard NCHW memory, as transformers returns them (`.view` keeps working);
    with `selected` (a set of indices), the others are None, as transformers returns a selection."""
    if tensors is None:
        return None
    return tuple(t.contiguous() if selected is None or i in selected else None for i, t in enumerate(tensors))


def _hidden_states_selection(value, count):
    """transformers' output_hidden_states: a flag, or an index or list of indices of the `count` hidden
    states to return (negative ones count from the end, out-of-range ones select nothing).
    Returns None (no hidden states), or the set of indices to return.

    As in transformers, a false value asks for none whatever its type: 0 and [] are not selections of
    index 0 and of nothing, they are "no hidden states" (transformers tests the flag's truth first)."""
    if isinstance(value, bool):
        return set(range(count)) if value else None
    indices = [value] if isinstance(value, int) else value
    is_index = lambda i: isinstance(i, int) and not isinstance(i, bool)  # noqa: E731
    if not isinstance(indices, (list, tuple)) or not all(is_index(i) for i in indices):
        raise TypeError(f"output_hidden_states must be a bool, an int or a list of ints, got {value!r}")
    if not value:
        return None
    return {i % count for i in indices if -count <= i < count}


class ConvNextPreTrainedModel(nn.Module):
    config_class = ConvNextConfig
    base_model_prefix = "convnext"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, ConvNextConfig):
            raise TypeError(f"config must be a fastconvnext.ConvNextConfig, got {type(config).__name__}")
        config.validate()
        self.config = config

    def _flags(self, output_hidden_states, return_dict):
        """The per-call flags, defaulting to the config's (as transformers does): the set of hidden-state
        indices to return (None for none) and whether to return the output object."""
        config = self.config
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        selection = _hidden_states_selection(output_hidden_states, config.num_stages + 1)
        return selection, config.return_dict if return_dict is None else bool(return_dict)

    @property
    def base_model(self):
        """The ConvNeXt trunk (`self.convnext` in the classifier, the model itself otherwise)."""
        return getattr(self, self.base_model_prefix, self)

    def post_init(self):
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ConvNextLayer) and module.layer_scale_parameter is not None:
            nn.init.constant_(module.layer_scale_parameter, self.config.layer_scale_init_value)

    # ---- conveniences transformers users expect ------------------------------------------------
    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Recompute each stage in backward instead of keeping its activations (training only)."""
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self):
        self._set_gradient_checkpointing(False)

    def _set_gradient_checkpointing(self, enabled):
        for module in self.modules():
            if isinstance(module, ConvNextEncoder):
                module.gradient_checkpointing = enabled

    @property
    def is_gradient_checkpointing(self):
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, ConvNextEncoder))

    # transformers 5.25 prefers these names to gradient_checkpointing_*; the same switch
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """Recompute each stage in backward (every stage: every_n_layers=1; offloading is not offered)."""
        if every_n_layers != 1 or offload:
            raise NotImplementedError(f"fastconvnext checkpoints every stage on the device; got every_n_layers="
                                      f"{every_n_layers!r}, offload={offload!r}")
        self._set_gradient_checkpointing(True)

    def activation_checkpointing_disable(self):
        self._set_gradient_checkpointing(False)

    @property
    def is_activation_checkpointing(self):
        return self.is_gradient_checkpointing

    def enable_input_require_grads(self):
        """Make the stem's output require grad (a forward hook), so gradients reach adapters under gradient
        checkpointing with a frozen trunk, as transformers' method does for its input embeddings."""
        stem = getattr(self.base_model, "embeddings", None)
        if stem is None:
            raise NotImplementedError(f"{type(self).__name__} has no stem (embeddings) module to hook")
        self.disable_input_require_grads()
        hook = stem.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        self._require_grads_hooks = [hook]

    def disable_input_require_grads(self):
        for hook in getattr(self, "_require_grads_hooks", []):
            hook.remove()
        self._require_grads_hooks = []

    def get_memory_footprint(self, return_buffers=True):
        """Bytes held by the parameters (and buffers), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    def push_to_hub(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                    revision=None, create_pr=False, max_shard_size="50GB", tags=None):
        """Upload what save_pretrained writes to the Hub repository `repo_id` (huggingface_hub; created if
        needed) and return the commit's URL. fastconvnext writes one model.safetensors: a max_shard_size other than
        the default is refused rather than ignored; tags are not written (no model card)."""
        if max_shard_size != "50GB":
            raise NotImplementedError(f"fastconvnext saves one model.safetensors; max_shard_size={max_shard_size!r}")
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise ImportError("push_to_hub needs huggingface_hub: pip install 'fastconvnext[hf]'") from None
        import tempfile

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message or "Upload model",
                                       commit_description=commit_description, create_pr=create_pr)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *, config=None, state_dict=None, **kwargs):
        """Load a transformers directory, a timm/original checkpoint file or (with huggingface_hub) a hub id;
        `pretrained_model_name_or_path=None` with config= and state_dict= builds from those (transformers' names).
        Options: see checkpoint.load_pretrained. Called on a family's base class (ConvNextPreTrainedModel,
        ConvNextV2PreTrainedModel, DINOv3ConvNextPreTrainedModel), the class is chosen from the checkpoint's
        tensors among that family's `model_classes()`."""
        from fastconvnext import checkpoint

        target = cls
        if "model_classes" in vars(cls):
            target = {c.__name__: c for c in cls.model_classes()}
        return checkpoint.load_pretrained(target, pretrained_model_name_or_path, config=config, state_dict=state_dict,
                                          **kwargs)

    @classmethod
    def model_classes(cls):
        return ConvNextModel, ConvNextForImageClassification, ConvNextBackbone

    def save_pretrained(self, save_directory, **kwargs):
        """Write config.json + model.safetensors that transformers' from_pretrained loads as is; transformers'
        arguments (max_shard_size, state_dict, is_main_process, ...): see checkpoint.save_pretrained."""
        from fastconvnext import checkpoint

        return checkpoint.save_pretrained(self, save_directory, **kwargs)

    # ---- input checks --------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values):
        """Reject input the convolutions would fail on deep inside, naming what was expected."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape [batch, channels, height, width], got {pixel_values.dim()}-D "
                f"shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        batch, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels (config.num_channels), got {channels} "
                f"(shape {tuple(pixel_values.shape)})"
            )
        if batch == 0:
            raise ValueError(f"pixel_values is an empty batch (shape {tuple(pixel_values.shape)})")
        smallest = self.config.patch_size * 2 ** (self.config.num_stages - 1)
        if height < smallest or width < smallest:
            raise ValueError(
                f"pixel_values must be at least {smallest}x{smallest} (patch_size {self.config.patch_size} and "
                f"{self.config.num_stages - 1} 2x downsamplings), got {height}x{width}"
            )
        device, dtype = self.device, self.dtype
        if pixel_values.device != device:
            raise ValueError(f"pixel_values is on {pixel_values.device} but the model is on {device}")
        if pixel_values.dtype != dtype and not torch.is_autocast_enabled(device.type):
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype} but the model's parameters are {dtype}; cast one of "
                f"them or run under torch.autocast"
            )


class PooledTrunk:
    """A family's trunk (mixed into its pretrained-model class): `last_hidden_state` (the last stage's output) and
    `pooler_output` (LayerNorm of its spatial mean); the family names its `encoder_class`."""

    encoder_class = None

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = ConvNextEmbeddings(config)
        self.encoder = self.encoder_class(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, output_attentions=None):
        """output_attentions is accepted and ignored, as in transformers (ConvNeXt has no attention)."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        self._check_pixel_values(pixel_values)
        selection, return_dict = self._flags(output_hidden_states, return_dict)
        last, hidden_states = self.encoder(self.embeddings(pixel_values), selection is not None)
        pooled = self.layernorm(last.mean(dim=(-2, -1)))
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last.contiguous(), pooler_output=pooled,
            hidden_states=_contiguous_nchw(hidden_states, selection),
        )
        return _returned(output, return_dict)


class ConvNextModel(PooledTrunk, ConvNextPreTrainedModel):
    """ConvNeXt trunk: `last_hidden_state` (stage-4 output) and `pooler_output` (LayerNorm of its spatial mean)."""

    encoder_class = ConvNextEncoder


def _returned(output, return_dict):
    """What a model's forward returns: the output object, or its tuple without return_dict. Under torch.jit.trace
    (and the TorchScript ONNX exporter) the object goes out as a dict of its fields, which is what the tracer makes
    of transformers' outputs (OrderedDicts); it cannot record any other class."""
    if not return_dict:
        return output.to_tuple()
    return dict(output.items()) if torch.jit.is_tracing() else output


class LinearClassifier:
    """A family's ForImageClassification (mixed into its pretrained-model class): a linear classifier on the trunk's
    pooled features, loss by config.problem_type; the trunk (`trunk_class`) is the attribute named
    base_model_prefix, as in transformers."""

    trunk_class = None

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        setattr(self, self.base_model_prefix, self.trunk_class(config))
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=None, output_attentions=None
    ):
        _, return_dict = self._flags(output_hidden_states, return_dict)
        # the trunk always answers with its output object, whatever config.return_dict says
        outputs = self.base_model(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs["pooler_output"])  # by key: under torch.jit.trace the trunk returns a dict
        loss = None if labels is None else self.loss(logits, labels)
        output = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.get("hidden_states"))
        return _returned(output, return_dict)

    def loss(self, logits, labels):
        """transformers' rule: problem_type, inferred (and stored in the config) on first use when unset."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        num_labels = self.config.num_labels
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        labels = labels.to(logits.device)
        problem = self.config.problem_type
        if problem == "single_label_classification" and num_labels == 1:
            raise ValueError(
                'problem_type="single_label_classification" needs num_labels > 1, got num_labels=1 (the loss would '
                'always be 0): use num_labels=2 for binary classification or problem_type="regression"'
            )
        if problem == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100)
        return F.binary_cross_entropy_with_logits(logits, labels)


class ConvNextForImageClassification(LinearClassifier, ConvNextPreTrainedModel):
    """ConvNeXt with a linear classifier on the pooled features; loss by config.problem_type."""

    trunk_class = ConvNextModel


class BackboneStages:
    """transformers' backbone interface (mixed into a family's Backbone): out_features / out_indices are read from
    the config on every call and setting either (here or on the config) re-aligns the other."""

    has_attentions = False

    @property
    def stage_names(self):
        return self.config.stage_names

    @property
    def out_features(self):
        return self.config.out_features

    @out_features.setter
    def out_features(self, value):
        self.config.out_features = value

    @property
    def out_indices(self):
        return self.config.out_indices

    @out_indices.setter
    def out_indices(self, value):
        self.config.out_indices = value

    @property
    def out_feature_channels(self):
        return dict(zip(self.stage_names, self.num_features))

    @property
    def channels(self):
        return [self.out_feature_channels[stage] for stage in self.out_features]

    def forward_with_filtered_kwargs(self, *args, **kwargs):
        """transformers' BackboneMixin entry point used by detection/segmentation heads."""
        kwargs.pop("output_attentions", None)
        return self(*args, **kwargs)


class NormedBackbone(BackboneStages):
    """A family's Backbone: feature maps of the stages named in config.out_features, each through its own LayerNorm;
    a stage can only be returned if the backbone was built with its LayerNorm. The family names its
    `encoder_class`."""

    encoder_class = None

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = ConvNextEmbeddings(config)
        self.encoder = self.encoder_class(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.hidden_states_norms = nn.ModuleDict(
            {
                stage: ConvNextLayerNorm(c, data_format="channels_first")
                for stage, c in zip(self.out_features, self.channels)
            }
        )
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None, output_attentions=None):
        """output_attentions is accepted and ignored, as in transformers (ConvNeXt has no attention)."""
        self._check_pixel_values(pixel_values)
        selection, return_dict = self._flags(output_hidden_states, return_dict)
        missing = [stage for stage in self.out_features if stage not in self.hidden_states_norms]
        if missing:
            raise ValueError(
                f"config.out_features asks for {missing}, but this backbone was built with LayerNorms for "
                f"{list(self.hidden_states_norms)} only; build a new {type(self).__name__} for other stages"
            )
        _, hidden_states = self.encoder(self.embeddings(pixel_values), output_hidden_states=True)
        feature_maps = tuple(
            self.hidden_states_norms[stage](h)
            for stage, h in zip(self.stage_names, hidden_states)
            if stage in self.out_features
        )
        output = BackboneOutput(
            feature_maps=_contiguous_nchw(feature_maps),
            hidden_states=_contiguous_nchw(hidden_states, selection) if selection is not None else None,
        )
        return _returned(output, return_dict)


class ConvNextBackbone(NormedBackbone, ConvNextPreTrainedModel):
    """Feature maps of the stages named in config.out_features, each through its own LayerNorm."""

    encoder_class = ConvNextEncoder
