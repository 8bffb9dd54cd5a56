"""Places where fastconvnext answered differently from transformers, or from what was asked, without an error:
the forward flags' truthiness, xIELU's parameter dtype when loaded, and use_backend() scopes across threads.
transformers is the oracle where it defines the behaviour."""
import threading

import pytest
import torch
import transformers

import fastconvnext
from fastconvnext import backend
from helpers import twin_models, transformers_selects_hidden_states
from tolerance import assert_fp32_within_rule, float64_twin, float64_twin_keeping_low_precision

TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 1, 1, 1])
KINDS = ["ConvNextModel", "ConvNextForImageClassification", "ConvNextBackbone"]


def assert_close(got, expected, what, atol):
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def _describe(output):
    """What a caller can see of an output: tuple or object, its keys, and which hidden states are present."""
    if isinstance(output, tuple):
        return ("tuple", len(output))
    hidden = output.hidden_states
    return (type(output).__name__, tuple(output.keys()),
            None if hidden is None else tuple(h is not None for h in hidden))


# ------------------------------------------------------------------------------------------- forward flags


@pytest.mark.parametrize("value", [0, [], (), False, True, 1, [0], (2, -1), -1], ids=repr)
@pytest.mark.parametrize("config_flag", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_hidden_states_truthiness_as_transformers(kind, config_flag, value):
    """A false value (0, [], ()) means no hidden states, as in transformers, not "select index 0" or "select
    nothing"; a true one is a flag or a selection; the config's flag only fills in an absent argument."""
    if not isinstance(value, bool) and value not in (0, [], ()) and not transformers_selects_hidden_states():
        pytest.skip(f"transformers {transformers.__version__} selects output_hidden_states otherwise; fastconvnext "
                    "follows newer transformers")
    hf, ours = twin_models(kind, output_hidden_states=config_flag, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x, output_hidden_states=value), ours(x, output_hidden_states=value)
        reference = float64_twin(hf)(x.double(), output_hidden_states=True).hidden_states  # all of them
    assert _describe(got) == _describe(expected)
    for i, (a, b, r) in enumerate(zip(got.hidden_states or (), expected.hidden_states or (), reference)):
        if b is not None:
            assert_fp32_within_rule(a, b, r, f"hidden_states[{i}]")


@pytest.mark.parametrize("kind", KINDS)
def test_output_hidden_states_none_takes_the_configs_flag(kind):
    """An explicit None is the config's flag, as when the argument is left out (transformers 5.25's can differ:
    its output capture reads an explicit None as false, which this package documents and tests otherwise)."""
    hf, ours = twin_models(kind, output_hidden_states=True, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, absent, explicit_none = hf(x), ours(x), ours(x, output_hidden_states=None)
    assert _describe(absent) == _describe(expected) == _describe(explicit_none)
    assert absent.hidden_states is not None and len(absent.hidden_states) == 5


@pytest.mark.parametrize("value", [None, 0, 1, "", "yes", False, True], ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_return_dict_truthiness_as_transformers(kind, value):
    hf, ours = twin_models(kind, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x, return_dict=value), ours(x, return_dict=value)
    assert _describe(got) == _describe(expected)


@pytest.mark.parametrize("value", [None, False, True, 1], ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_is_accepted_and_changes_nothing_as_in_transformers(kind, value):
    hf, ours = twin_models(kind, **TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = hf(x, output_attentions=value), ours(x, output_attentions=value)
    assert _describe(got) == _describe(expected)
    assert getattr(got, "attentions", None) is None and getattr(expected, "attentions", None) is None


# ---------------------------------------------------------------------------------------- xIELU parameters


@pytest.mark.filterwarnings("ignore")
def test_xielu_matches_transformers_in_bf16_and_fp16():
    """Models cast as a whole (both libraries cast xIELU's alpha/beta/eps with the rest), and fp32 weights under
    bf16 autocast with xIELU's parameters in bf16 as transformers builds them: the same numbers."""
    hf, ours = twin_models("ConvNextForImageClassification", num_labels=3, hidden_act="xielu", **TINY)
    x = torch.randn(2, 3, 32, 32)
    act = "convnext.encoder.stages.0.layers.0.act.alpha_p"
    assert ours.state_dict()[act].dtype == hf.state_dict()[act].dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(ours(x).logits.float(), hf(x).logits.float(), "bf16 autocast", atol=0)
    for dtype in (torch.bfloat16, torch.float16):
        theirs, mine = hf.to(dtype), ours.to(dtype)
        assert mine.state_dict()[act].dtype == theirs.state_dict()[act].dtype == dtype
        with torch.no_grad():
            assert_close(mine(x.to(dtype)).logits.float(), theirs(x.to(dtype)).logits.float(), str(dtype), atol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("load", ["from_pretrained", "from_transformers"])
def test_loaded_xielu_parameters_keep_transformers_bf16(load, tmp_path):
    hf, _ = twin_models("ConvNextForImageClassification", num_labels=3, hidden_act="xielu", **TINY)
    hf.save_pretrained(tmp_path)
    theirs = transformers.ConvNextForImageClassification.from_pretrained(tmp_path).eval()
    if load == "from_pretrained":
        ours = fastconvnext.ConvNextForImageClassification.from_pretrained(tmp_path).eval()
    else:
        ours = fastconvnext.from_transformers(theirs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fp32 = ours(x).logits, theirs(x).logits, float64_twin_keeping_low_precision(theirs)(x.double()).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = ours(x).logits.float(), theirs(x).logits.float()
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in theirs.state_dict().items()}
    assert_fp32_within_rule(*fp32, "fp32 logits")
    assert_close(*bf16, "bf16 autocast logits", atol=0)


# ----------------------------------------------------------------------------------- use_backend and threads


def _choice(x=torch.zeros(1, 2, 2, 8)):
    """What the convnext_mlp dispatch picks in this thread now: True fused, False eager."""
    return backend._choose("convnext_mlp", x, 8, ())


def _run_in_thread(target):
    errors = []

    def guarded():
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            errors.append(error)

    thread = threading.Thread(target=guarded)
    thread.start()
    return thread, errors


def test_use_backend_scopes_in_two_threads_do_not_leak():
    """Thread A enters use_backend("eager"), thread B then enters use_backend("triton"); A leaves its scope while
    B is still inside it, then B leaves. Each thread must see its own scope throughout, and both (and the main
    thread) the process default afterwards. A process-wide override gave A "triton" inside its scope and left
    "eager" for good. Driven step by step with events: no sleeps, no races."""
    default = backend.get_backend()
    assert default != "eager" and default != "triton", "the test needs a third default to tell scopes apart"
    a_entered, b_entered, a_left, b_left = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with fastconvnext.use_backend("eager"):
            a_entered.set()
            assert b_entered.wait(10)
            seen["A inside, B inside"] = (backend.get_backend(), _choice())
        seen["A after"] = backend.get_backend()
        a_left.set()
        assert b_left.wait(10)
        seen["A after B left"] = backend.get_backend()

    def thread_b():
        assert a_entered.wait(10)
        with fastconvnext.use_backend("triton"):
            b_entered.set()
            assert a_left.wait(10)
            seen["B inside, A left"] = (backend.get_backend(), _choice())
        seen["B after"] = backend.get_backend()
        b_left.set()

    (a, a_errors), (b, b_errors) = _run_in_thread(thread_a), _run_in_thread(thread_b)
    a.join(30), b.join(30)
    assert not a.is_alive() and not b.is_alive()
    assert not a_errors and not b_errors, (a_errors, b_errors)
    assert seen == {
        "A inside, B inside": ("eager", False),
        "A after": default,
        "B inside, A left": ("triton", True),  # TRITON_INTERPRET=1 (conftest): triton runs on CPU tensors
        "B after": default,
        "A after B left": default,
    }
    assert backend.get_backend() == default


def test_set_backend_is_the_process_default_and_a_scope_keeps_its_own():
    default = backend.get_backend()
    inside = {}
    try:
        with fastconvnext.use_backend("triton"):
            fastconvnext.set_backend("eager")
            inside["this thread"] = backend.get_backend()
            thread, errors = _run_in_thread(lambda: inside.setdefault("other thread", backend.get_backend()))
            thread.join(30)
            assert not errors
        assert backend.get_backend() == "eager"
    finally:
        fastconvnext.set_backend(default)
    assert inside == {"this thread": "triton", "other thread": "eager"}


def test_use_backend_rejects_an_unknown_name_and_changes_nothing():
    default = backend.get_backend()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'eager'\), got 'fused'"):
        with fastconvnext.use_backend("fused"):
            pass
    assert backend.get_backend() == default and backend.scoped_backend() is None


def test_compiled_code_follows_each_threads_scope():
    """torch.compile(fullgraph=True) traces the per-thread backend read and guards on it."""
    compiled = torch.compile(lambda x: x + 1 if backend.active_backend() == "eager" else x - 1, fullgraph=True,
                             backend="eager")
    results = {}
    x = torch.zeros(1)
    with fastconvnext.use_backend("eager"):
        results["eager scope"] = compiled(x).item()
        thread, errors = _run_in_thread(lambda: results.setdefault("other thread", compiled(x).item()))
        thread.join(60)
        assert not errors, errors
    results["after"] = compiled(x).item()
    assert results == {"eager scope": 1.0, "other thread": -1.0, "after": -1.0}


def test_checkpointed_stages_recompute_under_the_scope_of_the_forward():
    """Backward may run in another thread (CUDA's autograd threads; here: backward called from a thread), and
    gradient checkpointing recomputes each stage there: under the forward's use_backend scope, not that
    thread's default, or the recomputation could pick other ops than the forward did."""
    _, ours = twin_models("ConvNextForImageClassification", num_labels=3, **TINY)
    ours.train()
    ours.gradient_checkpointing_enable()
    seen = []
    for stage in ours.convnext.encoder.stages:
        stage.register_forward_pre_hook(lambda module, args: seen.append(backend.get_backend()))
    x = torch.randn(2, 3, 32, 32)
    default = backend.get_backend()
    assert default != "eager"
    with fastconvnext.use_backend("eager"):
        loss = ours(x, labels=torch.tensor([0, 2])).loss
    assert seen == ["eager"] * 4
    thread, errors = _run_in_thread(loss.backward)
    thread.join(60)
    assert not errors, errors
    assert seen == ["eager"] * 8, "each stage ran twice (forward, recomputation), both under the forward's scope"
    assert all(p.grad is not None for p in ours.parameters())


# ------------------------------------------------------------------------------ drop path under autocast


@pytest.mark.parametrize("layer_scale", [0.5, 0.0])
def test_drop_path_under_bf16_autocast_draws_as_transformers(layer_scale, monkeypatch):
    """transformers draws drop path's numbers in the dtype of gamma * pwconv2(...) (fp32 with layer scale, bf16
    without, under bf16 autocast); drawn in another dtype, the same seed can drop other samples."""
    config = dict(TINY, drop_path_rate=0.5, layer_scale_init_value=layer_scale, num_labels=3)
    hf, ours = twin_models("ConvNextForImageClassification", **config)
    hf.train()
    ours.train()
    x = torch.randn(16, 3, 32, 32)
    draws, rand = [], torch.rand

    def recording_rand(*args, **kwargs):
        draws.append(kwargs.get("dtype"))
        return rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", recording_rand)
    results = []
    for model in (hf, ours):
        draws.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(7)
            logits = model(x).logits.float()
        results.append((list(draws), logits))
    (their_draws, theirs), (our_draws, got) = results
    assert our_draws == their_draws and len(their_draws) == sum(TINY["depths"]) - 1  # the first block: rate 0
    torch.testing.assert_close(got, theirs, atol=5e-2, rtol=5e-2)  # the same drops, bf16 rounding apart
