"""Measured dispatch: time fused against eager per op and shape on this GPU, keep the faster, remember it.

`tune(model, example_inputs, training=...)` runs the model once to collect the shape of every fused-op
call (as `policy.PolicyKey`s), times each op both ways on those exact inputs (CUDA events by default;
the timer is an argument so tests run on CPU with a fake one), installs the faster choice into the
backend's policy and writes the table to the user's cache directory:
    $XDG_CACHE_HOME/fastconvnext (default ~/.cache/fastconvnext)/tuned-policy-<gpu>.json
keyed by GPU name, driver, torch, triton and fastconvnext versions. A later process on the same GPU and
versions reads it on its first CUDA dispatch; a corrupt file, or one written under other versions, is
ignored with a warning. Writes are atomic (a temp file in the same directory, then a rename).

FASTCONVNEXT_TUNE=1 tunes each shape on its first use instead (outside torch.compile tracing and
CUDA-graph capture, where the untuned shape takes the default policy).

Under torch.distributed every rank calls `tune` (collectively): all ranks run the collecting forward,
rank 0 alone times and writes the cache, and its table is broadcast, so every rank makes the same choice.
For the same reason the cache file is not read at dispatch time under torch.distributed, and
FASTCONVNEXT_TUNE=1 does not tune there (a warning says to call `tune` on every rank).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch

from fastconvnext import kernels, policy
from fastconvnext.kernels import reference
from fastconvnext.policy import Decision, PolicyKey
from fastconvnext.safe_io import write_text_atomically

CACHE_FORMAT = 1
ENVIRONMENT_FIELDS = ("gpu", "driver", "torch", "triton", "fastconvnext")
WARMUP, REPEATS = 3, 20


# ------------------------------------------------------------------------------------- environment


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastconvnext"


def _driver_version(index):
    """The driver release (nvidia-smi) and the CUDA API version it supports, as far as they can be read."""
    parts = []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(index)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            parts.append(done.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    query = getattr(torch._C, "_cuda_getDriverVersion", None)  # present in CUDA builds of torch
    if query is not None:
        with contextlib.suppress(RuntimeError):
            version = query()
            parts.append(f"CUDA {version // 1000}.{version % 1000 // 10}")
    return " / ".join(parts) or "unknown"


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device=None):
    """What a tuned table is only valid for: the GPU (or "cpu"), its driver, and the library versions."""
    import fastconvnext

    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu, driver = torch.cuda.get_device_name(index), _driver_version(index)
    else:
        gpu, driver = device.type, "none"
    return {"gpu": gpu, "driver": driver, "torch": torch.__version__, "triton": _version("triton"),
            "fastconvnext": fastconvnext.__version__}


def _default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cache_path(env):
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower() or "device"
    return cache_dir() / f"tuned-policy-{slug}.json"


# -------------------------------------------------------------------------------------------- cache


def _entry(key, decision):
    return {**key._asdict(), "fused_us": decision.fused_us, "eager_us": decision.eager_us}


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def measured_decision(fused_us, eager_us, where):
    """The faster of the two measured times (a tie keeps eager, the reference)."""
    fused = fused_us < eager_us
    reason = f"measured on {where}: fused {fused_us:,.1f} µs vs eager {eager_us:,.1f} µs -> {'fused' if fused else 'eager'}"
    return Decision(fused, "tuned", reason, fused_us, eager_us)


def _parse_entry(item, gpu):
    if not isinstance(item, dict) or set(item) != set(PolicyKey._fields) | {"fused_us", "eager_us"}:
        raise ValueError(f"an entry must have the fields {PolicyKey._fields + ('fused_us', 'eager_us')}, got {item!r}")
    key = PolicyKey(**{name: item[name] for name in PolicyKey._fields})
    text_fields, int_fields = ("op", "dtype", "mode"), ("arch", "channels", "hw", "batch")
    if not all(isinstance(getattr(key, f), str) for f in text_fields) or not all(
            isinstance(getattr(key, f), int) and not isinstance(getattr(key, f), bool) for f in int_fields):
        raise ValueError(f"bad field types in {item!r}")
    if key.op not in policy.OPS or key.mode not in policy.MODES:
        raise ValueError(f"unknown op or mode in {item!r}")
    if not (_positive_number(item["fused_us"]) and _positive_number(item["eager_us"])):
        raise ValueError(f"times must be positive numbers, got {item!r}")
    return key, measured_decision(float(item["fused_us"]), float(item["eager_us"]), gpu)


def load_cache(env, path=None):
    """{PolicyKey: Decision} from the cache file for `env`; {} when it is missing, corrupt or stale
    (the last two with a warning)."""
    path = Path(path) if path is not None else cache_path(env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as error:
        warnings.warn(f"fastconvnext: cannot read the tuning cache {path} ({error}); ignoring it", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"expected an object with format {CACHE_FORMAT}")
        stored_env, entries = data.get("environment"), data.get("entries")
        if not isinstance(stored_env, dict) or not isinstance(entries, list):
            raise ValueError("expected 'environment' (object) and 'entries' (list)")
        table = dict(_parse_entry(item, env["gpu"]) for item in entries)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"fastconvnext: ignoring the corrupt tuning cache {path}: {error}", stacklevel=2)
        return {}
    stale = {f: (stored_env.get(f), env[f]) for f in ENVIRONMENT_FIELDS if stored_env.get(f) != env[f]}
    if stale:
        changes = ", ".join(f"{f} {old!r} -> {new!r}" for f, (old, new) in stale.items())
        warnings.warn(f"fastconvnext: ignoring the stale tuning cache {path} (tuned under other versions: {changes}); "
                      f"run fastconvnext.tune() again", stacklevel=2)
        return {}
    return table


def save_cache(env, decisions, path=None):
    """Merge measured decisions into the cache file for `env`, atomically; returns the path, or None
    (with a warning) when the cache directory is not writable."""
    path = Path(path) if path is not None else cache_path(env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable old file is replaced, not reported twice
        table = load_cache(env, path)
    table.update(decisions)
    data = {"format": CACHE_FORMAT, "environment": env,
            "entries": [_entry(key, table[key]) for key in sorted(table, key=lambda k: tuple(map(str, k)))]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(data, indent=1))
    except OSError as error:
        warnings.warn(f"fastconvnext: could not write the tuning cache {path}: {error}", stacklevel=2)
        return None
    return path


# -------------------------------------------------------------------------------------------- timing


def event_timer(run, key=None, impl=None, warmup=WARMUP, repeats=REPEATS):
    """Median µs of `run()`: CUDA events on a GPU (after warm-up, which also lets Triton compile and
    autotune), perf_counter on CPU."""
    for _ in range(warmup):
        run()
    if key is not None and key.arch != policy.CPU_ARCH:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def _leaf(value, needs_grad):
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(needs_grad and value.is_floating_point())


def _implementation(op, impl):
    """The function behind one op: "triton", the fused kernel; "eager", the eager reference (what the
    backend runs on CUDA tensors when it picks eager)."""
    if impl == "eager":
        return getattr(reference, f"{op}_reference")
    return getattr(kernels, op)


def _runner(op, key, call, impl):
    """A no-argument function running one op call with `impl` ("triton" or "eager"): forward only, or
    forward and the gradients of every input that required one, as the call's mode says."""
    function = _implementation(op, impl)
    if key.mode == "forward":
        args = tuple(_leaf(value, False) for value, _ in call)

        def run():
            with torch.no_grad():
                return function(*args)

        return run
    args = tuple(_leaf(value, needs_grad) for value, needs_grad in call)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(_implementation(op, "eager")(*args))

    def run():
        with torch.enable_grad():
            return torch.autograd.grad(function(*args), inputs, grad_out)

    return run


def time_call(op, key, call, timer=event_timer, where="this device"):
    """Measure one recorded call both ways; the Decision keeps the faster."""
    fused_us = float(timer(_runner(op, key, call, "triton"), key=key, impl="fused"))
    eager_us = float(timer(_runner(op, key, call, "eager"), key=key, impl="eager"))
    for name, value in (("fused", fused_us), ("eager", eager_us)):
        if not _positive_number(value):
            raise ValueError(f"the timer must return a positive time in µs, got {value!r} for {name} {key.label}")
    return measured_decision(fused_us, eager_us, where)


# ------------------------------------------------------------------------------------------ collect


def _recorded(call):
    """A call's arguments kept for timing: tensors detached, each with whether it required grad."""
    return tuple((value.detach(), value.requires_grad) if isinstance(value, torch.Tensor) else (value, False)
                 for value in call)


@contextlib.contextmanager
def _collecting():
    calls = {}

    def record(op, key, call):
        if key not in calls:
            calls[key] = (op, _recorded(call))

    previous = policy.recorder
    policy.recorder = record
    try:
        yield calls
    finally:
        policy.recorder = previous


def _as_args(example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
                    f"inputs, got {type(example_inputs).__name__}")


def collect_calls(model, example_inputs, training):
    """{PolicyKey: (op, recorded call)} of every fused-op call one forward of `model` makes."""
    args, kwargs = _as_args(example_inputs)
    grad_mode = torch.enable_grad() if training else torch.no_grad()
    with _collecting() as calls, grad_mode, _no_first_use_tuning():
        model(*args, **kwargs)
    return calls


_busy = False


@contextlib.contextmanager
def _no_first_use_tuning():
    global _busy
    previous, _busy = _busy, True
    try:
        yield
    finally:
        _busy = previous


# ------------------------------------------------------------------------------------------- public


def distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _rank():
    import torch.distributed as dist

    return dist.get_rank() if distributed() else 0


def _broadcast(table):
    """Rank 0's {PolicyKey: Decision} on every rank."""
    import torch.distributed as dist

    payload = [[(tuple(k), d.fused_us, d.eager_us, d.reason) for k, d in table.items()] if dist.get_rank() == 0
               else None]
    dist.broadcast_object_list(payload, src=0)
    return {PolicyKey(*k): Decision(fused_us < eager_us, "tuned", reason, fused_us, eager_us)
            for k, fused_us, eager_us, reason in payload[0]}


def tune(model, example_inputs, training=False, timer=None, cache=True, retune=False):
    """Time fused against eager for every fused-op shape `model` meets on `example_inputs`, keep the faster.

    training: tune the training pass (forward + backward) instead of inference. timer: `timer(run, key=,
    impl=) -> µs` (default: CUDA events, median of 20 after 3 warm-ups). cache: read and write the
    table in the user's cache directory (shapes already there are not timed again unless retune).
    Returns {PolicyKey: Decision} for the model's shapes, installed into the dispatch policy.
    Under torch.distributed, call it on every rank: rank 0 times and its table is broadcast."""
    if capturing():
        raise RuntimeError("fastconvnext.tune() cannot run inside CUDA-graph capture: tune before capturing")
    if torch.compiler.is_compiling():
        raise RuntimeError("fastconvnext.tune() cannot run inside torch.compile: tune the eager model first")
    timer = timer or event_timer
    module = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    calls = collect_calls(module, example_inputs, training)
    table = {}
    if _rank() == 0:
        table = _time_calls(calls, timer, cache, retune)
    if distributed():
        table = _broadcast(table)
    policy.install_tuned(table)
    return table


def _time_calls(calls, timer, cache, retune):
    env = environment(_device_of(calls))
    known = load_cache(env) if cache and not retune else {}
    table = {key: known[key] for key in calls if key in known}
    measured = {key: time_call(op, key, call, timer, env["gpu"])
                for key, (op, call) in calls.items() if key not in table}
    if cache and measured:
        save_cache(env, measured)
    table.update(measured)
    return table


def _device_of(calls):
    for _, call in calls.values():
        return call[0][0].device
    return _default_device()


# ------------------------------------------------------------------------------ dispatch-time hooks

_loaded_devices = set()


def load_for_device(index):
    """Install the cached table of CUDA device `index` once per process (not under torch.distributed)."""
    if index in _loaded_devices or distributed():
        return
    _loaded_devices.add(index)
    policy.install_tuned(load_cache(environment(torch.device("cuda", index))))


def tune_on_first_use(op, key, call, timer=None):
    """FASTCONVNEXT_TUNE=1: measure an untuned shape now, where that is safe; else leave it to the default."""
    if _busy or capturing():
        return
    if distributed():
        policy.warn_once("FASTCONVNEXT_TUNE=1 does not tune under torch.distributed (every rank must make the same "
                           "choice): call fastconvnext.tune(model, inputs) on every rank before training")
        return
    device = call[0].device
    if device.type == "cuda":
        load_for_device(device.index if device.index is not None else torch.cuda.current_device())
        if key in policy.tuned_decisions():
            return
    env = environment(device)
    with _no_first_use_tuning():
        decision = time_call(op, key, _recorded(call), timer or event_timer, env["gpu"])
    policy.install_tuned({key: decision})
    save_cache(env, {key: decision})
