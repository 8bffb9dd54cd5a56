"""What every pytest-benchmark case in benchmarks/ shares: CPU threads and implementations timed in turns, as
`fastconvnext bench --quick` chooses and times them, said in the run's header.

Threads: FASTCONVNEXT_BENCH_THREADS if set; else on a busy CPU (1-minute load above half the cores) one
thread, since contended threads make the ratios unreadable; else torch's choice (the bench CLI's rule,
fastconvnext.tooling.bench.cli.quick_threads).

Turns: the first test of a case times every implementation of that case in turns (runner.measure_group: each
warmed up, then one call of each per round, the order rotated every round), and each test reports its own
implementation's samples to pytest-benchmark, so the implementations compared in one group ran under the
same load. The speed-up over the case's baseline (transformers for the model, eager channels-last for an op),
with its 95% bootstrap interval, is in each test's extra_info. With --benchmark-disable each implementation
runs once, untimed.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from fastconvnext.tooling.bench import cases, cli, environment, runner, timing
from fastconvnext.tooling.bench.suite import suite_settings

THREADS_ENV = "FASTCONVNEXT_BENCH_THREADS"
SETTINGS = suite_settings()
_SPEEDUPS = []  # one line per contender, printed at the end of the run (> 1: faster than the baseline)


def _requested_threads():
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_ENV} must be a positive number of threads, got {value!r}")
    return int(value)


def _choose_threads():
    """(threads, why): the bench CLI's rule for a --quick run, with THREADS_ENV as its --threads."""
    device = torch.device(SETTINGS.device)
    requested = _requested_threads()
    threads, _ = cli.quick_threads(types.SimpleNamespace(threads=requested),
                                   types.SimpleNamespace(quick=True, device=device))
    if device.type != "cpu":
        return None, None
    load = environment.load_text(environment.load_average(), os.cpu_count())
    if requested:
        why = f"{THREADS_ENV}={requested}"
    elif threads:
        why = (f"the machine is busy ({load}): one thread, as `fastconvnext bench --quick` takes, since contended "
               f"threads make the ratios unreadable; set {THREADS_ENV} to choose")
    else:
        why = f"torch's choice, the machine is not busy ({load}); set {THREADS_ENV} to choose"
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads(), why


def pytest_configure(config):
    config._fastconvnext_threads = _choose_threads()


def pytest_report_header(config):
    threads, why = config._fastconvnext_threads
    thread_line = f"CPU threads: {threads} ({why})" if threads else f"device {SETTINGS.device}; CPU threads not chosen"
    return [f"fastconvnext benchmarks: {thread_line}",
            f"fastconvnext benchmarks: each case's implementations are timed in turns ({SETTINGS.rounds} rounds, "
            f"{SETTINGS.warmup} warm-up call(s) each, order rotated every round), as `fastconvnext bench --quick` times "
            f"them; speed-ups over the baseline with 95% intervals: extra_info and the summary at the end"]


def pytest_terminal_summary(terminalreporter):
    if _SPEEDUPS:
        terminalreporter.section("fastconvnext: speed-up over the baseline, implementations timed in turns")
        for line in _SPEEDUPS:
            terminalreporter.write_line(line)


class InterleavedCases:
    """Timings of every implementation of a case, measured in turns once and handed to each case's tests."""

    def __init__(self):
        self._measured = {}  # (section, case) -> ({impl: (Timing, peak)}, notes)
        self._clock = timing.Clock(SETTINGS.device)
        self._settings = types.SimpleNamespace(device=torch.device(SETTINGS.device), warmup=SETTINGS.warmup,
                                               repeats=SETTINGS.rounds)

    def _measure(self, section, case, impls):
        key = (section, case)
        if key not in self._measured:
            group = runner._group(section, case, list(impls), self._settings.device)
            notes = []
            results = runner.measure_group(group, self._settings, self._clock, _NoProgress(), notes)
            self._measured[key] = (results, notes)
        return self._measured[key]

    def record(self, benchmark, section, case, impl, impls, baseline):
        """Report `impl`'s samples of the interleaved measurement of `case` as this test's benchmark."""
        if benchmark.disabled:  # pytest-benchmark runs the target once, untimed
            prepared = cases.prepare_model(case, impl) if section == "model" else cases.prepare_op(case, impl)
            benchmark.pedantic(prepared.run, setup=prepared.setup, rounds=1)
            return
        results, notes = self._measure(section, case, impls)
        if impl not in results:
            pytest.fail(f"{impl} was not timed: {'; '.join(notes) or 'no reason recorded'}")
        samples = results[impl][0]
        benchmark.group = f"{case.label} {case.pass_}"
        info = environment.describe(SETTINGS.device)
        benchmark.extra_info.update(
            implementation=cases.IMPL_LABELS[impl], shape=case.shape_text, dtype=case.dtype, **{"pass": case.pass_},
            device=f"{info['device_type']}: {info['device_name']}", threads=info["threads"],
            torch=info["torch_version"], transformers=info["transformers_version"], timed="in turns",
        )
        if baseline in results and impl != baseline:
            ratio = timing.ratio_of_medians(results[baseline][0], samples)
            benchmark.extra_info.update(baseline=cases.IMPL_LABELS[baseline], speedup_vs_baseline=round(ratio.value, 3),
                                        speedup_ci95=[round(ratio.low, 3), round(ratio.high, 3)])
            _SPEEDUPS.append(f"{case.label} {case.pass_}: {cases.IMPL_LABELS[impl]} {ratio.value:.2f}x "
                             f"(95% {ratio.low:.2f}-{ratio.high:.2f}) over {cases.IMPL_LABELS[baseline]}, "
                             f"{samples.median_ms:.2f} vs {results[baseline][0].median_ms:.2f} ms median, "
                             f"{info['threads']} thread(s)")
        stats = benchmark._make_stats(1)  # pytest-benchmark's own record of one timed round per sample
        for milliseconds in samples.samples_ms:
            stats.update(milliseconds / 1e3)
        benchmark._mode = "interleaved by benchmarks/conftest.py"


class _NoProgress:
    def update(self, n):
        pass


@pytest.fixture(scope="session")
def interleaved():
    return InterleavedCases()
