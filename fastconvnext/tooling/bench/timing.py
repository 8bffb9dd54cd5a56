"""Timing: warm-up, then interleaved repeats of every contender, median and spread.

GPU: each sample is one call between two CUDA events, after the L2 cache is flushed by writing a
256 MB buffer (so every call starts from HBM, as in a real network where the previous layer evicted
its inputs). CPU: time.perf_counter around one call. The contenders of one case run in turns within
one process (A B A B ..., the order rotated every round), so slow drift of the machine (clock,
other load) falls on all of them alike.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple

    @property
    def median_ms(self):
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q):
        data = sorted(self.samples_ms)
        if len(data) == 1:
            return data[0]
        pos = q * (len(data) - 1)
        low = int(pos)
        high = min(low + 1, len(data) - 1)
        return data[low] + (data[high] - data[low]) * (pos - low)

    @property
    def q1_ms(self):
        return self.quantile_ms(0.25)

    @property
    def q3_ms(self):
        return self.quantile_ms(0.75)

    @property
    def min_ms(self):
        return min(self.samples_ms)

    @property
    def max_ms(self):
        return max(self.samples_ms)


class Clock:
    """Times one call on the device: CUDA events with an L2 flush before, or perf_counter on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._flush = None
        if self.device.type == "cuda":
            self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush_l2(self):
        """Overwrite the L2 cache (CUDA); nothing on CPU."""
        if self._flush is not None:
            self._flush.zero_()

    def time_ms(self, run, setup=None):
        if setup is not None:
            setup()
        if self.device.type != "cuda":
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        self.flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def release(self):
        self._flush = None


def interleaved(contenders, clock, repeats, warmup, progress=None):
    """contenders: {name: (run, setup or None)} -> {name: Timing}; samples taken in turns."""
    names = list(contenders)
    for name in names:
        run, setup = contenders[name]
        for _ in range(warmup):
            if setup is not None:
                setup()
            run()
            if progress is not None:
                progress.update(1)
        clock.synchronize()
    samples = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            run, setup = contenders[name]
            samples[name].append(clock.time_ms(run, setup))
            if progress is not None:
                progress.update(1)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class Ratio:
    """baseline median / contender median, with a bootstrap confidence interval (> 1: contender faster)."""

    value: float
    low: float
    high: float
    level: float

    @property
    def half_width(self):
        """Half the interval's width relative to the ratio (0.05 = +-5 %)."""
        return (self.high - self.low) / (2 * self.value)

    def readable(self, max_half_width=0.10):
        return self.half_width <= max_half_width


def ratio_of_medians(baseline, contender, level=0.95, resamples=2000, seed=0):
    """Ratio of the medians with a percentile bootstrap interval (samples of each resampled on their own).

    Seeded, so one set of samples always prints the same interval."""
    rng = random.Random(seed)
    a, b = baseline.samples_ms, contender.samples_ms
    ratios = sorted(
        statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    low, high = ratios[int(tail * (resamples - 1))], ratios[int(round((1 - tail) * (resamples - 1)))]
    return Ratio(baseline.median_ms / contender.median_ms, low, high, level)


def peak_memory_bytes(run, setup, device):
    """CUDA: bytes allocated at the peak of one call above what was allocated before it; CPU: None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if setup is not None:
        setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
