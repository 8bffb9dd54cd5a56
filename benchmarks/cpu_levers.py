"""CPU levers, each measured against the current eager op at ConvNeXt-T stage shapes.

Every lever is an alternative formulation of one op, timed interleaved with the current one (same
inputs, turns rotated), printed as current / alternative (> 1: the alternative is faster) with a seeded
95% bootstrap interval and the 1-minute load average. None of them is the model's path unless this
benchmark shows it faster; see benchmarks/README.md for what was measured.

  dwconv-nchw     dwconv+LN forward+backward with the depthwise conv on an NCHW copy (the layout
                  transformers uses) instead of the channels-last view
  scale-fold      MLP forward+backward with the layer scale folded into fc2's weight and bias
                  (gamma[:, None] * W2, gamma * b2) instead of a separate multiply
  onednn-bf16     MLP inference under bf16 autocast: the model's oneDNN path (GELU as fc1's post-op,
                  layer scale + residual in one addcmul) instead of eager's linear-GELU-linear-mul-add
  onednn-train    MLP forward+backward in fp32: the model's training path (both linears through oneDNN,
                  forward and input gradient) instead of the eager reference's nn.Linear calls
  dw-bias-sum     dwconv+LN forward+backward in fp32: the model's training path (conv bias gradient as a
                  plain sum) instead of asking torch's conv backward for it

    python benchmarks/cpu_levers.py --threads 1 --repeats 15
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fastconvnext.tooling.bench import environment, timing
from fastconvnext.kernels import reference

STAGES = {"s1": (56, 96), "s2": (28, 192), "s3": (14, 384), "s4": (7, 768)}  # ConvNeXt-T: (H = W, C)
LEVERS = ("dwconv-nchw", "scale-fold", "onednn-bf16", "onednn-train", "dw-bias-sum")
DWCONV_LEVERS = ("dwconv-nchw", "dw-bias-sum")


def dwconv_layernorm_nchw(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    """The same op as the reference, with the conv on an NCHW copy of the [N, H, W, C] input."""
    y = F.conv2d(x.permute(0, 3, 1, 2).contiguous(), dw_weight, dw_bias, padding=dw_weight.shape[-1] // 2,
                 groups=x.shape[-1])
    return F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[-1],), ln_weight, ln_bias, eps)


def mlp_scale_folded(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
    hidden = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    return residual + F.linear(hidden, gamma[:, None] * fc2_weight, gamma * fc2_bias)


def mlp_onednn_bf16(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma):
    """The model's MLP path under bf16 autocast inference (call inside torch.autocast)."""
    return reference.convnext_mlp_cpu_inference(x, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)


def _inputs(lever, batch, size, channels, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x = randn(batch, size, size, channels)
    if lever in DWCONV_LEVERS:
        return [x, randn(channels, 1, 7, 7, scale=0.1), randn(channels, scale=0.1), 1 + randn(channels, scale=0.1),
                randn(channels, scale=0.1)]
    hidden = 4 * channels
    return [x, randn(batch, size, size, channels), randn(hidden, channels, scale=channels**-0.5),
            randn(hidden, scale=0.1), randn(channels, hidden, scale=hidden**-0.5), randn(channels, scale=0.1),
            randn(channels, scale=0.1)]


def contenders(lever, batch, size, channels):
    """{'current': (run, setup), 'alternative': (run, setup)} for one lever at one shape."""
    inputs = _inputs(lever, batch, size, channels)
    if lever == "onednn-bf16":  # as in the model under bf16 autocast: bf16 LN output, fp32 residual and weights
        inputs[0] = inputs[0].bfloat16()

        def eager_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                reference.convnext_mlp_reference(*inputs)

        def fused_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                mlp_onednn_bf16(*inputs)

        return {"current": (eager_bf16, None), "alternative": (fused_bf16, None)}
    leaves = [t.requires_grad_() for t in inputs]
    grad_out = torch.randn(batch, size, size, channels, generator=torch.Generator().manual_seed(1))
    current, alternative = {
        "dwconv-nchw": (reference.dwconv_layernorm_reference, dwconv_layernorm_nchw),
        "scale-fold": (reference.convnext_mlp_reference, mlp_scale_folded),
        "onednn-train": (reference.convnext_mlp_reference, reference.convnext_mlp_cpu_training),
        "dw-bias-sum": (reference.dwconv_layernorm_reference, reference.dwconv_layernorm_cpu_training),
    }[lever]

    def clear():
        for t in leaves:
            t.grad = None

    return {"current": (lambda: current(*leaves).backward(grad_out), clear),
            "alternative": (lambda: alternative(*leaves).backward(grad_out), clear)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {', '.join(LEVERS)}")
    parser.add_argument("--stages", default="s1,s3", help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name, allowed in (("levers", LEVERS), ("stages", tuple(STAGES))):
        items = getattr(args, name).split(",")
        if not set(items) <= set(allowed):
            parser.error(f"--{name} expects a comma list of {', '.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, items)
    return args


def _load(value):
    return "?" if value is None else f"{value:.1f}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment.header_line(environment.describe("cpu")))
    print(f"batch {args.batch}, {args.repeats} interleaved repeats; ratio = current / alternative (> 1: the "
          "alternative is faster)")
    for lever in args.levers:
        for stage in args.stages:
            size, channels = STAGES[stage]
            load = environment.load_average()
            t = timing.interleaved(contenders(lever, args.batch, size, channels), timing.Clock("cpu"), args.repeats,
                                   args.warmup)
            r = timing.ratio_of_medians(t["current"], t["alternative"])
            after = environment.load_average()
            print(f"{lever:12s} {stage} C={channels:<4d} current {t['current'].median_ms:8.1f} ms  alternative "
                  f"{t['alternative'].median_ms:8.1f} ms  ratio {r.value:.2f} (95% {r.low:.2f}-{r.high:.2f})  "
                  f"load {_load(load)}/{_load(after)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
