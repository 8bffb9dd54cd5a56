"""Hooks and adapters on a block's sub-modules take part as in transformers, in fastconvnext's models and in
transformers' own models under patch_transformers().

A block hands its sub-modules' tensors to the two fused ops only while those are the plain modules the ops
reproduce, with no hooks. A LoRA adapter (real peft), a forward, forward-pre or backward hook, a global module
hook or a replaced module makes that half of the block call its sub-modules instead. The oracle is
transformers with the same weights, the same adapter weights and the same hooks.
"""
import peft
import pytest
import torch
import transformers
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

import fastconvnext
from fastconvnext import backend, patch
from helpers import SMALL, twin_models
from tolerance import assert_fp32_within_rule, float64_twin, random_draws_as_in_float32

ATOL = 1e-5
LORA_TARGETS = ["pwconv1", "pwconv2"]
IMPLEMENTATIONS = ["fastconvnext", "patched"]
BLOCKS = sum(SMALL["depths"])
KIND = "ConvNextForImageClassification"
# peft asks transformers models is_gradient_checkpointing, which transformers 5 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _unpatched():
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()


def assert_close(got, expected, what, atol=ATOL):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def _pair(implementation, **overrides):
    """(transformers model, the model under test) with the same random weights, in eval mode: fastconvnext's
    class, or transformers' class built under patch_transformers()."""
    config = dict(SMALL, num_labels=3, drop_path_rate=0.3, **overrides)
    hf, ours = twin_models(KIND, **config)
    if implementation == "patched":
        with fastconvnext.patch_transformers():
            ours = getattr(transformers, KIND)(transformers.ConvNextConfig(**config))
        ours.load_state_dict(hf.state_dict(), strict=True)
        ours.eval()
        assert {type(m) for m in ours.modules() if type(m).__name__ == "ConvNextLayer"} == {patch.FusedConvNextLayer}
    return hf, ours


def _count_backend_calls(monkeypatch):
    calls = []
    for op in ("dwconv_layernorm", "convnext_mlp"):
        original = getattr(backend, op)
        monkeypatch.setattr(backend, op, lambda *a, _f=original, _op=op: calls.append(_op) or _f(*a))
    return calls


def _block(model, stage=1, layer=1):
    """The block stages[stage].layers[layer] (a block with drop path: the first one has rate 0)."""
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    return base.convnext.encoder.stages[stage].layers[layer]


def _with_lora(model, dropout=0.0):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def _same_random_lora_weights(*models):
    """The same random values in every LoRA matrix of each model (peft starts lora_B at zero: a no-op)."""
    gen = torch.Generator().manual_seed(7)
    names = sorted(name for name, _ in models[0].named_parameters() if ".lora_" in name)
    assert len(names) == 4 * BLOCKS, names
    with torch.no_grad():
        for name in names:
            value = 0.3 * torch.randn(dict(models[0].named_parameters())[name].shape, generator=gen)
            for model in models:
                dict(model.named_parameters())[name].copy_(value)


# ---------------------------------------------------------------------------------------------- LoRA (peft)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lora_outputs_and_module_names_match_transformers(implementation, monkeypatch):
    hf, ours = _pair(implementation)
    x = torch.randn(2, 3, 32, 36)
    with torch.no_grad():
        without_adapter = ours(x).logits
    theirs_lora, ours_lora = _with_lora(hf), _with_lora(ours)
    _same_random_lora_weights(theirs_lora, ours_lora)
    assert [n for n, _ in ours_lora.named_modules()] == [n for n, _ in theirs_lora.named_modules()]
    assert "base_model.model.convnext.encoder.stages.1.layers.1.pwconv1.lora_A.default" in dict(
        ours_lora.named_modules())
    exact_lora = float64_twin(theirs_lora)  # the adapter attached, its weights set
    calls = _count_backend_calls(monkeypatch)
    with torch.no_grad():
        expected, got = theirs_lora(pixel_values=x).logits, ours_lora(pixel_values=x).logits
        reference = exact_lora(pixel_values=x.double()).logits
    assert_fp32_within_rule(got, expected, reference, "logits with LoRA on pwconv1/pwconv2")
    assert (got - without_adapter).abs().max() > 0.1, "the adapter must change the output for the test to mean anything"
    # the MLP half calls pwconv1/pwconv2 (LoRA layers); the dwconv+LayerNorm half keeps its fused op
    assert calls.count("convnext_mlp") == 0 and calls.count("dwconv_layernorm") == BLOCKS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_lora_training_step_matches_transformers(implementation):
    """Training mode with LoRA dropout and drop path: the same random draws in the same order, the same loss,
    gradients that reach every LoRA matrix (and no frozen weight), and an optimizer step that changes them."""
    hf, ours = _pair(implementation)
    theirs_lora, ours_lora = _with_lora(hf, dropout=0.2), _with_lora(ours, dropout=0.2)
    _same_random_lora_weights(theirs_lora, ours_lora)
    theirs_lora.train(), ours_lora.train()
    exact_lora = float64_twin(theirs_lora)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    results = []
    for model in (theirs_lora, ours_lora, exact_lora):
        torch.manual_seed(11)
        with random_draws_as_in_float32():  # changes only the float64 twin's draws
            out = model(pixel_values=x.double() if model is exact_lora else x, labels=labels)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (expected, theirs_grads), (got, grads), (reference, exact_grads) = results
    assert_fp32_within_rule(got.logits, expected.logits, reference.logits, "training logits")
    assert_fp32_within_rule(got.loss, expected.loss, reference.loss, "loss")
    assert sorted(grads) == sorted(theirs_grads) and len(grads) == 4 * BLOCKS
    for name, grad in grads.items():
        assert ".lora_" in name and grad is not None and grad.abs().max() > 0, name
        assert_fp32_within_rule(grad, theirs_grads[name], exact_grads[name], f"grad of {name}")
    frozen = [n for n, p in ours_lora.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(ours_lora.named_parameters())[n].grad is None for n in frozen)

    before = {n: p.detach().clone() for n, p in ours_lora.named_parameters() if p.requires_grad}
    torch.optim.SGD([p for p in ours_lora.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(p, before[n]) for n, p in ours_lora.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_merged_and_unmerged_lora_agree_and_unloading_restores_the_fused_path(implementation, monkeypatch):
    hf, ours = _pair(implementation)
    theirs_lora, ours_lora = _with_lora(hf), _with_lora(ours)
    _same_random_lora_weights(theirs_lora, ours_lora)
    exact_lora = float64_twin(theirs_lora)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = exact_lora(pixel_values=x.double()).logits
        unmerged = ours_lora(pixel_values=x).logits
        ours_lora.merge_adapter()
        merged = ours_lora(pixel_values=x).logits
        ours_lora.unmerge_adapter()
        unmerged_again = ours_lora(pixel_values=x).logits
        expected = theirs_lora(pixel_values=x).logits
    assert_close(merged, unmerged, "merged vs unmerged LoRA")
    assert_close(unmerged_again, unmerged, "unmerged again")
    assert_fp32_within_rule(unmerged, expected, reference, "unmerged vs transformers")

    plain = ours_lora.merge_and_unload()
    assert {type(b.pwconv1) for b in plain.modules() if hasattr(b, "pwconv1")} == {nn.Linear}
    calls = _count_backend_calls(monkeypatch)
    with torch.no_grad():
        unloaded = plain(x).logits
    assert_close(unloaded, unmerged, "merge_and_unload vs the adapter")
    assert calls.count("convnext_mlp") == calls.count("dwconv_layernorm") == BLOCKS, "plain modules: fused ops again"


# ---------------------------------------------------------------------------------------------------- hooks


def _forward_hook(calls):
    def hook(module, args, output):
        calls.append(type(module).__name__)
        return 2.0 * output.tanh() + 0.25  # not affine: a LayerNorm after it cannot undo it

    return hook


def _forward_pre_hook(calls):
    def hook(module, args):
        calls.append(type(module).__name__)
        return (2.0 * args[0].tanh() - 0.125,)

    return hook


HOOKS = {"forward": ("register_forward_hook", _forward_hook),
         "forward_pre": ("register_forward_pre_hook", _forward_pre_hook)}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("hook_kind", sorted(HOOKS))
@pytest.mark.parametrize("submodule", ["dwconv", "layernorm", "pwconv1", "act", "pwconv2", "drop_path"])
def test_hooks_on_block_submodules_fire_and_change_the_output_as_in_transformers(
    implementation, hook_kind, submodule, monkeypatch
):
    hf, ours = _pair(implementation)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = ours(x).logits
    register, make_hook = HOOKS[hook_kind]
    hf64 = float64_twin(hf)  # the same hook (dtype-agnostic) is registered on it
    fired = {"transformers": [], "ours": [], "float64": []}
    handles = [getattr(getattr(_block(model), submodule), register)(make_hook(fired[who]))
               for who, model in (("transformers", hf), ("ours", ours), ("float64", hf64))]
    calls = _count_backend_calls(monkeypatch)
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
        reference = hf64(x.double()).logits
    assert len(fired["ours"]) == len(fired["transformers"]) == len(fired["float64"]) == 1, fired
    assert_fp32_within_rule(got, expected, reference, f"{hook_kind} hook on {submodule}")
    assert (got - plain).abs().max() > 1e-3, "the hook must change the output for the test to mean anything"
    half = "dwconv_layernorm" if submodule in ("dwconv", "layernorm") else "convnext_mlp"
    assert calls.count(half) == BLOCKS - 1, "only the hooked block's half leaves its fused op"

    for handle in handles:
        handle.remove()
    calls.clear()
    with torch.no_grad():
        after = ours(x).logits
    assert_close(after, plain, "hook removed")
    assert calls.count("dwconv_layernorm") == calls.count("convnext_mlp") == BLOCKS, "no hooks: fused ops again"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_full_backward_pre_hook"])
@pytest.mark.parametrize("submodule", ["layernorm", "pwconv2"])
def test_backward_hooks_on_block_submodules_fire_as_in_transformers(implementation, register, submodule):
    hf, ours = _pair(implementation)
    hf64 = float64_twin(hf)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    for who, model in (("transformers", hf), ("ours", ours), ("float64", hf64)):
        seen[who] = []
        getattr(getattr(_block(model), submodule), register)(lambda module, *grads, _s=seen[who]: _s.append(grads))
        model(x.double() if who == "float64" else x).logits.square().sum().backward()
    assert len(seen["ours"]) == len(seen["transformers"]) == len(seen["float64"]) == 1
    ours_grads, theirs_grads, exact_grads = seen["ours"][0], seen["transformers"][0], seen["float64"][0]
    assert len(ours_grads) == len(theirs_grads) == len(exact_grads)
    for got, expected, reference in zip(ours_grads, theirs_grads, exact_grads):
        assert_fp32_within_rule(got[0], expected[0], reference[0], f"{register} gradient on {submodule}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_global_module_hooks_see_every_submodule_and_change_the_output_as_in_transformers(
    implementation, monkeypatch
):
    """torch.nn.modules.module.register_module_forward_(pre_)hook: called for every module call, so every
    block calls its sub-modules in transformers' order; the hooks can change the output."""
    hf, ours = _pair(implementation)
    hf64 = float64_twin(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = ours(x).logits
    names = {}
    for model in (hf, ours):
        names.update({id(m): name for name, m in model.named_modules()})
    called = []

    def record(module, args):
        called.append(names.get(id(module)))

    def shift_linears(module, args, output):
        return output + 0.125 if isinstance(module, nn.Linear) else output

    calls = _count_backend_calls(monkeypatch)
    handles = [torch_module.register_module_forward_pre_hook(record),
               torch_module.register_module_forward_hook(shift_linears)]
    try:
        with torch.no_grad():
            reference = hf64(x.double()).logits  # under the same global hooks
            called.clear()
            expected = hf(x).logits
            theirs_called = list(called)
            called.clear()
            got = ours(x).logits
    finally:
        for handle in handles:
            handle.remove()
    block_modules = lambda seq: [n for n in seq if n and ".layers." in n]  # noqa: E731
    assert block_modules(called) == block_modules(theirs_called)
    assert "convnext.encoder.stages.1.layers.1.pwconv2" in called
    assert calls == [], "with global hooks no block may skip a module call"
    assert_fp32_within_rule(got, expected, reference, "global hooks")
    assert (got - plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ replaced modules


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass (as quantized and adapter layers are) whose output differs from F.linear's."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def _scaled_linear(old):
    new = _ScaledLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    return new


def _rms_norm(old):
    new = nn.RMSNorm(old.normalized_shape, eps=old.eps)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    return new


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2.0 * weight


REPLACEMENTS = {
    "pwconv1 subclass": lambda block: setattr(block, "pwconv1", _scaled_linear(block.pwconv1)),
    "layernorm -> RMSNorm": lambda block: setattr(block, "layernorm", _rms_norm(block.layernorm)),
    "parametrized dwconv": lambda block: parametrize.register_parametrization(block.dwconv, "weight", _Doubled()),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("replacement", sorted(REPLACEMENTS))
def test_replaced_submodules_run_as_modules_as_in_transformers(implementation, replacement):
    hf, ours = _pair(implementation)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = ours(x).logits
    for model in (hf, ours):
        REPLACEMENTS[replacement](_block(model))
    hf64 = float64_twin(hf)  # after the replacement: the same replaced module, in float64
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
        reference = hf64(x.double()).logits
    assert_fp32_within_rule(got, expected, reference, replacement)
    assert (got - plain).abs().max() > 1e-3, "the replacement must change the output for the test to mean anything"
