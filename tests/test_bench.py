"""The benchmark harness on CPU: the quick run's files, the roofline arithmetic, saved-bytes counting."""
import contextlib
import csv
import io
import os
import subprocess
import sys

import pytest
import torch

from fastconvnext.tooling.bench import cases, cli, runner, timing
from fastconvnext.tooling import roofline
from fastconvnext.tooling.bench.memory import count_saved, measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # The quick run's code path on a model small enough for a test (its real defaults: ConvNeXt-T 224² batch 8,
    # checked without running below). One thread: a loaded 2-core runner makes 2 threads crawl.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["--quick", "--output", str(out), "--threads", "1", "--model", "atto", "--resolution", "64",
                         "--batch", "2", "--repeats", "5", "--passes", "infer,train", "--no-progress"])
    (out / "printed.txt").write_text(printed.getvalue())  # beside the files it wrote; the run never reads it
    return code, out


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_csv_with_a_row_per_measurement(quick_run):
    code, out = quick_run
    assert code == 0
    rows = _csv_rows(out / "bench.csv")
    # atto model: transformers and fastconvnext's eager backend, inference and one training step
    assert len(rows) >= 3
    assert {(r["implementation"], r["pass"]) for r in rows} == {
        ("transformers", "infer"), ("transformers", "train"),
        ("fastconvnext-eager", "infer"), ("fastconvnext-eager", "train"),
    }
    for row in rows:
        assert float(row["median_ms"]) > 0
        assert float(row["q1_ms"]) <= float(row["median_ms"]) <= float(row["q3_ms"])
        assert float(row["img_per_s"]) == pytest.approx(int(row["batch"]) / (float(row["median_ms"]) / 1e3), rel=1e-3)


def test_csv_records_device_dtype_and_versions(quick_run):
    _, out = quick_run
    rows = _csv_rows(out / "bench.csv")
    columns = set(rows[0])
    assert {"device_type", "device_name", "dtype", "torch_version", "triton_version", "transformers_version",
            "fastconvnext_version", "driver_version", "cuda_version", "threads"} <= columns
    for row in rows:
        assert row["device_type"] == "cpu"  # a CPU figure is labelled as one
        assert row["dtype"] == "fp32"
        assert row["torch_version"] == torch.__version__
        assert row["threads"] == "1"
        assert row["peak_mem_mb"].startswith("n/a")  # no fake GPU memory figure on CPU
    import transformers

    assert rows[0]["transformers_version"] == transformers.__version__


def test_quick_run_writes_a_png_plot_and_no_fused_rows_on_cpu(quick_run):
    _, out = quick_run
    data = (out / "bench.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    summary = (out / "bench.md").read_text()
    assert "CPU figures, not GPU ones" in summary
    assert "fastconvnext (fused kernels) not run on CPU" in summary
    rows = _csv_rows(out / "bench.csv")
    assert all(r["implementation"] != "fastconvnext-fused" for r in rows)
    by_impl = {r["implementation"]: r for r in rows if r["section"] == "model"}
    theirs, mine = by_impl["transformers"], by_impl["fastconvnext-eager"]
    assert theirs["fastconvnext_impl"] == "fastconvnext-eager" and mine["fastconvnext_speedup"] == ""
    ratio = float(theirs["fastconvnext_speedup"])  # transformers' median over fastconvnext's: > 1 = faster
    assert ratio == pytest.approx(float(theirs["median_ms"]) / float(mine["median_ms"]), rel=1e-3)
    assert float(theirs["fastconvnext_ci_low"]) <= ratio <= float(theirs["fastconvnext_ci_high"])
    assert (out / "roofline.md").stat().st_size > 0


def test_quick_run_prints_a_ratio_interval_the_load_and_a_verdict(quick_run):
    _, out = quick_run
    summary = (out / "bench.md").read_text()
    assert "## Verdict" in summary
    verdicts = [line for line in summary.splitlines() if "the speed of transformers (95% interval" in line]
    assert len(verdicts) == 2  # infer and train
    assert all("machine load" in line and " -> " in line for line in verdicts)
    for row in _csv_rows(out / "bench.csv"):
        if row["implementation"] == "fastconvnext-eager":
            assert float(row["speedup_ci_low"]) <= float(row["speedup_vs_baseline"]) <= float(row["speedup_ci_high"])
        assert float(row["load_average"]) >= 0
    assert "torch.compile works on CPU" in summary


def test_quick_run_prints_what_was_measured_and_no_model_tables(quick_run):
    printed = (quick_run[1] / "printed.txt").read_text()
    assert "the speed of transformers (95% interval" in printed
    assert "MODEL" in printed and "--roofline" in printed  # one line pointing at the model, labelled
    assert "H100" not in printed and "A100" not in printed and "TB/s" not in printed, printed


def test_a_reader_closing_the_pipe_ends_the_run_quietly():
    # `fastconvnext bench --roofline | head`: the reader is gone before the report is written (read end closed).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "fastconvnext.tooling.bench", "--roofline"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert done.stderr == "", done.stderr[-2000:]
    assert done.returncode == cli.SIGPIPE_EXIT


def test_cpu_quick_defaults_are_convnext_t_224_batch_8_inference(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = cli.settings_from_args(cli.build_parser().parse_args(["--quick"]))
    assert (settings.model, settings.resolution, settings.batch, settings.model_passes) == ("tiny", 224, 8, ("infer",))
    assert settings.sections == ("model",) and settings.repeats >= 20


def test_cpu_quick_run_takes_one_thread_on_a_busy_machine_unless_told(monkeypatch):
    from fastconvnext.tooling.bench import environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    parse = cli.build_parser().parse_args
    quick, told, full = parse(["--quick"]), parse(["--quick", "--threads", "2"]), parse([])
    monkeypatch.setattr(environment, "load_average", lambda: 6.0)
    threads, why = cli.quick_threads(quick, cli.settings_from_args(quick))
    assert threads == 1 and "busy" in why and "load 6.0 on 2 cores" in why
    assert cli.quick_threads(told, cli.settings_from_args(told)) == (2, None)
    assert cli.quick_threads(full, cli.settings_from_args(full)) == (None, None)
    monkeypatch.setattr(environment, "load_average", lambda: 0.4)
    assert cli.quick_threads(quick, cli.settings_from_args(quick)) == (None, None)


def _timing(samples):
    return timing.Timing(tuple(float(x) for x in samples))


def test_ratio_of_medians_interval_brackets_the_ratio_and_narrows_with_agreement():
    steady = timing.ratio_of_medians(_timing([20, 20.2, 19.8, 20.1, 19.9] * 4), _timing([10, 10.1, 9.9, 10.05, 9.95] * 4))
    assert steady.value == pytest.approx(2.0)
    assert steady.low <= steady.value <= steady.high and steady.readable()
    noisy = timing.ratio_of_medians(_timing([5, 40, 12, 30, 8, 25, 15, 35] * 2), _timing([10, 11, 9, 10.5] * 4))
    assert noisy.half_width > 0.10 and not noisy.readable()
    again = timing.ratio_of_medians(_timing([5, 40, 12, 30, 8, 25, 15, 35] * 2), _timing([10, 11, 9, 10.5] * 4))
    assert again == noisy  # seeded: one set of samples prints one interval


def _model_row(impl, median, q1, q3, ci=("", "")):
    return {"section": "model", "case": "ConvNeXt-tiny 224²", "pass": "infer", "implementation": impl,
            "baseline": "transformers", "median_ms": median, "q1_ms": q1, "q3_ms": q3, "batch": 8, "repeats": 20,
            "speedup_vs_baseline": round(100 / median, 3), "speedup_ci_low": ci[0], "speedup_ci_high": ci[1],
            "load_average": 3.5, "img_per_s": 8 / (median / 1e3)}


def test_verdict_says_too_noisy_and_no_ratio_is_drawn_from_a_baseline_whose_spread_exceeds_the_difference():
    from fastconvnext.tooling.bench import report

    base = _model_row("transformers", 100, 60, 160)  # IQR 100 ms
    close = _model_row("fastconvnext-eager", 80, 75, 85, ci=(0.7, 1.6))  # 20 ms faster: inside the noise
    outcome = runner.Outcome([base, close], [], {}, loads=[3.5])
    (line,) = report.verdict_lines(outcome)
    assert "1.25x the speed of transformers (95% interval 0.70-1.60x" in line and "too noisy to read" in line
    assert "machine load 3.5" in line
    clear = _model_row("fastconvnext-eager", 80, 79, 81, ci=(1.2, 1.3))
    (line,) = report.verdict_lines(runner.Outcome([_model_row("transformers", 100, 99, 101), clear], [], {}))
    assert line.endswith("-> faster than transformers")


def test_the_plot_has_one_metric_and_the_text_reports_wording():
    """Each bar is fastconvnext's speed-up over another implementation (> 1 = fastconvnext faster) with its
    interval; a bar whose interval is wider than the text report's limit says what the text says."""
    from fastconvnext.tooling.bench import report

    def row(value, low, high):
        return {"fastconvnext_speedup": value, "fastconvnext_ci_low": low, "fastconvnext_ci_high": high}

    assert report._bar_label(row(1.25, 1.2, 1.3)) == "1.25×\n(1.20–1.30)"
    assert report._bar_label(row(1.25, 0.7, 1.6)) == report.NOISY
    assert "too noisy to read" in report.NOISY.replace("\n", " ")
    note = report.plot_footnote()
    assert "> 1 = fastconvnext faster" in note and "within noise" not in note
    assert "fastconvnext faster" in report.YLABEL


def test_rows_say_how_much_faster_fastconvnext_is_than_each_other_implementation():
    fast, slow = _timing([10, 10.1, 9.9] * 5), _timing([30, 30.3, 29.7] * 5)
    assert runner.fastconvnext_impl("model", {"transformers": 0, "fastconvnext-eager": 0}) == "fastconvnext-eager"
    assert runner.fastconvnext_impl("convnext_mlp", {"eager": 0, "fused": 0, "compile": 0}) == "fused"
    assert timing.ratio_of_medians(slow, fast).value == pytest.approx(3.0)  # the ratio the rows carry: other / mine


def test_roofline_option_prints_without_measuring(monkeypatch, capsys):
    def no_measurement(*args, **kwargs):
        raise AssertionError("--roofline must not measure anything")

    monkeypatch.setattr(runner, "run", no_measurement)
    monkeypatch.setattr(timing, "interleaved", no_measurement)
    assert cli.main(["--roofline"]) == 0
    text = capsys.readouterr().out
    assert "T-s1 C=96@56²" in text and "B-s4 C=1024@7²" in text
    assert "H100" in text and "A100" in text


def test_dwconv_layernorm_bytes_at_convnext_t_stage_1_by_hand():
    """Batch 64, 56x56, C=96, bf16, forward, worked out kernel by kernel."""
    pixels = 64 * 56 * 56  # 200,704
    activation = pixels * 96 * 2  # one [N, H, W, C] bf16 tensor: 38,535,168 bytes
    stats = 2 * pixels * 4  # fp32 mean and rstd per pixel: 1,605,632 bytes
    taps_and_bias = (96 * 7 * 7 + 96) * 2  # conv weight + bias in bf16
    ln_params = 2 * 96 * 2  # LayerNorm weight + bias in bf16
    # eager: conv reads x and its params, writes y1; layer_norm reads y1 and its params, writes y2 and stats
    eager = (activation + taps_and_bias + activation) + (activation + ln_params + activation + stats)
    assert eager == 155_756_288
    # fused: the params (49*96 taps, conv bias, LN weight and bias) cast to fp32 (read bf16, write fp32),
    # then one kernel reads x and the fp32 params and writes y and the stats
    params = 96 * 49 + 3 * 96
    fused = (params * 2 + params * 4) + (activation + params * 4 + activation + stats)
    assert fused == 78_725_888

    shape = roofline.StageShape("tiny", 1, 64, 56, 96)
    eager_model = roofline.traffic("dwconv_layernorm", "eager", "fwd", shape, "bf16")
    fused_model = roofline.traffic("dwconv_layernorm", "fused", "fwd", shape, "bf16")
    assert eager_model.bytes == eager
    assert fused_model.bytes == fused

    # H100 SXM bound: each kernel takes max(bytes / 3.35 TB/s, FLOPs / 67 TFLOP/s fp32 CUDA cores).
    elements = pixels * 96
    conv_s = max((2 * activation + taps_and_bias) / 3.35e12, (2 * 49 + 1) * elements / 67e12)  # 49 MACs + bias
    norm_s = max((2 * activation + ln_params + stats) / 3.35e12, 8 * elements / 67e12)
    kernel_s = max((2 * activation + params * 4 + stats) / 3.35e12, (2 * 49 + 1 + 8) * elements / 67e12)
    cast_s = params * 6 / 3.35e12
    assert eager_model.seconds(roofline.H100_SXM) == pytest.approx(conv_s + norm_s, rel=1e-9)
    assert fused_model.seconds(roofline.H100_SXM) == pytest.approx(kernel_s + cast_s, rel=1e-9)
    # the conv is compute bound on the CUDA cores (98 FLOPs per 4 bytes moved), LayerNorm memory bound
    assert conv_s == pytest.approx(99 * elements / 67e12) and norm_s > 8 * elements / 67e12
    assert eager_model.seconds(roofline.H100_SXM) * 1e6 == pytest.approx(51.96, abs=0.01)
    assert fused_model.seconds(roofline.H100_SXM) * 1e6 == pytest.approx(30.78, abs=0.01)


def test_eager_mlp_moves_23_activation_sized_tensors_per_forward():
    """fc1 1 read + 4 written, GELU 4 + 4, fc2 4 + 1, layer scale 1 + 1, residual 2 + 1 (in units of M*C)."""
    shape = roofline.StageShape("tiny", 1, 64, 56, 96)
    m, c, d, s = 64 * 56 * 56, 96, 384, 2
    weights = (d * c + d) * s + (c * d + c) * s + c * s  # W1, b1, W2, b2, gamma
    assert roofline.traffic("convnext_mlp", "eager", "fwd", shape, "bf16").bytes == 23 * m * c * s + weights


def test_modelled_kernel_layout_matches_the_kernels():
    """The roofline's 'as built' numbers follow constants of the kernel modules; fail loudly if they move."""
    from fastconvnext.kernels import convnext_mlp_kernel, dwconv_layernorm_kernel

    assert roofline.DWCONV_FUSED.partial_programs == dwconv_layernorm_kernel.PARTIAL_PROGRAMS
    assert roofline.DWCONV_FUSED.wgrad_block_p == dwconv_layernorm_kernel._wgrad_config()[0]
    tiles = roofline.mlp_fused_tiles(96, "bf16", 64 * 56 * 56)
    assert tiles.part_rows == convnext_mlp_kernel._PART_ROWS
    assert tiles.dw_segments == min(convnext_mlp_kernel._MAX_SEGMENTS,
                                    -(-64 * 56 * 56 // convnext_mlp_kernel._SEGMENT_ROWS))


def test_saved_for_backward_counts_by_hand():
    """N=2, 7x7, C=8, fp32 (M = 98 rows): eager MLP keeps h and GELU(h) ([M, 32] each) and fc2's output
    ([M, 8], for the layer-scale grad); the fused MLP keeps only y2 = fc2's output; eager dwconv+LN keeps the
    conv output and LayerNorm's fp32 mean and rstd."""
    shape = roofline.StageShape("tiny", 4, 2, 7, 8)
    requests = [("convnext_mlp", "eager", shape, "fp32"), ("convnext_mlp", "fused", shape, "fp32"),
                ("dwconv_layernorm", "eager", shape, "fp32"), ("dwconv_layernorm", "fused", shape, "fp32")]
    mlp_eager, mlp_fused, dw_eager, dw_fused = measure(requests)  # child process, FakeTensorMode
    assert mlp_eager.extra == 2 * 98 * 32 * 4 + 98 * 8 * 4
    assert mlp_fused.extra == 98 * 8 * 4
    assert dw_eager.extra == 98 * 8 * 4 + 2 * 98 * 4
    assert dw_fused.extra < dw_eager.extra


def test_count_saved_counts_a_storage_once_and_excludes_inputs():
    x = torch.randn(4, 5, requires_grad=True)

    def fn(x):
        y = x.exp()  # saves its output y (new)
        return y * y  # saves y twice: still one storage

    counted = count_saved(fn, {"x": x})
    assert counted.extra == 4 * 5 * 4
    assert counted.saved == 4 * 5 * 4


def test_load_text_does_not_count_the_benchmark_itself_as_competition():
    from fastconvnext.tooling.bench import environment

    assert "busy" not in environment.load_text(2.1, cores=2, own_threads=2)
    assert "this run's 2 thread(s) included" in environment.load_text(2.1, cores=2, own_threads=2)
    assert "busy" in environment.load_text(3.5, cores=2, own_threads=2)
    assert "busy" in environment.load_text(1.2, cores=2)  # before the run starts, all load is other work


def test_bench_puts_measured_times_beside_the_prior_and_autos_choice():
    """The CUDA table: measured fused and eager, the prior's prediction, and what auto runs (here from the prior)."""
    from fastconvnext import backend
    from fastconvnext.tooling.bench import report
    from fastconvnext.tooling.roofline import StageShape

    case = cases.OpCase("convnext_mlp", StageShape("tiny", 1, 64, 56, 96), "bf16", "cuda", "fwd")
    rows = [{"section": "convnext_mlp", "case": case.label, "pass": "fwd", "implementation": impl, "median_ms": ms}
            for impl, ms in (("fused", 0.2), ("eager", 0.5), ("compile", 0.3))]
    outcome = runner.Outcome(rows, [], {"device_type": "cuda"}, groups=[runner.Group("convnext_mlp", case, [])])
    prior = {("convnext_mlp", 90, "bf16", 96, 3136, 64, "forward"): {"fused_us": 250.0, "eager_us": 400.0}}
    backend.clear_policy()
    try:
        with backend.use_predicted_table(prior):
            (row,) = report.prior_rows(outcome, arch=90)
    finally:
        backend.clear_policy()
    assert row == ["convnext_mlp", "64x56x56x96", "fwd", "200.0", "500.0", "2.50", "250.0", "400.0", "1.60",
                   "fused (model)"]


def test_the_eager_estimate_charges_each_step_at_its_public_efficiency():
    """Worked by hand at ConvNeXt-T stage 1, batch 64, bf16, H100: the floor at peaks, the estimate at the public
    fractions (roofline.EAGER_EFFICIENCY, sources in EAGER_SOURCES)."""
    gpu = roofline.H100_SXM
    shape = roofline.StageShape("t", 1, 64, 56, 96)
    pixels, c = 64 * 56 * 56, 96
    conv = roofline.traffic("dwconv_layernorm", "eager", "fwd", shape, "bf16").steps[0]
    assert conv.unit == "dwconv" and conv.flops == 2 * 49 * pixels * c + pixels * c
    floor = max(conv.bytes / 3.35e12, conv.flops / 67e12)
    estimate = max(conv.bytes / (0.8 * 3.35e12), conv.flops / (0.15 * 67e12))
    assert conv.seconds(gpu, "bf16") == pytest.approx(floor)
    assert conv.estimate_seconds(gpu, "bf16") == pytest.approx(estimate)
    assert estimate > 4 * floor  # the conv is compute-bound at 15 % of the FP32 peak
    fc1 = roofline.traffic("convnext_mlp", "eager", "fwd", shape, "bf16").steps[0]
    assert fc1.unit == "matmul"
    assert fc1.estimate_seconds(gpu, "bf16") == pytest.approx(
        max(fc1.bytes / (0.8 * 3.35e12), 2 * pixels * c * 4 * c / (0.78 * 989e12)))
    backward = roofline.traffic("dwconv_layernorm", "eager", "fwd+bwd", shape, "bf16").steps
    assert [s.unit for s in backward if s.unit.startswith("dwconv")] == ["dwconv", "dwconv_bwd", "dwconv_bwd"]
    whole = roofline.traffic("block", "eager", "fwd+bwd", shape, "bf16")
    assert whole.estimate_seconds(gpu) == pytest.approx(sum(s.estimate_seconds(gpu, "bf16") for s in whole.steps))
    assert whole.estimate_seconds(gpu) > whole.seconds(gpu)


@pytest.mark.parametrize("family", ["convnextv2", "dinov3"])
def test_model_cases_of_the_other_families_run_both_sides_with_the_same_weights(family):
    """bench --family: fastconvnext's and transformers' model of that family, same weights, same output."""
    case = cases.ModelCase("atto", 2, 32, "fp32", "cpu", "infer", family)
    assert case.label.startswith(cases.FAMILIES[family][2])
    ours, theirs = cases.build_models("atto", seed=0, family=family)
    assert type(ours).__name__ == type(theirs).__name__ == cases.FAMILIES[family][1]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cases._pooled(ours(pixels)), cases._pooled(theirs(pixels)), rtol=0, atol=1e-5)
    for impl in ("transformers", "fastconvnext-eager"):
        cases.prepare_model(case, impl).run()
    parsed = cli.build_parser().parse_args(["--family", family, "--device", "cpu"])
    assert cli.settings_from_args(parsed).family == family
