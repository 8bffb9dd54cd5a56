"""The `fastconvnext` command: classify images, convert checkpoints, show the setup, run benchmarks.

Exit codes: 0 success, 1 the command failed while running (missing or unreadable files, a checkpoint
that cannot be loaded, no CUDA, ...), 2 the command line itself is wrong (argparse's usage errors),
130 interrupted. Errors are printed as one `fastconvnext: error: ...` line on stderr (a checkpoint
mismatch report adds indented lines), without a traceback unless --traceback is given. Text that comes
from files (labels, paths, messages) is escaped before it reaches the terminal.

--help, --version and usage errors answer without importing torch, PIL or Triton.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import traceback
import unicodedata
import warnings
from importlib import metadata
from pathlib import Path

PROG = "fastconvnext"

DESCRIPTION = """\
ConvNeXt on fused Triton kernels: a drop-in for transformers' ConvNeXt models.

Models (ConvNeXt, ConvNeXt V2, DINOv3-ConvNeXt) are read from a transformers directory (config.json +
model.safetensors or pytorch_model.bin), a single checkpoint file (.safetensors/.pth/.pt/.bin/.ckpt in
transformers', timm's or the original facebookresearch layout; DINOv3 needs its directory) or, with
huggingface_hub, a Hub id."""

EPILOG = """\
examples:
  fastconvnext classify --model ./convnext-tiny-224 cat.jpg dog.png --top-k 3
  fastconvnext classify --model convnext_tiny.pth photos/*.jpg --device cuda --dtype bf16 --json
  fastconvnext convert convnext_tiny_1k_224_ema.pth ./convnext-tiny-224
  fastconvnext info
  fastconvnext bench --help

environment:
  FASTCONVNEXT_BACKEND=auto|triton|eager   which implementation the fused ops use (default auto)
  FASTCONVNEXT_MAX_IMAGE_PIXELS=N          largest image, decoded or resized, in pixels (default 178956970)"""

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What a failing command raises for its user's input or environment; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


class CommandError(Exception):
    """A runtime failure with a message meant for the user (exit code 1)."""


# ---------------------------------------------------------------------------------------------------------------
# Parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; `argv` only decides whether the bench options are loaded (they import more)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_fastconvnext_version()}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback when a command fails")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_classify(commands)
    _add_convert(commands)
    _add_info(commands)
    _add_bench(commands, load_options=_first_positional(argv) == "bench")
    return parser


def _subparser(commands, name: str, help_text: str, description: str, epilog: str | None = None):
    parser = commands.add_parser(
        name, help=help_text, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # also after the command (`fastconvnext classify ... --traceback`); SUPPRESS keeps a value given before it
    parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback when the command fails")
    return parser


def _add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=("auto", "triton", "eager"),
        help="implementation of the fused ops (default: $FASTCONVNEXT_BACKEND or auto)",
    )


def _add_ignore_mismatched_sizes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ignore-mismatched-sizes", action="store_true",
        help="re-initialize checkpoint tensors whose shape differs from the model's (e.g. a new head) "
             "instead of failing; as from_pretrained(ignore_mismatched_sizes=True)",
    )


def _add_classify(commands) -> None:
    parser = _subparser(
        commands, "classify", "print the top-k classes of images",
        "Classify images with a ConvNeXt image-classification checkpoint.\n\n"
        "Preprocessing comes from MODEL/preprocessor_config.json when MODEL is a directory that has one;\n"
        "otherwise the ImageNet evaluation settings are used (shortest edge = config.image_size,\n"
        "crop 224/256, bicubic, ImageNet mean/std).\n\n"
        "Scores as transformers' image-classification pipeline gives them: softmax probabilities for\n"
        "single-label classification, sigmoid probabilities for a multi-label or one-logit head, and the\n"
        "raw scores (JSON key \"score\", not \"probability\") for problem_type \"regression\".",
        "examples:\n"
        "  fastconvnext classify --model ./convnext-tiny-224 cat.jpg\n"
        "  fastconvnext classify --model model.safetensors *.png --top-k 1 --json",
    )
    parser.add_argument("--model", "-m", required=True, metavar="PATH",
                        help="transformers directory, checkpoint file or Hub id")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    parser.add_argument("--top-k", "-k", type=positive_int, default=5, metavar="K",
                        help="classes shown per image (default 5)")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=8, metavar="N",
                        help="images per forward pass (default 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu (default)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="model and input dtype (default fp32)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    _add_ignore_mismatched_sizes_option(parser)
    _add_backend_option(parser)
    parser.set_defaults(handler=run_classify)


def _add_convert(commands) -> None:
    parser = _subparser(
        commands, "convert", "convert a checkpoint to a transformers directory",
        "Convert any supported checkpoint (transformers directory, timm or original facebookresearch\n"
        "file, Hub id) into a transformers directory: config.json, model.safetensors and\n"
        "preprocessor_config.json, loadable by transformers' from_pretrained and by fastconvnext.\n"
        "The model class follows the checkpoint: with a classifier head ConvNextForImageClassification,\n"
        "else ConvNextModel (or ConvNextBackbone); ConvNeXt V2 and DINOv3-ConvNeXt likewise.",
        "example:\n  fastconvnext convert convnext_tiny_1k_224_ema.pth ./convnext-tiny-224",
    )
    parser.add_argument("source", metavar="SRC", help="checkpoint file, transformers directory or Hub id")
    parser.add_argument("destination", metavar="DST", help="output directory (created if needed)")
    parser.add_argument("--dtype", choices=("keep",) + tuple(DTYPES), default="keep",
                        help="dtype of the written weights (default: keep the checkpoint's)")
    _add_ignore_mismatched_sizes_option(parser)
    parser.set_defaults(handler=run_convert)


def _add_info(commands) -> None:
    parser = _subparser(
        commands, "info", "show versions, devices and which kernels would run",
        "Show library versions, CUDA devices, the backend setting and the implementation each fused op\n"
        "would use for CUDA and CPU tensors.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_backend_option(parser)
    parser.set_defaults(handler=run_info)


def _add_bench(commands, load_options: bool) -> None:
    parser = _subparser(
        commands, "bench", "benchmark fused kernels and models against eager PyTorch",
        "Benchmark fastconvnext against eager PyTorch, torch.compile and transformers; on CPU, --quick gives a "
        "first ratio with its interval and the machine load.",
    )
    parser.set_defaults(handler=run_bench)
    if not load_options:
        return  # the other commands need no benchmark imports
    try:
        from fastconvnext.tooling.bench.cli import add_arguments
    except ImportError as error:
        parser.set_defaults(bench_unavailable=str(error))
        parser.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return
    add_arguments(parser)


def _first_positional(argv: list[str] | None) -> str | None:
    return next((arg for arg in (argv or []) if not arg.startswith("-")), None)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: choose a command: classify, convert, info or bench", file=sys.stderr)
        return 2
    try:
        with _backend_scope(getattr(args, "backend", None)), _cli_warnings():
            return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CommandError,) + EXPECTED_ERRORS as error:
        if args.traceback:
            traceback.print_exc()
        print(f"{PROG}: error: {_message(error)}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _cli_warnings():
    """Show warnings as `fastconvnext: warning: ...` (escaped, detail lines indented) instead of Python's
    `file:line: Category: ...` form, for the duration of a command."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {_message(message)}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _message(error: BaseException) -> str:
    """The error's text; the first line carries the point, later lines (a loader's tensor list) stay indented."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename:  # "[Errno 2] ..." reads worse
        text = f"{error.strerror}: {error.filename}"
    first, *rest = text.splitlines()
    lines = [first] + [f"  {line.rstrip()}" for line in rest if line.strip()]
    return "\n".join(terminal_safe(line) for line in lines)


# Unicode categories never printed raw: controls (C0, DEL, C1), format characters (bidi overrides and
# isolates, zero-width marks), line/paragraph separators, surrogates, private use and unassigned code points.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def terminal_safe(text: str) -> str:
    """`text` with every character that could move the cursor, recolour, retitle or reorder the terminal
    (ESC sequences, C0/C1 controls, bidi overrides, ...) written as a visible \\xNN / \\uNNNN escape."""
    return "".join(_escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    if unicodedata.category(char) not in _UNPRINTABLE_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# ---------------------------------------------------------------------------------------------------------------
# classify


def run_classify(args: argparse.Namespace) -> int:
    import torch

    image_paths = [Path(p) for p in args.images]
    _check_images_readable(image_paths)
    device = _pick_device(args.device)
    processor = _saved_processor(args.model)  # a broken preprocessor_config.json fails before the model loads
    model = _load_classifier(args.model, device, getattr(torch, DTYPES[args.dtype]), args.ignore_mismatched_sizes)
    if processor is None:
        processor = _imagenet_processor(args.model, model.config)
    function = score_function(model.config)
    if function == "none":
        print(f"{PROG}: note: {terminal_safe(_RAW_SCORES_NOTE.format(model.config.problem_type))}", file=sys.stderr)
    predictions = _predict(model, processor, image_paths, args.batch_size, min(args.top_k, model.config.num_labels),
                           function)
    if args.json:
        print(json.dumps(list(predictions), indent=2))
    else:
        for result in predictions:  # printed batch by batch
            _print_prediction(result)
    return 0


def _predict(model, processor, image_paths: list[Path], batch_size: int, top_k: int, function: str = "softmax"):
    """Yield {"image", "predictions": [{"label", "index", "probability"}, ...]} per image, in order; with
    function "none" (regression) the value is the raw logit, under "score" instead of "probability"."""
    import torch

    key = "score" if function == "none" else "probability"
    for start in range(0, len(image_paths), batch_size):
        batch_paths = image_paths[start : start + batch_size]
        # Paths, not decoded images: the processor names the file in its errors (EXIF orientation applied).
        pixels = processor([str(p) for p in batch_paths], return_tensors="pt").pixel_values
        with torch.inference_mode():
            logits = model(pixels.to(device=model.device, dtype=model.dtype)).logits.float()
        # a stable descending sort: equal scores keep label order, as the pipeline's sorted() does
        values, indices = _scores(logits, function).sort(dim=-1, descending=True, stable=True)
        for path, scores, ids in zip(batch_paths, values[:, :top_k].tolist(), indices[:, :top_k].tolist()):
            yield {"image": str(path), "predictions": [
                {"label": _label(model.config, i), "index": i, key: v} for v, i in zip(scores, ids)
            ]}


@contextlib.contextmanager
def _backend_scope(name: str | None):
    """Run a command under --backend when given, restoring the previous setting afterwards."""
    if name is None:
        yield
        return
    from fastconvnext.backend import use_backend

    with use_backend(name):
        yield


def _check_images_readable(paths: list[Path]) -> None:
    """Fail before the model is loaded when an image is missing, not an image or over the pixel limit
    (reads headers only); the errors name the file."""
    from fastconvnext.image_processing import check_image_file

    for path in paths:
        if not path.exists():
            raise CommandError(f"image not found: {path}")
        if path.is_dir():
            raise CommandError(f"expected an image file, got a directory: {path}")
        check_image_file(path)


def _pick_device(choice: str):
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(choice)


def _load_model(path: str, **options):
    """`load_pretrained`, with the foreign exception types a broken file can raise turned into one error
    naming the file (ValueError/TypeError/OSError/RuntimeError pass through, prefixed with the path if needed)."""
    from fastconvnext.checkpoint import load_pretrained

    try:
        return load_pretrained(None, path, **options)
    except CommandError:
        raise
    except EXPECTED_ERRORS as error:
        if str(path) in str(error):
            raise
        raise CommandError(f"{path}: {_message(error)}") from error
    except _foreign_load_errors() as error:
        raise CommandError(f"cannot load {path}: {type(error).__name__}: {error}") from error


def _foreign_load_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the libraries under the loader (pickle, zipfile, safetensors, torch's device
    checks) that mean a broken file or an unusable map_location, not a bug here."""
    import pickle
    import struct
    import zipfile

    errors = [AssertionError, EOFError, pickle.UnpicklingError, struct.error, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError
    except ImportError:
        pass
    else:
        errors.append(SafetensorError)
    return tuple(errors)


def _load_classifier(path: str, device, dtype, ignore_mismatched_sizes: bool = False):
    from fastconvnext.convnext_v2 import ConvNextV2ForImageClassification
    from fastconvnext.modeling import ConvNextForImageClassification

    model = _load_model(path, map_location=device, dtype=dtype, ignore_mismatched_sizes=ignore_mismatched_sizes)
    if not isinstance(model, (ConvNextForImageClassification, ConvNextV2ForImageClassification)):
        raise CommandError(
            f"{path} has no classification head (it loads as {type(model).__name__}); classify needs a "
            "ConvNextForImageClassification or ConvNextV2ForImageClassification checkpoint"
        )
    return model


def _processor_for(model_path: str, config):
    """MODEL/preprocessor_config.json when there is one, else the ImageNet evaluation settings (with a note)."""
    processor = _saved_processor(model_path)
    return _imagenet_processor(model_path, config) if processor is None else processor


def _saved_processor(model_path: str):
    """The processor saved in the model directory, or None when there is none."""
    from fastconvnext.image_processing import PREPROCESSOR_CONFIG_NAME, ConvNextImageProcessor

    directory = Path(model_path)
    if directory.is_dir() and (directory / PREPROCESSOR_CONFIG_NAME).is_file():
        return ConvNextImageProcessor.from_pretrained(directory)
    return None


def _imagenet_processor(model_path: str, config):
    from fastconvnext.image_processing import PREPROCESSOR_CONFIG_NAME, ConvNextImageProcessor

    try:
        processor = ConvNextImageProcessor.for_imagenet(image_size=config.image_size)
    except (TypeError, ValueError) as error:
        raise CommandError(f"{model_path} has no {PREPROCESSOR_CONFIG_NAME} and its config's {error}") from None
    note = (f"no {PREPROCESSOR_CONFIG_NAME} with {model_path}; using the ImageNet evaluation settings "
            f"(ConvNextImageProcessor.for_imagenet(image_size={config.image_size}))")
    print(f"{PROG}: note: {terminal_safe(note)}", file=sys.stderr)
    return processor


SCORE_FUNCTIONS = ("sigmoid", "softmax", "none")
_RAW_SCORES_NOTE = ("config.problem_type is {!r}: the values shown are the model's raw scores (logits), "
                    "not probabilities")


def score_function(config) -> str:
    """What turns logits into the scores shown, decided as transformers' ImageClassificationPipeline does by
    default (postprocess with function_to_apply=None): "none" (raw scores) for problem_type "regression";
    "sigmoid" for "multi_label_classification" or a single logit; "softmax" for
    "single_label_classification" or several logits; else config.function_to_apply, else "none"."""
    problem_type, num_labels = config.problem_type, config.num_labels
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem_type == "single_label_classification" or num_labels > 1:
        return "softmax"
    function = getattr(config, "function_to_apply", "none")
    if str(function).lower() not in SCORE_FUNCTIONS:
        raise CommandError(f"config.function_to_apply must be one of {SCORE_FUNCTIONS}, got {function!r}")
    return str(function).lower()


def _scores(logits, function: str):
    if function == "sigmoid":
        return logits.sigmoid()
    if function == "softmax":
        return logits.softmax(dim=-1)
    return logits


def _label(config, index: int) -> str:
    return str(config.id2label.get(index, f"LABEL_{index}"))


def _print_prediction(result: dict) -> None:
    """`  1. 0.9731  label` per class; raw scores (regression) read `  1. score 2.5000  label`."""
    print(terminal_safe(result["image"]))
    for rank, prediction in enumerate(result["predictions"], start=1):
        if "probability" in prediction:
            value = f"{prediction['probability']:.4f}"
        else:
            value = f"score {prediction['score']:.4f}"
        print(f"  {rank}. {value}  {terminal_safe(prediction['label'])}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# convert


def run_convert(args: argparse.Namespace) -> int:
    import torch

    destination = Path(args.destination)
    if destination.exists() and not destination.is_dir():
        raise CommandError(f"destination exists and is not a directory: {destination}")
    dtype = "auto" if args.dtype == "keep" else getattr(torch, DTYPES[args.dtype])
    model = _load_model(args.source, dtype=dtype, ignore_mismatched_sizes=args.ignore_mismatched_sizes)
    processor = _processor_for(args.source, model.config)  # before anything is written: no partial output
    model.save_pretrained(destination)
    processor_files = processor.save_pretrained(destination)
    print(terminal_safe(f"wrote {destination}: {type(model).__name__} ({model.num_parameters():,} parameters, "
                        f"{model.dtype}), {', '.join(Path(name).name for name in processor_files)}"))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# info


def run_info(args: argparse.Namespace) -> int:
    backend_report, backend_error = _backend_report()
    report = {"versions": _versions(), "devices": _devices(), "backend": backend_report}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for section, values in report.items():
            print(f"{section}:")
            width = max(map(len, values), default=0)
            for key, value in values.items():
                print(f"  {key:<{width}}  {terminal_safe(str(value))}")
    if backend_error is not None:  # the report is still shown: it is what one runs to find such a problem
        raise backend_error
    return 0


def _versions() -> dict[str, str]:
    import torch

    versions = {
        "python": platform.python_version(), "fastconvnext": _fastconvnext_version(), "torch": torch.__version__,
    }
    for package in ("triton", "transformers"):
        versions[package] = _installed_version(package)
    return versions


def _installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _fastconvnext_version() -> str:
    from fastconvnext import __version__

    return __version__


def _devices() -> dict[str, str]:
    import torch

    devices = {"cuda available": str(torch.cuda.is_available()), "torch cuda build": str(torch.version.cuda)}
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        devices[f"cuda:{index}"] = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
    return devices


BACKEND_ENV_VAR = "FASTCONVNEXT_BACKEND"


def _backend_report() -> tuple[dict[str, str], ValueError | None]:
    """The backend section of `info`, and the error an invalid $FASTCONVNEXT_BACKEND raised (else None)."""
    report = {
        BACKEND_ENV_VAR: os.environ.get(BACKEND_ENV_VAR, "(unset)"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "(unset)"),
    }
    try:
        from fastconvnext import backend

        setting = backend.get_backend()
        choices = {op: str(choice) for op, choice in backend.describe().items()}
    except ValueError as error:  # a bad $FASTCONVNEXT_BACKEND, raised at import or at first use
        return {"setting": f"invalid ({error})", **report}, error
    return {"setting": setting, **report, **choices}, None


# ---------------------------------------------------------------------------------------------------------------
# bench


def run_bench(args: argparse.Namespace) -> int:
    unavailable = getattr(args, "bench_unavailable", None)
    if unavailable is not None:
        raise CommandError(f"the benchmark harness is not available in this install ({unavailable})")
    from fastconvnext.tooling.bench.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
