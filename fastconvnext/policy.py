"""The dispatch policy's vocabulary and state, below both `fastconvnext.backend` (which decides) and
`fastconvnext.tuning` (which measures): the backend in force (a process-wide default, and per thread the
innermost use_backend() scope's), the key a decision depends on, decisions, the table of measured decisions
and the hook through which tuning records a model's calls."""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import NamedTuple

from fastconvnext.kernels import _env

ENV_VAR = _env.BACKEND_ENV
BACKENDS = _env.FLAGS[ENV_VAR].values  # ("auto", "triton", "eager")
# every op the dispatch decides and times; the prior (fastconvnext/prior.json) models each
OPS = ("dwconv_layernorm", "convnext_mlp", "convnext_v2_mlp")
MODES = ("forward", "forward_backward")
CPU_ARCH = 0  # the arch recorded for CPU tensors (tuning in Triton's interpreter, tests)


def _checked(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _backend_from_env():
    """(backend, error message or None): a bad value keeps 'auto' and is reported on first use.

    Read once, at import (not per call like the other flags): the environment gives the process-wide default,
    which set_backend() then replaces; the error waits for the first dispatch or get_backend() so that
    `fastconvnext info` (backend.describe) still runs and reports it."""
    try:
        return _env.read(ENV_VAR), None
    except ValueError as error:
        return "auto", str(error)


class _ThreadBackend(threading.local):
    """Per thread: the backend of the innermost use_backend() scope, None outside any (as torch keeps its
    grad and dispatch modes per thread). A threading.local rather than a ContextVar: torch.compile traces
    its reads (and guards on them), where ContextVar.get breaks the graph."""

    name = None


default_backend, _env_error = _backend_from_env()  # process-wide: set_backend() and FASTCONVNEXT_BACKEND
_thread = _ThreadBackend()
_warned = set()


def active_backend():
    """The backend in force in this thread: its innermost use_backend() scope's, else the process-wide default."""
    name = _thread.name
    return default_backend if name is None else name


def scoped_backend():
    """This thread's use_backend() backend, or None outside any scope (the process default applies)."""
    return _thread.name


def raise_env_error():
    """Raise the FASTCONVNEXT_BACKEND error, unless set_backend() or this thread's use_backend() overrides it."""
    if _env_error is not None and _thread.name is None:
        raise ValueError(_env_error)


def set_backend(name):
    """Choose the process-wide implementation of the fused ops: "auto", "triton" or "eager" (overrides the env
    var). A thread inside a use_backend() scope keeps that scope's backend until the scope ends."""
    global default_backend, _env_error
    default_backend = _checked(name, "backend")
    _env_error = None


def get_backend():
    """The backend in force in this thread; raises ValueError if FASTCONVNEXT_BACKEND holds an unknown name
    (and neither set_backend() nor a use_backend() scope overrides it)."""
    raise_env_error()
    return active_backend()


def configured_backend():
    """(backend, error or None) without raising: for reports such as `fastconvnext info`."""
    if _thread.name is not None:
        return _thread.name, None
    return default_backend, _env_error


@contextlib.contextmanager
def use_backend(name):
    """Run with another backend inside the `with` block, in this thread only: other threads keep theirs, and
    the process-wide default (set_backend) is untouched. Scopes nest; each restores the one it found."""
    name = _checked(name, "backend")
    previous = _thread.name
    _thread.name = name
    try:
        yield
    finally:
        _thread.name = previous


def warn_once(message, stacklevel=3):
    """Warn with this message once per process; stacklevel counts frames from here (2: warn_once's caller)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"fastconvnext: {message}", stacklevel=stacklevel)



class PolicyKey(NamedTuple):
    """What a decision depends on, in the order of the prior's key columns; hw = H*W and
    batch = N rounded up to a power of two, arch the compute capability (90 for sm_90, 0 for CPU).
    A tuple, so torch.compile traces it as constants."""

    op: str
    arch: int
    dtype: str
    channels: int
    hw: int
    batch: int
    mode: str

    @property
    def label(self):
        arch = "cpu" if self.arch == CPU_ARCH else f"sm_{self.arch}"
        return f"{self.op} C={self.channels} H*W<={self.hw} N<={self.batch} {self.dtype} {self.mode} {arch}"


@dataclass(frozen=True)
class Decision:
    """fused or eager, where the choice came from ("tuned": measured here; "model": the prior, fastconvnext/prior.json;
    "none": nothing to go on; "failed": timing the shape on first use failed, so it runs eagerly in this process),
    why, and the times behind it (µs; measured for "tuned", the MODEL's prediction for "model")."""

    fused: bool
    source: str
    reason: str
    fused_us: float | None = None
    eager_us: float | None = None

    @property
    def choice(self):
        return "fused" if self.fused else "eager"


_tuned = {}  # PolicyKey -> Decision, measured by fastconvnext.tuning
_decisions = {}  # PolicyKey -> Decision, every lookup so far
recorder = None  # set by fastconvnext.tuning while it collects a model's calls: recorder(op, PolicyKey, call)
summary_pending = False  # set by fastconvnext.tuning while its first-run line waits to be emitted (backend asks)


def install_tuned(decisions):
    """Add measured decisions {PolicyKey: Decision} (fastconvnext.tuning); they win over any model."""
    _tuned.update(decisions)
    for key in decisions:
        _decisions.pop(key, None)


def tuned_decisions():
    return dict(_tuned)


def clear_policy(tuned=True):
    """Forget cached lookups (and, by default, the tuned decisions)."""
    _decisions.clear()
    if tuned:
        _tuned.clear()
