"""Where the test split is opened, and where validation is carved from train.

The rule: every *choice* — sweeps and their pruning, tuning trials, lever studies, σ-grid or
inference-variant choice — is made on validation; test is read only by the final evaluation and
the published learning curve.  It is enforced here, not by convention:

  * `open_test(what, loader)` is the only way a task reads its test split.
  * Inside `selection(reason)` (which `bench tune` and `bench sweep` enter), `open_test` raises
    `TestSealed`.  The seal is an environment variable, so a subprocess started from a selection
    (a trial trained in another process) is sealed too.
  * `carve_validation` takes a seeded, recorded subset of the train split as validation; the two
    are disjoint by construction, and test is never touched.

tests/test_protocol.py proves it: scrambling the test labels changes neither a tuning study's
chosen configuration nor any validation figure.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, TypeVar

import numpy as np

SEAL_ENV = "BENCH_TEST_SEALED"
T = TypeVar("T")


class TestSealed(RuntimeError):
    """A selection step tried to read the test split."""

    __test__ = False   # not a pytest test class


def test_sealed() -> str:
    """The reason the test split is sealed now ('' when it is open)."""
    return os.environ.get(SEAL_ENV, "")


test_sealed.__test__ = False


@contextlib.contextmanager
def selection(reason: str):
    """Seal the test split for the duration (nested selections keep the outer reason)."""
    before = os.environ.get(SEAL_ENV)
    os.environ[SEAL_ENV] = before or reason
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SEAL_ENV, None)
        else:
            os.environ[SEAL_ENV] = before


def open_test(what: str, loader: Callable[[], T]) -> T:
    """Load a test split through the seal: `loader()` runs only outside a selection."""
    reason = test_sealed()
    if reason:
        raise TestSealed(f"{what}: the test split is sealed during {reason}; selections read validation only")
    return loader()


def carve_validation(n_train: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of a train split of n_train examples: a seeded random
    `val_fraction` of it is validation.  The permutation depends only on `seed` (data.val_seed),
    not on the run's seed, so every arm and every seed of a suite sees the same validation set."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_train * val_fraction))
    perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x5A11,))).permutation(n_train)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def metric_on(metric: str, split: str) -> str:
    """A task's metric name on another split: test_acc → val_acc, gen_ppl → val_gen_ppl."""
    if metric.startswith("test_"):
        return f"{split}_{metric[5:]}" if split != "test" else metric
    return metric if split == "test" else f"{split}_{metric}"
