"""The method core against the paper's and the official code's numbers."""

import math

import pytest
import torch

from bench.diffusion import (LogNormalNoise, c_in, c_noise, c_out, c_skip, denoised, euler_step, loss_weight,
                             make_partition, sample_chain, sample_sigma, sigmas_equiprobable, sigmas_karras,
                             steps_per_block)

NOISE = LogNormalNoise()


@pytest.mark.parametrize("B, expected", [
    (2, [0.002, 0.3012, 80]),
    (3, [0.002, 0.1796, 0.5050, 80]),
    (4, [0.002, 0.1341, 0.3012, 0.6766, 80]),
    (6, [0.002, 0.0943, 0.1796, 0.3012, 0.5050, 0.9617, 80]),
])
def test_equiprobable_boundaries_match_paper(B, expected):
    p = make_partition(B, "equiprobable")
    assert [round(e, 4) for e in p.edges] == pytest.approx(expected, abs=1e-4)
    assert [p.mass(b) for b in range(B)] == pytest.approx([1 / B] * B, abs=1e-12)


@pytest.mark.parametrize("B, expected", [
    (2, [0.002, 0.4, 80]),
    (3, [0.002, 0.0684, 2.3392, 80]),
    (6, [0.002, 0.0117, 0.0684, 0.4, 2.3392, 13.68, 80]),
])
def test_log_uniform_boundaries_match_paper(B, expected):
    assert list(make_partition(B, "log-uniform").edges) == pytest.approx(expected, abs=1e-2)


def test_linear_and_explicit_boundaries():
    assert make_partition(2, "linear").edges == pytest.approx((0.002, 40.001, 80))
    p = make_partition(3, "explicit", edges=[0.1, 1.0])
    assert p.edges == (0.002, 0.1, 1.0, 80.0)
    assert make_partition(3, "explicit", edges=[0.002, 0.1, 1.0, 80]).edges == p.edges
    with pytest.raises(ValueError):
        make_partition(3, "explicit", edges=[1.0, 0.1])
    with pytest.raises(ValueError):
        make_partition(3, "explicit", edges=[0.1])


def test_first_block_owns_highest_noise_and_overlap_ranges():
    p = make_partition(3, "equiprobable", gamma=0.05)
    assert p.interval(0) == (pytest.approx(0.5050, abs=1e-4), 80.0)
    assert p.interval(2) == (0.002, pytest.approx(0.1796, abs=1e-4))
    # paper §2.2 / official code: [0.002, 0.2249], [0.1706, 0.5318], [0.3920, 80] (low → high noise)
    assert p.training_range(2) == pytest.approx((0.002, 0.2249), abs=1e-4)
    assert p.training_range(1) == pytest.approx((0.1706, 0.5318), abs=1e-4)
    assert p.training_range(0) == pytest.approx((0.3920, 80.0), abs=1e-4)
    # the share of training σ's outside each block's own interval (official_code.md §4)
    outside = [1 - p.mass(b) / p.training_mass(b) for b in (2, 1, 0)]
    assert outside == pytest.approx([0.175, 0.085, 0.193], abs=2e-3)


def test_bad_partitions_are_refused():
    with pytest.raises(ValueError, match="gamma"):
        make_partition(3, gamma=-0.1)
    with pytest.raises(ValueError, match="unknown partition"):
        make_partition(3, "quadratic")
    with pytest.raises(ValueError, match="smaller than sigma_max"):
        LogNormalNoise(sigma_min=1.0, sigma_max=1.0)


def test_preconditioning_identities():
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 50, dtype=torch.float64)
    sd = 0.5
    assert torch.allclose(c_skip(sigma, sd) + c_out(sigma, sd) ** 2 / sd**2, torch.ones_like(sigma))
    assert torch.allclose(loss_weight(sigma, sd) * c_out(sigma, sd) ** 2, torch.ones_like(sigma))
    assert torch.allclose(c_in(sigma, sd) ** 2 * (sigma**2 + sd**2), torch.ones_like(sigma))
    assert torch.allclose(c_noise(sigma), 0.25 * torch.log(sigma))
    assert float(c_noise(torch.tensor(0.002))) == pytest.approx(-1.554, abs=1e-3)
    assert float(loss_weight(torch.tensor(0.1796), sd)) == pytest.approx(35.0, abs=0.1)
    assert float(loss_weight(torch.tensor(80.0), sd)) == pytest.approx(4.0, abs=1e-3)
    # D = c_skip·z + c_out·F recovers y when F is the ideal residual (y − c_skip·z)/c_out
    y, z = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    s = torch.full((8,), 0.7, dtype=torch.float64)
    F_ideal = (y - c_skip(s, sd)[:, None] * z) / c_out(s, sd)[:, None]
    assert torch.allclose(denoised(z, F_ideal, s, sd), y)


def test_truncated_sampler_in_range_and_matches_quantiles():
    g = torch.Generator().manual_seed(0)
    lo, hi = 0.1796, 0.5050
    s = sample_sigma(NOISE, 200_000, lo, hi, generator=g)
    assert s.min() >= lo and s.max() <= hi
    # empirical quantiles against the exact conditional quantiles of the truncated log-normal
    probs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    q_lo, q_hi = NOISE.cdf(lo), NOISE.cdf(hi)
    exact = NOISE.icdf(q_lo + probs * (q_hi - q_lo))
    assert torch.allclose(torch.quantile(s, probs), exact, rtol=5e-3)
    # the full range reproduces the log-normal's own median, exp(P_mean)
    full = sample_sigma(NOISE, 200_000, 0.002, 80, generator=g)
    assert float(full.log().median()) == pytest.approx(-1.2, abs=0.02)
    assert float(full.log().std()) == pytest.approx(1.2, abs=0.02)


def test_euler_step_moves_towards_the_denoised_estimate():
    z, D = torch.tensor([10.0]), torch.tensor([1.0])
    z_next = euler_step(z, D, sigma=2.0, sigma_next=1.0)
    # the official code's sign: a convex blend (σ_next/σ)·z + (1 − σ_next/σ)·D
    assert float(z_next) == pytest.approx(0.5 * 10 + 0.5 * 1)
    assert abs(float(z_next - D)) < abs(float(z - D))


def test_sigma_grids_and_block_assignment():
    p = make_partition(3)
    s3 = sigmas_equiprobable(NOISE, 3)
    assert s3.tolist() == pytest.approx([80, 0.3012, 0.002], abs=1e-4)
    assert [p.block_of(x) for x in s3.tolist()] == [0, 1, 2]
    # B+1 points land on the boundaries; a boundary belongs to the higher-noise block
    s4 = sigmas_equiprobable(NOISE, 4)
    assert s4.tolist() == pytest.approx([80, 0.5050, 0.1796, 0.002], abs=1e-4)
    assert [p.block_of(x) for x in s4.tolist()] == [0, 0, 1, 2]
    assert steps_per_block(p, sigmas_equiprobable(NOISE, 6)) == [2, 2, 2]
    assert steps_per_block(p, sigmas_equiprobable(NOISE, 50)) == [17, 16, 17]
    k = sigmas_karras(NOISE, 50)
    assert k[0] == 80 and k[-1] == 0.002 and bool((k[1:] < k[:-1]).all())
    assert steps_per_block(p, k)[0] > 30  # Karras ρ=7 spends most steps at high noise


def test_sample_chain_runs_each_step_with_the_owning_block():
    p = make_partition(3)
    calls = []
    target = torch.ones(2, 3)

    def denoise(z, sigma, block):
        calls.append((round(sigma, 4), block))
        return target

    sigmas = torch.cat([sigmas_equiprobable(NOISE, 6), torch.zeros(1, dtype=torch.float64)])
    z = sample_chain(denoise, 80 * torch.randn(2, 3), sigmas, p)
    assert [b for _, b in calls] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(z, target)  # the last step to σ = 0 returns D


def test_equiprobable_grid_with_a_lower_start():
    p = make_partition(3)
    s = sigmas_equiprobable(NOISE, 3, sigma_start=10.0)
    assert s[0] == 10.0 and s[-1] == 0.002 and bool((s[1:] < s[:-1]).all())
    assert [p.block_of(x) for x in s.tolist()] == [0, 1, 2]
    with pytest.raises(ValueError, match="sampling start"):
        sigmas_equiprobable(NOISE, 3, sigma_start=100.0)


@pytest.mark.parametrize("n, rho", [(5, 7.0), (9, 3.0)])
def test_karras_grid_is_eq5_of_karras_et_al(n, rho):
    """Every point, not just the ends: (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,
    written out here with math.pow (mutation testing found only the end points checked)."""
    a, b = math.pow(80.0, 1 / rho), math.pow(0.002, 1 / rho)
    expected = [math.pow(a + i / (n - 1) * (b - a), rho) for i in range(n)]
    assert sigmas_karras(NOISE, n, rho).tolist() == pytest.approx(expected, rel=1e-12)
    assert sigmas_karras(NOISE, 1).tolist() == [80.0]   # one point: a single call from pure noise
    with pytest.raises(ValueError, match="num_points must be >= 1"):
        sigmas_karras(NOISE, 0)


@pytest.mark.parametrize("start", [None, 10.0])
def test_equiprobable_grid_cuts_equal_noise_mass(start):
    """Consecutive points of the equiprobable grid enclose equal probability under p_noise
    (truncated below σ_start), from σ_start down to σ_min."""
    s = sigmas_equiprobable(NOISE, 6, sigma_start=start).tolist()
    masses = [NOISE.mass(lo, hi) for hi, lo in zip(s, s[1:])]
    assert masses == pytest.approx([NOISE.mass(0.002, s[0]) / 5] * 5, rel=1e-9)
    assert s[0] == (start or 80.0) and s[-1] == pytest.approx(0.002, rel=1e-12)
    assert sigmas_equiprobable(NOISE, 1, sigma_start=start).tolist() == [start or 80.0]
    with pytest.raises(ValueError, match="num_points must be >= 1"):
        sigmas_equiprobable(NOISE, 0)
