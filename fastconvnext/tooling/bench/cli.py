"""`fastconvnext bench` (and `python -m fastconvnext.tooling.bench`): options, defaults, what gets written."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastconvnext.tooling.bench import cases, runner

DEFAULT_OUTPUT = "bench-results"
SECTION_NAMES = ("dwconv_layernorm", "convnext_mlp", "model")

# Defaults per (device type, quick): what a run does when an option is not given.
# The CPU quick run is the README's first command: ConvNeXt-T inference at 224², batch 8 (small models and
# images gave ratios that moved by 3x between runs), with enough interleaved repeats for a ratio interval.
BOTH_PASSES = ("infer", "train")
DEFAULTS = {
    ("cuda", False): dict(dtype="bf16", sections=SECTION_NAMES, model="tiny", batch=64, resolution=224,
                          stage_models=("tiny", "base"), repeats=30, warmup=5, passes=BOTH_PASSES),
    ("cuda", True): dict(dtype="bf16", sections=SECTION_NAMES, model="tiny", batch=32, resolution=224,
                         stage_models=("tiny",), repeats=10, warmup=3, passes=BOTH_PASSES),
    ("cpu", False): dict(dtype="fp32", sections=SECTION_NAMES, model="tiny", batch=8, resolution=224,
                         stage_models=("tiny",), repeats=15, warmup=2, passes=BOTH_PASSES),
    ("cpu", True): dict(dtype="fp32", sections=("model",), model="tiny", batch=8, resolution=224,
                        stage_models=("tiny",), repeats=25, warmup=1, passes=("infer",)),
}
ROOFLINE_BATCH = 64


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _comma_list(choices):
    def parse(text):
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}; got {text!r}")
        return items

    return parse


def add_arguments(parser):
    """Add the bench options to `parser` (the `fastconvnext bench` subparser, or a standalone one)."""
    parser.add_argument("--model", choices=tuple(cases.MODEL_PRESETS),
                        help="model size for the end-to-end case (default: tiny)")
    parser.add_argument("--family", choices=tuple(cases.FAMILIES), default="convnext",
                        help="model family of the end-to-end case: convnext (V1), convnextv2 (ConvNeXt V2) or dinov3 "
                             "(DINOv3-ConvNeXt); each against transformers' class of that family (default convnext)")
    parser.add_argument("--batch", type=_positive_int,
                        help="batch size of the model and op cases (default: 64 on CUDA, 8 on CPU; --quick: 32 / 8); "
                             f"with --roofline the analytic batch (default {ROOFLINE_BATCH}; 128 is the other "
                             "common choice)")
    parser.add_argument("--resolution", type=_positive_int, help="model input height = width (default 224)")
    parser.add_argument("--dtype", choices=tuple(cases.DTYPES),
                        help="activation and parameter dtype (default: bf16 on CUDA, fp32 on CPU; --roofline: bf16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to measure (default auto: CUDA when available)")
    parser.add_argument("--ops", type=_comma_list(SECTION_NAMES), metavar="LIST",
                        help=f"comma list of {', '.join(SECTION_NAMES)} (default: all; --quick on CPU: model)")
    parser.add_argument("--stages", type=_comma_list(tuple(runner.roofline.STAGE_CHANNELS)), metavar="LIST",
                        help="ConvNeXt sizes whose four stage shapes the op cases use: tiny, base (default: both on "
                             "CUDA, tiny on CPU)")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help=f"directory for bench.csv, bench.png, bench.md, roofline.md (default {DEFAULT_OUTPUT}/; "
                             "with --roofline nothing is written unless given)")
    parser.add_argument("--quick", action="store_true",
                        help="a first look: on CPU, ConvNeXt-T inference at 224x224, batch 8, fastconvnext vs "
                             "transformers interleaved, the ratio with a 95%% interval and the machine load, with 1 "
                             "thread when the machine is busy (unless --threads is given); plus the roofline")
    parser.add_argument("--roofline", action="store_true",
                        help="print the performance model's prior (fastconvnext/prior.json, MODEL) per stage and op, "
                             "for H100/A100, and exit; measures nothing")
    parser.add_argument("--markdown", action="store_true", help="with --roofline: print it as markdown "
                                                               "(benchmarks/ROOFLINE.md)")
    parser.add_argument("--repeats", type=_positive_int, help="timed calls per implementation (default 30 CUDA, "
                                                              "15 CPU; --quick 10 CUDA, 25 CPU)")
    parser.add_argument("--passes", type=_comma_list(BOTH_PASSES), metavar="LIST",
                        help="model passes: infer, train (default: both; --quick on CPU: infer)")
    parser.add_argument("--warmup", type=_non_negative_int, help="untimed calls first (default 5 CUDA, 2 CPU; at "
                                                                 "least 1 is always run)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls and convs on CUDA (and in "
                                                            "the fp32 roofline)")
    parser.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice); "
                                                              "recorded with every result")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders (CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args):
    """Resolve every option against the per-device defaults."""
    from fastconvnext.tooling.bench.environment import resolve_device

    device = resolve_device(args.device)
    defaults = DEFAULTS[(device.type, bool(args.quick))]
    batch = args.batch or defaults["batch"]
    return runner.Settings(
        device=device,
        dtype=args.dtype or defaults["dtype"],
        sections=args.ops or defaults["sections"],
        model=args.model or defaults["model"],
        family=getattr(args, "family", "convnext"),
        batch=batch,
        op_batch=args.batch or (defaults["batch"] if device.type == "cpu" or args.quick else 64),
        resolution=args.resolution or defaults["resolution"],
        stage_models=args.stages or defaults["stage_models"],
        repeats=args.repeats or defaults["repeats"],
        warmup=defaults["warmup"] if args.warmup is None else args.warmup,
        output=args.output or Path(DEFAULT_OUTPUT),
        quick=bool(args.quick),
        progress=not args.no_progress,
        allow_tf32=bool(args.tf32),
        compile=not args.no_compile,
        model_passes=args.passes or defaults["passes"],
    )


def _roofline_only(args):
    from fastconvnext.tooling.bench import roofline_report

    batch, dtype = args.batch or ROOFLINE_BATCH, args.dtype or "bf16"
    text = (roofline_report.markdown_report(batch, dtype, args.tf32) if args.markdown
            else roofline_report.text_report(batch, dtype, args.tf32))
    print(text)
    if args.output is not None:
        _write_roofline(args.output, batch, dtype, args.tf32)
    return 0


def _write_roofline(directory, batch, dtype, allow_tf32):
    import csv

    from fastconvnext.tooling.bench import roofline_report

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "roofline.md").write_text(roofline_report.markdown_report(batch, dtype, allow_tf32) + "\n")
    rows = roofline_report.csv_rows(batch, dtype, allow_tf32)
    with (directory / "roofline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def quick_threads(args, settings):
    """(threads to set or None, note or None). --threads wins; else a CPU quick run on a busy machine uses one
    thread: contended threads made the ratio's interval +-17-71 % at load 6-9 on 2 cores, one thread +-4-11 %."""
    if args.threads:
        return args.threads, None
    if not settings.quick or settings.device.type != "cpu":
        return None, None
    from fastconvnext.tooling.bench import environment

    load, cores = environment.load_average(), os.cpu_count() or 1
    if load is None or cores == 1 or load <= 0.5 * cores:
        return None, None
    return 1, (f"--quick ran with 1 thread because the machine is busy ({environment.load_text(load, cores)}); "
               "contended threads make the ratio unreadable. Pass --threads to choose.")


def _progress_factory(enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda total: tqdm(total=total, unit="call", dynamic_ncols=True, file=sys.stderr)


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a Unix tool killed by SIGPIPE


def run(args):
    """Run `fastconvnext bench` with parsed arguments; returns the exit code. A reader that closes the pipe
    early (`fastconvnext bench --roofline | head`) ends the run quietly, as Unix tools do."""
    try:
        code = _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush of stdout again at exit: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return SIGPIPE_EXIT
    return code


def _run(args):
    if args.markdown and not args.roofline:
        print("fastconvnext bench: error: --markdown goes with --roofline", file=sys.stderr)
        return 2
    if args.roofline:
        return _roofline_only(args)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"fastconvnext bench: error: {error}", file=sys.stderr)
        return 2
    from fastconvnext.tooling.bench import report

    import torch

    threads_before = torch.get_num_threads()
    threads, why = quick_threads(args, settings)
    if threads:
        torch.set_num_threads(threads)
    try:
        outcome = runner.run(settings, _progress_factory(settings.progress))
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller keeps its own setting
    if why:
        outcome.notes.insert(0, why)
    print(report.terminal_report(outcome))
    settings.output.mkdir(parents=True, exist_ok=True)
    written = [report.write_csv(outcome.rows, settings.output / "bench.csv")]
    (settings.output / "bench.md").write_text(report.markdown_report(outcome))
    written.append(settings.output / "bench.md")
    if report.matplotlib_available():
        plot = report.write_plot(outcome, settings.output / "bench.png")
        if plot is not None:
            written.append(plot)
    else:
        print("matplotlib is not installed (pip install 'fastconvnext[bench]'): bench.png not written; "
              "the CSV and tables are complete.")
    roofline_dtype = settings.dtype if settings.device.type == "cuda" else "bf16"
    _write_roofline(settings.output, ROOFLINE_BATCH, roofline_dtype, settings.allow_tf32)
    written += [settings.output / "roofline.md", settings.output / "roofline.csv"]
    if settings.quick:
        print("\nModelled figures (MODEL, not measured): fastconvnext bench --roofline; written to roofline.md")
    print()
    print("Wrote " + ", ".join(str(p) for p in written))
    return 0 if outcome.rows else 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastconvnext.tooling.bench",
        description="Benchmark the fused ops and the model against eager PyTorch, torch.compile and transformers.",
    )
    return add_arguments(parser)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run(args)
