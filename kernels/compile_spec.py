"""What a kernel module hands to `compile_check`: one entry per kernel config the launchers can pick."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileTarget:
    kernel: str  # display name, e.g. "dwconv_layernorm_fwd"
    fn: object  # the @triton.jit function (unwrapped from any autotuner/heuristics)
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    dtype: str = "fp32"  # activation dtype this config is used for
    label: str = ""  # short description of the config (block sizes, flags)
    expects_tensor_cores: bool = False  # SASS must show HMMA (sm_80) / HGMMA or HMMA (sm_90)
    extra: dict = field(default_factory=dict)
