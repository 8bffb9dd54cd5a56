#!/usr/bin/env bash
# GPU acceptance run (issue 10 item 3): native kernel tests, inductor compile, 50-step bf16 training
# (fused vs eager), fastconvnext.tune() and its policy table, measured vs modelled op times.
# Usage: benchmarks/gpu_acceptance.sh [OUTPUT_DIR] [more gpu_acceptance.py options]
# Writes OUTPUT_DIR/gpu_acceptance.md and .json; exits non-zero if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/gpu_acceptance}"
if [ "$#" -gt 0 ]; then shift; fi
exec "${PYTHON:-python}" benchmarks/gpu_acceptance.py --output "$out" "$@"
