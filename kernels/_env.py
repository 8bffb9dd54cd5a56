"""The one reader of fastconvnext's environment flags, and the runtime states every module asks about.

The kernels sit below the model package, so the parser lives here; `fastconvnext.policy`, `.backend` and
`.tuning` import it as `fastconvnext.kernels._env`. Every flag is in FLAGS with its kind, default and the
values it accepts, and is parsed one way:

  bool    1/0, true/false, yes/no, on/off: any case, surrounding whitespace ignored; unset or empty: the default.
  choice  one of the listed names: any case, surrounding whitespace ignored; unset or empty: the default.
  count   a positive integer in ASCII digits (surrounding whitespace ignored); unset or empty: the default.
  dir     a directory, taken as given; unset or empty: the default (None here: the caller's documented one).
  xdg_dir as dir, but a relative path is ignored as unset (the XDG Base Directory rule).

Anything else is a ValueError naming the flag, the accepted values and the value given. `read(name)` reads
the environment on every call, so tests (and users) can flip a flag between calls; where a module reads one
once instead, it says why (FASTCONVNEXT_BACKEND: read at import in fastconvnext.policy, where set_backend()
overrides it and the error is deferred to the first dispatch so `fastconvnext info` still runs).

TRITON_INTERPRET is Triton's flag: Triton reads it itself when a kernel module is imported (@triton.jit makes
an interpreted function or a compiled one). A value fastconvnext and the installed Triton would read differently
(" 1": on here, off for Triton; "y": on for Triton 3.9, not a value here) is refused, so the dispatch never
sends CPU tensors to compiled kernels or CUDA tensors to the interpreter.
"""
from __future__ import annotations

import os
import re
import sys
from typing import NamedTuple

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOL_WORDS = ("1", "0", "true", "false", "yes", "no", "on", "off")

BACKEND_ENV = "FASTCONVNEXT_BACKEND"
TUNE_ENV = "FASTCONVNEXT_TUNE"
AUTOTUNE_ENV = "FASTCONVNEXT_AUTOTUNE"
INTERPRET_ENV = "TRITON_INTERPRET"
CACHE_HOME_ENV = "XDG_CACHE_HOME"
MAX_PIXELS_ENV = "FASTCONVNEXT_MAX_IMAGE_PIXELS"
SASS_CACHE_ENV = "FASTCONVNEXT_SASS_CACHE"


class Flag(NamedTuple):
    """One environment flag: name, kind (see the module docstring), default, the values it accepts (the
    choices, the boolean words, or a description), what it does, and a hint appended to a bad value's error."""

    name: str
    kind: str
    default: object
    values: tuple
    doc: str
    hint: str = ""


FLAGS = {flag.name: flag for flag in (
    Flag(BACKEND_ENV, "choice", "auto", ("auto", "triton", "eager"),
         "which implementation the fused ops use: auto (per shape, the faster), triton (always the kernels) or "
         "eager (always PyTorch). Read once, at import; set_backend() overrides it",
         " (set in the environment; unset it or call fastconvnext.set_backend())"),
    Flag(TUNE_ENV, "bool", True, BOOL_WORDS,
         "on CUDA, `auto` times fused against eager the first time it meets a shape and caches the faster; "
         "0: never time on first use and ignore the cache, the prior (MODEL) decides "
         "(fastconvnext.tune() still measures when called)"),
    Flag(AUTOTUNE_ENV, "bool", True, BOOL_WORDS,
         "Triton autotuning of each kernel launch; 0: every launcher's default config (fewer compiles)"),
    Flag(INTERPRET_ENV, "bool", False, BOOL_WORDS,
         "Triton's: run the kernels in Triton's CPU interpreter (Triton reads it when a kernel module is "
         "imported); a value the installed Triton reads differently is refused"),
    Flag(CACHE_HOME_ENV, "xdg_dir", None, ("an absolute directory",),
         "the user cache directory; the tuning cache is $XDG_CACHE_HOME/fastconvnext (default ~/.cache)"),
    Flag(MAX_PIXELS_ENV, "count", 178_956_970, ("a positive integer (pixels)",),
         "the largest image, decoded or resized, in pixels (default: Pillow's bomb threshold)"),
    Flag(SASS_CACHE_ENV, "dir", None, ("a directory",),
         "where fastconvnext/tooling/sass_report.py caches compiled SASS (default ~/.cache/fastconvnext/sass)"),
)}

_COUNT = re.compile(r"[0-9]{1,18}")


def _bad(flag, raw):
    values = flag.values if flag.kind in ("bool", "choice") else flag.values[0]
    default = _default_text(flag)
    ending = f" (any case; unset or empty: {default})" if flag.kind == "bool" else ""
    return ValueError(f"{flag.name} must be {'one of ' if flag.kind in ('bool', 'choice') else ''}{values}, "
                      f"got {raw!r}{flag.hint or ending}")


def _default_text(flag):
    if flag.kind == "bool":
        return "on" if flag.default else "off"
    return "the default" if flag.default is None else repr(flag.default)


def parse(name, raw):
    """The value of flag `name` for the environment text `raw` (None: unset); ValueError for a bad value."""
    flag = FLAGS[name]
    if raw is None:
        return flag.default
    if flag.kind in ("dir", "xdg_dir"):
        if raw == "" or (flag.kind == "xdg_dir" and not os.path.isabs(raw)):
            return flag.default
        return raw
    text = raw.strip()
    if not text:
        return flag.default
    if flag.kind == "bool":
        word = text.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    elif flag.kind == "choice":
        if text.lower() in flag.values:
            return text.lower()
    elif flag.kind == "count":
        if _COUNT.fullmatch(text) and int(text) > 0:
            return int(text)
    else:
        raise AssertionError(f"unknown flag kind {flag.kind!r}")
    raise _bad(flag, raw)


def read(name):
    """Flag `name` as the environment holds it now (see parse)."""
    raw = os.environ.get(name)
    value = parse(name, raw)
    if name == INTERPRET_ENV:
        _agree_with_triton(raw, value)
    return value


def error(name):
    """The ValueError message a read of `name` would raise now, or None (for reports that must not raise)."""
    try:
        read(name)
    except ValueError as err:
        return str(err)
    return None


def report():
    """{name: how it is set and what that means here}, for `fastconvnext info`; never raises."""
    lines = {}
    for name, flag in FLAGS.items():
        raw = os.environ.get(name)
        try:
            value = read(name)
        except ValueError as err:
            lines[name] = f"invalid: {err}"
            continue
        if flag.kind == "bool":
            value = "on" if value else "off"
        shown = "unset" if raw is None else f"set to {raw!r}"
        if value is None:
            lines[name] = f"the default ({shown})"
        else:
            lines[name] = f"{value} ({shown}; default {_default_text(flag)})"
    return lines


# Raw values on which every supported Triton (getenv_bool: "1"/"true"/"on" and, since 3.9, "yes"/"y" are on,
# anything else off, nothing stripped) and this parser agree without asking Triton.
_TRITON_AGREES = {"", "0", "1"}
_triton_reads = {}  # raw value -> Triton's reading (False, True) or None when Triton cannot be asked


def _agree_with_triton(raw, ours):
    if raw is None or raw in _TRITON_AGREES:
        return
    if raw not in _triton_reads:
        _triton_reads[raw] = _ask_triton()
    theirs = _triton_reads[raw]
    if theirs is not None and theirs != ours:
        version = getattr(sys.modules.get("triton"), "__version__", "?")
        raise ValueError(f"{INTERPRET_ENV}={raw!r} reads as {'on' if ours else 'off'} here but Triton {version} "
                         f"reads it as {'on' if theirs else 'off'}; set it to 1 or 0 so both agree")


def _ask_triton():
    """How the installed Triton reads TRITON_INTERPRET now; None without Triton or its knobs."""
    try:
        from triton import knobs
    except ImportError:
        return None
    try:
        return bool(knobs.runtime.interpret)
    except Exception:  # a Triton whose knobs differ: it cannot be asked, our reading stands
        return None


# ------------------------------------------------------------------------------------------ runtime states


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET), read on each call."""
    return read(INTERPRET_ENV)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (False without CUDA). Nothing that must not be
    recorded into a graph (timing, autotuning, host synchronisation) may run while it is."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autotune_enabled() -> bool:
    """One switch for every kernel: FASTCONVNEXT_AUTOTUNE=0 pins each launcher's default config.

    The interpreter never autotunes (it would time every candidate, very slowly), and neither does a
    launch inside CUDA-graph capture: timing candidates there would record them into the graph, so a
    captured launch takes the launcher's default config (same reduction order, so the same bits)."""
    return not interpreting() and read(AUTOTUNE_ENV) and not capturing()
