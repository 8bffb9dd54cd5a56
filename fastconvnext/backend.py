"""The one place that decides, per call, whether an op runs as a fused Triton kernel or as eager PyTorch.

`auto` (default): on CUDA tensors, per (op, channels, H*W bucket, batch bucket, dtype, grad mode, GPU
  arch), whichever of fused and eager is faster HERE: the first time a shape is met it is timed both ways on
  the call's own inputs and the faster is kept and cached per GPU, driver and versions (fastconvnext.tuning;
  FASTCONVNEXT_TUNE=0 opts out). Where it cannot be timed (CUDA-graph capture, torch.compile tracing,
  torch.distributed, too little free memory) the cached decision applies, else the prior: the performance
  model's predictions shipped as data (fastconvnext/prior.json, a MODEL: fused against the eager estimate), else
  eager. Eager ops on every other device.
`triton`: always the kernels; on CPU tensors that needs TRITON_INTERPRET=1 (Triton's interpreter).
`eager`: always the eager references from `fastconvnext.kernels.reference`.
Set with `set_backend(...)` or the environment variable FASTCONVNEXT_BACKEND (read at import; a bad value
is reported when an op is first dispatched or `get_backend()` is called, so `fastconvnext info` still runs):
the process-wide default. `with use_backend(...)` overrides it in the current thread only, for the block.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
from pathlib import Path

import torch

from fastconvnext import policy
from fastconvnext.kernels import _env, _op_support, reference
from fastconvnext.policy import (  # noqa: F401  (the public names are also fastconvnext.backend's)
    BACKENDS, CPU_ARCH, ENV_VAR, MODES, OPS, Decision, PolicyKey, active_backend, clear_policy, configured_backend,
    get_backend, install_tuned, scoped_backend, set_backend, tuned_decisions, use_backend,
)

TUNE_ENV_VAR = _env.TUNE_ENV
DTYPE_NAMES = _op_support.DTYPE_NAMES
# The model leaves out effects (launch gaps, cache behaviour) worth a few percent: a modelled win smaller than
# that is no win, and the policy keeps eager.
MODEL_WIN_FACTOR = 0.95
PRIOR_PATH = Path(__file__).with_name("prior.json")
PRIOR_KEY_COLUMNS = ("op", "arch", "dtype", "channels", "hw", "batch", "mode")
_triton_importable = importlib.util.find_spec("triton") is not None
_tuned, _decisions = policy._tuned, policy._decisions  # the same dicts: PolicyKey -> Decision
_UNSET = object()
_predicted_override = _UNSET


def _kernels_usable(device_type):
    """Whether the Triton kernels can run on tensors of this device type; the reason when not."""
    if not _triton_importable:
        return False, "triton is not installed"
    problem = _triton_release_problem()
    if problem is not None:
        return False, problem
    if device_type == "cuda" or (device_type == "cpu" and _env.interpreting()):
        return True, ""
    if device_type == "cpu":
        return False, "CPU tensors run the kernels only in Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"no Triton kernels for {device_type} tensors"


def _triton_release_problem():
    """Why the installed Triton cannot run the kernels (too old), or None: auto then runs eager, a forced
    'triton' backend raises with this reason, instead of an ImportError deep in the first fused call."""
    from fastconvnext.kernels import _triton_compat

    return _triton_compat.support_problem()


def _choose(op, x, channels, tensors, unsupported_reason=None, call=None):
    """Return True for the fused kernel, False for eager, raising if `triton` is forced and impossible.

    `call` (the op's arguments) lets `auto` time a shape on its first use."""
    policy.raise_env_error()
    if policy.recorder is not None and call is not None and unsupported_reason is None:
        policy.recorder(op, policy_key(op, x, channels, tensors), call)
    active = policy.active_backend()
    if active == "eager":
        return False
    if active == "auto":  # CUDA only, so TRITON_INTERPRET is not read for the CPU tensors auto runs eagerly
        return (x.device.type == "cuda" and unsupported_reason is None and _kernels_usable("cuda")[0]
                and _auto_prefers_fused(op, x, channels, tensors, call))
    usable, why = _kernels_usable(x.device.type)
    if not usable:
        raise RuntimeError(f"backend 'triton' is forced but cannot run here: {why}")
    if unsupported_reason is not None:
        policy.warn_once(f"{unsupported_reason}; that op runs eagerly", stacklevel=4)  # points at the op's caller
        return False
    return True


def _auto_prefers_fused(op, x, channels, tensors, call):
    """The auto policy for a CUDA call: a shape not decided by a measurement yet is timed first (unless
    FASTCONVNEXT_TUNE=0, or tuning declines: see fastconvnext.tuning). Under torch.compile tracing nothing is
    timed, and neither the flag nor the pending first-run line is read (a traced read would become a guard)."""
    if call is not None and not torch.compiler.is_compiling():
        key = policy_key(op, x, channels, tensors)
        if key not in _tuned and _tune_on_first_use():
            _tune_call(op, key, call)
        if policy.summary_pending:
            _flush_summary()
    index = x.device.index if x.device.index is not None else -1
    return _prefers_fused(op, index, *_call_shape(x, channels, tensors))


# ------------------------------------------------------------------------------------------- policy


def bucket(n):
    """The power of two at or above n. Written as comparisons so torch.compile guards on the bucket
    (a symbolic size becomes a constant per bucket) instead of failing on int()."""
    b = 1
    while n > b:
        b *= 2
    return b


def _mode(tensors):
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "forward_backward" if needs_grad else "forward"


def _compute_dtype(x):
    """Under autocast both ops compute an fp32 input in the autocast dtype, so that dtype's times apply."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _call_shape(x, channels, tensors):
    """(dtype, channels, hw bucket, batch bucket, mode) of a call: traced to constants by torch.compile."""
    dtype = DTYPE_NAMES.get(_compute_dtype(x), str(x.dtype).replace("torch.", ""))
    return dtype, channels, bucket(x.shape[1] * x.shape[2]), bucket(x.shape[0]), _mode((x, *tensors))


def policy_key(op, x, channels, tensors=(), arch=None):
    """The PolicyKey of one call: x is [N, H, W, C]; channels from the weights (static under compile)."""
    if arch is None:
        arch = device_arch(x.device.index) if x.device.type == "cuda" else CPU_ARCH
    return PolicyKey(op, arch, *_call_shape(x, channels, tensors))


_arch_cache = {}


def device_arch(index=None):
    """Compute capability of a CUDA device as an int (sm_90 -> 90)."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _arch_cache:
        major, minor = torch.cuda.get_device_capability(index)
        _arch_cache[index] = 10 * major + minor
    return _arch_cache[index]


@contextlib.contextmanager
def use_predicted_table(table):
    """Decide from this dict {(op, arch, dtype, channels, hw, batch, mode): {"fused_us", "eager_us"}} (None: no
    prior) instead of the shipped prior (fastconvnext/prior.json)."""
    global _predicted_override
    previous = _predicted_override
    _predicted_override = table
    _decisions.clear()
    try:
        yield
    finally:
        _predicted_override = previous
        _decisions.clear()


def _predicted_table():
    if _predicted_override is not _UNSET:
        return _predicted_override
    return _shipped_prior()


@functools.lru_cache(maxsize=1)
def _shipped_prior():
    """fastconvnext/prior.json as {key: {"fused_us", "eager_us"}}; None (with one warning) when absent or malformed:
    a damaged data file must not stop dispatch."""
    try:
        return read_prior(PRIOR_PATH)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        policy.warn_once(f"{PRIOR_PATH} does not load ({type(error).__name__}: {error}); auto falls back to eager "
                         f"where it cannot measure")
        return None


def read_prior(path):
    """The prior's rows keyed as PolicyKey fields; raises ValueError naming what is wrong in a malformed file."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = document["columns"]
    missing = [c for c in (*PRIOR_KEY_COLUMNS, "fused_us", "eager_us") if c not in columns]
    if missing:
        raise ValueError(f"prior columns lack {missing}; has {columns}")
    where = {name: columns.index(name) for name in (*PRIOR_KEY_COLUMNS, "fused_us", "eager_us")}
    table = {}
    for row in document["rows"]:
        if len(row) != len(columns):
            raise ValueError(f"a prior row has {len(row)} values for {len(columns)} columns: {row!r}")
        key = tuple(row[where[c]] for c in PRIOR_KEY_COLUMNS)
        fused, eager = float(row[where["fused_us"]]), float(row[where["eager_us"]])
        if not (fused > 0 and eager > 0 and math.isfinite(fused) and math.isfinite(eager)):
            raise ValueError(f"prior times must be positive and finite, got {row!r}")
        table[key] = {"fused_us": fused, "eager_us": eager}
    return table


def _nearest(values, target):
    """The value closest to target on a log scale (ties: the smaller)."""
    return min(values, key=lambda v: (abs(math.log(v / target)), v))


def _nearest_arch(arch, known):
    """A known arch of the same generation (sm_86 -> sm_80), the closest at or below it first; else None."""
    same = [a for a in known if a // 10 == arch // 10]
    if not same:
        return None
    below = [a for a in same if a <= arch]
    return max(below) if below else min(same)


def _compare(fused_us, eager_us, source, where):
    fused = fused_us < MODEL_WIN_FACTOR * eager_us
    verdict = "fused" if fused else "eager"
    reason = (f"{where}: fused {fused_us:,.1f} µs vs eager {eager_us:,.1f} µs (MODEL) -> {verdict}")
    return Decision(fused, source, reason, fused_us, eager_us)


def model_decision(key, table):
    """The decision of a PREDICTED table at the nearest arch, C, H*W and batch; None when it has no point."""
    op, arch, dtype, channels, hw, batch, mode = key
    points = [k for k in table if k[0] == op and k[2] == dtype and k[6] == mode]
    near_arch = _nearest_arch(arch, {k[1] for k in points})
    if near_arch is None:
        return None
    points = [k for k in points if k[1] == near_arch]
    c = _nearest({k[3] for k in points}, channels)
    points = [k for k in points if k[3] == c]
    near_hw = _nearest({k[4] for k in points}, hw)
    points = [k for k in points if k[4] == near_hw]
    n = _nearest({k[5] for k in points}, batch)
    entry = table[(op, near_arch, dtype, c, near_hw, n, mode)]
    where = f"prior (MODEL) at sm_{near_arch} C={c} H*W={near_hw} N={n}, fused vs the eager estimate"
    return _compare(float(entry["fused_us"]), float(entry["eager_us"]), "model", where)


def static_decision(key):
    """The default policy: the prior's prediction at the nearest point, else eager with the reason."""
    if key.dtype not in DTYPE_NAMES.values():
        return Decision(False, "none", f"no fused kernel for {key.dtype}")
    table = _predicted_table()
    if table:
        try:
            decision = model_decision(key, table)
        except (KeyError, TypeError, ValueError, IndexError) as error:  # a malformed override
            policy.warn_once(f"the prior has a malformed entry ({type(error).__name__}: {error}); using eager")
            decision = None
        if decision is not None:
            return decision
    arch = "CPU" if key.arch == CPU_ARCH else f"sm_{key.arch}"
    return Decision(False, "none", f"no prior for {arch} (modelled: sm_80, sm_90); fastconvnext.tune() measures "
                                   f"this GPU")


def decide(key):
    """The policy's Decision for a PolicyKey: measured (this process, or the cache of the current GPU) if it
    was, else the prior: the static policy."""
    key = PolicyKey(*key)
    decision = _decisions.get(key)
    if decision is None:
        if key.arch != CPU_ARCH:
            _load_tuned_cache()
        decision = _tuned.get(key) or static_decision(key)
        _decisions[key] = decision
    return decision


def _load_tuned_cache(index=None):
    """The decisions cached for CUDA device `index` (None: the current one), read once per process and device
    (tuning.load_for_device); not with FASTCONVNEXT_TUNE=0 (the prior alone) nor under torch.distributed."""
    if not torch.cuda.is_available() or not _tune_on_first_use():
        return
    from fastconvnext import tuning

    tuning.load_for_device(torch.cuda.current_device() if index is None else index)


@torch.compiler.assume_constant_result
def _prefers_fused(op, device_index, dtype, channels, hw, batch, mode):
    """decide(...).fused for a call on CUDA device `device_index` (-1: the current one); under torch.compile
    evaluated once per trace, outside the graph (all arguments are constants), so reading the device's
    arch, the prior or the tuning cache never breaks the graph."""
    index = None if device_index < 0 else device_index
    key = PolicyKey(op, device_arch(index), dtype, channels, hw, batch, mode)
    if key not in _decisions:
        _load_tuned_cache(index)
    return decide(key).fused


def policy_table(keys=None):
    """Rows (key label, choice, source, fused µs, eager µs, reason) for the given keys, by default every
    shape tuned or dispatched so far in this process; the bench report and `fastconvnext info` print it."""
    if keys is None:
        keys = sorted(set(_tuned) | set(_decisions), key=lambda k: tuple(map(str, k)))
    rows = []
    for key in keys:
        d = decide(key)
        rows.append((PolicyKey(*key).label, d.choice, d.source,
                     None if d.fused_us is None else round(d.fused_us, 1),
                     None if d.eager_us is None else round(d.eager_us, 1), d.reason))
    return rows


POLICY_HEADERS = ("shape", "choice", "source", "fused µs", "eager µs", "why")


def format_policy_table(keys=None):
    """policy_table() as aligned text, for the bench report (keys default to default_report_keys()).
    µs from "tuned" rows are measurements on this GPU; from "model" rows, the prior's MODEL predictions."""
    rows = [tuple("" if v is None else str(v) for v in row)
            for row in policy_table(default_report_keys() if keys is None else keys)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(POLICY_HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(POLICY_HEADERS, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def stage_keys(arch, dtype="bf16", batch=64, channels=(96, 192, 384, 768), sizes=(56, 28, 14, 7)):
    """PolicyKeys of every op (ConvNeXt's two, ConvNeXt V2's MLP) at ConvNeXt-T's four stage shapes (ConvNeXt V2-T's
    too), forward and forward_backward."""
    return [PolicyKey(op, arch, dtype, c, bucket(s * s), bucket(batch), mode)
            for c, s in zip(channels, sizes) for op in OPS for mode in MODES]


# ------------------------------------------------------------------------------ tuning on first use


def _tune_on_first_use():
    """FASTCONVNEXT_TUNE, read on each call (default on; a bad value raises ValueError naming it)."""
    return _env.read(TUNE_ENV_VAR)


def _tune_call(op, key, call):
    """Time this call's shape now, unless that cannot be done safely here (fastconvnext.tuning decides)."""
    from fastconvnext import tuning

    tuning.tune_on_first_use(op, key, call)


def _flush_summary():
    from fastconvnext import tuning

    tuning.flush_summary()


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
    call = (x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    if _choose("dwconv_layernorm", x, dw_weight.shape[0], call[1:5], _dwconv_unsupported(dw_weight), call):
        from fastconvnext.kernels import dwconv_layernorm as fused

        return fused(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    layout = cpu_dwconv_layout(x, dw_weight.shape[0], call[1:5])
    if reference.cpu_training_paths_apply(x):
        return reference.dwconv_layernorm_cpu_training(*call, layout)
    return reference.dwconv_layernorm_reference(x, dw_weight, dw_bias, ln_weight, ln_bias, eps, layout)


# The eager depthwise conv's layout on CPU, measured (benchmarks/cpu_dwconv_layout.py, fp32, torch 2.13, one
# thread, Xeon, 2 cores): the channels-last view was faster at every ConvNeXt-T stage shape in inference
# (1.5-5x) and in training (1.6-4.5x; stage 3 at one image even), except training at wide stages on few
# positions, where torch's channels-last conv backward costs a near-fixed 10-15 ms: at 768 channels and 49-147
# positions (N*H*W) an NCHW copy was 1.8-5x faster, at 196 even or faster; from 392 channels-last was even or
# faster again; at 384 channels it never lost. Two threads on a machine loaded 4x over: medians unreadable
# (intervals spanning 1), fastest of 25 runs each NCHW 4.8x / 3.4x / 1.7x at batch 2 / 4 / 8 (benchmarks/README.md).
CPU_NCHW_DWCONV_MIN_CHANNELS = 768
CPU_NCHW_DWCONV_MAX_POSITIONS = 196


def cpu_dwconv_layout(x, channels, tensors=()):
    """"nchw" or "channels_last" (reference.DWCONV_LAYOUTS) for an eager dwconv+LayerNorm call on x [N, H, W, C]:
    NCHW for fp32 CPU calls that record gradients (no autocast) with at least CPU_NCHW_DWCONV_MIN_CHANNELS
    channels on at most CPU_NCHW_DWCONV_MAX_POSITIONS positions; channels-last otherwise (and on other devices)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return "channels_last"
    if _mode((x, *tensors)) != "forward_backward":
        return "channels_last"
    positions = x.shape[0] * x.shape[1] * x.shape[2]
    wide_and_small = channels >= CPU_NCHW_DWCONV_MIN_CHANNELS and positions <= CPU_NCHW_DWCONV_MAX_POSITIONS
    return "nchw" if wide_and_small else "channels_last"


def convnext_mlp(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=None, act="gelu", sample_scale=None):
    """residual + sample_scale[n] * gamma * MLP(x), x and residual as [N, H, W, C]."""
    call = (x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale)
    if _choose("convnext_mlp", x, fc1_weight.shape[1], call[1:7], _mlp_unsupported(act), call):
        from fastconvnext.kernels import convnext_mlp as fused

        return fused(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale)
    if reference.onednn_mlp_available(x, act, sample_scale):
        return reference.convnext_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act)
    if reference.cpu_training_paths_apply(x):
        return reference.convnext_mlp_cpu_training(*call)
    return reference.convnext_mlp_reference(
        x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, act, sample_scale
    )


def convnext_v2_mlp(x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act="gelu",
                    sample_scale=None):
    """residual + sample_scale[n] * (GRN(act(x W1^T + b1)) W2^T + b2): ConvNeXt V2's MLP, x and residual [N, H, W, C].

    `auto` on CUDA times it against the eager reference at first use and, where it cannot time, decides from the cache,
    else the prior, as for the V1 ops."""
    call = (x, residual, fc1_weight, fc1_bias, grn_weight, grn_bias, fc2_weight, fc2_bias, act, sample_scale)
    if _choose("convnext_v2_mlp", x, fc1_weight.shape[1], call[1:8], _mlp_unsupported(act), call):
        from fastconvnext.kernels import convnext_v2_mlp as fused

        return fused(*call)
    if reference.onednn_mlp_available(x, act, sample_scale) and not torch.is_autocast_enabled("cpu"):
        return reference.convnext_v2_mlp_cpu_inference(*call[:9])
    return reference.convnext_v2_mlp_reference(*call)


def describe():
    """Which implementation each op would use now, for CUDA and for CPU tensors, the environment flags, whether
    shapes are measured on first use, where this GPU's tuning cache is and the decisions measured in it, and
    the auto policy's table (shown by `fastconvnext info`). Never raises: a bad FASTCONVNEXT_BACKEND (or any
    other bad flag) is reported here."""
    report = {}
    backend_name, env_error = configured_backend()
    if env_error is not None:
        report[f"{ENV_VAR} error"] = env_error
    for device_type in ("cuda", "cpu"):
        try:
            usable, why = _kernels_usable(device_type)
        except ValueError as error:  # a bad TRITON_INTERPRET
            usable, why = False, str(error)
        if backend_name == "eager":
            choice = "eager PyTorch (backend forced to 'eager')"
        elif usable and device_type == "cuda" and backend_name == "auto":
            choice = "per shape, the faster of fused Triton kernel and eager PyTorch (policy below)"
        elif usable and (device_type == "cuda" or backend_name == "triton"):
            mode = " in Triton's interpreter" if device_type == "cpu" else ""
            choice = f"fused Triton kernel{mode}"
        elif backend_name == "triton":
            choice = f"error: backend 'triton' forced but {why}"
        else:
            choice = f"eager PyTorch ({why or 'auto picks eager on CPU'})"
        for op in OPS:
            report[f"{op} [{device_type}]"] = choice
    report["convnext_mlp activations fused"] = ", ".join(reference.FUSED_ACTS)
    if torch.backends.mkldnn.is_available():
        report["convnext_mlp eager, fp32 CPU inference"] = "oneDNN linear with fused bias+act / layer scale+residual"
        report["convnext_mlp eager, fp32 CPU training"] = "oneDNN linears (forward and input gradient)"
    report.update(_tuning_report())
    try:
        report.update(_policy_report())
    except ValueError as error:  # a bad FASTCONVNEXT_TUNE, read when the policy looks for the cache
        report["policy"] = f"unavailable: {error}"
    return report


def _tuning_report():
    """The flags as read now, whether `auto` measures on first use, and this GPU's tuning cache."""
    from fastconvnext import tuning

    report = {f"env {name}": text for name, text in _env.report().items()}
    try:
        tune = _tune_on_first_use()
    except ValueError as error:
        report["tuning"] = f"invalid ({error})"
        return report
    if tune:
        report["tuning"] = ("on first use: on CUDA, auto times fused against eager the first time it meets a shape "
                            "(median of CUDA-event runs, forward or forward+backward as called), keeps the faster "
                            "and caches it; inside CUDA-graph capture or torch.compile tracing, under "
                            "torch.distributed (call fastconvnext.tune() on every rank) or short of memory, the "
                            "cached decision, else the prior (MODEL, fastconvnext/prior.json), decides. "
                            "FASTCONVNEXT_TUNE=0 turns it off")
    else:
        report["tuning"] = (f"off ({TUNE_ENV_VAR}=0): the prior (MODEL) decides, unless fastconvnext.tune() "
                            f"measured the shape in this process; the cache is not read")
    try:
        report.update(tuning.cache_report())
    except Exception as error:  # a report must not fail on a GPU it cannot query
        report["tuning cache"] = f"unavailable ({type(error).__name__}: {error})"
    return report


def default_report_keys():
    """The shapes the policy report shows: those tuned or dispatched so far, else ConvNeXt-T's stage shapes
    (bf16, batch 64) on this GPU's arch (sm_90 without a GPU)."""
    keys = sorted(set(_tuned) | set(_decisions), key=lambda k: tuple(map(str, k)))
    if keys:
        return keys
    arch = device_arch() if torch.cuda.is_available() else 90
    return stage_keys(arch)


def _policy_report():
    report = {}
    for label, choice, source, fused_us, eager_us, reason in policy_table(default_report_keys()):
        report[f"policy {label}"] = f"{choice} ({source}: {reason})"
    return report
