"""GPU acceptance run (issue 10 item 3): one command, one report, non-zero exit on any failed step.

Steps, each in its own Python process (a CUDA fault in one cannot take the others down), each with a
time limit (575 s in all, so under 10 minutes):
  kernel_tests   the kernel test files with FASTCONVNEXT_TEST_DEVICE=cuda (native kernels, real configs
                 and autotuner, ConvNeXt-T stage shapes at batch 8)
  inductor       torch.compile (default inductor backend, fullgraph) of ConvNeXt-T through both fused ops,
                 forward and backward, against the eager ops (tests/tolerance.py's rule, fp64 reference)
  training       50 steps of bf16-autocast AdamW training of ConvNeXt-T on random data (a fixed set of
                 batches), fused and eager from one initialization, losses side by side
  tune           fastconvnext.tune() on ConvNeXt-T (inference and training passes) and the policy table
  modelled       fused and eager timed at ConvNeXt-T stage shapes (batch 64, bf16) beside the static
                 model's prediction (fastconvnext.bench.ops_report.predicted_us, when present)
  calibrate      benchmarks/calibrate_machine.py: HBM, L2->SM, tensor-core and FFMA microbenchmarks, MEASURED
                 beside the static model's ASSUMED constants (issue 9)
Writes <output>/gpu_acceptance.md and <output>/gpu_acceptance.json (plus steps/<name>.json and logs).

    benchmarks/gpu_acceptance.sh OUTPUT_DIR            # or: python benchmarks/gpu_acceptance.py --output DIR
    python benchmarks/gpu_acceptance.py --output DIR --steps training,tune
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("kernel_tests", "inductor", "training", "tune", "modelled", "calibrate")
# Limits per step (sum 575 s, so the run stays under 10 minutes); not yet checked on a GPU.
STEP_TIMEOUT_S = {"kernel_tests": 180, "inductor": 80, "training": 100, "tune": 65, "modelled": 60, "calibrate": 90}
KERNEL_TEST_FILES = ("test_kernels_native.py", "test_dispatch_policy.py", "test_tuning.py", "test_kernel_env.py")
CONVNEXT_T = dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
STAGES_T = ((56, 96), (28, 192), (14, 384), (7, 768))
TRAINING_LOSS_RTOL = 0.05  # fused vs eager loss per step; bf16 rounding differs between the two paths


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float = 0.0
    summary: str = ""  # markdown
    data: dict = field(default_factory=dict)
    error: str = ""


# ------------------------------------------------------------------------------------ orchestration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="directory for the report (created)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list out of {', '.join(STEPS)}")
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--run-step", choices=STEPS, help=argparse.SUPPRESS)  # internal: one step, in-process
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps takes a comma list out of {', '.join(STEPS)}, got {args.steps!r}")
    if args.train_steps < 2 or args.train_batch < 1:
        parser.error(f"--train-steps must be >= 2 and --train-batch >= 1, got {args.train_steps}, {args.train_batch}")
    args.steps = steps
    return args


def subprocess_runner(args):
    """Runs one step as `python gpu_acceptance.py --run-step NAME` and reads its steps/NAME.json."""

    def run(name):
        steps_dir = args.output / "steps"
        steps_dir.mkdir(parents=True, exist_ok=True)
        result_path, log_path = steps_dir / f"{name}.json", steps_dir / f"{name}.log"
        result_path.unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--output", str(args.output), "--run-step", name,
                   "--train-steps", str(args.train_steps), "--train-batch", str(args.train_batch)]
        begin = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      timeout=STEP_TIMEOUT_S[name])
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.perf_counter() - begin
        if result_path.is_file():
            result = StepResult(**json.loads(result_path.read_text()))
        else:
            result = StepResult(name, False, error="no result written")
        result.seconds = seconds
        if rc is None:
            result.ok, result.error = False, f"timed out after {STEP_TIMEOUT_S[name]} s (log: {log_path})"
        elif rc != 0 and result.ok:
            result.ok, result.error = False, f"exit code {rc} (log: {log_path})"
        elif not result.ok and not result.error:
            result.error = f"exit code {rc} (log: {log_path})"
        return result

    return run


def orchestrate(steps, runner, progress=print):
    """Run every step (a failure does not stop the rest); a runner that raises counts as a failed step."""
    results = []
    for name in steps:
        progress(f"[gpu_acceptance] {name} ...")
        begin = time.perf_counter()
        try:
            result = runner(name)
        except Exception as error:  # the report must still be written
            result = StepResult(name, False, time.perf_counter() - begin, error=f"{type(error).__name__}: {error}")
        progress(f"[gpu_acceptance] {name}: {'ok' if result.ok else 'FAILED ' + result.error} ({result.seconds:.0f} s)")
        results.append(result)
    return results


def environment():
    env = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            env["gpu"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    except ImportError:
        env["torch"] = "not installed"
    for package in ("triton", "transformers", "fastconvnext"):
        try:
            from importlib import metadata

            env[package] = metadata.version(package)
        except Exception:
            env[package] = "not installed"
    return env


def write_report(output, results, env):
    """<output>/gpu_acceptance.md and .json; returns the markdown path."""
    output.mkdir(parents=True, exist_ok=True)
    passed = all(r.ok for r in results)
    lines = [f"# GPU acceptance run: {'PASSED' if passed else 'FAILED'}", "",
             "Measured on the machine below unless a figure is labelled as a model.", "",
             "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {r.name} | {'ok' if r.ok else 'FAILED: ' + r.error} | {r.seconds:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r.name}: {'ok' if r.ok else 'FAILED'}", ""]
        if r.error:
            lines += [f"Error: {r.error}", ""]
        if r.summary:
            lines.append(r.summary)
    md = output / "gpu_acceptance.md"
    md.write_text("\n".join(lines) + "\n")
    (output / "gpu_acceptance.json").write_text(json.dumps(
        {"passed": passed, "environment": env, "steps": [asdict(r) for r in results]}, indent=1, default=str))
    return md


def main(argv=None):
    args = parse_args(argv)
    if args.run_step:
        return _run_step_in_process(args)
    results = orchestrate(args.steps, subprocess_runner(args))
    md = write_report(args.output, results, environment())
    print(f"[gpu_acceptance] report: {md}")
    return 0 if all(r.ok for r in results) else 1


def _run_step_in_process(args):
    name = args.run_step
    try:
        result = STEP_FUNCTIONS[name](args)
    except Exception as error:
        import traceback

        traceback.print_exc()
        result = StepResult(name, False, error=f"{type(error).__name__}: {error}")
    steps_dir = args.output / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    (steps_dir / f"{name}.json").write_text(json.dumps(asdict(result), indent=1, default=str))
    return 0 if result.ok else 1


# -------------------------------------------------------------------------------------------- steps


def _md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Setup:
    """What the steps run on. The defaults are the acceptance run; tests shrink it to run the same code
    on CPU in Triton's interpreter (fp32, no autocast, tiny shapes, a fast timer)."""

    device: str = "cuda"
    model: dict = field(default_factory=lambda: dict(CONVNEXT_T))
    image: int = 224
    stages: tuple = STAGES_T  # (side, channels) of the modelled op shapes
    modelled_batch: int = 64
    tune_batch: int = 8
    dtype: str = "bf16"  # tune/modelled activations; training uses autocast to it when autocast is set
    autocast: bool = True
    timer: object = None  # None: fastconvnext.tuning.event_timer


SETUP = Setup()


def _torch_on_device():
    import torch

    if SETUP.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the acceptance run needs a GPU")
    return torch


def _sync(torch):
    if SETUP.device == "cuda":
        torch.cuda.synchronize()


def _dtype(torch):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[SETUP.dtype]


def step_kernel_tests(args):
    _torch_on_device()
    files = [f"tests/{name}" for name in KERNEL_TEST_FILES if (ROOT / "tests" / name).is_file()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTCONVNEXT_TEST_DEVICE"] = "cuda"
    env["XDG_CACHE_HOME"] = str(args.output / "cache")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=STEP_TIMEOUT_S["kernel_tests"] - 10)
    (args.output / "kernel_tests.log").write_text(done.stdout + done.stderr)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-15:]
    summary = "Files: " + ", ".join(files) + "\n\n```\n" + "\n".join(tail) + "\n```"
    return StepResult("kernel_tests", done.returncode == 0, summary=summary,
                      data={"returncode": done.returncode, "files": files, "tail": tail},
                      error="" if done.returncode == 0 else f"pytest exit code {done.returncode}")


def _script_module(path: Path):
    """A sibling script (tests/tolerance.py, benchmarks/calibrate_machine.py) by its path: no sys.path entry."""
    import importlib.util

    name = f"_gpu_acceptance_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tolerance():
    return _script_module(ROOT / "tests" / "tolerance.py")


def _convnext(torch, classify=False, num_labels=10):
    import fastconvnext

    torch.manual_seed(0)
    config = fastconvnext.ConvNextConfig(**SETUP.model, num_labels=num_labels, layer_scale_init_value=0.5)
    cls = fastconvnext.ConvNextForImageClassification if classify else fastconvnext.ConvNextModel
    return cls(config).to(SETUP.device)


def step_inductor(args):
    torch = _torch_on_device()
    import copy

    import fastconvnext

    tolerance = _tolerance()
    model = _convnext(torch).train()
    pixels = torch.randn(2, 3, SETUP.image, SETUP.image, device=SETUP.device)

    def forward_backward(m, dtype, compile_=False):
        m = copy.deepcopy(m).to(dtype)
        run = torch.compile(m, fullgraph=True) if compile_ else m  # default backend: inductor
        out = run(pixels.to(dtype)).pooler_output
        out.backward(torch.ones_like(out))
        return out.detach().double(), m.embeddings.patch_embeddings.weight.grad.detach().double()

    with fastconvnext.use_backend("eager"):
        reference = forward_backward(model, torch.float64)
        eager = forward_backward(model, torch.float32)
    torch._dynamo.reset()
    with fastconvnext.use_backend("triton"):
        fused = forward_backward(model, torch.float32, compile_=True)
    rows, ok = [], True
    for what, f, e, r in zip(("pooler_output", "d stem weight"), fused, eager, reference):
        limit = 2 * tolerance.max_abs_diff(e, r) + tolerance.ATOL[torch.float32]
        err = tolerance.max_abs_diff(f, r)
        ok &= err <= limit
        rows.append((what, f"{err:.3g}", f"{limit:.3g}", "ok" if err <= limit else "FAILED"))
    summary = (f"torch.compile(model, fullgraph=True), inductor, backend 'triton', ConvNeXt fp32 batch 2 at "
               f"{SETUP.image}², forward + backward; max |compiled - fp64 eager| against the rule "
               f"2*max|eager fp32 - fp64| + atol:\n\n"
               + _md_table(("tensor", "compiled error", "allowed", "result"), rows))
    return StepResult("inductor", bool(ok), summary=summary, data={"rows": rows},
                      error="" if ok else "compiled output outside the tolerance rule")


def _train(torch, model, batches, labels, steps, backend_name):
    import fastconvnext

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(SETUP.device, dtype=_dtype(torch), enabled=SETUP.autocast)
    losses, times = [], []
    with fastconvnext.use_backend(backend_name):
        for step in range(steps):
            i = step % len(batches)
            _sync(torch)
            begin = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(batches[i], labels=labels[i]).loss
            loss.backward()
            optimizer.step()
            _sync(torch)
            times.append((time.perf_counter() - begin) * 1e3)
            losses.append(loss.item())
    return losses, times


def training_verdict(fused_losses, eager_losses, cycle):
    """(ok, max relative difference, error): finite, fused within TRAINING_LOSS_RTOL of eager at every
    step, and (given two passes over the batches) a lower mean loss over the last pass than the first."""
    finite = all(math.isfinite(v) for v in fused_losses + eager_losses)
    rel = [abs(f - e) / max(abs(e), 1e-6) for f, e in zip(fused_losses, eager_losses)]
    worst = max(rel) if finite else float("nan")
    learned = all(sum(losses[-cycle:]) < sum(losses[:cycle]) for losses in (fused_losses, eager_losses)) \
        if len(fused_losses) >= 2 * cycle else True
    if not finite:
        return False, worst, "non-finite loss"
    if worst > TRAINING_LOSS_RTOL:
        return False, worst, f"fused and eager losses differ by {worst:.2%}"
    if not learned:
        return False, worst, "the loss did not decrease from the first pass over the batches to the last"
    return True, worst, ""


def step_training(args, cycle=4):
    torch = _torch_on_device()
    import copy

    model = _convnext(torch, classify=True).train()
    gen = torch.Generator(device=SETUP.device).manual_seed(1)
    batches = [torch.randn(args.train_batch, 3, SETUP.image, SETUP.image, device=SETUP.device, generator=gen)
               for _ in range(cycle)]
    labels = [torch.randint(0, 10, (args.train_batch,), device=SETUP.device, generator=gen) for _ in range(cycle)]
    fused_losses, fused_ms = _train(torch, copy.deepcopy(model), batches, labels, args.train_steps, "triton")
    eager_losses, eager_ms = _train(torch, copy.deepcopy(model), batches, labels, args.train_steps, "eager")
    ok, worst, error = training_verdict(fused_losses, eager_losses, cycle)
    rows = [(s + 1, f"{f:.4f}", f"{e:.4f}", f"{abs(f - e) / max(abs(e), 1e-6):.2%}")
            for s, (f, e) in enumerate(zip(fused_losses, eager_losses)) if s < 5 or s % 10 == 9 or s == len(fused_losses) - 1]
    median = lambda xs: sorted(xs[2:] or xs)[len(xs[2:] or xs) // 2]  # noqa: E731 (first steps compile, autotune)
    precision = f"{SETUP.dtype} autocast" if SETUP.autocast else "fp32"
    summary = (f"ConvNeXt classifier ({SETUP.model}), {precision}, AdamW lr 1e-4, batch {args.train_batch} at "
               f"{SETUP.image}², {args.train_steps} steps cycling over {cycle} fixed random batches, fused and eager "
               f"from one initialization. Measured median step: fused {median(fused_ms):.1f} ms, eager "
               f"{median(eager_ms):.1f} ms. Pass: finite, |fused-eager|/|eager| <= {TRAINING_LOSS_RTOL:.0%} at every "
               f"step (max {worst:.2%}), mean loss of the last pass below the first.\n\n"
               + _md_table(("step", "fused loss", "eager loss", "rel. diff"), rows))
    return StepResult("training", ok, summary=summary, error=error,
                      data={"fused_losses": fused_losses, "eager_losses": eager_losses, "fused_ms": fused_ms,
                            "eager_ms": eager_ms})


def step_tune(args):
    torch = _torch_on_device()
    os.environ["XDG_CACHE_HOME"] = str(args.output / "cache")
    import fastconvnext
    from fastconvnext import backend

    model = _convnext(torch).to(_dtype(torch))
    pixels = torch.randn(SETUP.tune_batch, 3, SETUP.image, SETUP.image, device=SETUP.device, dtype=_dtype(torch))
    tables = {}
    for training in (False, True):
        model.train(training)
        tables[training] = fastconvnext.tune(model, pixels, training=training, timer=SETUP.timer)
    keys = sorted(set(tables[False]) | set(tables[True]), key=lambda k: tuple(map(str, k)))
    rows = [(label, choice, source, fused_us, eager_us, backend.static_decision(key).choice)
            for key, (label, choice, source, fused_us, eager_us, _) in zip(keys, backend.policy_table(keys))]
    summary = (f"fastconvnext.tune() on ConvNeXt {SETUP.dtype} batch {SETUP.tune_batch} at {SETUP.image}² "
               "(inference, then training); µs are measured medians (CUDA events); 'default' is what the "
               "untuned policy (static model, else roofline) would have chosen (a MODEL).\n\n"
               + _md_table(("shape", "tuned choice", "source", "fused µs", "eager µs", "default"), rows))
    ok = len(keys) > 0 and all(r[2] == "tuned" for r in rows)
    return StepResult("tune", ok, summary=summary, data={"rows": rows},
                      error="" if ok else "no tuned shape recorded")


def _stage_call(torch, op, n, size, channels, dtype, needs_grad):
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=SETUP.device, dtype=dtype) * scale).requires_grad_(needs_grad)

    x = rand(n, size, size, channels)
    if op == "dwconv_layernorm":
        return (x, rand(channels, 1, 7, 7, scale=0.1), rand(channels), rand(channels), rand(channels), 1e-6)
    return (x, rand(n, size, size, channels), rand(4 * channels, channels, scale=0.05), rand(4 * channels, scale=0.05),
            rand(channels, 4 * channels, scale=0.05), rand(channels, scale=0.05), rand(channels, scale=0.5), "gelu", None)


def _predicted(op, shape, dtype, mode, arch):
    """The static model's {"fused_us", "eager_us"}, or None when ops_report or the table lacks it."""
    try:
        from fastconvnext.bench.ops_report import predicted_us
    except ImportError:
        return None
    try:
        return predicted_us(op, shape, dtype, mode, arch)
    except Exception as error:  # a model that cannot answer must not fail the measurement
        print(f"predicted_us failed for {op} {shape}: {type(error).__name__}: {error}")
        return None


def _ratio(measured, predicted):
    return f"{measured / predicted:.2f}" if predicted else "n/a"


def step_modelled(args):
    torch = _torch_on_device()
    from fastconvnext import backend, tuning

    arch = backend.device_arch() if SETUP.device == "cuda" else 90
    rows = []
    for size, channels in SETUP.stages:
        for op in backend.OPS:
            for mode in backend.MODES:
                call = _stage_call(torch, op, SETUP.modelled_batch, size, channels, _dtype(torch),
                                   mode == "forward_backward")
                tensors = [t for t in call[1:] if isinstance(t, torch.Tensor)]
                key = backend.policy_key(op, call[0], channels, tensors)
                measured = tuning.time_call(op, key, tuning._recorded(call), SETUP.timer or tuning.event_timer)
                shape = (SETUP.modelled_batch, size, size, channels)
                model = _predicted(op, shape, SETUP.dtype, mode, 90 if arch >= 90 else 80)
                rows.append((op, "x".join(map(str, shape)), mode,
                             f"{measured.fused_us:,.1f}", f"{model['fused_us']:,.1f}" if model else "not modelled",
                             _ratio(measured.fused_us, model and model["fused_us"]),
                             f"{measured.eager_us:,.1f}", f"{model['eager_us']:,.1f}" if model else "not modelled",
                             _ratio(measured.eager_us, model and model["eager_us"])))
    summary = (f"Per call, {SETUP.dtype}, stage shapes at batch {SETUP.modelled_batch}: measured median µs (CUDA "
               "events, this GPU) beside the static SASS model's prediction (a MODEL, kernels/perf_table.py; eager "
               "predicted = its optimistic floor); ratio = measured / modelled.\n\n"
               + _md_table(("op", "shape", "mode", "fused measured", "fused model", "ratio", "eager measured",
                            "eager model", "ratio"), rows))
    return StepResult("modelled", True, summary=summary, data={"rows": rows})


def step_calibrate(args):
    """calibrate_machine's table; off CUDA (the tests) its interpreter dry run, labelled as no measurement."""
    _torch_on_device()
    calibrate_machine = _script_module(ROOT / "benchmarks" / "calibrate_machine.py")
    dry_run = SETUP.device != "cuda"
    rows, suggest, facts = calibrate_machine.run_all(dry_run=dry_run)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "calibrate_machine.json").write_text(json.dumps(
        {"measured": not dry_run, "facts": facts, "suggested": suggest}, indent=1, default=str))
    return StepResult("calibrate", True, summary=calibrate_machine.report(rows, suggest, facts, dry_run),
                      data={"suggested": suggest, "facts": facts, "rows": rows})


STEP_FUNCTIONS = {"kernel_tests": step_kernel_tests, "inductor": step_inductor, "training": step_training,
                  "tune": step_tune, "modelled": step_modelled, "calibrate": step_calibrate}

if __name__ == "__main__":
    sys.exit(main())
