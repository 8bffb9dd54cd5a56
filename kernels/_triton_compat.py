"""Every Triton-version-gated piece of fastconvnext.kernels, in one place.

Supported: Triton 3.4 to 3.9 (MIN_TRITON). The kernels are written against Triton 3.9 (torch 2.13's pin) and
tuned there; what older releases need lives here and nowhere else:

- `approx_div(x, y)`: fp32 x / y as PTX `div.approx.f32`. Triton 3.9 spells it `tl.fdiv(x, y, approx=True)`; 3.4-3.8
  have no `approx` argument, so natively the same instruction comes from inline PTX, and in their interpreter
  (which cannot run PTX) from a plain fp32 division, which is what 3.9's interpreter computes for the approx divide.
- The interpreter on Triton < 3.7 turns a runtime integer into a Python int with `int(array of shape (1,))`, which
  numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so `range(n)` over a
  kernel argument fails. `_patch_interpreter_index` gives its tensors the `__index__` Triton 3.7 has
  (`int(data.squeeze())`); interpreter-only, and applied only where the installed pair needs it.
- `ast_source` / `compile_for_arch`: how compile_check and sass_report build a kernel for sm_<arch> without a GPU.
- `config_choice`: the launch-config choices that depend on the Triton release (its register allocation differs),
  so that no release gets a config that spills on it; compile_targets lists what the running release picks.

Why 3.4 is the floor (`MIN_TRITON`, `FLOOR_REASON`): Triton 3.3's code generator refuses a chained boolean
operator (`a and b and c`: "chained boolean operators (A or B or C) are not supported", UnsupportedLanguageConstruct),
which `_mlp_bwd_dx_kernel` uses in a constexpr (TWO_PIECES); 3.4 accepts it. Triton 3.2 has no tuple values in
its compiler (the dwconv kernels carry their sliding windows in tuples), spells ASTSource's constexprs `constants=`
and takes an AttrsDescriptor for the attrs.
"""
from __future__ import annotations

import re
from typing import Optional

import triton
import triton.language as tl

from ._env import interpreting

MIN_TRITON = (3, 4)
# tl.fdiv(..., approx=True) (PTX div.approx.f32) exists from this release on
APPROX_FDIV_SINCE = (3, 9)
# the interpreter's tensor.__index__ squeezes its one-element array (works with numpy >= 2.4) from this release on
INTERPRETER_INDEX_FIXED_SINCE = (3, 7)
FLOOR_REASON = ("Triton 3.3's code generator refuses chained boolean operators (`a and b and c`), which the MLP "
                "backward kernel uses; 3.2 also has no tuple values in kernels, which the dwconv kernels use")


def parse_version(text: str) -> tuple:
    """(major, minor, patch) of a version string such as "3.6.0", "3.4.0+git1234" or "3.7.0rc1"."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        raise ValueError(f"cannot read a Triton version from {text!r}")
    return tuple(int(part or 0) for part in match.groups())


TRITON_VERSION = parse_version(triton.__version__)


def _text(version: tuple) -> str:
    return ".".join(str(part) for part in version)


def support_problem(version: Optional[tuple] = None) -> Optional[str]:
    """Why the kernels cannot run on this Triton release (None where they can)."""
    version = TRITON_VERSION if version is None else version
    if tuple(version[:2]) >= MIN_TRITON:
        return None
    return (f"fastconvnext.kernels needs Triton >= {_text(MIN_TRITON)}, but triton {_text(version)} is installed "
            f"({FLOOR_REASON}); install a newer Triton (pip install 'triton>={_text(MIN_TRITON)}') or run the eager "
            f"ops (fastconvnext.set_backend('eager'))")


def require_supported(version: Optional[tuple] = None) -> None:
    """Raise ImportError naming the installed and the required Triton release where the kernels cannot run."""
    problem = support_problem(version)
    if problem is not None:
        raise ImportError(problem)


# ------------------------------------------------------------------------------------ approximate divide


@triton.jit
def _approx_div_fdiv(x, y):
    # Triton >= 3.9: div.approx.f32 natively; the interpreter divides in fp32
    return tl.fdiv(x, y, approx=True)


@triton.jit
def _approx_div_ptx(x, y):
    # Triton < 3.9, compiled: the instruction 3.9's tl.fdiv(approx=True) emits, as inline PTX (fp32 operands, as
    # there; the asm broadcasts a scalar x)
    tl.static_assert(y.dtype == tl.float32, "approx_div: fp32 operands")
    return tl.inline_asm_elementwise("div.approx.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _approx_div_plain(x, y):
    # Triton < 3.9, interpreter: an fp32 division, as 3.9's interpreter computes the approx divide
    return x / y


def approx_div_helper(version: Optional[tuple] = None, interpreter: Optional[bool] = None):
    """The @triton.jit approx-divide helper for a Triton release and mode (defaults: the installed one, and
    whether TRITON_INTERPRET is set now; a kernel module binds it once, when its @triton.jit functions are made)."""
    version = TRITON_VERSION if version is None else version
    interpreter = interpreting() if interpreter is None else interpreter
    if tuple(version[:2]) >= APPROX_FDIV_SINCE:
        return _approx_div_fdiv
    return _approx_div_plain if interpreter else _approx_div_ptx


approx_div = approx_div_helper()


# ------------------------------------------------------------------------- interpreter: runtime integers


def _numpy_rejects_int_of_1d() -> bool:
    """Whether numpy refuses int() of a one-element 1-D array (numpy >= 2.4; a DeprecationWarning before)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(np.zeros(1, dtype=np.int32))
        except TypeError:
            return True
    return False


def interpreter_index_patch_needed(version: Optional[tuple] = None, numpy_rejects: Optional[bool] = None) -> bool:
    """Whether the interpreter's scalar `__index__` fails here: Triton < 3.7 with a numpy that rejects int() of a
    one-element 1-D array (the interpreter keeps a kernel's integer arguments as such arrays)."""
    version = TRITON_VERSION if version is None else version
    if tuple(version[:2]) >= INTERPRETER_INDEX_FIXED_SINCE:
        return False
    return _numpy_rejects_int_of_1d() if numpy_rejects is None else numpy_rejects


def _scalar_index(self) -> int:
    return int(self.handle.data.squeeze())


def _patch_interpreter_index() -> bool:
    """Make the interpreter's tensors index with `int(data.squeeze())` (Triton 3.7's fix), where needed.

    Triton re-patches `tl.tensor` on every interpreted launch (`_patch_lang` -> `_patch_lang_tensor`), so the
    module function is wrapped: after Triton's own patch, `__index__` is replaced (through the restore scope on
    3.6, which then restores both in order; plain assignment on 3.4/3.5, which never restore). Returns whether it
    patched."""
    if not interpreter_index_patch_needed():
        return False
    from triton.runtime import interpreter as _interpreter

    original = _interpreter._patch_lang_tensor
    if getattr(original, "_fastconvnext_index_patch", False):
        return True

    def patch_lang_tensor(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index
        return result

    patch_lang_tensor._fastconvnext_index_patch = True
    _interpreter._patch_lang_tensor = patch_lang_tensor
    return True


# Applied on import (it changes nothing outside Triton's interpreter): a kernel module imports this one first.
INTERPRETER_INDEX_PATCHED = _patch_interpreter_index()


# ----------------------------------------------------------------------------- compiling without a GPU


def ast_source(fn, signature: dict, constexprs: dict, attrs: dict):
    """triton.compiler.ASTSource for a kernel: signature name -> type, constexprs name -> value, attrs
    (argument index,) -> [[attribute, value]] (the form of Triton 3.3 and later; 3.2 took `constants=` and an
    AttrsDescriptor, one reason it is below the floor)."""
    from triton.compiler import ASTSource

    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_for_arch(fn, signature: dict, constexprs: dict, attrs: dict, arch: int, options: dict):
    """triton.compile of one specialization for sm_<arch> (CUDA, 32-thread warps), no GPU needed."""
    from triton.backends.compiler import GPUTarget

    return triton.compile(ast_source(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


# ------------------------------------------------------------------------------- per-release configs

# Launch-config choices that depend on the Triton release, because its register allocation does: knob ->
# ((first release, value), ...), newest release first; a release takes the first entry at or below it. The
# launchers' config rules read these through `config_choice`, and each kernel module's compile_targets() lists
# what the running release picks, so compile_check checks exactly that. Triton 3.9's values are the tuned ones
# (the kernels' bits there are pinned by the tests); an older release gets the value checked to compile without
# spills on it (compile_check, sm_80 and sm_90; Triton 3.4 and 3.6 compiled, 3.5/3.7/3.8 take the same rows).
CONFIG_CHOICES = {
    # convnext_mlp: rows of the fc2 GEMM tile (two-GEMM forward, fp16/bf16, C >= 128); 128x128 below 3.9
    "mlp.fc2_rows": (((3, 9), 256), ((3, 4), 128)),
    # convnext_mlp: K step (BLOCK_D) of the fp32 fc2 GEMM; 16 below 3.9
    "mlp.fc2_fp32_k_step": (((3, 9), 32), ((3, 4), 16)),
    # convnext_mlp: the fused dx kernel keeps x and g rows resident in two pieces (C = 96: 64 + 32), None; below 3.6
    # it streams them instead, (BLOCK_K, BLOCK_D)
    "mlp.dx_two_pieces_streamed": (((3, 6), None), ((3, 4), (16, 32))),
    # convnext_mlp: dW kernel's 32K-output tiles (256x128, 128x256) from C = 129 (fp16/bf16); 128x128 below 3.6
    "mlp.dw_wide_tiles": (((3, 6), True), ((3, 4), False)),
    # convnext_mlp: 128x256 tiles of the hidden backward with pre saved (C < 1024 or not a power of two); 128x128
    # below 3.9
    "mlp.hidden_bwd_pre_wide": (((3, 9), True), ((3, 4), False)),
    # convnext_mlp: 128x256 tiles of fc1_pre (the first pass of the two-pass hidden backward, C >= 192); 128x128 below 3.9
    "mlp.fc1_pre_wide": (((3, 9), True), ((3, 4), False)),
    # convnext_mlp: rows of the dx GEMM tile (fp16/bf16, C >= 128 but not 129-256); 128 below 3.9
    "mlp.dx_gemm_rows": (((3, 9), 256), ((3, 4), 128)),
    # convnext_mlp: fc1 + act takes 128x256 tiles from this C (fp16/bf16; 128x128 below it); 384 below 3.9
    "mlp.fc1_wide_from": (((3, 9), 192), ((3, 4), 384)),
    # convnext_mlp: the two-accumulator hidden backward takes 64-wide K steps (3 stages) from C = 768; below 3.9 it keeps
    # the 32-wide, 2-stage steps of C >= 384
    "mlp.hidden_bwd_k64_from_768": (((3, 9), True), ((3, 4), False)),
    # dwconv_layernorm: conv outputs a thread of the 1-warp tile forward (C = 96): 3 x 8 tiles, 2 x 8 below 3.9
    "dwconv.fwd_accumulators_1_warp": (((3, 9), 72), ((3, 4), 48)),
    # dwconv_layernorm: conv outputs a thread of the 16-warp tile forward (C = 1536) with fp32 x: 3 x 4 tiles, 2 x 4
    # below 3.6
    "dwconv.fwd_accumulators_16_warps_fp32_x": (((3, 6), 40), ((3, 4), 24)),
    # dwconv_layernorm: the tile LayerNorm backward with fp32 x keeps 2-row tiles up to this chunk width (wider
    # chunks: 1 row); 128 (as 16-bit x), 32 below 3.9 (C = 96 only)
    "dwconv.norm_tile_narrow_chunk_fp32_x": (((3, 9), 128), ((3, 4), 32)),
    # convnext_v2_mlp: hidden chunk (BLOCK_D) of pass 2 recomputing h (fp16/bf16, C <= 128); 32 below 3.9 (3.4: 64
    # spilled 24 B on sm_80 with drop path at C = 96)
    "v2mlp.fc2_recompute_chunk": (((3, 9), 64), ((3, 4), 32)),
}


def config_choice(knob: str, version: Optional[tuple] = None):
    """The value of a per-release config knob (CONFIG_CHOICES) for a Triton release (default: the installed one)."""
    version = tuple((TRITON_VERSION if version is None else version)[:2])
    for since, value in CONFIG_CHOICES[knob]:
        if version >= tuple(since):
            return value
    raise ValueError(f"config knob {knob!r} has no value for triton {_text(version)}")
