"""Which memory layout the CPU depthwise conv + LayerNorm should run in, per ConvNeXt stage shape.

The block holds its activations as [N, H, W, C]. The model's eager op convolves the channels-last view of
that tensor (x.permute(0, 3, 1, 2), no copy); the alternative copies it to NCHW first (the layout transformers
convolves in) and permutes the result back for the LayerNorm. Both are timed interleaved (same inputs, turns
rotated) at ConvNeXt-T's stage shapes for each batch, in inference (no autograd) and training (forward +
backward, the model's fp32 training formulation with the conv bias gradient as a sum), and printed as
channels-last / NCHW (> 1: NCHW is faster) with a seeded 95% bootstrap interval of the ratio of medians,
the torch version, the thread count and the 1-minute load average before and after each row.

`--model-step` times instead a whole ConvNeXt-T training step (224², forward, loss, backward) with the
layout rule (`backend.cpu_dwconv_layout`) against channels-last everywhere, interleaved.

    python benchmarks/cpu_dwconv_layout.py --threads 1 --repeats 9
    python benchmarks/cpu_dwconv_layout.py --threads 1 --model-step --batches 2,4
"""
from __future__ import annotations

import argparse
import sys

import torch

import fastconvnext
from fastconvnext import backend
from fastconvnext.kernels import reference
from fastconvnext.tooling.bench import environment, timing

STAGES = {"s1": (56, 96), "s2": (28, 192), "s3": (14, 384), "s4": (7, 768)}  # ConvNeXt-T: (H = W, C)
BATCHES = (1, 2, 4, 8, 32)
MODES = ("inference", "training")


def _inputs(batch, size, channels, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    return [randn(batch, size, size, channels), randn(channels, 1, 7, 7, scale=0.1), randn(channels, scale=0.1),
            1 + randn(channels, scale=0.1), randn(channels, scale=0.1)]


def contenders(mode, batch, size, channels):
    """{'channels_last': (run, setup), 'nchw': (run, setup)} for one shape and mode."""
    inputs = _inputs(batch, size, channels)
    if mode == "inference":
        def run_in(layout):
            def run():
                with torch.inference_mode():
                    reference.dwconv_layernorm_reference(*inputs, layout=layout)
            return run, None

        return {layout: run_in(layout) for layout in reference.DWCONV_LAYOUTS}
    leaves = [t.requires_grad_() for t in inputs]
    grad_out = torch.randn(batch, size, size, channels, generator=torch.Generator().manual_seed(1))

    def clear():
        for t in leaves:
            t.grad = None

    def train_in(layout):
        return (lambda: reference.dwconv_layernorm_cpu_training(*leaves, layout=layout).backward(grad_out), clear)

    return {layout: train_in(layout) for layout in reference.DWCONV_LAYOUTS}


def model_step_contenders(batch):
    """{'channels_last': ..., 'rule': ...}: a ConvNeXt-T training step, the conv layout forced or by the rule."""
    model = fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig()).train()
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rule = backend.cpu_dwconv_layout

    def step(choose):
        def run():
            backend.cpu_dwconv_layout = choose
            try:
                model(pixels).pooler_output.square().mean().backward()
            finally:
                backend.cpu_dwconv_layout = rule
        return run, lambda: model.zero_grad(set_to_none=True)

    return {"channels_last": step(lambda *args: "channels_last"), "rule": step(rule)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma list of batch sizes")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--model-step", action="store_true",
                        help="time a ConvNeXt-T training step, layout rule vs channels-last everywhere")
    args = parser.parse_args(argv)
    for name, allowed in (("stages", tuple(STAGES)), ("modes", MODES)):
        items = getattr(args, name).split(",")
        if not set(items) <= set(allowed):
            parser.error(f"--{name} expects a comma list of {', '.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, items)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches expects a comma list of integers, got {args.batches!r}")
    return args


def _load(value):
    return "?" if value is None else f"{value:.1f}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(environment.header_line(environment.describe("cpu")))
    if args.model_step:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
              "ratio = channels-last everywhere / layout rule median (> 1: the rule is faster), 95% interval")
        for batch in args.batches:
            load = environment.load_average()
            t = timing.interleaved(model_step_contenders(batch), timing.Clock("cpu"), args.repeats, args.warmup)
            r = timing.ratio_of_medians(t["channels_last"], t["rule"])
            print(f"ConvNeXt-T 224² training step N={batch:<3d} channels-last {t['channels_last'].median_ms:8.0f} ms  "
                  f"rule {t['rule'].median_ms:8.0f} ms  ratio {r.value:5.3f} ({r.low:.3f}-{r.high:.3f})  "
                  f"load {_load(load)}/{_load(environment.load_average())}", flush=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
          "ratio = channels-last / NCHW median (> 1: NCHW faster), 95% bootstrap interval")
    for mode in args.modes:
        for stage in args.stages:
            size, channels = STAGES[stage]
            for batch in args.batches:
                load = environment.load_average()
                t = timing.interleaved(contenders(mode, batch, size, channels), timing.Clock("cpu"), args.repeats,
                                       args.warmup)
                r = timing.ratio_of_medians(t["channels_last"], t["nchw"])
                print(f"{mode:9s} {stage} C={channels:<4d} {size:2d}x{size:<2d} N={batch:<3d} channels-last "
                      f"{t['channels_last'].median_ms:8.2f} ms  NCHW {t['nchw'].median_ms:8.2f} ms  ratio "
                      f"{r.value:5.2f} ({r.low:.2f}-{r.high:.2f})  load {_load(load)}/{_load(environment.load_average())}",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
