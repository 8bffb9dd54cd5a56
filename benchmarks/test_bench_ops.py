"""pytest-benchmark: each fused op vs eager PyTorch (channels-last, and NCHW + permute for dwconv+LN) vs
torch.compile of the eager op, forward and forward+backward, at ConvNeXt-T/-B stage shapes.

    pytest benchmarks/test_bench_ops.py --benchmark-only

Cases come from fastconvnext.tooling.bench (the same ones `fastconvnext bench` measures); sizes and device are
set by the FASTCONVNEXT_BENCH_* variables documented in fastconvnext/tooling/bench/suite.py. Without CUDA the
fused and torch.compile cases are skipped, each with the reason.
CPU threads and timing in turns: benchmarks/conftest.py (said in the run's header).
"""
import pytest

from fastconvnext.tooling.bench import cases
from fastconvnext.tooling.bench.suite import case_id, suite_settings

SETTINGS = suite_settings()
CASES = cases.op_cases(cases.OPS, SETTINGS.stages, SETTINGS.batch, SETTINGS.dtype, SETTINGS.device)
PARAMS = [pytest.param(case, impl, id=case_id(case, impl)) for case in CASES for impl in cases.OP_IMPLS[case.op]]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_op(benchmark, case, impl, interleaved):
    reason = cases.unavailable_reason(impl, SETTINGS.device)
    if reason is not None:
        pytest.skip(reason)
    interleaved.record(benchmark, "op", case, impl, cases.OP_IMPLS[case.op], cases.OP_BASELINE)
