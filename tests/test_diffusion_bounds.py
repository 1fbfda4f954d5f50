"""The method core's edges: the boundaries of every check (one value inside, one outside), its
messages (what a user reads), its dtypes and shapes, and the chain's last step.  Written against
the mutants scripts/mutation.py found surviving tests/test_diffusion.py."""

import math

import pytest
import torch

from bench.diffusion import (LogNormalNoise, denoised, euler_step, make_partition, sample_chain,
                             sigmas_equiprobable, sigmas_karras, steps_per_block)
from bench.diffusion.noise import log_normal_pdf
from bench.diffusion.precond import scale_input, weighted_loss
from bench.diffusion.sampler import make_sigmas
from bench.diffusion.partition import Partition, partition_edges

NOISE = LogNormalNoise()


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma_min": 0.0}, r"sigma_min and sigma_max must be positive, got 0.0, 80.0"),
    ({"sigma_min": -1.0}, r"must be positive"),
    ({"sigma_max": 0.0}, r"sigma_min and sigma_max must be positive, got 0.002, 0.0"),
    ({"P_std": 0.0}, r"P_std must be positive, got 0.0"),
    ({"sigma_data": 0.0}, r"sigma_data must be positive, got 0.0"),
])
def test_noise_rejects_each_non_positive_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LogNormalNoise(**kwargs)


def test_noise_accepts_small_positive_fields():
    assert LogNormalNoise(P_std=0.5, sigma_data=0.1).P_std == 0.5


def test_quantile_is_float64_and_exact_at_the_ends():
    for sigma_max in (80.0, 1.7, 33.3, 7.1):
        noise = LogNormalNoise(sigma_max=sigma_max)
        q = noise.quantile([0.0, 0.5, 1.0])            # a Python list, not a tensor
        assert q.dtype == torch.float64
        assert q[0].item() == noise.sigma_min and q[-1].item() == sigma_max
    # a list is read in float64 too, not float32 (1/3 is not a float32 value)
    assert torch.equal(NOISE.quantile([1 / 3]), NOISE.quantile(torch.tensor([1 / 3], dtype=torch.float64)))


def test_partition_edge_checks_and_their_messages():
    assert make_partition(1).edges == (NOISE.sigma_min, NOISE.sigma_max)          # one block: two edges
    assert Partition(NOISE, (NOISE.sigma_min, NOISE.sigma_max)).num_blocks == 1
    with pytest.raises(ValueError, match="^a partition needs at least two edges$"):
        Partition(NOISE, (NOISE.sigma_min,))
    with pytest.raises(ValueError, match=r"strictly increasing, got \[0.002, 1.0, 1.0, 80.0\]"):
        Partition(NOISE, (0.002, 1.0, 1.0, 80.0))
    with pytest.raises(ValueError, match=r"from sigma_min=0.002 to sigma_max=80.0, got 0.002 … 79.0$"):
        Partition(NOISE, (0.002, 1.0, 79.0))                                          # only the top end is off
    with pytest.raises(ValueError, match=r"got 0.003 … 80.0$"):
        Partition(NOISE, (0.003, 1.0, 80.0))


def test_block_index_out_of_range_names_the_block():
    p = make_partition(3)
    assert p.interval(2)[0] == NOISE.sigma_min
    with pytest.raises(IndexError, match="^block 3 out of range for B=3$"):
        p.interval(3)


def test_make_partition_keeps_its_strategy():
    assert make_partition(3, "log-uniform").strategy == "log-uniform"
    assert make_partition(3).gamma == 0.0                                  # no overlap unless asked
    assert make_partition(3, "explicit", edges=[0.1, 1.0]).strategy == "explicit"


@pytest.mark.parametrize("B, strategy, edges, message", [
    (0, "equiprobable", None, r"^num_blocks must be >= 1, got 0$"),
    (3, "explicit", None, r"^strategy 'explicit' needs boundaries \(sigma_edges\)$"),
    (2, "explicit", [0.002, 1.0, 79.0], r"^explicit boundaries must start at sigma_min=0.002 and end at sigma_max=80.0$"),
    (2, "explicit", [0.003, 1.0, 80.0], r"must start at sigma_min"),
    (3, "explicit", [1.0], r"^explicit boundaries for B=3: give 2 interior values \(or 4 including sigma_min and sigma_max\), got 1$"),
    (3, "explicit", [0.002, 1.0], r"^explicit boundaries must lie strictly inside \(0.002, 80.0\), got \[0.002, 1.0\]$"),
    (3, "explicit", [1.0, 80.0], r"strictly inside"),
    (3, "cosine", None, r"^unknown partition strategy 'cosine'; choose one of equiprobable, log-uniform, linear, explicit$"),
    (3, "log-uniform", [0.1, 1.0], r"^sigma_edges given but strategy is 'log-uniform'; use strategy 'explicit'$"),
])
def test_partition_edges_rejects_with_one_clear_message(B, strategy, edges, message):
    with pytest.raises(ValueError, match=message):
        partition_edges(NOISE, B, strategy, edges)


def test_one_block_edges_are_the_whole_range():
    assert partition_edges(NOISE, 1, "equiprobable") == (NOISE.sigma_min, NOISE.sigma_max)


def test_denoised_keeps_the_shape_and_dtype_of_z_with_per_sample_sigma():
    z, F = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    D = denoised(z, F, torch.rand(4, dtype=torch.float64) + 0.1, 0.5)
    assert D.shape == z.shape and D.dtype == torch.float32


def test_sigma_grids_at_their_smallest():
    with pytest.raises(ValueError, match=r"sampling start 0.002 must lie in \(sigma_min, sigma_max\]"):
        sigmas_equiprobable(NOISE, 5, sigma_start=NOISE.sigma_min)
    one = sigmas_equiprobable(NOISE, 1)
    assert one.dtype == torch.float64 and one.tolist() == [NOISE.sigma_max]
    two = sigmas_equiprobable(NOISE, 2)
    assert two.tolist() == [NOISE.sigma_max, NOISE.sigma_min]
    k = sigmas_karras(NOISE, 1)
    assert k.dtype == torch.float64 and k.tolist() == [NOISE.sigma_max]


def test_steps_per_block_does_not_count_a_trailing_zero():
    p = make_partition(3)
    grid = torch.cat([sigmas_equiprobable(NOISE, 9), torch.zeros(1, dtype=torch.float64)])
    assert sum(steps_per_block(p, grid)) == 9


def test_chain_takes_euler_steps_and_returns_D_at_sigma_zero():
    """σ = 3 → 1 → 0 with a denoiser that reads z and its block: the first step is Euler, the last
    (to σ = 0) is D itself, bit for bit."""
    p = make_partition(2)                           # σ = 3 is block 0's, σ = 1 block 1's (boundary 0.30)
    torch.manual_seed(0)
    z0 = torch.randn(1000, dtype=torch.float64)

    def denoise(z, sigma, block):
        return 0.5 * z + block + 0.25

    z1 = euler_step(z0, denoise(z0, 3.0, 0), 3.0, 1.0)
    expected = denoise(z1, 1.0, p.block_of(1.0))
    out = sample_chain(denoise, z0, torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64), p)
    assert torch.equal(out, expected)


def test_scale_input_is_c_in_times_z_per_sample():
    z, sigma = torch.randn(3, 2, 4), torch.tensor([0.01, 0.5, 40.0], dtype=torch.float64)
    out = scale_input(z, sigma, 0.5)
    assert out.shape == z.shape and out.dtype == z.dtype
    for i in range(3):
        assert torch.allclose(out[i], z[i] / (sigma[i].item() ** 2 + 0.25) ** 0.5, rtol=1e-6)


def test_weighted_loss_each_weighting_by_hand():
    """λ(σ) = (σ² + σ_d²)/(σ σ_d)²; per-sample losses of shape (N, D) broadcast against λ (N,)."""
    per = torch.tensor([[1.0, 3.0], [2.0, 0.0], [4.0, 0.0]])         # unequal rows: lambda ≠ official
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    lam = [(s * s + 0.25) / (s * 0.5) ** 2 for s in (0.5, 1.0, 2.0)]      # 8, 5, 4.25
    assert weighted_loss(per, sigma, 0.5, "uniform").item() == pytest.approx(10 / 6)
    assert weighted_loss(per, sigma, 0.5, "lambda").item() == pytest.approx((8 * 4 + 5 * 2 + 4.25 * 4) / 6)
    assert weighted_loss(per, sigma, 0.5, "official").item() == pytest.approx(10 / 6 * sum(lam) / 3)
    assert weighted_loss(per, sigma, 0.5, "lambda").dtype == per.dtype
    with pytest.raises(ValueError, match="^unknown weighting 'edm'; choose one of lambda, official, uniform$"):
        weighted_loss(per, sigma, 0.5, "edm")


def test_log_normal_pdf_is_the_density_of_ln_sigma():
    noise = LogNormalNoise(P_mean=-1.2, P_std=1.2)
    s = torch.logspace(-6, 6, 200001, dtype=torch.float64)
    pdf = log_normal_pdf(noise, s)
    assert torch.trapezoid(pdf, s).item() == pytest.approx(1.0, abs=1e-6)          # a density over σ
    at = 0.3
    x = (math.log(at) + 1.2) / 1.2
    assert log_normal_pdf(noise, at).item() == pytest.approx(math.exp(-x * x / 2) / (at * 1.2 * math.sqrt(2 * math.pi)), rel=1e-12)


def test_make_sigmas_dispatches_by_grid_name():
    assert torch.equal(make_sigmas(NOISE, 7), sigmas_equiprobable(NOISE, 7))
    assert torch.equal(make_sigmas(NOISE, 7, "equiprobable", sigma_start=10.0), sigmas_equiprobable(NOISE, 7, 10.0))
    assert torch.equal(make_sigmas(NOISE, 7, "karras", rho=3.0), sigmas_karras(NOISE, 7, rho=3.0))
    assert not torch.equal(make_sigmas(NOISE, 7, "karras", rho=3.0), sigmas_karras(NOISE, 7))
    # EDM's ρ = 7 is the default of both
    assert torch.equal(make_sigmas(NOISE, 7, "karras"), sigmas_karras(NOISE, 7, rho=7.0))
    assert torch.equal(sigmas_karras(NOISE, 7), sigmas_karras(NOISE, 7, rho=7.0))
    with pytest.raises(ValueError, match="^unknown sigma grid 'linear'; choose one of equiprobable, karras$"):
        make_sigmas(NOISE, 7, "linear")


def test_block_training_sigmas_lie_in_its_range_and_follow_the_generator():
    p = make_partition(3, gamma=0.1)
    for b in range(3):
        lo, hi = p.training_range(b)
        draws = p.sample_training_sigma(b, 2000, generator=torch.Generator().manual_seed(b))
        assert draws.shape == (2000,) and draws.min() >= lo and draws.max() <= hi
        again = p.sample_training_sigma(b, 2000, generator=torch.Generator().manual_seed(b))
        assert torch.equal(draws, again)
        # p_noise restricted to the range: the median draw sits at the range's own median
        mid = p.noise.icdf((p.noise.cdf(lo) + p.noise.cdf(hi)) / 2).item()
        assert draws.median().item() == pytest.approx(mid, rel=0.1)


def test_a_sigma_within_the_tie_tolerance_below_a_boundary_belongs_to_the_higher_noise_block():
    p = make_partition(3)
    e = p.edges[1]                                   # ascending σ: block 2 owns [σ_min, e]
    assert p.block_of(e * (1 - 1e-9)) == 1 and p.block_of(e * (1 - 1e-8)) == 2
