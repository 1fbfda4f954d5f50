#!/usr/bin/env bash
# The prepared GPU scaling run: vit_fashion's two verdict pairs at 0.125–8× the suite's budget (the 8×
# that 2 CPU cores cannot reach), every point its own run on the GPU, 3 seeds.  It writes
# results/gpu/scaling/ (csv, fit, png, README) from runs in runs_gpu/, never mixed with the CPU points of
# results/scaling/.  Budget: under 9 minutes on one H100/H200 (the model is tiny; evaluation dominates).
#   scripts/gpu_scaling.sh                                   # on a GPU machine
#   BUDGETS=0.01,0.02 SEEDS=0 PAIRS=tuned scripts/gpu_scaling.sh   # a wiring check on the CPU
# Needs results/vit_fashion/tuned.yaml (committed) and data/fashion_mnist (`bench data fashion-mnist`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/bench ] && BENCH=.venv/bin/bench || BENCH=bench
BUDGETS=${BUDGETS:-0.125,0.25,0.5,1,2,4,8}
SEEDS=${SEEDS:-0,1,2}
PAIRS=${PAIRS:-tuned,paper}
JOBS=${JOBS:-4}
out=results/gpu
mkdir -p "$out/vit_fashion"
cp results/vit_fashion/tuned.yaml "$out/vit_fashion/tuned.yaml"   # the CPU study's choices, unchanged
# the suite's params with its runs and results elsewhere, and torch's own thread count (no CPU runs side by side)
sed -e "s#^suite: vit_fashion#suite: vit_fashion\nruns_dir: runs_gpu\nresults_dir: $out#" \
    -e 's/^  threads: 1 .*/  threads: 0/' suites/vit_fashion/params.yaml > "$out/vit_fashion_params.yaml"
export BENCH_MLFLOW=0
exec timeout 540 "$BENCH" scaling "$out/vit_fashion_params.yaml" --budgets "$BUDGETS" --seeds "$SEEDS" \
  --pairs "$PAIRS" --jobs "$JOBS"
