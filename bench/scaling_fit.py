"""The trend of a metric against training compute: a saturating power law per arm, with seed
bootstrap intervals, and the compute at which the fitted DB − E2E gap enters the verdict margin.

Fitted to a loss ℓ (lower is better: BPC, FID, or 1 − accuracy / 1 − MAUVE for a higher-is-better
metric in [0, 1]):

    ℓ(C) = ℓ∞ + a · (C / C₀)^(−b),     ℓ∞ ≥ 0, a ≥ 0, b in EXPONENTS

C is the arm's training FLOPs and C₀ the smallest compute in the table (it only conditions a).
For each b on a grid the two linear coefficients are least squares (clamped to the constraints),
and the b with the smallest squared error is kept: no optimiser to start or to diverge.

Intervals resample *seeds* with replacement (every budget point of a drawn seed comes along, and
both arms draw the same seeds, so the gap stays paired), as bench.verdict does for one budget.
With 3–5 seeds there are few distinct resamples: the intervals are coarse, and say so by being wide.
"""

from __future__ import annotations

import numpy as np

EXPONENTS = np.geomspace(0.02, 3.0, 240)
EXTRAPOLATION = 4.0   # the crossing search reaches at most this multiple past the largest compute run


def to_loss(values, higher_is_better: bool) -> np.ndarray:
    """The fitted quantity: lower is better and a floor of 0 is possible."""
    v = np.asarray(values, dtype=float)
    return 1.0 - v if higher_is_better else v


def from_loss(loss, higher_is_better: bool) -> np.ndarray:
    return 1.0 - np.asarray(loss, dtype=float) if higher_is_better else np.asarray(loss, dtype=float)


def saturating_power_law(C, floor: float, a: float, b: float, C0: float) -> np.ndarray:
    return floor + a * (np.asarray(C, dtype=float) / C0) ** (-b)


def fit_power_law(C, loss, C0: float | None = None, exponents: np.ndarray = EXPONENTS) -> dict:
    """Least-squares ℓ∞, a, b of ℓ(C) = ℓ∞ + a (C/C₀)^(−b) over every (compute, loss) point."""
    C, y = np.asarray(C, dtype=float), np.asarray(loss, dtype=float)
    if np.unique(np.round(np.log(C), 2)).size < 3:   # 3 parameters: fewer budgets leave the law undetermined
        raise ValueError(f"a power-law fit needs points at ≥ 3 budgets, got {C.size} points")
    C0 = float(C.min()) if C0 is None else C0
    x = (C / C0)[None, :] ** (-exponents[:, None])          # (exponents, points)
    n, sx, sy = y.size, x.sum(1), y.sum()
    sxx, sxy = (x * x).sum(1), (x * y).sum(1)
    det = n * sxx - sx ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(det > 0, (n * sxy - sx * sy) / det, 0.0)
        floor = (sy - a * sx) / n
    # the constraints: a floor below 0 → refit a alone through 0; a rising curve (a < 0) → flat
    neg_floor = floor < 0
    a = np.where(neg_floor, np.maximum(sxy / sxx, 0.0), a)
    floor = np.where(neg_floor, 0.0, floor)
    rising = a < 0
    a, floor = np.where(rising, 0.0, a), np.where(rising, sy / n, floor)
    sse = ((y[None, :] - floor[:, None] - a[:, None] * x) ** 2).sum(1)
    best = int(np.argmin(sse))
    return {"floor": float(floor[best]), "a": float(a[best]), "b": float(exponents[best]), "C0": C0,
            "sse": float(sse[best]), "points": int(n), "flat": bool(a[best] == 0.0)}


def fitted_gap(fit_e2e: dict, fit_db: dict, C) -> np.ndarray:
    """ℓ_E2E(C) − ℓ_DB(C) at the same compute: positive means DiffusionBlocks is better."""
    e = saturating_power_law(C, fit_e2e["floor"], fit_e2e["a"], fit_e2e["b"], fit_e2e["C0"])
    d = saturating_power_law(C, fit_db["floor"], fit_db["a"], fit_db["b"], fit_db["C0"])
    return e - d


def margin_crossing(fit_e2e: dict, fit_db: dict, margin: float, relative: bool, C_min: float, C_max: float,
                    higher_is_better: bool = True) -> float | None:
    """The least compute in [C_min, EXTRAPOLATION · C_max] from which the fitted gap stays inside
    ±margin (a relative margin is a fraction of the fitted E2E metric); None if it never does."""
    grid = np.geomspace(C_min, EXTRAPOLATION * C_max, 400)
    gap = fitted_gap(fit_e2e, fit_db, grid)
    e2e = saturating_power_law(grid, fit_e2e["floor"], fit_e2e["a"], fit_e2e["b"], fit_e2e["C0"])
    width = margin * np.abs(from_loss(e2e, higher_is_better)) if relative else np.full_like(grid, margin)
    inside = np.abs(gap) < width
    if not inside[-1]:
        return None
    outside = np.flatnonzero(~inside)
    return float(grid[outside[-1] + 1] if outside.size else grid[0])


def bootstrap_fits(points: dict, seeds: list[int], margin: float, relative: bool, higher_is_better: bool,
                   resamples: int = 1000, seed: int = 0) -> dict:
    """points: arm role ("e2e", "db") → (seed array, compute array, loss array).  Seeds are drawn
    with replacement, the same draw for both roles.  Returns each role's fit on all points, the
    2.5 / 97.5 percentiles of its floor and exponent, and the crossing compute's distribution."""
    C_all = np.concatenate([points[r][1] for r in points])
    C0, C_min, C_max = float(C_all.min()), float(C_all.min()), float(C_all.max())

    def fits(draw: np.ndarray) -> dict:
        out = {}
        for role, (s, C, y) in points.items():
            idx = np.concatenate([np.flatnonzero(s == k) for k in draw])
            out[role] = fit_power_law(C[idx], y[idx], C0)
        return out

    full = fits(np.asarray(seeds))
    rng = np.random.default_rng(seed)
    draws = [fits(rng.choice(seeds, size=len(seeds), replace=True)) for _ in range(resamples)]
    result = {"C_min": C_min, "C_max": C_max, "resamples": resamples, "seeds": list(seeds)}
    for role in points:
        result[role] = {**full[role], **{f"{k}_ci": [float(np.quantile([d[role][k] for d in draws], q))
                                                     for q in (0.025, 0.975)] for k in ("floor", "b")}}
    cross = [margin_crossing(d["e2e"], d["db"], margin, relative, C_min, C_max, higher_is_better) for d in draws]
    found = np.array([c for c in cross if c is not None])
    result["crossing"] = margin_crossing(full["e2e"], full["db"], margin, relative, C_min, C_max, higher_is_better)
    result["crossing_share"] = float(found.size / resamples)   # resamples whose fitted gap enters the margin
    result["crossing_ci"] = [float(np.quantile(found, q)) for q in (0.025, 0.975)] if found.size else None
    return result
