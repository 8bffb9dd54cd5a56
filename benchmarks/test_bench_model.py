"""pytest-benchmark: the model end to end, fastconvnext vs transformers' ConvNextModel (and torch.compile
of it on CUDA), inference and one training step (forward, backward, SGD step).

    pytest benchmarks/test_bench_model.py --benchmark-only

On CPU fastconvnext runs its eager backend (the fused kernels need CUDA; that case is skipped with the
reason). Sizes: FASTCONVNEXT_BENCH_MODEL, _MODEL_BATCH, _RESOLUTION, _DTYPE (fastconvnext/tooling/bench/suite.py).
CPU threads and timing in turns: benchmarks/conftest.py (said in the run's header).
"""
import pytest

from fastconvnext.tooling.bench import cases
from fastconvnext.tooling.bench.suite import case_id, suite_settings

SETTINGS = suite_settings()
CASES = [
    cases.ModelCase(SETTINGS.model, SETTINGS.model_batch, SETTINGS.resolution, SETTINGS.dtype, SETTINGS.device, p)
    for p in cases.MODEL_PASSES
]
PARAMS = [pytest.param(case, impl, id=case_id(case, impl)) for case in CASES for impl in cases.MODEL_IMPLS]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_model(benchmark, case, impl, interleaved):
    reason = cases.unavailable_reason(impl, SETTINGS.device)
    if reason is not None:
        pytest.skip(reason)
    interleaved.record(benchmark, "model", case, impl, cases.MODEL_IMPLS, cases.MODEL_BASELINE)
