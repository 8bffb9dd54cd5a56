"""Bytes autograd keeps for backward, per image: transformers vs fastconvnext (eager, fused, checkpointed).

Counts every distinct storage saved for backward during one training forward with loss
(fastconvnext.training.SavedTensorBytes), parameters excluded, at batch 1 and 2: the difference is
the per-image cost. By default the runs use FakeTensorMode: shapes and the saved-tensor graph are
exact but nothing is computed, so ConvNeXt-T at 224x224 takes seconds on a CPU, and the fused
kernels (which on CPU only run in Triton's slow interpreter) are represented by their fake impls.
`--real` runs the real ops instead (use a small --image-size: the fused path runs in the interpreter).

    python benchmarks/memory_saved_for_backward.py                 # ConvNeXt-T, 224x224
    python benchmarks/memory_saved_for_backward.py --real --image-size 32 --hidden-sizes 8 12 20 24 --depths 1 1 1 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# The fused path on CPU tensors is Triton's interpreter; it must be chosen before the kernels import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastconvnext  # noqa: E402
from fastconvnext.training import saved_bytes_per_image  # noqa: E402

MIB = 2**20


def _config_kwargs(args):
    return dict(hidden_sizes=args.hidden_sizes, depths=args.depths, num_labels=args.num_labels)


def _transformers_model(args):
    import transformers

    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**_config_kwargs(args)))


def _fastconvnext_model(args, checkpointing=False):
    model = fastconvnext.ConvNextForImageClassification(fastconvnext.ConvNextConfig(**_config_kwargs(args)))
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _variants(args):
    """(name, model factory, backend) in table order; the first is the baseline of the ratio."""
    return [
        ("transformers eager", lambda: _transformers_model(args), "eager"),
        ("fastconvnext eager", lambda: _fastconvnext_model(args), "eager"),
        ("fastconvnext fused", lambda: _fastconvnext_model(args), "triton"),
        ("fastconvnext fused + gradient checkpointing", lambda: _fastconvnext_model(args, True), "triton"),
    ]


def measure(args):
    """One row per variant: name, bytes per image, batch-independent bytes."""
    rows = []
    for name, build, backend in _variants(args):
        torch.manual_seed(0)
        model = build().train()
        with fastconvnext.use_backend(backend):
            saved = saved_bytes_per_image(model, args.image_size, fake=not args.real)
        rows.append({"variant": name, "bytes_per_image": saved.per_image, "constant_bytes": saved.constant})
        del model
    baseline = rows[0]["bytes_per_image"]
    for row in rows:
        row["ratio_to_transformers"] = row["bytes_per_image"] / baseline
    return rows


def format_table(rows, args):
    mode = "real ops" if args.real else "FakeTensorMode"
    lines = [
        f"Saved for backward, hidden_sizes={args.hidden_sizes} depths={args.depths}, "
        f"{args.image_size}x{args.image_size}, fp32, {mode}",
        "",
        "| variant | MiB / image | vs transformers | batch-independent KiB |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['bytes_per_image'] / MIB:.2f} | {row['ratio_to_transformers']:.1%} "
            f"| {row['constant_bytes'] / 1024:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[96, 192, 384, 768])
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 3, 9, 3])
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument("--real", action="store_true", help="run real ops instead of FakeTensorMode")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = measure(args)
    print(format_table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
