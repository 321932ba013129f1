#!/usr/bin/env bash
# The one-GPU check (benchmarks/gpu_check.py): on a machine without CUDA it says so and exits 0,
# writing nothing. `bash benchmarks/gpu_check.sh --cpu` dry-runs every step on tiny CPU models.
# Uses the machine's own python with torch (PYTHON=...); never downloads anything.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ "${1:-}" != "--cpu" ] && [ "${LOOM_GPU_CHECK_CPU:-0}" != 1 ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA device; nothing run, BENCHMARKS.md unchanged"
        exit 0
    fi
fi
[ "${LOOM_GPU_CHECK_CPU:-0}" = 1 ] && set -- --cpu "$@"
# Use the checkout's sources when the package is not installed (no pip, no network).
"$PY" -c "import loom" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The whole check stops starting steps after 480 s and is killed at 540 s (under 9 minutes).
exec timeout --kill-after=10 540 "$PY" benchmarks/gpu_check.py --budget-s 480 "$@"
