"""kernels/_env.py, the one reader of environment flags: every flag's accepted values, a bad value's message,
reads on each call, the TRITON_INTERPRET agreement with Triton, and no other runtime module reading the
environment (or defining its own capturing()/interpreting()) behind its back."""
import ast
import itertools
from pathlib import Path

import pytest

from fastconvnext import backend, policy
from fastconvnext.kernels import _env

ROOT = Path(__file__).resolve().parents[1]
BOOL_FLAGS = [name for name, flag in _env.FLAGS.items() if flag.kind == "bool"]
SPELLINGS = {True: ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " on ", "\ttrue\n"],
             False: ["0", "false", "FALSE", "no", "No", "off", "OFF", " 0 ", "\noff"]}


def _raw_spellings(value):
    return SPELLINGS[value]


def test_the_table_holds_the_runtime_flags_with_their_defaults():
    flags = _env.FLAGS
    assert (flags["FASTCONVNEXT_BACKEND"].kind, flags["FASTCONVNEXT_BACKEND"].default) == ("choice", "auto")
    assert flags["FASTCONVNEXT_BACKEND"].values == ("auto", "triton", "eager") == backend.BACKENDS
    assert (flags["FASTCONVNEXT_TUNE"].kind, flags["FASTCONVNEXT_TUNE"].default) == ("bool", True)
    assert (flags["FASTCONVNEXT_AUTOTUNE"].kind, flags["FASTCONVNEXT_AUTOTUNE"].default) == ("bool", True)
    assert (flags["TRITON_INTERPRET"].kind, flags["TRITON_INTERPRET"].default) == ("bool", False)
    assert all(flag.doc for flag in flags.values())


@pytest.mark.parametrize("name", [n for n in BOOL_FLAGS if n != "TRITON_INTERPRET"])
@pytest.mark.parametrize("value", [True, False])
def test_booleans_accept_every_spelling_in_any_case_with_whitespace(name, value):
    for raw in _raw_spellings(value):
        assert _env.parse(name, raw) is value, raw


@pytest.mark.parametrize("name", BOOL_FLAGS)
def test_unset_or_empty_booleans_take_the_default(name):
    default = _env.FLAGS[name].default
    for raw in (None, "", "   ", "\n"):
        assert _env.parse(name, raw) is default


@pytest.mark.parametrize("name", BOOL_FLAGS)
@pytest.mark.parametrize("raw", ["2", "maybe", "y", "n", "enable", "1.0", "-1", "tru e", "0x1"])
def test_a_bad_boolean_names_the_flag_the_values_and_what_was_given(name, raw):
    default = "on" if _env.FLAGS[name].default else "off"
    with pytest.raises(ValueError) as caught:
        _env.parse(name, raw)
    assert str(caught.value) == (f"{name} must be one of ('1', '0', 'true', 'false', 'yes', 'no', 'on', 'off'), "
                                 f"got {raw!r} (any case; unset or empty: {default})")


def test_the_backend_choice_accepts_its_names_in_any_case():
    for raw, expected in [("auto", "auto"), (" Triton ", "triton"), ("EAGER", "eager"), ("", "auto"), (None, "auto")]:
        assert _env.parse("FASTCONVNEXT_BACKEND", raw) == expected
    with pytest.raises(ValueError) as caught:
        _env.parse("FASTCONVNEXT_BACKEND", "fused")
    assert str(caught.value) == ("FASTCONVNEXT_BACKEND must be one of ('auto', 'triton', 'eager'), got 'fused' (set in "
                                 "the environment; unset it or call fastconvnext.set_backend())")


def test_a_bad_backend_is_kept_for_the_first_dispatch_not_raised_at_import(monkeypatch):
    monkeypatch.setenv("FASTCONVNEXT_BACKEND", "fused")
    name, error = policy._backend_from_env()
    assert name == "auto" and error.startswith("FASTCONVNEXT_BACKEND must be one of") and "'fused'" in error
    monkeypatch.setenv("FASTCONVNEXT_BACKEND", " EAGER")
    assert policy._backend_from_env() == ("eager", None)


def test_the_pixel_limit_is_a_positive_integer():
    name = "FASTCONVNEXT_MAX_IMAGE_PIXELS"
    assert _env.parse(name, None) == _env.parse(name, " ") == 178_956_970
    assert _env.parse(name, " 1000 ") == 1000
    for raw in ("0", "-5", "1e6", "12.5", "lots", "١٢", "9" * 400):
        with pytest.raises(ValueError) as caught:
            _env.parse(name, raw)
        assert str(caught.value) == f"{name} must be a positive integer (pixels), got {raw!r}"


def test_directories_are_taken_as_given_and_xdg_ignores_relative_paths():
    assert _env.parse("FASTCONVNEXT_SASS_CACHE", "rel/dir") == "rel/dir"
    assert _env.parse("FASTCONVNEXT_SASS_CACHE", "") is None
    assert _env.parse("XDG_CACHE_HOME", "/tmp/x ") == "/tmp/x "
    assert _env.parse("XDG_CACHE_HOME", "relative/cache") is None  # the XDG rule: a relative path is invalid
    assert _env.parse("XDG_CACHE_HOME", None) is None


def test_flags_are_read_on_each_call(monkeypatch):
    for raw, expected in [("off", False), ("yes", True), ("FALSE", False), ("", True)]:
        monkeypatch.setenv("FASTCONVNEXT_TUNE", raw)
        assert _env.read("FASTCONVNEXT_TUNE") is expected
        assert backend._tune_on_first_use() is expected
    monkeypatch.setenv("FASTCONVNEXT_TUNE", "bogus")
    with pytest.raises(ValueError, match="FASTCONVNEXT_TUNE must be one of .* got 'bogus'"):
        backend._tune_on_first_use()
    assert _env.error("FASTCONVNEXT_TUNE").startswith("FASTCONVNEXT_TUNE must be one of")
    monkeypatch.delenv("FASTCONVNEXT_TUNE")
    assert _env.error("FASTCONVNEXT_TUNE") is None


def test_autotune_false_off_and_no_turn_autotuning_off(monkeypatch):
    """The bug this parser fixes: FASTCONVNEXT_AUTOTUNE=false used to leave autotuning on."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_env, "capturing", lambda: False)
    for raw in ("false", "off", "no", "0", "OFF"):
        monkeypatch.setenv("FASTCONVNEXT_AUTOTUNE", raw)
        assert _env.autotune_enabled() is False, raw
    for raw in ("true", "on", "yes", "1", ""):
        monkeypatch.setenv("FASTCONVNEXT_AUTOTUNE", raw)
        assert _env.autotune_enabled() is True, raw
    monkeypatch.setenv("FASTCONVNEXT_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="FASTCONVNEXT_AUTOTUNE must be one of"):
        _env.autotune_enabled()


def test_tune_off_no_false_turn_first_use_tuning_off(monkeypatch):
    """The bug this parser fixes: FASTCONVNEXT_TUNE=false/off/no used to turn tuning ON."""
    for raw in ("false", "off", "no", "0"):
        monkeypatch.setenv("FASTCONVNEXT_TUNE", raw)
        assert backend._tune_on_first_use() is False, raw


# ------------------------------------------------------------------------------------ TRITON_INTERPRET


def test_triton_interpret_agrees_with_triton_or_is_refused(monkeypatch):
    from triton import knobs

    monkeypatch.setattr(_env, "_triton_reads", {})
    words = ["1", "0", "", "true", "TRUE", "on", "yes", "false", "off", "no", " 1", "1 ", " true", "ON "]
    disagreements = []
    for raw in words:
        monkeypatch.setenv("TRITON_INTERPRET", raw)
        triton_reads = bool(knobs.runtime.interpret)
        ours = _env.parse("TRITON_INTERPRET", raw)
        if ours == triton_reads:
            assert _env.interpreting() is ours, raw
        else:  # " 1": stripped here, not by Triton 3.9; a disagreement is refused, never guessed
            disagreements.append(raw)
            with pytest.raises(ValueError) as caught:
                _env.interpreting()
            assert str(caught.value).startswith(f"TRITON_INTERPRET={raw!r} reads as {'on' if ours else 'off'} here "
                                                f"but Triton ")
            assert str(caught.value).endswith(f"reads it as {'on' if triton_reads else 'off'}; set it to 1 or 0 so "
                                              f"both agree")
    # Triton 3.9 reads " 1" as off; older releases strip it (then every word agrees and none is refused)
    assert disagreements or triton_version_reads_padded_words(knobs), "no disagreement where one was expected"


def triton_version_reads_padded_words(knobs):
    import os

    os.environ["TRITON_INTERPRET"] = " 1"
    return bool(knobs.runtime.interpret)


def test_triton_interpret_bad_value_and_the_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "bogus")
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET must be one of .* got 'bogus' \(any case; unset or empty: off\)"):
        backend._kernels_usable("cpu")
    report = backend.describe()  # `fastconvnext info` still runs and says why
    assert "TRITON_INTERPRET must be one of" in report["dwconv_layernorm [cpu]"]
    assert report["env TRITON_INTERPRET"].startswith("invalid: TRITON_INTERPRET must be one of")
    monkeypatch.setenv("TRITON_INTERPRET", "on")
    assert backend._kernels_usable("cpu") == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    assert backend._kernels_usable("cpu")[0] is False


def test_report_never_raises_and_shows_each_flag(monkeypatch):
    monkeypatch.setenv("FASTCONVNEXT_TUNE", "maybe")
    monkeypatch.setenv("FASTCONVNEXT_AUTOTUNE", "off")
    report = _env.report()
    assert set(report) == set(_env.FLAGS)
    assert report["FASTCONVNEXT_TUNE"].startswith("invalid: FASTCONVNEXT_TUNE must be one of")
    assert report["FASTCONVNEXT_AUTOTUNE"] == "off (set to 'off'; default on)"
    described = backend.describe()
    assert described["tuning"].startswith("invalid (FASTCONVNEXT_TUNE must be one of")


# ----------------------------------------------------------------------------- nobody else reads the env

# Files outside this change's reach that still read the environment directly (their owners switch them to
# _env.read); the test fails on any other runtime file that does.
STILL_DIRECT = {
    "fastconvnext/cli.py",  # `info` shows FASTCONVNEXT_BACKEND and TRITON_INTERPRET as set
    "fastconvnext/image_processing.py",  # FASTCONVNEXT_MAX_IMAGE_PIXELS (in FLAGS)
    "fastconvnext/tooling/bench/suite.py",  # FASTCONVNEXT_BENCH_* (benchmark harness settings)
    "fastconvnext/tooling/bench/memory.py",  # copies the environment for a child process
    "fastconvnext/tooling/compile_check.py",  # sets TRITON_CACHE_DIR for its compiles
    "fastconvnext/tooling/calibrate.py",  # sets TRITON_INTERPRET for --dry-run before Triton loads
}
OWN_HELPERS = {"capturing", "_capturing", "interpreting", "_interpreting"}


def _runtime_files():
    return sorted(itertools.chain((ROOT / "fastconvnext").rglob("*.py"), (ROOT / "kernels").glob("*.py")))


def _environment_reads(tree):
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb", "getenvb") and \
                isinstance(node.value, ast.Name) and node.value.id == "os":
            reads.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ("environ", "getenv") for alias in node.names):
            reads.append(node.lineno)
    return sorted(reads)


def test_only_kernels_env_reads_the_environment_in_runtime_code():
    readers, helpers = {}, {}
    for path in _runtime_files():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if relative != "kernels/_env.py":
            lines = _environment_reads(tree)
            if lines:
                readers[relative] = lines
            defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in OWN_HELPERS]
            if defined:
                helpers[relative] = defined
    assert set(readers) <= STILL_DIRECT, {k: v for k, v in readers.items() if k not in STILL_DIRECT}
    assert not helpers, helpers
    for mine in ("fastconvnext/backend.py", "fastconvnext/policy.py", "fastconvnext/tuning.py"):
        assert mine not in readers


def test_the_scan_finds_a_direct_read():
    tree = ast.parse("import os\nx = os.environ.get('A')\ny = os.getenv('B')\nfrom os import environ\n")
    assert _environment_reads(tree) == [2, 3, 4]
