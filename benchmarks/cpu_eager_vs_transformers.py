"""CPU speed: fastconvnext's eager path vs transformers' model of the same family, same weights, one process.

ConvNeXt-T config (random weights), batch 8, 224x224, fp32, torch.inference_mode (or, with --train, a
training step: forward, mean square of the pooled features, backward). --family picks ConvNextModel,
ConvNextV2Model or DINOv3ConvNextModel. After warm-up the two models run in turns (A B, then B A, ...) so
machine drift falls on both; prints both medians, the ratio transformers / fastconvnext (> 1: fastconvnext
is faster; target: never below 1, goal 1.1) with its 95% bootstrap interval, the CPU, the thread count, the
load and the versions.

    python benchmarks/cpu_eager_vs_transformers.py                    # torch's default thread count
    python benchmarks/cpu_eager_vs_transformers.py --family convnextv2 --batch 1
    python benchmarks/cpu_eager_vs_transformers.py --family dinov3 --train
    python benchmarks/cpu_eager_vs_transformers.py --threads 1 --profile

--profile adds a per-op breakdown (torch.profiler, self CPU time per aten op, summed over the calls of
one forward) of both models, sorted by the difference, to show which op makes the gap.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from fastconvnext.backend import use_backend
from fastconvnext.tooling.bench import cases, environment, timing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=tuple(cases.MODEL_PRESETS))
    parser.add_argument("--family", default="convnext", choices=tuple(cases.FAMILIES))
    parser.add_argument("--train", action="store_true", help="time a training step instead of inference")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model (>= 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="per-op breakdown of both models")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be at least 10, got {args.repeats}")
    return args


def _contenders(ours, theirs, pixels, train=False):
    if train:
        return {"fastconvnext (eager)": _training_step(ours, pixels, "eager"),
                "transformers": _training_step(theirs, pixels, None)}

    def run_ours():
        with torch.inference_mode(), use_backend("eager"):
            ours(pixels)

    def run_theirs():
        with torch.inference_mode():
            theirs(pixels)

    return {"fastconvnext (eager)": (run_ours, None), "transformers": (run_theirs, None)}


def _training_step(model, pixels, backend_name):
    """(step, untimed setup): forward in training mode, mean square of the pooled features, backward."""
    model.train()

    def step():
        with use_backend(backend_name) if backend_name else contextlib.nullcontext():
            output = model(pixels)
        output.pooler_output.square().mean().backward()

    return step, lambda: model.zero_grad(set_to_none=True)



def per_op_profile(contenders):
    """{name: {aten op: self CPU ms of one call}} from one profiled call per model."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, (run, _) in contenders.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        out[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return out


def print_profile(profiles):
    (a_name, a), (b_name, b) = profiles.items()
    ops = sorted(set(a) | set(b), key=lambda op: -abs(a.get(op, 0.0) - b.get(op, 0.0)))
    print(f"\nPer-op self CPU time of one forward (ms), sorted by |difference|:")
    print(f"{'op':40s} {a_name:>22s} {b_name:>14s} {'difference':>11s}")
    for op in ops[:15]:
        x, y = a.get(op, 0.0), b.get(op, 0.0)
        print(f"{op:40s} {x:22.2f} {y:14.2f} {x - y:+11.2f}")
    print(f"{'total':40s} {sum(a.values()):22.2f} {sum(b.values()):14.2f} {sum(a.values()) - sum(b.values()):+11.2f}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = cases.build_models(args.model, family=args.family)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn((args.batch, 3, args.resolution, args.resolution), generator=gen)
    contenders = _contenders(ours, theirs, pixels, args.train)
    clock = timing.Clock("cpu")
    results = timing.interleaved(contenders, clock, args.repeats, args.warmup)
    info = environment.describe("cpu")
    fast, hf = results["fastconvnext (eager)"], results["transformers"]
    interval = timing.ratio_of_medians(hf, fast)
    ratio = interval.value
    load = environment.load_average()
    print(environment.header_line(info))
    what = "training step" if args.train else "inference_mode"
    print(f"{cases.FAMILIES[args.family][2]}-{args.model}, batch {args.batch}, {args.resolution}x{args.resolution}, "
          f"fp32, {what}, "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up calls each; {environment.load_text(load)}")
    for name, t in results.items():
        print(f"  {name:22s} median {t.median_ms:9.1f} ms  IQR {t.q1_ms:.1f}-{t.q3_ms:.1f}  "
              f"min {t.min_ms:.1f}  ({args.batch / (t.median_ms / 1e3):.1f} img/s)")
    if not interval.readable():
        verdict = "too noisy to read (95% interval wider than +-10%)"
    else:
        verdict = "goal met (>= 1.1x)" if ratio >= 1.1 else "not slower" if ratio >= 1.0 else "SLOWER than transformers"
    print(f"  speed-up transformers / fastconvnext = {ratio:.3f}x (medians, 95% interval {interval.low:.2f}-"
          f"{interval.high:.2f})  -> {verdict}; {hf.min_ms / fast.min_ms:.3f}x (minimums)")
    if args.profile:
        print_profile(per_op_profile(contenders))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "env": info, "load_average": load, "ratio": ratio,
                       "ci95": [interval.low, interval.high],
                       "samples_ms": {k: list(v.samples_ms) for k, v in results.items()}}, f, indent=2)
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
