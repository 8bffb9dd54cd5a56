"""What the pytest-benchmark suites in benchmarks/ share: settings from the environment, one timed case.

    pytest benchmarks/ --benchmark-only

Environment variables (defaults: CUDA when available, else CPU sizes small enough for a laptop):
    FASTCONVNEXT_BENCH_DEVICE   auto | cpu | cuda                       (auto)
    FASTCONVNEXT_BENCH_DTYPE    fp32 | fp16 | bf16                      (bf16 on CUDA, fp32 on CPU)
    FASTCONVNEXT_BENCH_BATCH    op-case batch                           (64 on CUDA, 2 on CPU)
    FASTCONVNEXT_BENCH_STAGES   tiny,base: stage shapes of the op cases (tiny,base on CUDA, tiny on CPU)
    FASTCONVNEXT_BENCH_MODEL    model preset of the end-to-end cases    (tiny on CUDA, atto on CPU)
    FASTCONVNEXT_BENCH_MODEL_BATCH, FASTCONVNEXT_BENCH_RESOLUTION       (64 and 224 on CUDA, 2 and 64 on CPU)
    FASTCONVNEXT_BENCH_ROUNDS, FASTCONVNEXT_BENCH_WARMUP                (30 and 5 on CUDA, 5 and 1 on CPU)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fastconvnext.tooling.bench import cases, environment
from fastconvnext.tooling import roofline
from fastconvnext.tooling.bench.timing import Clock


@dataclass(frozen=True)
class SuiteSettings:
    device: str
    dtype: str
    batch: int
    stages: tuple
    model: str
    model_batch: int
    resolution: int
    rounds: int
    warmup: int


def _env(name, cuda_default, cpu_default, on_cuda, cast=str):
    value = os.environ.get(name)
    return cast(value) if value else (cuda_default if on_cuda else cpu_default)


def suite_settings():
    device = environment.resolve_device(os.environ.get("FASTCONVNEXT_BENCH_DEVICE", "auto"))
    cuda = device.type == "cuda"
    return SuiteSettings(
        device=str(device),
        dtype=_env("FASTCONVNEXT_BENCH_DTYPE", "bf16", "fp32", cuda),
        batch=_env("FASTCONVNEXT_BENCH_BATCH", 64, 2, cuda, int),
        stages=tuple(_env("FASTCONVNEXT_BENCH_STAGES", "tiny,base", "tiny", cuda).split(",")),
        model=_env("FASTCONVNEXT_BENCH_MODEL", "tiny", "atto", cuda),
        model_batch=_env("FASTCONVNEXT_BENCH_MODEL_BATCH", 64, 2, cuda, int),
        resolution=_env("FASTCONVNEXT_BENCH_RESOLUTION", 224, 64, cuda, int),
        rounds=_env("FASTCONVNEXT_BENCH_ROUNDS", 30, 5, cuda, int),
        warmup=_env("FASTCONVNEXT_BENCH_WARMUP", 5, 1, cuda, int),
    )


def case_id(case, impl):
    if isinstance(case, cases.OpCase):
        s = case.shape
        return f"{case.op}-{s.model}-s{s.stage}-C{s.channels}-{s.size}x{s.size}-b{s.batch}-{case.pass_}-{impl}"
    return f"{case.preset}-{case.resolution}px-b{case.batch}-{case.pass_}-{impl}"


def run_benchmark(benchmark, case, impl, settings):
    """Time one (case, impl) with pytest-benchmark's pedantic mode: L2 flush and gradient reset untimed."""
    prepared = cases.prepare_model(case, impl) if isinstance(case, cases.ModelCase) else cases.prepare_op(case, impl)
    clock = Clock(settings.device)

    def setup():
        if prepared.setup is not None:
            prepared.setup()
        clock.flush_l2()
        clock.synchronize()

    def target():
        prepared.run()
        clock.synchronize()

    info = environment.describe(settings.device)
    benchmark.group = f"{case.label} {case.pass_}"
    benchmark.extra_info.update(
        implementation=cases.IMPL_LABELS[impl], shape=case.shape_text, dtype=case.dtype, **{"pass": case.pass_},
        device=f"{info['device_type']}: {info['device_name']}", torch=info["torch_version"],
        triton=info["triton_version"], transformers=info["transformers_version"],
        cuda=info["cuda_version"], driver=info["driver_version"],
    )
    if isinstance(case, cases.OpCase) and impl in roofline.IMPLS[case.op]:
        benchmark.extra_info["modelled_bytes"] = int(roofline.traffic(case.op, impl, case.pass_, case.shape,
                                                                      case.dtype).bytes)
    try:
        benchmark.pedantic(target, setup=setup, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)
    finally:
        clock.release()
