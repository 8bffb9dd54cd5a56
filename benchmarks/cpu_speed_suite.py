"""CPU speed of fastconvnext's eager path against transformers, every CPU mode in one process.

ConvNeXt-T (random weights, the same in both models), 224x224. Modes:
  infer-b1, infer-b8, infer-b32   fp32 inference (torch.inference_mode)
  bf16-b8                         inference under torch.autocast("cpu", bfloat16), both models alike
  train-b8, train-b8-dp           fp32 training step (forward, loss, backward, SGD step); drop path 0 / 0.1
Per mode the two models run in turns (rotated every round) after warm-up; the printed ratio is
transformers' median / fastconvnext's median (> 1: fastconvnext is faster; target never below 1, goal 1.1)
with a seeded 95% bootstrap interval, and the 1-minute load average before and after the mode: on a busy
machine the interval says how far the figure can be trusted.

    python benchmarks/cpu_speed_suite.py                        # every mode
    python benchmarks/cpu_speed_suite.py --modes infer-b8,bf16-b8 --repeats 20 --threads 2 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch

from fastconvnext.backend import use_backend
from fastconvnext.tooling.bench import cases, environment, timing


@dataclass(frozen=True)
class Mode:
    batch: int
    train: bool = False
    drop_path: float = 0.0
    bf16: bool = False


MODES = {
    "infer-b1": Mode(1),
    "infer-b8": Mode(8),
    "infer-b32": Mode(32),
    "bf16-b8": Mode(8, bf16=True),
    "train-b8": Mode(8, train=True),
    "train-b8-dp": Mode(8, train=True, drop_path=0.1),
}


def _mode_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(MODES)}; got {text!r}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", type=_mode_list, default=list(MODES), metavar="LIST",
                        help=f"comma list of {', '.join(MODES)} (default: all)")
    parser.add_argument("--model", default="tiny", choices=tuple(cases.MODEL_PRESETS))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per model and mode (>= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", help="also write every sample to this file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5, got {args.repeats}")
    return args


def _models(preset, drop_path):
    import transformers

    import fastconvnext

    config = cases.model_config_kwargs(preset)
    torch.manual_seed(0)
    ours = fastconvnext.ConvNextModel(fastconvnext.ConvNextConfig(**config, drop_path_rate=drop_path))
    theirs = transformers.ConvNextModel(transformers.ConvNextConfig(**config, drop_path_rate=drop_path))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _eager(ours):
    return use_backend("eager") if ours else contextlib.nullcontext()


def _runner(model, mode, pixels, ours):
    """The timed call of one model in one mode, and its untimed setup (gradients cleared)."""
    model.train(mode.train)
    if not mode.train:
        def infer():
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.bf16)
            with torch.inference_mode(), autocast, _eager(ours):
                model(pixels)

        return infer, None
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        with _eager(ours):
            model(pixels).pooler_output.square().mean().backward()
        optimizer.step()

    return step, lambda: optimizer.zero_grad(set_to_none=True)


def measure(name, args):
    mode = MODES[name]
    ours, theirs = _models(args.model, mode.drop_path)
    pixels = torch.randn((mode.batch, 3, args.resolution, args.resolution), generator=torch.Generator().manual_seed(1))
    contenders = {"fastconvnext": _runner(ours, mode, pixels, True), "transformers": _runner(theirs, mode, pixels, False)}
    load_before = environment.load_average()
    results = timing.interleaved(contenders, timing.Clock("cpu"), args.repeats, args.warmup)
    load_after = environment.load_average()
    ratio = timing.ratio_of_medians(results["transformers"], results["fastconvnext"])
    return {"mode": name, "ratio": ratio, "results": results, "load": (load_before, load_after)}


def report_line(outcome):
    ratio, results = outcome["ratio"], outcome["results"]
    ours, theirs = results["fastconvnext"], results["transformers"]
    loads = "/".join("?" if x is None else f"{x:.1f}" for x in outcome["load"])
    if not ratio.readable():
        verdict = "too noisy to read"
    elif ratio.low >= 1.1:
        verdict = "goal met (>= 1.1x)"
    elif ratio.low >= 1.0:
        verdict = "not slower"
    elif ratio.high < 1.0:
        verdict = "SLOWER than transformers"
    else:
        verdict = "cannot tell"
    return (f"{outcome['mode']:12s} ratio {ratio.value:5.2f}x  95% {ratio.low:.2f}-{ratio.high:.2f}  "
            f"ours {ours.median_ms:8.1f} ms (IQR {ours.q1_ms:.0f}-{ours.q3_ms:.0f})  "
            f"transformers {theirs.median_ms:8.1f} ms (IQR {theirs.q1_ms:.0f}-{theirs.q3_ms:.0f})  "
            f"load {loads}  -> {verdict}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = environment.describe("cpu")
    print(environment.header_line(info))
    print(f"ConvNeXt-{args.model} {args.resolution}x{args.resolution}, {args.repeats} interleaved repeats after "
          f"{args.warmup} warm-up calls; ratio = transformers / fastconvnext (CPU eager path), load = 1-min average "
          f"before/after on {os.cpu_count()} cores", flush=True)
    outcomes = []
    for name in args.modes:
        outcomes.append(measure(name, args))
        print(report_line(outcomes[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "env": info, "modes": [
                {"mode": o["mode"], "ratio": o["ratio"].value, "ci95": [o["ratio"].low, o["ratio"].high],
                 "load": o["load"], "samples_ms": {k: list(v.samples_ms) for k, v in o["results"].items()}}
                for o in outcomes]}, f, indent=2)
    return outcomes


if __name__ == "__main__":
    main(sys.argv[1:])
