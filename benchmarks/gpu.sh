#!/usr/bin/env bash
# The GPU check on one lent H100/H200-class GPU (under 8 minutes): one-GPU bf16 training of the
# llama3.2-1b and opt1.3b shapes with p3d and a hand-written loop, and p3d's CUDA path.
# Writes docs/results/gpu.md and gpu.json. Arguments go to benchmarks/gpu.py (--help lists them;
# --dry-run checks the same path on CPU in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" benchmarks/gpu.py "$@"
