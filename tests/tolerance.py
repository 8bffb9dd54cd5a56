"""CONTRIBUTING's tolerance rule: R the reference (fp32; float64 where the op's dtype is fp32), E the eager op in
the op's dtype, F fastconvnext's result. Require max|F - R| <= 2 * max|E - R| + atol(dtype); gradients likewise.
"""
import contextlib
import copy
from unittest import mock

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def max_abs_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(fused, eager, reference, dtype, what="output"):
    assert fused.shape == reference.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(reference.shape)}"
    err_fused = max_abs_diff(fused, reference)
    err_eager = max_abs_diff(eager, reference)
    bound = 2 * err_eager + ATOL[dtype]
    assert err_fused <= bound, (
        f"{what} ({dtype}): max|F-R| = {err_fused:.3e} exceeds 2*max|E-R| + atol = {bound:.3e}"
    )


# A whole fastconvnext model in fp32 against transformers' (the oracle): E is transformers' model in fp32, R a float64
# copy of it. A flat atol on F - E would be a lottery: both sides round differently on every CPU (ATen's vectorised
# paths and oneDNN's kernels differ by ISA), and deep stacks without layer scale amplify it past 1e-5.


def float64_twin(model):
    """R's model: a float64 copy of transformers' model (same weights, same mode)."""
    return copy.deepcopy(model).double()


def as_float64(value):
    """The float64 twin's inputs: floating tensors cast, everything else (integer labels, flags) as given."""
    return value.double() if torch.is_tensor(value) and value.is_floating_point() else value


@contextlib.contextmanager
def random_draws_as_in_float32():
    """torch.rand in float64 consumes the generator differently from float32; drop path's masks in the float64 twin
    are drawn in float32 (then widened), so under the same seed it drops the samples the fp32 runs drop."""
    rand = torch.rand

    def rand_in_float32(*size, dtype=None, **kwargs):
        if dtype == torch.float64:
            return rand(*size, dtype=torch.float32, **kwargs).double()
        return rand(*size, dtype=dtype, **kwargs)

    with mock.patch.object(torch, "rand", rand_in_float32):
        yield


def assert_fp32_within_rule(got, eager, reference, what):
    """fastconvnext's fp32 result against transformers' in fp32 (E) and float64 (R), by the rule."""
    assert got.shape == eager.shape, f"{what}: shape {tuple(got.shape)} != {tuple(eager.shape)}"
    assert got.dtype == eager.dtype == torch.float32, f"{what}: dtypes {got.dtype}, {eager.dtype}, expected float32"
    assert reference.dtype == torch.float64, f"{what}: the reference must be float64, got {reference.dtype}"
    assert_within_rule(got, eager, reference, torch.float32, what)


def assert_grads_within_rule(ours, eager, reference, what="grad of"):
    """Every parameter gradient of fastconvnext's model against transformers' fp32 and float64 models, by name."""
    theirs, exact = dict(eager.named_parameters()), dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert_fp32_within_rule(param.grad, theirs[name].grad, exact[name].grad, f"{what} {name}")


def three_runs(ours, hf, x, **kwargs):
    """fastconvnext's output (F), transformers' in fp32 (E) and transformers' float64 twin's (R)."""
    reference = float64_twin(hf)(as_float64(x), **{k: as_float64(v) for k, v in kwargs.items()})
    return ours(x, **kwargs), hf(x, **kwargs), reference


def assert_each_within_rule(got, eager, reference, what):
    """Sequences of results (hidden states, feature maps), element by element."""
    assert len(got) == len(eager) == len(reference), f"{what}: lengths {len(got)}, {len(eager)}, {len(reference)}"
    for i, (f, e, r) in enumerate(zip(got, eager, reference)):
        assert_fp32_within_rule(f, e, r, f"{what}[{i}]")


def assert_sequences_within_rule(got, eager, reference, what):
    """assert_each_within_rule, and each of fastconvnext's results contiguous, as its outputs are (patched
    transformers models return transformers' own permuted views: use assert_each_within_rule there)."""
    assert_each_within_rule(got, eager, reference, what)
    assert all(f.is_contiguous() for f in got), f"{what}: not contiguous"


def float64_twin_keeping_low_precision(model):
    """float64_twin for models holding some tensors in a lower precision on purpose (xIELU's alpha_p/alpha_n/beta/eps
    in bf16, as transformers builds them): only the fp32 tensors become float64, so R computes what E computes
    (softplus of a bf16 alpha rounds in bf16 in both) without E's fp32 rounding."""
    return copy.deepcopy(model)._apply(lambda t: t.double() if t.dtype == torch.float32 else t)


def assert_grads_within_rule_of_their_dtypes(ours, eager, reference, what="grad of"):
    """assert_grads_within_rule for models whose parameters are not all fp32 (R from
    float64_twin_keeping_low_precision): fp32 gradients as there, the others by the rule of their own dtype."""
    theirs, exact = dict(eager.named_parameters()), dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        if param.dtype == torch.float32:
            assert_fp32_within_rule(param.grad, theirs[name].grad, exact[name].grad, f"{what} {name}")
        else:
            dtypes = param.grad.dtype, theirs[name].grad.dtype, exact[name].grad.dtype
            assert dtypes == (param.dtype,) * 3, f"{what} {name}: gradient dtypes {dtypes}"
            assert_within_rule(param.grad, theirs[name].grad, exact[name].grad, param.dtype, f"{what} {name}")


def assert_classifier_step_within_rule(ours, hf, x, labels):
    """A classifier's logits, loss and every parameter gradient of that loss against transformers' by the rule."""
    hf64 = float64_twin(hf)
    got, expected, reference = ours(x, labels=labels), hf(x, labels=labels), hf64(x.double(), labels=labels)
    for field in ("logits", "loss"):
        assert_fp32_within_rule(got[field], expected[field], reference[field], field)
    for out in (got, expected, reference):
        out.loss.backward()
    assert_grads_within_rule(ours, hf, hf64)
