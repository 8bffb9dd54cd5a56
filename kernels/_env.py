"""Environment switches shared by every kernel module (read on each call, so tests can flip them)."""
import os

AUTOTUNE_ENV = "FASTCONVNEXT_AUTOTUNE"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """One switch for every kernel: FASTCONVNEXT_AUTOTUNE=0 pins each launcher's default config.

    The interpreter never autotunes (it would time every candidate, very slowly)."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"
