"""What the fused ops need around their launches: the device guard, the forward-mode AD test, the dtype names the
launch rules, dispatch keys and performance tables use, and the registration of their autocast rules (one
torch.library IMPL library for the fastconvnext namespace)."""
import contextlib

import torch
import torch.autograd.forward_ad as forward_ad

_AUTOCAST_LIBRARY = torch.library.Library("fastconvnext", "IMPL")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device_guard(device: torch.device):
    """Make the tensors' GPU current while launching: a model on cuda:1 with cuda:0 current must
    not launch on cuda:0."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward_mode_ad(*tensors) -> bool:
    """Whether any input carries a forward-mode tangent (torch.autograd.forward_ad) or is wrapped by a
    torch.func transform (jvp, jacfwd, vmap, grad): there the custom ops would drop tangents silently."""
    if torch.compiler.is_compiling():
        return False
    return any(
        t is not None and (forward_ad.unpack_dual(t).tangent is not None
                           or torch._C._functorch.is_functorch_wrapped_tensor(t))
        for t in tensors
    )


def autocast_key(device_type: str):
    """The Autocast<Device> dispatch key (AutocastCUDA, AutocastCPU)."""
    return getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))


def register_autocast_rules(op_name: str, make_rule) -> None:
    """Register `make_rule(device_type)` as op_name's autocast kernel for CUDA and CPU, for the C++
    dispatcher and for the Python dispatcher (which torch.compile traces through)."""
    overload = getattr(torch.ops.fastconvnext, op_name).default
    for device_type in ("cuda", "cpu"):
        key, rule = autocast_key(device_type), make_rule(device_type)
        overload.py_impl(key)(rule)
        _AUTOCAST_LIBRARY.impl(op_name, lambda _keys, *args, _rule=rule: _rule(*args), key.name, with_keyset=True)
