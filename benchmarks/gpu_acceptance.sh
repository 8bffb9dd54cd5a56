#!/usr/bin/env bash
# GPU acceptance run in stages, each one command well under 10 minutes (benchmarks/gpu_acceptance.py says what
# each stage does, its time limit and expected duration: `python benchmarks/gpu_acceptance.py --plan`).
#
#   benchmarks/gpu_acceptance.sh --stage preflight OUTPUT_DIR    # seconds: versions, GPU, imports, CUDA
#   benchmarks/gpu_acceptance.sh --stage 1 OUTPUT_DIR            # <= 4 min: calibration, fused vs eager MEASURED
#   benchmarks/gpu_acceptance.sh --stage 2 OUTPUT_DIR            # native correctness at full stage shapes
#   benchmarks/gpu_acceptance.sh --stage 3 OUTPUT_DIR            # tune(), bf16 training, inductor
#   benchmarks/gpu_acceptance.sh --stage all OUTPUT_DIR          # the four in one command (~11 min of limits)
#   benchmarks/gpu_acceptance.sh --rehearse --stage all OUTPUT_DIR   # CPU: the same code paths, tiny, interpreter
#
# Runs from a plain (uninstalled) source tree: this checkout goes first on PYTHONPATH; nothing is installed.
# FASTCONVNEXT_AUTOTUNE=0 (default kernel configs: fewer compiles). TRITON_CACHE_DIR, when set, is the compile
# cache the stages share; else OUTPUT_DIR/cache/triton (keep OUTPUT_DIR between the stage commands).
# Options after OUTPUT_DIR or before it: --cache-dir DIR, --workers N (passed to gpu_acceptance.py).
# Exit status: 0 when every stage run passed, 1 when one failed or timed out, 2 on a usage error.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

stage="all"
out=""
rehearse=()
extra=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --stage) [ "$#" -ge 2 ] || { echo "gpu_acceptance.sh: --stage needs a value" >&2; exit 2; }
                 stage="$2"; shift 2 ;;
        --stage=*) stage="${1#--stage=}"; shift ;;
        --rehearse) rehearse=(--rehearse); shift ;;
        --cache-dir|--workers) [ "$#" -ge 2 ] || { echo "gpu_acceptance.sh: $1 needs a value" >&2; exit 2; }
                 extra+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_acceptance.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$out" ] || { echo "gpu_acceptance.sh: one OUTPUT_DIR only, got '$out' and '$1'" >&2; exit 2; }
           out="$1"; shift ;;
    esac
done
out="${out:-bench-results/gpu_acceptance}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export FASTCONVNEXT_AUTOTUNE=0
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$out/cache/triton}"
if [ "${#rehearse[@]}" -gt 0 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if command -v python3 >/dev/null 2>&1; then python=python3; else python=python; fi
fi
script="$root/benchmarks/gpu_acceptance.py"
# Each stage is killed at its own limit by gpu_acceptance.py; this is the backstop for the whole command.
limit="$("$python" "$script" --stage "$stage" --print-limit)"
cd "$root"
exec timeout --kill-after=10 "$limit" "$python" "$script" --stage "$stage" --output "$out" \
    ${rehearse[@]+"${rehearse[@]}"} ${extra[@]+"${extra[@]}"}
