#!/usr/bin/env bash
# Train and evaluate arms of a suite over seeds, JOBS runs side by side (each run is one thread:
# train.threads in the suite's params), resuming whatever was killed.  DVC runs the same commands
# one at a time; this is the same work, in parallel.  Afterwards `dvc commit` records the outputs.
#   scripts/run_seeds.sh suites/vit_fashion/params.yaml "e2e dblocks" "0 1 2 3 4" [JOBS]
set -euo pipefail
params=$1; arms=$2; seeds=$3; jobs=${4:-2}
# seed-major (every arm of seed 0, then of seed 1, …): a run stopped part-way still leaves paired seeds
for seed in $seeds; do for arm in $arms; do echo "$arm $seed"; done; done |
  xargs -P "$jobs" -L 1 bash -c 'bench train "$0" --arm "$1" --seed "$2" --resume-if-compatible --no-progress &&
                                 bench evaluate "$0" --arm "$1" --seed "$2"' "$params"
