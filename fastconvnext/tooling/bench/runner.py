"""Runs the measurement plan: per case, prepare every implementation, warm up, time them in turns."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastconvnext.tooling.bench import cases, environment, memory, timing
from fastconvnext.tooling import roofline

SECTIONS = ("dwconv_layernorm", "convnext_mlp", "model")


@dataclass
class Settings:
    device: torch.device
    dtype: str
    sections: tuple
    model: str
    batch: int
    op_batch: int
    resolution: int
    stage_models: tuple
    repeats: int
    warmup: int
    output: Path
    quick: bool = False
    progress: bool = True
    allow_tf32: bool = False
    compile: bool = True
    model_passes: tuple = cases.MODEL_PASSES
    family: str = "convnext"


@dataclass
class Group:
    """One case and the implementations measured side by side on it."""

    section: str
    case: object
    impls: list
    skipped: dict = field(default_factory=dict)  # impl -> reason


@dataclass
class Outcome:
    rows: list
    notes: list
    env: dict
    groups: list = field(default_factory=list)
    saved: dict = field(default_factory=dict)  # (op, StageShape, impl) -> memory.SavedBytes
    loads: list = field(default_factory=list)  # 1-min load average before the first and after each case


def _op_impls(op, settings):
    impls = list(cases.OP_IMPLS[op])
    if not settings.compile:
        impls.remove("compile")
    return impls


def build_plan(settings):
    groups = []
    for op in cases.OPS:
        if op not in settings.sections:
            continue
        for case in cases.op_cases((op,), settings.stage_models, settings.op_batch, settings.dtype,
                                   str(settings.device)):
            groups.append(_group(op, case, _op_impls(op, settings), settings.device))
    if "model" in settings.sections:
        impls = [i for i in cases.MODEL_IMPLS if settings.compile or not i.endswith("-compile")]
        for pass_ in settings.model_passes:
            case = cases.ModelCase(settings.model, settings.batch, settings.resolution, settings.dtype,
                                   str(settings.device), pass_, settings.family)
            groups.append(_group("model", case, impls, settings.device))
    return groups


def _group(section, case, impls, device):
    group = Group(section, case, [])
    for impl in impls:
        reason = cases.unavailable_reason(impl, device)
        if reason is None:
            group.impls.append(impl)
        else:
            group.skipped[impl] = reason
    return group


def _prepare(group, impl):
    if group.section == "model":
        return cases.prepare_model(group.case, impl)
    return cases.prepare_op(group.case, impl)


def _warm(prepared, warmup, clock, progress):
    for _ in range(warmup):
        if prepared.setup is not None:
            prepared.setup()
        prepared.run()
        progress.update(1)
    clock.synchronize()


def measure_group(group, settings, clock, progress, notes):
    """{impl: (Timing, peak bytes or None)} for the implementations that ran."""
    ready = {}
    for impl in group.impls:
        try:
            prepared = _prepare(group, impl)
            _warm(prepared, max(1, settings.warmup), clock, progress)
            ready[impl] = prepared
        except Exception as error:  # one broken contender must not cost the others' figures
            notes.append(f"{group.section} {group.case.label} {group.case.pass_} {impl}: failed, "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            progress.update(settings.repeats)
    if not ready:
        return {}
    results = {}
    try:
        timings = timing.interleaved({k: (p.run, p.setup) for k, p in ready.items()}, clock, settings.repeats, 0,
                                     progress)
        for impl, prepared in ready.items():
            peak = timing.peak_memory_bytes(prepared.run, prepared.setup, settings.device)
            results[impl] = (timings[impl], peak)
    except Exception as error:  # e.g. out of memory at a large batch: report it, keep the other cases
        notes.append(f"{group.section} {group.case.label} {group.case.pass_}: timing failed, "
                     f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        results = {}
    ready.clear()
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _units(groups, settings):
    return sum(len(g.impls) * (max(1, settings.warmup) + settings.repeats) for g in groups)


def _saved_bytes(groups, settings, notes):
    """{(op, shape, impl): SavedBytes} for the fwd+bwd op cases (counted in a child process)."""
    requests = []
    for g in groups:
        if g.section != "model" and g.case.pass_ == "fwd+bwd":
            for impl in g.impls + list(g.skipped):
                if impl in roofline.IMPLS[g.section]:
                    requests.append((g.section, impl, g.case.shape, settings.dtype))
    if not requests:
        return {}
    try:
        counted = memory.measure(requests)
    except Exception as error:
        notes.append(f"saved-for-backward bytes not counted: {type(error).__name__}: {error}")
        return {}
    return {(op, shape, impl): saved for (op, impl, shape, _), saved in zip(requests, counted)}


def run(settings, progress_factory=None):
    """Measure the plan; returns Outcome(rows, notes, env)."""
    env = environment.describe(settings.device)
    if settings.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = settings.allow_tf32
        torch.backends.cudnn.allow_tf32 = settings.allow_tf32
    groups = build_plan(settings)
    notes = _skip_notes(groups)
    saved = _saved_bytes(groups, settings, notes)
    clock = timing.Clock(settings.device)
    rows = []
    progress = (progress_factory or _null_progress)(_units(groups, settings))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loads = [environment.load_average()]
    try:
        for group in groups:
            progress.set_description(f"{group.case.label} {group.case.pass_}")
            results = measure_group(group, settings, clock, progress, notes)
            loads.append(environment.load_average())
            rows += _rows(group, results, saved, env, settings, stamp, loads[-2:])
    finally:
        progress.close()
        clock.release()
    return Outcome(rows, notes, env, groups, saved, loads)


def _skip_notes(groups):
    seen, notes = set(), []
    for g in groups:
        for impl, reason in g.skipped.items():
            key = (g.section, impl)
            if key not in seen:
                seen.add(key)
                notes.append(f"{g.section}: {cases.IMPL_LABELS[impl]} {reason}")
    return notes


class _null_progress:
    def __init__(self, total):
        self.total = total

    def update(self, n):
        pass

    def set_description(self, text):
        pass

    def close(self):
        pass


# --------------------------------------------------------------------------------------------- rows

# Sizes are in MB = 10^6 bytes throughout (peak memory, bytes saved for backward, modelled traffic).
CSV_COLUMNS = (
    "section", "case", "implementation", "implementation_label", "pass", "device_type", "device_name", "dtype",
    "shape", "batch", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats", "warmup",
    "img_per_s", "gb_per_s", "effective_gb_per_s", "tflop_per_s", "pct_of_hbm_peak", "modelled_bytes",
    "modelled_flops", "peak_mem_mb", "saved_for_backward_mb", "saved_extra_mb", "baseline", "speedup_vs_baseline",
    "speedup_ci_low", "speedup_ci_high", "fastconvnext_impl", "fastconvnext_speedup", "fastconvnext_ci_low",
    "fastconvnext_ci_high", "load_average",
    "torch_version", "triton_version", "transformers_version", "fastconvnext_version", "python_version",
    "cuda_version", "driver_version", "cudnn_version", "cpu_model", "threads", "timestamp",
)


def _roofline_impl(impl):
    return {"eager": "eager", "eager_nchw": "eager_nchw", "fused": "fused", "compile": "eager"}.get(impl)


def fastconvnext_impl(section, impls):
    """The implementation that is fastconvnext's in a section: the fused one where it ran, else its eager path."""
    fused, eager = ("fastconvnext-fused", "fastconvnext-eager") if section == "model" else ("fused", "eager")
    return fused if fused in impls else (eager if eager in impls else "")


def _rows(group, results, saved, env, settings, stamp, loads=()):
    baseline = cases.MODEL_BASELINE if group.section == "model" else cases.OP_BASELINE
    base = results.get(baseline)
    mine = fastconvnext_impl(group.section, results)
    known = [x for x in loads if x is not None]
    rows = []
    for impl, (t, peak) in results.items():
        row = {key: "" for key in CSV_COLUMNS}
        row.update({k: env[k] for k in CSV_COLUMNS if k in env})
        row.update(
            section=group.section, case=group.case.label, implementation=impl,
            implementation_label=cases.IMPL_LABELS[impl], **{"pass": group.case.pass_}, dtype=settings.dtype,
            shape=group.case.shape_text, batch=group.case.batch if group.section == "model" else group.case.shape.batch,
            median_ms=round(t.median_ms, 6), q1_ms=round(t.q1_ms, 6), q3_ms=round(t.q3_ms, 6),
            min_ms=round(t.min_ms, 6), max_ms=round(t.max_ms, 6), repeats=len(t.samples_ms),
            warmup=max(1, settings.warmup), timestamp=stamp,
            peak_mem_mb="n/a (CPU)" if peak is None else round(peak / 1e6, 2),
            baseline=baseline if base is not None else "",
            speedup_vs_baseline=round(base[0].median_ms / t.median_ms, 3) if base is not None else "",
            load_average=round(max(known), 2) if known else "",
        )
        if base is not None and impl != baseline:
            ratio = timing.ratio_of_medians(base[0], t)
            row.update(speedup_ci_low=round(ratio.low, 3), speedup_ci_high=round(ratio.high, 3))
        if mine and impl != mine:  # how much faster fastconvnext is than this implementation (> 1: faster)
            ratio = timing.ratio_of_medians(t, results[mine][0])
            row.update(fastconvnext_impl=mine, fastconvnext_speedup=round(ratio.value, 3),
                       fastconvnext_ci_low=round(ratio.low, 3), fastconvnext_ci_high=round(ratio.high, 3))
        seconds = t.median_ms / 1e3
        if group.section == "model":
            row["img_per_s"] = round(group.case.batch / seconds, 2)
        else:
            _op_throughput(row, group, impl, seconds, saved, settings)
        rows.append(row)
    return rows


def _op_throughput(row, group, impl, seconds, saved, settings):
    case = group.case
    modelled = roofline.traffic(case.op, _roofline_impl(impl), case.pass_, case.shape, settings.dtype)
    useful = roofline.traffic(case.op, "fused_min", case.pass_, case.shape, settings.dtype)
    row.update(
        modelled_bytes=int(modelled.bytes), modelled_flops=int(modelled.flops),
        tflop_per_s=round(modelled.flops / seconds / 1e12, 4),
        effective_gb_per_s=round(useful.bytes / seconds / 1e9, 2),
    )
    if impl != "compile":  # what torch.compile fuses is not modelled; its effective GB/s still compares
        row["gb_per_s"] = round(modelled.bytes / seconds / 1e9, 2)
        gpu = roofline.gpu_for_device_name(row["device_name"]) if row["device_type"] == "cuda" else None
        if gpu is not None:
            row["pct_of_hbm_peak"] = round(100 * modelled.bytes / seconds / gpu.hbm_bytes_per_s, 1)
    counted = saved.get((case.op, case.shape, impl)) if case.pass_ == "fwd+bwd" else None
    if counted is not None:
        row.update(saved_for_backward_mb=round(counted.saved / 1e6, 2), saved_extra_mb=round(counted.extra / 1e6, 2))
