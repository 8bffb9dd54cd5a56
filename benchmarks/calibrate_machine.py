"""Measure the performance model's machine constants on the GPU at hand: `python benchmarks/calibrate_machine.py
[--output DIR] [--quick] [--dry-run] [--sass 90|80]` runs fastconvnext.tooling.calibrate (same options; see its
docstring), which `python -m fastconvnext.tooling.calibrate` also runs."""
import runpy

if __name__ == "__main__":
    runpy.run_module("fastconvnext.tooling.calibrate", run_name="__main__", alter_sys=True)
