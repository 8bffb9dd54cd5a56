"""fastconvnext.tooling.calibrate (benchmarks/calibrate_machine.py runs it) on CPU: each microbenchmark kernel computes what it claims (in Triton's
interpreter, TRITON_INTERPRET=1 from conftest), the rate arithmetic, the refusal without CUDA."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime import interpreter

from helpers import dot_with_exact_bf16
from tolerance import assert_within_rule

ROOT = Path(__file__).resolve().parents[1]
calib = importlib.import_module("fastconvnext.tooling.calibrate")
BLOCK = calib.READ_BLOCK


def small_ints(n, seed):
    """Values 0..7: fp32 sums of these stay exact, so a kernel that skips or repeats a block is caught."""
    return torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(seed)).float()


def test_hbm_read_sums_every_element_once():
    x = small_ints(6 * BLOCK, 0)
    partials, nbytes = calib.read_sum(x, programs=3, sweeps=0)
    assert nbytes == x.numel() * 4
    shares = x.view(3, 2 * BLOCK).sum(dim=1)  # program p reads the p-th contiguous share
    assert torch.equal(partials, shares)


def test_l2_read_sweeps_the_whole_buffer_from_staggered_starts():
    x = small_ints(3 * BLOCK, 1)
    partials, nbytes = calib.read_sum(x, programs=3, sweeps=2)
    assert nbytes == 3 * 2 * x.numel() * 4  # every program reads all of x twice
    assert torch.equal(partials, torch.full((3,), 2 * x.sum().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 16), (32, 16)])
def test_dot_loop_accumulates_iterations_of_the_product(shape, dtype, monkeypatch):
    if dtype == torch.bfloat16:  # Triton 3.9's interpreter multiplies bf16 bit patterns: see that test file
        monkeypatch.setattr(interpreter.interpreter_builder, "create_dot", dot_with_exact_bf16)
    m, n = shape
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(m, 16, generator=gen).to(dtype)
    b = torch.randn(16, n, generator=gen).to(dtype)
    out, flops = calib.dot_loop(a, b, programs=2, iterations=3, num_warps=4)
    assert flops == 2 * m * n * 16 * 3 * 2
    reference = 3 * (a.double() @ b.double())
    eager = (a @ b) * 3  # the eager matmul in the same dtype
    for program in out:
        assert_within_rule(program, eager, reference, dtype, what="dot loop")


def test_fma_loop_runs_every_iteration():
    out, fmas = calib.fma_loop(programs=2, iterations=5, block=64, device="cpu", scale=0.5, shift=1.0)
    assert fmas == 2 * 64 * calib.FMA_CHAINS * 5
    x = (torch.arange(128) % 64).double()
    chains = [x + c for c in range(calib.FMA_CHAINS)]
    for _ in range(5):
        chains = [v * 0.5 + 1.0 for v in chains]
    assert torch.equal(out.double(), sum(chains))  # halving and adding 1 is exact at these sizes


def test_rate_arithmetic_on_known_times():
    r = calib.rate(2e9, [1.0, 2.0, 4.0])  # 2 GB in 1 / 2 / 4 ms
    assert r == {"median": 1e12, "max": 2e12, "min": 5e11}
    assert calib.ffma_issue_per_clock(32 * 100 * 2e9 * 4, sms=100, clock_hz=2e9) == 4.0
    # the public pointer-load figure (roofline.MACHINE_SOURCES), on both archs
    assert calib.assumed_dot_efficiency(90, 128) == 0.6 and calib.assumed_dot_efficiency(80, 128) == 0.6
    with pytest.raises(ValueError, match="positive times"):
        calib.rate(1.0, [0.0])


def test_time_ms_reports_per_call_times_of_every_repeat():
    calls = []
    times = calib.time_ms(lambda: calls.append(1), warmup=2, repeats=3, inner=4, cuda=False)
    assert len(times) == 3 and len(calls) == 2 + 3 * 4 and all(t >= 0 for t in times)


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError, match=f"multiple of {BLOCK} elements, got torch.float32 with 100"):
        calib.read_sum(torch.ones(100), 1, 0)
    with pytest.raises(ValueError, match="bf16 \\(or fp16\\) a"):
        calib.dot_loop(torch.ones(16, 16), torch.ones(16, 16), 1, 1, 4)


def test_dry_run_writes_a_labelled_report(tmp_path):
    assert calib.main(["--dry-run", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "calibrate_machine.json").read_text())
    assert report["measured"] is False and len(report["rows"]) == 5
    assert "DRY RUN (interpreter; NOT a measurement)" in (tmp_path / "calibrate_machine.md").read_text()


def test_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate_machine.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("calibrate_machine: no CUDA device: calibrate_machine needs a GPU "
                                   "(or --dry-run for the interpreter)")
