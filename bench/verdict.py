"""Verdicts: paired differences over seeds, a bootstrap interval, and a call against a margin
fixed in params.yaml before the runs (bench.protocol).

For a pair (E2E arm, DB arm) run on the same seeds, d_s = ±(DB_s − E2E_s), signed so that a
positive d means DiffusionBlocks is better (for a lower-is-better metric d = E2E − DB).  With a
relative margin d_s is divided by the E2E mean.  Reported: mean d, a percentile bootstrap 95%
interval of the mean over seeds, and P(DB ≥ E2E), the share of seeds on which DB was at least as
good.  The verdict follows from the interval and the margin m alone:

    matches       the whole interval lies inside (−m, +m)
    better        otherwise, if its lower end is above 0
    worse         otherwise, if its upper end is below 0
    inconclusive  in every other case

With 5 seeds a bootstrap interval is narrow-ish and optimistic; it is what we can afford, and
the seed count is printed beside every verdict.
"""

from __future__ import annotations

import numpy as np

VERDICTS = ("matches", "better", "worse", "inconclusive")


def paired_differences(e2e: list[float], db: list[float], higher_is_better: bool,
                       relative: bool = False) -> np.ndarray:
    e, d = np.asarray(e2e, dtype=float), np.asarray(db, dtype=float)
    if e.shape != d.shape or e.size == 0:
        raise ValueError(f"paired differences need the same seeds for both arms, got {e.size} and {d.size} values")
    diff = (d - e) if higher_is_better else (e - d)
    return diff / abs(e.mean()) if relative else diff


def bootstrap_interval(values: np.ndarray, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling seeds with replacement)."""
    values = np.asarray(values, dtype=float)
    if values.size == 1:
        return float(values[0]), float(values[0])   # one seed: no interval (the verdict says so)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def verdict(low: float, high: float, margin: float, n_seeds: int) -> str:
    if n_seeds < 2:
        return "inconclusive"
    if -margin < low and high < margin:
        return "matches"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "inconclusive"


def compare_pair(e2e: list[float], db: list[float], higher_is_better: bool, margin: float,
                 relative: bool = False) -> dict:
    d = paired_differences(e2e, db, higher_is_better, relative)
    low, high = bootstrap_interval(d)
    return {"seeds": int(d.size), "e2e_mean": float(np.mean(e2e)), "db_mean": float(np.mean(db)),
            "mean_diff": float(d.mean()), "ci_low": low, "ci_high": high,
            "p_db_ge_e2e": float((d >= 0).mean()), "margin": margin,
            "verdict": verdict(low, high, margin, int(d.size))}
