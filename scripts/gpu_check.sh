#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): meter vs CUDA allocator, step time and MFU (fp32,
# bf16, bf16 + compile), the CPU suites' check configs on CUDA, a single-GPU torchrun smoke run.
# Writes results/gpu/*.md.  Budget: under 8 minutes on one H100/H200.
#   scripts/gpu_check.sh          # on a GPU machine
#   scripts/gpu_check.sh --dry    # the same code on the CPU at tiny batches (a wiring check)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3
exec timeout 480 "$PY" -m bench.gpu_check "$@"
