"""Benchmark harness behind `fastconvnext bench`.

Modules, in the order data flows:
- `cases`: what is measured (op at a ConvNeXt stage shape, or a model at a size preset) and how one
  implementation of it is prepared; shared with the pytest-benchmark suites in benchmarks/ (`suite`).
- `timing`: warm-up, interleaved repeats, CUDA events with an L2 flush, or perf_counter on CPU.
- `memory`: bytes saved for backward, counted under FakeTensorMode.
- `roofline`: the byte and FLOP model of every implementation, and the H100 / A100 bounds it implies.
- `runner`: runs the plan and makes one CSV row per measurement; `report`: tables, CSV, PNG.
- `cli`: the `fastconvnext bench` options (`add_arguments`, `run`) and `main` for `python -m fastconvnext.tooling.bench`.
"""
