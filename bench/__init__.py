"""bench: a reference harness for DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026)."""

import os

# OpenMP threads that spin while waiting make CPU training up to ~10x slower when other jobs share
# the cores (measured here with several suites on 2 cores); sleeping costs little when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
