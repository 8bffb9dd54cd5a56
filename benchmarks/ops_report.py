"""Per-op report of the fused kernels (fused vs eager at ConvNeXt-T/-B stage shapes, batch 64 and 256).

    python benchmarks/ops_report.py                 # analytic bytes/FLOPs/saved bytes; on CUDA also measured
    python benchmarks/ops_report.py --batch 64      # one batch
    python benchmarks/ops_report.py --measure       # on CPU: also time the eager ops

See fastconvnext/tooling/bench/ops_report.py for what is printed.
"""
import sys

from fastconvnext.tooling.bench.ops_report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
