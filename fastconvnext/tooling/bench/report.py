"""Turning measured rows into the terminal table, bench.md, bench.csv and bench.png."""
from __future__ import annotations

import csv
import math
import importlib.util
import textwrap
from pathlib import Path

from fastconvnext.tooling.bench import cases, environment, timing
from fastconvnext.tooling import roofline
from fastconvnext.tooling.bench.runner import CSV_COLUMNS
from fastconvnext.tooling.bench.table import format_table, markdown_table

SECTION_TITLES = {
    "dwconv_layernorm": "dwconv 7x7 + LayerNorm (per call)",
    "convnext_mlp": "MLP: Linear-GELU-Linear-layer scale-residual (per call)",
    "model": "Model end to end",
}
MB = 1e6


def _fmt(value, digits=None):
    """Numbers with about four significant digits (or a fixed number of decimals)."""
    if value in ("", None):
        return ""
    if isinstance(value, str):
        return value
    if digits is None:
        magnitude = math.floor(math.log10(abs(value))) if value else 0
        digits = max(0, 3 - magnitude)  # four significant digits, none lost below 1 ms
    return f"{value:,.{digits}f}"


def _throughput(row):
    if row["section"] == "model":
        return f"{row['img_per_s']:,.1f} img/s"
    parts = []
    if row["gb_per_s"] != "":
        parts.append(f"{row['gb_per_s']:,.1f} GB/s")
    parts.append(_flop_rate(row["tflop_per_s"]))
    if row["pct_of_hbm_peak"] != "":
        parts.append(f"{row['pct_of_hbm_peak']}% HBM")
    return ", ".join(parts)


def _flop_rate(tflop_per_s):
    """TFLOP/s, or GFLOP/s where that would print as 0.00 (CPU rates)."""
    if tflop_per_s == "":
        return ""
    return f"{tflop_per_s:.2f} TFLOP/s" if tflop_per_s >= 0.1 else f"{tflop_per_s * 1e3:,.1f} GFLOP/s"


def _speedup(row):
    value = row["speedup_vs_baseline"]
    if value == "" or row["implementation"] == row["baseline"]:
        return "1.00× (baseline)" if value != "" else ""
    return f"{value:.2f}×"


TABLE_HEADERS = ("case", "pass", "implementation", "median ms", "IQR ms", "throughput", "peak mem MB",
                 "saved extra MB", "vs baseline")


def _table_cells(row):
    return [
        row["case"], row["pass"], cases.IMPL_LABELS[row["implementation"]], _fmt(row["median_ms"]),
        f"{_fmt(row['q1_ms'])}–{_fmt(row['q3_ms'])}", _throughput(row),
        _fmt(row["peak_mem_mb"], 1) if not isinstance(row["peak_mem_mb"], str) else row["peak_mem_mb"],
        _fmt(row["saved_extra_mb"], 1), _speedup(row),
    ]


def _analytic_cells(outcome):
    """Per op case: modelled bytes per call eager vs fused and bytes saved for backward (any device)."""
    body = []
    for group in outcome.groups:
        if group.section == "model":
            continue
        case = group.case
        eager = roofline.traffic(case.op, "eager", case.pass_, case.shape, case.dtype)
        fused = roofline.traffic(case.op, "fused", case.pass_, case.shape, case.dtype)
        cells = [case.label, case.shape_text, case.pass_, f"{eager.bytes / MB:,.1f}", f"{fused.bytes / MB:,.1f}",
                 f"{fused.bytes / eager.bytes - 1:+.0%}"]
        if case.pass_ == "fwd+bwd":
            e, f = (outcome.saved.get((case.op, case.shape, i)) for i in ("eager", "fused"))
            cells += [f"{e.extra / MB:,.1f}" if e else "n/a", f"{f.extra / MB:,.1f}" if f else "n/a"]
        else:
            cells += ["", ""]
        body.append(cells)
    return body


ANALYTIC_HEADERS = ("case", "shape", "pass", "eager MB moved", "fused MB moved", "fused vs eager",
                    "eager saved MB", "fused saved MB")
ANALYTIC_NOTE = (
    "MB moved: the byte model of fastconvnext/tooling/roofline.py (HBM traffic on a GPU). Saved MB: bytes kept "
    "for backward beyond the op's inputs and parameters, counted with saved_tensors_hooks under FakeTensorMode "
    "(exact shapes, nothing computed)."
)


PRIOR_HEADERS = ("op", "shape", "pass", "measured fused µs", "measured eager µs", "measured eager/fused",
                 "prior fused µs (MODEL)", "prior eager µs (MODEL)", "prior eager/fused", "auto's choice")
PRIOR_NOTE = ("measured: this run, medians on this GPU; prior: fastconvnext/prior.json, the performance model's "
              "prediction (fused vs the eager estimate) at the nearest modelled point, MODEL; auto's choice: what the "
              "auto backend runs for that shape now, and where the decision came from (tuned = timed on this GPU "
              "at first use, model = the prior). Where measured and prior disagree, the measurement is right.")


def prior_rows(outcome, arch=None):
    """Per measured op case with fused and eager rows: measured times, the prior's prediction, auto's choice."""
    from fastconvnext import backend

    by = {(r["section"], r["case"], r["pass"], r["implementation"]): r for r in outcome.rows}
    body = []
    for group in outcome.groups:
        if group.section == "model":
            continue
        case = group.case
        fused, eager = (by.get((group.section, case.label, case.pass_, impl)) for impl in ("fused", "eager"))
        if fused is None or eager is None:
            continue
        n, h, w, c = case.shape.dims
        mode = "forward" if case.pass_ == "fwd" else "forward_backward"
        key = backend.PolicyKey(case.op, backend.device_arch() if arch is None else arch, case.dtype, c,
                                backend.bucket(h * w), backend.bucket(n), mode)
        decision = backend.decide(key)
        cells = [case.op, case.shape_text, case.pass_, _fmt(fused["median_ms"] * 1e3, 1),
                 _fmt(eager["median_ms"] * 1e3, 1), f"{eager['median_ms'] / fused['median_ms']:.2f}"]
        if decision.source == "model":
            cells += [_fmt(decision.fused_us, 1), _fmt(decision.eager_us, 1),
                      f"{decision.eager_us / decision.fused_us:.2f}"]
        else:
            cells += ["-", "-", "-"]
        body.append(cells + [f"{decision.choice} ({decision.source})"])
    return body


NOISE_LIMIT = 0.10  # a ratio whose 95 % interval is wider than +-10 % is reported as too noisy to read


def _busy_threads(env):
    """Threads the benchmark itself keeps busy: torch's CPU threads on CPU, one host thread on a GPU."""
    return (env.get("threads") or 0) if env.get("device_type") == "cpu" else 1


def verdict_lines(outcome):
    """Per model pass and contender: the ratio to transformers, its interval, the load, and whether it reads."""
    lines = []
    for row in outcome.rows:
        if row["section"] != "model" or row["speedup_ci_low"] == "":
            continue
        ratio = timing.Ratio(row["speedup_vs_baseline"], row["speedup_ci_low"], row["speedup_ci_high"], 0.95)
        load = environment.load_text(row["load_average"] if row["load_average"] != "" else None,
                                     own_threads=_busy_threads(outcome.env))
        head = (f"{row['case']} batch {row['batch']} {row['pass']}: {cases.IMPL_LABELS[row['implementation']]} "
                f"runs at {ratio.value:.2f}x the speed of transformers (95% interval {ratio.low:.2f}-"
                f"{ratio.high:.2f}x, +-{ratio.half_width:.0%}; {row['repeats']} interleaved repeats; {load})")
        if not ratio.readable(NOISE_LIMIT):
            one_thread = "" if outcome.env.get("threads") == 1 else "with --threads 1 on a busy one, "
            tail = (f"too noisy to read: the interval is wider than +-{NOISE_LIMIT:.0%}; rerun on a quiet machine, "
                    f"{one_thread}or with more --repeats")
        elif ratio.low > 1:
            tail = "faster than transformers"
        elif ratio.high < 1:
            tail = "slower than transformers"
        else:
            tail = "no difference this run can resolve"
        lines.append(f"{head} -> {tail}")
    return lines


def terminal_report(outcome):
    lines = [environment.header_line(outcome.env), ""]
    for section in ("dwconv_layernorm", "convnext_mlp", "model"):
        rows = [r for r in outcome.rows if r["section"] == section]
        if not rows:
            continue
        lines += [f"== {SECTION_TITLES[section]} — {rows[0]['device_type'].upper()} {rows[0]['device_name']}, "
                  f"{rows[0]['dtype']}", format_table(TABLE_HEADERS, [_table_cells(r) for r in rows]), ""]
    prior = prior_rows(outcome) if outcome.env.get("device_type") == "cuda" else []
    if prior:
        lines += ["== Measured beside the prior (MODEL) and auto's choice", format_table(PRIOR_HEADERS, prior),
                  PRIOR_NOTE, ""]
    analytic = _analytic_cells(outcome)
    if analytic:
        lines += ["== Per-call bytes, eager vs fused (analytic; valid whatever the device)",
                  format_table(ANALYTIC_HEADERS, analytic), ANALYTIC_NOTE, ""]
    verdicts = verdict_lines(outcome)
    if verdicts:
        lines += ["== Verdict"] + verdicts + [""]
    if outcome.notes:
        lines += ["Notes:"] + [f"- {note}" for note in outcome.notes]
    return "\n".join(lines)


def markdown_report(outcome):
    lines = ["# fastconvnext bench", "", environment.header_line(outcome.env), ""]
    for section in ("dwconv_layernorm", "convnext_mlp", "model"):
        rows = [r for r in outcome.rows if r["section"] == section]
        if rows:
            lines += [f"## {SECTION_TITLES[section]} — {rows[0]['device_type'].upper()} {rows[0]['device_name']}, "
                      f"{rows[0]['dtype']}", "", markdown_table(TABLE_HEADERS, [_table_cells(r) for r in rows]), ""]
    prior = prior_rows(outcome) if outcome.env.get("device_type") == "cuda" else []
    if prior:
        lines += ["## Measured beside the prior (MODEL) and auto's choice", "", markdown_table(PRIOR_HEADERS, prior),
                  "", PRIOR_NOTE, ""]
    analytic = _analytic_cells(outcome)
    if analytic:
        lines += ["## Per-call bytes, eager vs fused (analytic)", "", markdown_table(ANALYTIC_HEADERS, analytic), "",
                  ANALYTIC_NOTE, ""]
    verdicts = verdict_lines(outcome)
    if verdicts:
        lines += ["## Verdict", ""] + [f"- {line}" for line in verdicts] + [""]
    if outcome.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in outcome.notes]
    return "\n".join(lines) + "\n"


def write_csv(rows, path):
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


# --------------------------------------------------------------------------------------------- plot


def matplotlib_available():
    return importlib.util.find_spec("matplotlib") is not None


YLABEL = "speed-up of fastconvnext over it\n(×; > 1 = fastconvnext faster)"
NOISY = "too noisy\nto read"


def _section_bars(rows):
    """fastconvnext's implementation and, per (case, pass) and other implementation, its row (None if not run)."""
    mine = next((r["fastconvnext_impl"] for r in rows if r["fastconvnext_impl"]), "")
    keys, others = [], []
    for row in rows:
        if (row["case"], row["pass"]) not in keys:
            keys.append((row["case"], row["pass"]))
        if row["fastconvnext_speedup"] != "" and row["implementation"] not in others:
            others.append(row["implementation"])
    by = {(r["case"], r["pass"], r["implementation"]): r for r in rows}
    return mine, keys, others, by


def _interval(row):
    return timing.Ratio(row["fastconvnext_speedup"], row["fastconvnext_ci_low"], row["fastconvnext_ci_high"], 0.95)


def _bar_label(row):
    """The ratio with its 95 % interval, or the text's wording where the interval is too wide to read."""
    ratio = _interval(row)
    if not ratio.readable(NOISE_LIMIT):
        return NOISY
    return f"{ratio.value:.2f}×\n({ratio.low:.2f}–{ratio.high:.2f})"


def plot_footnote():
    return ("Each bar: how much faster fastconvnext (the implementation named in the panel title) runs than the "
            "implementation in the legend, as the ratio of median times (> 1 = fastconvnext faster; dashed line = "
            f"equal); whiskers: 95% bootstrap interval of that ratio; '{NOISY.replace(chr(10), ' ')}' where the "
            f"interval is wider than +-{NOISE_LIMIT:.0%} (as in the text report). Times per case are in bench.csv.")


def _load_footnote(outcome):
    known = [x for x in outcome.loads if x is not None]
    return f"Highest {environment.load_text(max(known))}." if known else ""


def write_plot(outcome, path):
    """One metric in every panel: the speed-up of fastconvnext over each other implementation, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {r["section"] for r in outcome.rows if r["fastconvnext_speedup"] != ""}
    sections = [s for s in ("dwconv_layernorm", "convnext_mlp", "model") if s in present]
    if not sections:
        return None
    widths = [max(6.0, 1.1 * len({(r["case"], r["pass"]) for r in outcome.rows if r["section"] == s}))
              for s in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(max(widths) + 3, 4.2 * len(sections)), squeeze=False)
    env = outcome.env
    palette = plt.get_cmap("tab10")
    every_impl = list(cases.OP_IMPLS["dwconv_layernorm"]) + list(cases.MODEL_IMPLS)
    impl_colors = {impl: palette(i) for i, impl in enumerate(every_impl)}
    for ax, section in zip(axes[:, 0], sections):
        rows = [r for r in outcome.rows if r["section"] == section]
        mine, keys, others, by = _section_bars(rows)
        bar_w = 0.8 / max(1, len(others))
        for i, impl in enumerate(others):
            bars = []
            for g, key in enumerate(keys):
                row = by.get((*key, impl))
                if row is not None and row["fastconvnext_speedup"] != "":
                    bars.append((g + (i - (len(others) - 1) / 2) * bar_w, row))
            if not bars:
                continue
            xs = [x for x, _ in bars]
            values = [row["fastconvnext_speedup"] for _, row in bars]
            whiskers = [[max(0.0, v - row["fastconvnext_ci_low"]) for v, (_, row) in zip(values, bars)],
                        [max(0.0, row["fastconvnext_ci_high"] - v) for v, (_, row) in zip(values, bars)]]
            ax.bar(xs, values, bar_w, label=f"vs {cases.IMPL_LABELS[impl]}", color=impl_colors[impl], yerr=whiskers,
                   capsize=2, error_kw={"linewidth": 0.8})
            for x, row in bars:
                ax.annotate(_bar_label(row), (x, row["fastconvnext_ci_high"]), textcoords="offset points",
                            xytext=(0, 2), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.margins(y=0.2)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([(c if section == "model" else c.split(" ", 1)[-1].replace(" ", "\n")) + f"\n{p}"
                            for c, p in keys], fontsize=8)
        ax.set_ylabel(YLABEL, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        device = f"{env['device_type'].upper()}: {env['device_name']}"
        ax.set_title(f"{SECTION_TITLES[section]}: {cases.IMPL_LABELS[mine]} vs the others\n{device}, "
                     f"{rows[0]['dtype']}, batch {rows[0]['batch']}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = (f"torch {env['torch_version']}, triton {env['triton_version']}, transformers "
               f"{env['transformers_version']}, fastconvnext {env['fastconvnext_version']}"
               + (f", CUDA {env['cuda_version']}, driver {env['driver_version']}" if env["device_type"] == "cuda"
                  else f", {env['threads']} CPU thread(s) — CPU figures, not GPU") + ". " + plot_footnote()
               + " " + _load_footnote(outcome))
    caption_lines = textwrap.wrap(caption, int(fig.get_figwidth() * 15))
    fig.text(0.01, 0.005, "\n".join(caption_lines), fontsize=7, va="bottom")
    caption_inches = (len(caption_lines) + 1) * 7 * 1.25 / 72  # 7 pt text, 1.25 line spacing
    fig.tight_layout(rect=(0, caption_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
