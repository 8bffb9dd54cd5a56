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
    parts.append(f"{row['tflop_per_s']:.2f} TFLOP/s")
    if row["pct_of_hbm_peak"] != "":
        parts.append(f"{row['pct_of_hbm_peak']}% HBM")
    return ", ".join(parts)


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


def _panel_mode(rows, section):
    """"img/s" for the model; "speed-up" for an op with contenders beside its baseline; else "ms"."""
    if section == "model":
        return "img/s"
    if any(r["implementation"] != r["baseline"] and r["speedup_vs_baseline"] != "" for r in rows):
        return "speed-up"
    return "ms"


def resolved(row, base_row):
    """Whether a contender's difference from its baseline exceeds the baseline's own spread (IQR).
    When it does not, no speed-up bar or label is drawn from it: the difference is noise."""
    spread = base_row["q3_ms"] - base_row["q1_ms"]
    return abs(base_row["median_ms"] - row["median_ms"]) > spread


def _value_and_spread(row, mode, by):
    """The bar height and its (down, up) whisker: IQR of the row, carried through to img/s or speed-up."""
    if mode == "img/s":
        v = row["img_per_s"]
        low, high = row["batch"] / (row["q3_ms"] / 1e3), row["batch"] / (row["q1_ms"] / 1e3)
    elif mode == "speed-up":
        base = by[(row["case"], row["pass"], row["baseline"])]["median_ms"]
        v = base / row["median_ms"]
        low, high = base / row["q3_ms"], base / row["q1_ms"]
    else:
        v, low, high = row["median_ms"], row["q1_ms"], row["q3_ms"]
    return v, (max(0.0, v - low), max(0.0, high - v))


YLABELS = {
    "img/s": "images / s (higher is better)",
    "speed-up": "speed-up vs eager PyTorch (channels-last)\n(median ratio; higher is better)",
    "ms": "median ms per call (lower is better)",
}


def _section_axes_data(rows, section):
    """Bars of one panel: group keys and labels, implementations, heights and whiskers per implementation."""
    mode = _panel_mode(rows, section)
    keys, impls = [], []
    for row in rows:
        if (row["case"], row["pass"]) not in keys:
            keys.append((row["case"], row["pass"]))
        if row["implementation"] not in impls and not (mode == "speed-up" and row["implementation"] == row["baseline"]):
            impls.append(row["implementation"])
    by = {(r["case"], r["pass"], r["implementation"]): r for r in rows}
    values, spreads = {}, {}
    for impl in impls:
        values[impl], spreads[impl] = [], []
        for case, pass_ in keys:
            row = by.get((case, pass_, impl))
            v, spread = _value_and_spread(row, mode, by) if row is not None else (None, (0.0, 0.0))
            values[impl].append(v)
            spreads[impl].append(spread)

    def label(case, pass_):
        text = case if section == "model" else case.split(" ", 1)[-1].replace(" ", "\n")
        return f"{text}\n{pass_}"

    return mode, [label(c, p) for c, p in keys], impls, values, spreads, keys, by


def _row_resolved(by, key, impl):
    row = by.get((*key, impl))
    base = by.get((*key, row["baseline"])) if row is not None and row["baseline"] else None
    return base is not None and resolved(row, base)


def _label_model_ratios(ax, impl, xs, values, spreads, keys, by):
    """Above each non-baseline model bar: its speed-up vs transformers with the 95 % interval, or 'within noise'."""
    for x, v, s, key in zip(xs, values, spreads, keys):
        row = by.get((*key, impl))
        if v is None or row is None or row["speedup_vs_baseline"] == "" or impl == row["baseline"]:
            continue
        if _row_resolved(by, key, impl) and row["speedup_ci_low"] != "":
            text = f"{row['speedup_vs_baseline']:.2f}×\n({row['speedup_ci_low']:.2f}–{row['speedup_ci_high']:.2f})"
        else:
            text = "within\nnoise"
        ax.annotate(text, (x, v + s[1]), textcoords="offset points", xytext=(0, 2), ha="center", va="bottom",
                    fontsize=7)


def plot_footnote(modes):
    """What the whiskers, bars and labels of the panels present mean (only the panel kinds drawn)."""
    parts = ["Whiskers: interquartile range of the timed calls."]
    if "speed-up" in modes:
        parts.append("Op speed-up panels: median time of eager PyTorch (channels-last) / median time of each "
                     "contender, dashed line = eager; where the difference of medians is smaller than eager's IQR, "
                     "no bar is drawn (hollow marker at 1, 'noise').")
    if "ms" in modes:
        parts.append("Op ms panels: median time per call.")
    if "img/s" in modes:
        parts.append("Model panel: images per second; label: speed-up vs transformers (ratio of medians) and its "
                     "95% bootstrap interval, or 'within noise' where the difference of medians is smaller than "
                     "transformers' IQR.")
    return " ".join(parts) + " Times per case are in bench.csv."


def _load_footnote(outcome):
    known = [x for x in outcome.loads if x is not None]
    return f"Highest {environment.load_text(max(known))}." if known else ""


def write_plot(outcome, path):
    """One panel per section: ops as speed-up over eager, the model as images/s; IQR whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {r["section"] for r in outcome.rows}
    sections = [s for s in ("dwconv_layernorm", "convnext_mlp", "model") if s in present]
    if not sections:
        return None
    widths = []
    for s in sections:
        n = len({(r["case"], r["pass"]) for r in outcome.rows if r["section"] == s})
        widths.append(max(6.0, 1.1 * n))
    fig, axes = plt.subplots(len(sections), 1, figsize=(max(widths) + 3, 4.2 * len(sections)), squeeze=False)
    env = outcome.env
    palette = plt.get_cmap("tab10")
    every_impl = list(cases.OP_IMPLS["dwconv_layernorm"]) + list(cases.MODEL_IMPLS)
    impl_colors = {impl: palette(i) for i, impl in enumerate(every_impl)}
    for ax, section in zip(axes[:, 0], sections):
        rows = [r for r in outcome.rows if r["section"] == section]
        mode, labels, impls, values, spreads, keys, by = _section_axes_data(rows, section)
        bar_w = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs = [g + (i - (len(impls) - 1) / 2) * bar_w for g in range(len(keys))]
            present = [(x, v, s) for x, v, s in zip(xs, values[impl], spreads[impl]) if v is not None]
            if not present:
                continue
            if mode == "speed-up":  # a bar only where the difference from the baseline is not noise
                noisy = [p for p, key in zip(present, keys) if not _row_resolved(by, key, impl)]
                present = [p for p, key in zip(present, keys) if _row_resolved(by, key, impl)]
                for x, _, _ in noisy:
                    ax.plot([x], [1.0], marker="o", markerfacecolor="none", color=impl_colors[impl])
                    ax.annotate("noise", (x, 1.0), textcoords="offset points", xytext=(0, 4), ha="center",
                                va="bottom", fontsize=7, rotation=90 if len(impls) > 2 else 0)
            if present:
                px, pv, ps = zip(*present)
                ax.bar(px, pv, bar_w, label=cases.IMPL_LABELS[impl], color=impl_colors[impl],
                       yerr=[[s[0] for s in ps], [s[1] for s in ps]], capsize=2, error_kw={"linewidth": 0.8})
            if mode == "img/s":
                _label_model_ratios(ax, impl, xs, values[impl], spreads[impl], keys, by)
        if mode == "speed-up":
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        if mode != "ms":
            ax.margins(y=0.15)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(YLABELS[mode], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        device = f"{env['device_type'].upper()}: {env['device_name']}"
        batch = f", batch {rows[0]['batch']}"
        ax.set_title(f"{SECTION_TITLES[section]} — {device}, {rows[0]['dtype']}{batch}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    modes = {_panel_mode([r for r in outcome.rows if r["section"] == s], s) for s in sections}
    caption = (f"torch {env['torch_version']}, triton {env['triton_version']}, transformers "
               f"{env['transformers_version']}, fastconvnext {env['fastconvnext_version']}"
               + (f", CUDA {env['cuda_version']}, driver {env['driver_version']}" if env["device_type"] == "cuda"
                  else f", {env['threads']} CPU thread(s) — CPU figures, not GPU") + ". " + plot_footnote(modes)
               + " " + _load_footnote(outcome))
    width_chars = int(fig.get_figwidth() * 15)
    caption_lines = textwrap.wrap(caption, width_chars)
    fig.text(0.01, 0.005, "\n".join(caption_lines), fontsize=7, va="bottom")
    caption_inches = (len(caption_lines) + 1) * 7 * 1.25 / 72  # 7 pt text, 1.25 line spacing
    fig.tight_layout(rect=(0, caption_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
