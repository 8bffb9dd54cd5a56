"""The benchmark cases, shared by `fastconvnext bench` and the pytest-benchmark suites in benchmarks/.

A case says what to run (op at a stage shape, or a model at a size) and which pass; `prepare_*`
turns (case, implementation) into a `Prepared`: a `run()` that is timed and a `setup()` that is not
(gradients reset before each training call).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastconvnext.tooling.roofline import KERNEL_SIZE, MLP_RATIO, StageShape, stage_shapes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODEL_PRESETS = {  # transformers / timm ConvNeXt sizes: (hidden_sizes, depths)
    "atto": ((40, 80, 160, 320), (2, 2, 6, 2)),
    "femto": ((48, 96, 192, 384), (2, 2, 6, 2)),
    "pico": ((64, 128, 256, 512), (2, 2, 6, 2)),
    "nano": ((80, 160, 320, 640), (2, 2, 8, 2)),
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
    "xlarge": ((256, 512, 1024, 2048), (3, 3, 27, 3)),
}
OPS = ("dwconv_layernorm", "convnext_mlp")
OP_PASSES = ("fwd", "fwd+bwd")
MODEL_PASSES = ("infer", "train")
OP_IMPLS = {
    "dwconv_layernorm": ("eager", "eager_nchw", "fused", "compile"),
    "convnext_mlp": ("eager", "fused", "compile"),
}
OP_BASELINE = "eager"
MODEL_IMPLS = ("transformers", "fastconvnext-eager", "fastconvnext-fused", "transformers-compile")
MODEL_BASELINE = "transformers"
IMPL_LABELS = {
    "eager": "eager PyTorch (channels-last)",
    "eager_nchw": "eager PyTorch (NCHW conv + permute)",
    "fused": "fused Triton kernel",
    "compile": "torch.compile(eager)",
    "transformers": "transformers ConvNextModel",
    "transformers-compile": "torch.compile(transformers)",
    "fastconvnext-eager": "fastconvnext (eager backend)",
    "fastconvnext-fused": "fastconvnext (fused kernels)",
}

CPU_FUSED_REASON = (
    "not run on CPU: the fused Triton kernels need a CUDA GPU (on CPU they only run in Triton's interpreter, "
    "a correctness tool, not a performance path)"
)
CPU_COMPILE_REASON = (
    "not timed on CPU: torch.compile works on CPU (the model compiles to one graph, inductor included; see "
    "tests/test_compile_cpu.py), but inductor's build of a whole model takes minutes on a small CPU, so only CUDA "
    "runs time it"
)


def unavailable_reason(impl, device):
    """Why `impl` cannot be measured on `device`, or None when it can."""
    device = torch.device(device)
    if impl in ("fused", "fastconvnext-fused"):
        if device.type != "cuda":
            return CPU_FUSED_REASON
        if importlib.util.find_spec("triton") is None:
            return "not run: triton is not installed"
    if impl in ("compile", "transformers-compile") and device.type != "cuda":
        return CPU_COMPILE_REASON
    if impl.startswith("transformers") and importlib.util.find_spec("transformers") is None:
        return "not run: transformers is not installed (pip install 'fastconvnext[hf]')"
    return None


@dataclass
class Prepared:
    run: Callable[[], object]
    setup: Optional[Callable[[], None]] = None


# ------------------------------------------------------------------------------------------ op cases


@dataclass(frozen=True)
class OpCase:
    op: str
    shape: StageShape
    dtype: str
    device: str
    pass_: str

    @property
    def label(self):
        return f"{self.op} {self.shape.label}"

    @property
    def shape_text(self):
        return "x".join(str(d) for d in self.shape.dims)


def op_cases(ops=OPS, models=("tiny", "base"), batch=64, dtype="bf16", device="cuda", passes=OP_PASSES):
    return [
        OpCase(op, shape, dtype, str(device), pass_)
        for op in ops
        for shape in stage_shapes(models, batch)
        for pass_ in passes
    ]


def _randn(shape, dtype, device, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)


def op_inputs(case, nchw=False, seed=0):
    """Random inputs of one op call; x is [N, H, W, C] contiguous ([N, C, H, W] contiguous when nchw)."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    n, h, w, c = case.shape.dims
    if case.op == "dwconv_layernorm":
        return {
            "x": _randn((n, c, h, w) if nchw else (n, h, w, c), dtype, device, gen),
            "dw_weight": _randn((c, 1, KERNEL_SIZE, KERNEL_SIZE), dtype, device, gen, 0.1),
            "dw_bias": _randn((c,), dtype, device, gen, 0.1),
            "ln_weight": 1 + _randn((c,), dtype, device, gen, 0.1),
            "ln_bias": _randn((c,), dtype, device, gen, 0.1),
        }
    d = MLP_RATIO * c
    return {
        "x": _randn((n, h, w, c), dtype, device, gen),
        "residual": _randn((n, h, w, c), dtype, device, gen),
        "fc1_weight": _randn((d, c), dtype, device, gen, c**-0.5),
        "fc1_bias": _randn((d,), dtype, device, gen, 0.1),
        "fc2_weight": _randn((c, d), dtype, device, gen, d**-0.5),
        "fc2_bias": _randn((c,), dtype, device, gen, 0.1),
        "gamma": _randn((c,), dtype, device, gen, 0.1),
    }


def dwconv_layernorm_nchw(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """transformers' order: conv on an NCHW tensor, permute to NHWC, LayerNorm (which copies the view)."""
    y = F.conv2d(x, dw_weight, dw_bias, padding=dw_weight.shape[-1] // 2, groups=x.shape[1])
    return F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), ln_weight, ln_bias, eps)


def op_function(op, impl):
    """The callable behind (op, impl); `compile` returns a fresh torch.compile of the eager reference."""
    from fastconvnext.kernels import reference

    eager = {"dwconv_layernorm": reference.dwconv_layernorm_reference,
             "convnext_mlp": reference.convnext_mlp_reference}[op]
    if impl == "eager":
        return eager
    if impl == "eager_nchw":
        if op != "dwconv_layernorm":
            raise ValueError("eager_nchw exists for dwconv_layernorm only")
        return dwconv_layernorm_nchw
    if impl == "fused":
        import fastconvnext.kernels as kernels

        return getattr(kernels, op)
    if impl == "compile":
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no generic dynamic kernels
        return torch.compile(eager, dynamic=False)
    raise ValueError(f"unknown implementation {impl!r} for {op}; expected one of {OP_IMPLS[op]}")


def prepare_op(case, impl, seed=0):
    """Inputs + the timed call for one op implementation; fwd runs under no_grad, fwd+bwd backpropagates."""
    fn = op_function(case.op, impl)
    inputs = op_inputs(case, nchw=impl == "eager_nchw", seed=seed)
    if case.pass_ == "fwd":
        def run_fwd():
            with torch.no_grad():
                return fn(**inputs)

        return Prepared(run_fwd)
    leaves = [t.requires_grad_() for t in inputs.values()]
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = _randn(case.shape.dims, DTYPES[case.dtype], torch.device(case.device), gen)

    def reset_grads():
        for t in leaves:
            t.grad = None

    def run_train():
        fn(**inputs).backward(grad_out)

    return Prepared(run_train, reset_grads)


# --------------------------------------------------------------------------------------- model cases


# Model families: (config, model class name) in fastconvnext and in transformers, and the label prefix.
FAMILIES = {
    "convnext": ("ConvNextConfig", "ConvNextModel", "ConvNeXt"),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2Model", "ConvNeXt-V2"),
    "dinov3": ("DINOv3ConvNextConfig", "DINOv3ConvNextModel", "DINOv3-ConvNeXt"),
}


@dataclass(frozen=True)
class ModelCase:
    preset: str
    batch: int
    resolution: int
    dtype: str
    device: str
    pass_: str  # "infer" or "train"
    family: str = "convnext"

    @property
    def label(self):
        return f"{FAMILIES[self.family][2]}-{self.preset} {self.resolution}²"

    @property
    def shape_text(self):
        return f"{self.batch}x3x{self.resolution}x{self.resolution}"


def model_config_kwargs(preset):
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {tuple(MODEL_PRESETS)}, got {preset!r}")
    hidden_sizes, depths = MODEL_PRESETS[preset]
    return {"hidden_sizes": list(hidden_sizes), "depths": list(depths)}


def build_models(preset, seed=0, with_transformers=True, family="convnext"):
    """fastconvnext's model of `family` and (when asked) transformers' with the same random weights; CPU, fp32,
    eval."""
    import fastconvnext

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    config_name, model_name, _ = FAMILIES[family]
    torch.manual_seed(seed)
    ours = getattr(fastconvnext, model_name)(getattr(fastconvnext, config_name)(**model_config_kwargs(preset))).eval()
    if not with_transformers:
        return ours, None
    import transformers

    theirs = getattr(transformers, model_name)(getattr(transformers, config_name)(**model_config_kwargs(preset)))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs.eval()


def _model_for(impl, preset, seed, family="convnext"):
    """(model, fastconvnext backend to run it under, or None for transformers)."""
    if impl not in MODEL_IMPLS:
        raise ValueError(f"model implementation must be one of {MODEL_IMPLS}, got {impl!r}")
    ours, theirs = build_models(preset, seed, with_transformers=impl.startswith("transformers"), family=family)
    if theirs is not None:
        return theirs, None
    return ours, ("eager" if impl == "fastconvnext-eager" else "triton")


def _pooled(output):
    return output.pooler_output if hasattr(output, "pooler_output") else output[1]


def prepare_model(case, impl, seed=0):
    """Model + batch for one implementation. infer: inference_mode forward. train: forward, loss on the
    pooled features, backward, SGD step (gradients set to None before each step, untimed)."""
    from fastconvnext.backend import use_backend

    model, backend_name = _model_for(impl, case.preset, seed, case.family)
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    model = model.to(device=device, dtype=dtype)
    model.train(case.pass_ == "train")
    callable_model = torch.compile(model) if impl.endswith("-compile") else model
    gen = torch.Generator().manual_seed(seed + 2)
    pixels = _randn((case.batch, 3, case.resolution, case.resolution), dtype, device, gen)

    def forward():
        if backend_name is None:
            return callable_model(pixels)
        with use_backend(backend_name):
            return callable_model(pixels)

    if case.pass_ == "infer":
        def run_infer():
            with torch.inference_mode():
                return forward()

        return Prepared(run_infer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run_step():
        loss = _pooled(forward()).float().square().mean()
        loss.backward()
        optimizer.step()

    return Prepared(run_step, lambda: optimizer.zero_grad(set_to_none=True))
