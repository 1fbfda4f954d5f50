"""bench.verdict at its edges: the sign convention, the relative margin, the bootstrap interval
(exactly the documented percentile bootstrap), the strict inequalities of the verdict rule and
P(DB ≥ E2E) with ties.  Written for mutation testing of the verdict code; no training."""

import numpy as np
import pytest

from bench.verdict import bootstrap_interval, compare_pair, paired_differences, verdict


def test_differences_are_signed_so_that_positive_means_db_better():
    assert paired_differences([0.80, 0.70], [0.85, 0.60], higher_is_better=True).tolist() == pytest.approx([0.05, -0.10])
    assert paired_differences([3.0, 2.0], [2.5, 2.5], higher_is_better=False).tolist() == pytest.approx([0.5, -0.5])
    # relative: divided by |E2E mean| (2.5 here), also for a negative-valued metric
    assert paired_differences([3.0, 2.0], [2.5, 2.5], False, relative=True).tolist() == pytest.approx([0.2, -0.2])
    assert paired_differences([-2.0, -2.0], [-1.0, -1.0], True, relative=True).tolist() == pytest.approx([0.5, 0.5])
    for e2e, db in [([1.0, 2.0], [1.0]), ([], [])]:
        with pytest.raises(ValueError, match=rf"need the same seeds for both arms, got {len(e2e)} and {len(db)} values"):
            paired_differences(e2e, db, True)


def test_the_interval_is_the_documented_percentile_bootstrap():
    d = np.array([0.01, 0.04, -0.02, 0.03, 0.00])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, 5, size=(10_000, 5))].mean(axis=1)
    assert bootstrap_interval(d) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    rng = np.random.default_rng(7)
    means = d[rng.integers(0, 5, size=(500, 5))].mean(axis=1)
    assert bootstrap_interval(d, level=0.8, resamples=500, seed=7) == (float(np.quantile(means, 0.1)),
                                                                        float(np.quantile(means, 0.9)))
    assert bootstrap_interval([0.3]) == (0.3, 0.3)                       # one seed: no interval
    assert bootstrap_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    lo, hi = bootstrap_interval(d, level=0.5)
    wide = bootstrap_interval(d)
    assert wide[0] < lo < d.mean() < hi < wide[1]


@pytest.mark.parametrize("low,high,expected", [
    (-0.0099, 0.0099, "matches"),
    (-0.01, 0.005, "inconclusive"),          # touching the margin is not inside it
    (-0.005, 0.01, "inconclusive"),
    (0.001, 0.02, "better"), (0.0, 0.02, "inconclusive"),     # better needs the lower end above 0
    (-0.02, -0.001, "worse"), (-0.02, 0.0, "inconclusive"),   # worse needs the upper end below 0
    (0.005, 0.009, "matches"),               # inside the margin comes first, even when above 0
])
def test_verdict_rule_edges(low, high, expected):
    assert verdict(low, high, margin=0.01, n_seeds=2) == expected


def test_one_seed_is_never_a_verdict_and_ties_count_for_db():
    assert verdict(0.5, 0.6, margin=0.01, n_seeds=1) == "inconclusive"
    r = compare_pair([0.8, 0.8, 0.8, 0.8], [0.8, 0.9, 0.7, 0.9], higher_is_better=True, margin=0.5)
    assert r["p_db_ge_e2e"] == 0.75 and r["seeds"] == 4 and r["margin"] == 0.5
    assert (r["e2e_mean"], r["db_mean"], r["mean_diff"]) == pytest.approx((0.8, 0.825, 0.025))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(bootstrap_interval(np.array([0.0, 0.1, -0.1, 0.1])))
    assert r["verdict"] == "matches"


def test_two_seeds_get_an_interval_and_a_relative_pair_is_judged_relative():
    lo, hi = bootstrap_interval([0.1, 0.3])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.3)       # resampling two seeds spans both
    r = compare_pair([2.0, 2.0], [1.9, 1.9], higher_is_better=False, margin=0.03, relative=True)
    assert r["mean_diff"] == pytest.approx(0.05) and r["verdict"] == "better"   # 5 % of E2E, beyond the 3 % margin
