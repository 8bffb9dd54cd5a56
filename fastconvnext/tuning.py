"""Measured dispatch: time fused against eager per op and shape on this GPU, keep the faster, remember it.

On first use (the default on CUDA). The first time the `auto` backend meets a policy key (op, channels,
H*W bucket, batch bucket, dtype, grad mode, arch) on a CUDA tensor, `tune_on_first_use` times that very
call both ways: the same inputs for both, warm-up (which also lets Triton compile and autotune), then the
median of CUDA-event timings, forward only or forward and backward as the grad mode says. The faster is
installed into the dispatch policy and merged into the cache file of this GPU; later processes read the file
instead of timing again. FASTCONVNEXT_TUNE=0 opts out: no timing on first use and no cache read at dispatch,
the prior (fastconvnext/prior.json, a MODEL) decides, unless `tune()` is called explicitly.

Where timing is impossible or unsafe the call takes the cached decision, else the prior (a MODEL):
  - inside CUDA-graph capture (`_env.capturing()`): timing would record the runs into the graph;
  - inside torch.compile tracing: the decision is made once per trace, outside the graph (backend.py);
  - short of memory: the runs need room for a second copy of the op's intermediates. Before timing, the free
    memory (torch.cuda.mem_get_info, plus what PyTorch's caching allocator holds unused) is compared with
    MEMORY_HEADROOM times `timing_memory_estimate` (a MODEL of the eager op's extra bytes, plus Triton's
    256 MB autotuning buffer while autotuning is on); a shape that does not fit is not timed in this process.
    An out-of-memory error while timing is caught, what the runs held is released (the traceback first, then
    torch.cuda.empty_cache) and the shape falls back the same way;
  - when the fused kernel itself fails while being timed: a warning with the error, and that shape runs
    eagerly in this process (the failure is not written to the cache).

Under torch.distributed nothing is timed on first use, and the cache file is not read at dispatch time: rank 0
decides, through `tune`. A first-use measurement could only be made the same on every rank with a collective
at the first use of each key, and ranks are not guaranteed to meet the same keys in the same order (the last
batch of an epoch, a rank-dependent branch, evaluation on rank 0 only), so such a collective could deadlock;
and cache files of different nodes may differ. So on first use every rank takes the prior (the same
table on every rank, so the same choice), and a one-time warning says to call `fastconvnext.tune(model,
inputs)` on every rank: that call is collective by contract, rank 0 alone times (and writes its cache), and
its table is broadcast, so every rank installs the same choices.

The first forward of a process that measured reports it on ONE line, through the `fastconvnext.tuning`
logger at WARNING (the codebase's warnings are for problems, and Python's warnings print a source line under
the message; the logger prints exactly one line on stderr through Python's last-resort handler, and an
application can silence it with logging.getLogger("fastconvnext.tuning").setLevel(logging.ERROR)):
    fastconvnext: measured N shapes in T ms on <GPU>; decisions cached in <path>
A model's forward has no end hook in the dispatch, so the measurements are summed, and the line is emitted
at the first CUDA dispatch that comes SUMMARY_DEBOUNCE_S or more after the last measurement ended (in
practice the next forward), or at interpreter exit if none does; once per process.

`tune(model, example_inputs, training=...)` runs the model once to collect the shape of every fused-op
call (as `policy.PolicyKey`s), times each op both ways on those exact inputs (the timer is an argument, so
tests run on CPU with a fake one), installs the faster choice and writes the table to the cache:
    $XDG_CACHE_HOME/fastconvnext (default ~/.cache/fastconvnext)/tuned-policy-<gpu>.json
keyed by GPU name, driver, torch, triton and fastconvnext versions. A file that is missing, not a regular
file (a FIFO or a directory: opened with O_NONBLOCK and fstat'ed, never read), larger than MAX_CACHE_BYTES,
not UTF-8, not JSON (nesting too deep, a number too long included), of another format or written under other
versions is ignored with a warning and the shapes are measured again. Writers merge: under an exclusive
flock on `<cache>.lock` beside the file (waiting at most LOCK_TIMEOUT_S), the file is read again, merged
with the new decisions and replaced atomically (safe_io.write_text_atomically), so concurrent writers keep
each other's entries.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import math
import os
import re
import reprlib
import stat
import statistics
import subprocess
import threading
import time
import warnings
from pathlib import Path

import torch

from fastconvnext import kernels, policy
from fastconvnext.kernels import _env, reference
from fastconvnext.policy import Decision, PolicyKey
from fastconvnext.safe_io import write_text_atomically

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENVIRONMENT_FIELDS = ("gpu", "driver", "torch", "triton", "fastconvnext")
WARMUP, REPEATS = 3, 20
MAX_CACHE_BYTES = 4 << 20  # an entry is ~200 bytes: room for ~20,000 shapes
LOCK_TIMEOUT_S = 10.0
MEMORY_HEADROOM = 2.0  # the estimate is a MODEL: timing needs twice it free
AUTOTUNE_BUFFER_BYTES = 256 * 10**6  # triton.testing.do_bench's L2-flush buffer, allocated while autotuning
SUMMARY_DEBOUNCE_S = 1.0
MAX_KEY_INT = 2**31

first_use_timer = None  # the timer first-use tuning uses (None: event_timer); tests inject a fake one here
clock = time.perf_counter  # the clock the first-run summary reads (tests inject a fake one)
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlong, _short.maxlevel, _short.maxdict = 80, 80, 40, 3, 10


# ------------------------------------------------------------------------------------- environment


def cache_dir():
    base = _env.read(_env.CACHE_HOME_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
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


def _device_identity(index):
    """(GPU name, driver) of CUDA device `index`."""
    return torch.cuda.get_device_name(index), _driver_version(index)


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


_environments = {}  # (device type, index) -> environment(): nvidia-smi is slow, and nothing in it changes


def environment(device=None):
    """What a tuned table is only valid for: the GPU (or "cpu"), its driver, and the library versions."""
    import fastconvnext

    device = torch.device(device) if device is not None else _default_device()
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    if (device.type, index) not in _environments:
        gpu, driver = _device_identity(index) if device.type == "cuda" else (device.type, "none")
        _environments[device.type, index] = {"gpu": gpu, "driver": driver, "torch": torch.__version__,
                                             "triton": _version("triton"), "fastconvnext": fastconvnext.__version__}
    return dict(_environments[device.type, index])


def _default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cache_path(env):
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower() or "device"
    return cache_dir() / f"tuned-policy-{slug}.json"


def lock_path(path):
    """The lock file beside a cache file (kept: removing a lock file others may wait on would void the lock)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


# -------------------------------------------------------------------------------------------- cache


def _entry(key, decision):
    return {**key._asdict(), "fused_us": decision.fused_us, "eager_us": decision.eager_us}


def _positive_number(value):
    """A finite positive int or float (not bool); an int too large for a float is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:
        return False
    return math.isfinite(value) and value > 0


def measured_decision(fused_us, eager_us, where):
    """The faster of the two measured times (a tie keeps eager, the reference)."""
    fused = fused_us < eager_us
    reason = f"measured on {where}: fused {fused_us:,.1f} µs vs eager {eager_us:,.1f} µs -> {'fused' if fused else 'eager'}"
    return Decision(fused, "tuned", reason, fused_us, eager_us)


def _parse_entry(item, gpu):
    fields = PolicyKey._fields + ("fused_us", "eager_us")
    if not isinstance(item, dict) or set(item) != set(fields):
        raise ValueError(f"an entry must have the fields {fields}, got {_short.repr(item)}")
    key = PolicyKey(**{name: item[name] for name in PolicyKey._fields})
    text_fields, int_fields = ("op", "dtype", "mode"), ("arch", "channels", "hw", "batch")
    if not all(isinstance(getattr(key, f), str) and len(getattr(key, f)) <= 32 for f in text_fields) or not all(
            type(getattr(key, f)) is int and 0 <= getattr(key, f) < MAX_KEY_INT for f in int_fields):
        raise ValueError(f"bad field types or values in {_short.repr(item)}")
    if key.op not in policy.OPS or key.mode not in policy.MODES:
        raise ValueError(f"unknown op or mode in {_short.repr(item)}")
    if not (_positive_number(item["fused_us"]) and _positive_number(item["eager_us"])):
        raise ValueError(f"times must be positive numbers, got {_short.repr(item)}")
    return key, measured_decision(float(item["fused_us"]), float(item["eager_us"]), gpu)


class _Unusable(Exception):
    """A cache path that exists but cannot be a cache file (not a regular file, too large)."""


def _file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _read_bounded(path):
    """The bytes of the regular file at `path`, at most MAX_CACHE_BYTES: opened with O_NONBLOCK (a FIFO does not
    block the open) and fstat'ed before any read (a FIFO, a directory or a device is never read)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(path, flags)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable(f"it is {_file_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_CACHE_BYTES:
            raise _Unusable(f"it holds {info.st_size:,} bytes, more than the {MAX_CACHE_BYTES:,} bytes a cache may")
        chunks, size = [], 0
        while size <= MAX_CACHE_BYTES:
            chunk = os.read(descriptor, MAX_CACHE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CACHE_BYTES:  # grew after the fstat
            raise _Unusable(f"it holds more than the {MAX_CACHE_BYTES:,} bytes a cache may")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _decode(data, env):
    """{PolicyKey: Decision} and the stored environment from a cache file's bytes; ValueError when malformed."""
    try:
        data = json.loads(data.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"expected an object with format {CACHE_FORMAT}")
    stored_env, entries = data.get("environment"), data.get("entries")
    if not isinstance(stored_env, dict) or not isinstance(entries, list):
        raise ValueError("expected 'environment' (object) and 'entries' (list)")
    return dict(_parse_entry(item, env["gpu"]) for item in entries), stored_env


def load_cache(env, path=None):
    """{PolicyKey: Decision} from the cache file for `env`; {} when it is missing, unusable, corrupt or stale
    (all but the first with a warning): never an exception, never a blocking read."""
    path = Path(path) if path is not None else cache_path(env)
    try:
        data = _read_bounded(path)
    except FileNotFoundError:
        return {}
    except (OSError, _Unusable) as error:
        warnings.warn(f"fastconvnext: cannot read the tuning cache {path} ({error}); ignoring it, the shapes are "
                      f"measured again", stacklevel=2)
        return {}
    try:
        table, stored_env = _decode(data, env)
    except ValueError as error:
        warnings.warn(f"fastconvnext: ignoring the corrupt tuning cache {path}: {error}", stacklevel=2)
        return {}
    stale = {f: (stored_env.get(f), env[f]) for f in ENVIRONMENT_FIELDS if stored_env.get(f) != env[f]}
    if stale:
        changes = ", ".join(f"{f} {_short.repr(old)} -> {new!r}" for f, (old, new) in stale.items())
        warnings.warn(f"fastconvnext: ignoring the stale tuning cache {path} (tuned under other versions: {changes}); "
                      f"run fastconvnext.tune() again", stacklevel=2)
        return {}
    return table


@contextlib.contextmanager
def _locked(path):
    """An exclusive flock on the lock file beside `path`, waited for at most LOCK_TIMEOUT_S (then OSError).
    Without fcntl, or where the file system refuses flock, writers go unlocked (still atomic, may drop entries)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    name = lock_path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    descriptor = os.open(name, flags, 0o666)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, f"the lock file {name} is not a regular file")
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OSError(errno.ETIMEDOUT, f"another process held the lock {name} for over "
                                                   f"{LOCK_TIMEOUT_S:g} s") from None
                time.sleep(0.01)
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    break  # no flock here: go on unlocked, as safe_io does
                raise
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the flock


def save_cache(env, decisions, path=None):
    """Merge measured decisions into the cache file for `env`: under the lock beside it, read the file again,
    merge, replace it atomically. Returns the path, or None (with a warning) when it cannot be written."""
    path = Path(path) if path is not None else cache_path(env)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unusable old file is replaced, not reported twice
                table = load_cache(env, path)
            table.update(decisions)
            data = {"format": CACHE_FORMAT, "environment": env,
                    "entries": [_entry(key, table[key]) for key in sorted(table, key=lambda k: tuple(map(str, k)))]}
            write_text_atomically(path, json.dumps(data, indent=1))
    except OSError as error:
        warnings.warn(f"fastconvnext: could not write the tuning cache {path}: {error}", stacklevel=2)
        return None
    return path


def cache_report(env=None):
    """{label: text} for `fastconvnext info`: where this GPU's cache is, and each decision in it with its
    measured times. Never raises."""
    if env is None:
        if not torch.cuda.is_available():
            return {"tuning cache": f"{cache_dir()}{os.sep}tuned-policy-<gpu>.json, one per GPU (no CUDA device here)"}
        env = environment()
    path = cache_path(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load_cache(env, path)
    where = "" if path.exists() else ", not written yet"
    report = {"tuning cache": f"{path} ({len(table)} decision{'s' if len(table) != 1 else ''} measured on "
                              f"{env['gpu']}{where})"}
    if caught:
        report["tuning cache problem"] = "; ".join(str(w.message) for w in caught)
    for key in sorted(table, key=lambda k: tuple(map(str, k))):
        decision = table[key]
        report[f"cached {key.label}"] = (f"{decision.choice} (measured: fused {decision.fused_us:,.1f} µs vs "
                                         f"eager {decision.eager_us:,.1f} µs)")
    return report


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


def _seeded_like(out):
    """A fixed pseudo-random gradient shaped like `out`, from a private generator: timing neither reads nor
    advances the caller's RNG (a checkpointed stage replays the RNG it recorded, so it must not move)."""
    generator = torch.Generator(device=out.device)
    generator.manual_seed(0)
    return torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)


def _runner(op, key, call, impl, shared=None):
    """A no-argument function running one op call with `impl` ("triton" or "eager"): forward only, or
    forward and the gradients of every input that required one, as the call's mode says. `shared` (a dict)
    holds the output gradient both implementations' runners use, made on the first run."""
    function = _implementation(op, impl)
    if key.mode == "forward":
        args = tuple(_leaf(value, False) for value, _ in call)

        def run():
            with torch.no_grad():
                return function(*args)

        return run
    args = tuple(_leaf(value, needs_grad) for value, needs_grad in call)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    shared = {} if shared is None else shared

    def run():
        with torch.enable_grad():
            out = function(*args)
            if "grad_out" not in shared:
                shared["grad_out"] = _seeded_like(out.detach())
            return torch.autograd.grad(out, inputs, shared["grad_out"])

    return run


@contextlib.contextmanager
def _own_saved_tensors():
    """Autograd inside the block saves tensors plainly, whatever saved-tensor hooks the caller has on: under a
    non-reentrant checkpoint the caller's hooks would recompute its whole checkpointed region when timing
    unpacks a tensor. A no-op when no hooks are set (the query is private; without it, always override)."""
    query = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    active = True
    if query is not None:
        try:
            active = query(False) is not None
        except (RuntimeError, TypeError):
            active = True
    if not active:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
        yield


def time_call(op, key, call, timer=event_timer, where="this device"):
    """Measure one recorded call both ways, on the same inputs; the Decision keeps the faster."""
    shared = {}
    with _own_saved_tensors():
        fused_us = float(timer(_runner(op, key, call, "triton", shared), key=key, impl="fused"))
        eager_us = float(timer(_runner(op, key, call, "eager", shared), key=key, impl="eager"))
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
    if _env.capturing():
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
_declined = {}  # PolicyKey -> why it is not timed in this process (memory, a failed kernel)
_measuring = threading.Lock()  # one first-use measurement at a time; other threads take the prior meanwhile
_warned_kinds = set()


def _warn_kind_once(kind, message):
    """Warn once per process and kind (not per shape: a model has many)."""
    if kind not in _warned_kinds:
        _warned_kinds.add(kind)
        warnings.warn(f"fastconvnext: {message}", stacklevel=4)


def load_for_device(index):
    """Install the cached table of CUDA device `index` once per process (not under torch.distributed)."""
    if index in _loaded_devices or distributed():
        return
    _loaded_devices.add(index)
    policy.install_tuned(load_cache(environment(torch.device("cuda", index))))


def _free_memory(device):
    """Bytes a new allocation on `device` can use: the driver's free memory plus what PyTorch's caching
    allocator holds unused; None when it cannot be read."""
    try:
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError):
        return None
    return free + max(0, unused)


def _nbytes(value):
    if not (hasattr(value, "shape") and isinstance(getattr(value, "dtype", None), torch.dtype)):
        return 0
    return math.prod(value.shape) * value.dtype.itemsize


def timing_memory_estimate(op, key, call):
    """MODEL (an estimate, not a measurement): bytes timing one call needs beyond what the caller holds, for the
    eager reference (the fused op needs less): its outputs and intermediates (the MLP's hidden activation is
    [N, H, W, fc1 rows]), and in forward_backward its saved tensors, the gradients of every input and the output
    gradient; plus Triton's benchmark buffer while autotuning is on."""
    x = call[0]
    act = _nbytes(x)
    if op in ("convnext_mlp", "convnext_v2_mlp") and len(call) > 2 and hasattr(call[2], "shape"):
        hidden = act // max(1, x.shape[-1]) * call[2].shape[0]
        forward, backward = 2 * hidden + 3 * act, 2 * hidden + 3 * act
    else:
        forward, backward = 3 * act, 4 * act
    total = forward
    if key.mode == "forward_backward":
        total += backward + sum(_nbytes(value) for value in call)
    if not _env.interpreting() and _env.read(_env.AUTOTUNE_ENV):
        total += AUTOTUNE_BUFFER_BYTES
    return total


def _release_memory():
    """Hand what a failed timing left in PyTorch's cache back to the driver."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def tune_on_first_use(op, key, call, timer=None):
    """Measure a shape not yet decided here, now, where that is safe; else the cached decision or the prior
    (the prior) decides. See the module docstring for where it does not time."""
    if _busy or _env.capturing() or torch.compiler.is_compiling() or key in _declined:
        return
    if distributed():
        policy.warn_once("shapes are not measured on first use under torch.distributed (ranks may meet different "
                         "shapes, and each must make the same choice): they use the prior (MODEL) until "
                         "fastconvnext.tune(model, inputs) is called on every rank (rank 0 measures and broadcasts); "
                         "FASTCONVNEXT_TUNE=0 silences this")
        return
    device = call[0].device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        load_for_device(index)
        if key in policy._tuned:
            return
        free, needed = _free_memory(device), MEMORY_HEADROOM * timing_memory_estimate(op, key, call)
        if free is not None and free < needed:
            _declined[key] = "not enough free memory"
            _warn_kind_once("memory", f"not enough free GPU memory to time {key.label} (about {needed / 2**20:,.0f} "
                                      f"MiB wanted, a MODEL estimate; {free / 2**20:,.0f} MiB free): shapes that do "
                                      f"not fit use the cached decision, else the prior (MODEL); "
                                      f"fastconvnext.tune() measures them when memory allows")
            return
    if not _measuring.acquire(blocking=False):
        return  # another thread is measuring: this call takes the cached decision or the prior
    try:
        _measure(op, key, call, device, timer)
    finally:
        _measuring.release()


def _measure(op, key, call, device, timer):
    env = environment(device)
    begin = clock()
    failure = None
    with _no_first_use_tuning():
        try:
            decision = time_call(op, key, _recorded(call), timer or first_use_timer or event_timer, env["gpu"])
        except torch.OutOfMemoryError as error:
            failure = ("oom", f"ran out of memory while timing {key.label} ({str(error).splitlines()[0][:200]})")
        except Exception as error:  # the fused kernel failed: say so, and run that shape eagerly here
            failure = ("failed", f"timing {key.label} failed ({type(error).__name__}: {str(error)[:300]})")
    if failure is not None:  # out of the except block: the traceback, and the tensors its frames held, are gone
        kind, message = failure
        _release_memory()
        _declined[key] = message
        if kind == "oom":
            _warn_kind_once("oom", f"{message}: released what timing held; shapes that cannot be timed use the "
                                   f"cached decision, else the prior (MODEL)")
        else:
            policy.install_tuned({key: Decision(False, "failed", f"{message}; runs eagerly in this process")})
            policy.warn_once(f"{message}; that shape runs eagerly in this process", stacklevel=4)
        return
    elapsed_ms = (clock() - begin) * 1e3
    policy.install_tuned({key: decision})
    _note_measured(elapsed_ms, env["gpu"], save_cache(env, {key: decision}), cache_path(env))


# ------------------------------------------------------------------------------------ first-run line

_summary = {"shapes": 0, "ms": 0.0, "gpus": [], "cached": [], "unwritten": [], "last": None, "done": False}
_atexit_registered = False


def _note_measured(elapsed_ms, gpu, written, path):
    global _atexit_registered
    if _summary["done"]:
        return
    _summary["shapes"] += 1
    _summary["ms"] += elapsed_ms
    for field, value in (("gpus", gpu), ("cached" if written else "unwritten", str(path))):
        if value not in _summary[field]:
            _summary[field].append(value)
    _summary["last"] = clock()
    policy.summary_pending = True
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(flush_summary, True)


def summary_line():
    """The one line that reports this process's first-use measurements (None when nothing was measured)."""
    n = _summary["shapes"]
    if not n:
        return None
    line = f"fastconvnext: measured {n} shape{'s' if n != 1 else ''} in {_summary['ms']:,.0f} ms on " \
           f"{', '.join(_summary['gpus'])}"
    if _summary["cached"]:
        line += f"; decisions cached in {', '.join(_summary['cached'])}"
    if _summary["unwritten"]:
        line += f"; could not write {', '.join(_summary['unwritten'])} (see the warning)"
    return line


def flush_summary(force=False):
    """Emit the first-run line once per process: when SUMMARY_DEBOUNCE_S have passed since the last
    measurement ended (backend calls this on each CUDA dispatch while one is pending), or now with force."""
    if _summary["done"] or not _summary["shapes"]:
        return
    if not force and clock() - _summary["last"] < SUMMARY_DEBOUNCE_S:
        return
    _summary["done"] = True
    policy.summary_pending = False
    logger.warning(summary_line())


def reset():
    """Forget, in this process, which caches were loaded, the shapes declined and the first-run line (tests;
    a fresh policy: with backend.clear_policy(), the next dispatch reads the cache file again)."""
    _loaded_devices.clear()
    _declined.clear()
    _environments.clear()
    _warned_kinds.clear()
    _summary.update(shapes=0, ms=0.0, gpus=[], cached=[], unwritten=[], last=None, done=False)
    policy.summary_pending = False
