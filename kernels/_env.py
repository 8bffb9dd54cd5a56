"""Environment switches shared by every kernel module (read on each call, so tests can flip them)."""
import os

AUTOTUNE_ENV = "FASTCONVNEXT_AUTOTUNE"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """One switch for every kernel: FASTCONVNEXT_AUTOTUNE=0 pins each launcher's default config.

    The interpreter never autotunes (it would time every candidate, very slowly), and neither does a
    launch inside CUDA-graph capture: timing candidates there would record them into the graph, so a
    captured launch takes the launcher's default config (same reduction order, so the same bits)."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0" and not _capturing()


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
