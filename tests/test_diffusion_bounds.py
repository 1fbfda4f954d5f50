"""The method core's edges: the boundaries of every check (one value inside, one outside), its
messages (what a user reads), its dtypes and shapes, and the chain's last step.  Written against
the mutants scripts/mutation.py found surviving tests/test_diffusion.py."""

import pytest
import torch

from bench.diffusion import (LogNormalNoise, denoised, euler_step, make_partition, sample_chain,
                             sigmas_equiprobable, sigmas_karras, steps_per_block)
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
