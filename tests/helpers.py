"""Shared test helpers: twin models (transformers oracle + fastconvnext) with the same random weights."""
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
