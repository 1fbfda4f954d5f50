"""σ grids for inference, the Euler step, and the sampler that chains blocks.

The Euler step is the official code's, z ← z + (σ_next − σ)·(z − D)/σ, a convex blend of z and
D for σ_next < σ.  (The paper's printed Eq. 4 has the opposite sign and moves away from D.)
"""

from __future__ import annotations

from typing import Callable

import torch

from bench.diffusion.noise import LogNormalNoise
from bench.diffusion.partition import Partition

GRIDS = ("equiprobable", "karras")


def sigmas_equiprobable(noise: LogNormalNoise, num_points: int, sigma_start: float | None = None) -> torch.Tensor:
    """σ_start → σ_min, evenly spaced in CDF space of p_noise (so each block of an equiprobable
    partition gets about the same number of steps; paper App. H).  float64, descending.
    σ_start defaults to σ_max; a lower start keeps the first call inside the σ range the first
    block actually saw in training.  A single point is σ_start: one call from pure noise."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    start = noise.sigma_max if not sigma_start else float(sigma_start)
    if not noise.sigma_min < start <= noise.sigma_max:
        raise ValueError(f"sampling start {start} must lie in (sigma_min, sigma_max] = ({noise.sigma_min}, {noise.sigma_max}]")
    if num_points == 1:
        return torch.tensor([start], dtype=torch.float64)
    top = noise.mass(noise.sigma_min, start)  # the truncated distribution's CDF at σ_start
    sigmas = noise.quantile(torch.linspace(top, 0.0, num_points, dtype=torch.float64))
    sigmas[0] = start
    return sigmas


def sigmas_karras(noise: LogNormalNoise, num_points: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5: (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, descending."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if num_points == 1:
        return torch.tensor([noise.sigma_max], dtype=torch.float64)
    i = torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    a, b = noise.sigma_max ** (1 / rho), noise.sigma_min ** (1 / rho)
    s = (a + i * (b - a)) ** rho
    s[0], s[-1] = noise.sigma_max, noise.sigma_min
    return s


def make_sigmas(noise: LogNormalNoise, num_points: int, grid: str = "equiprobable", rho: float = 7.0,
                sigma_start: float | None = None) -> torch.Tensor:
    if grid == "equiprobable":
        return sigmas_equiprobable(noise, num_points, sigma_start)
    if grid == "karras":
        return sigmas_karras(noise, num_points, rho)
    raise ValueError(f"unknown sigma grid {grid!r}; choose one of {', '.join(GRIDS)}")


def euler_step(z: torch.Tensor, D: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from σ to σ_next: z + (σ_next − σ)(z − D)/σ."""
    return z + (sigma_next - sigma) * (z - D) / sigma


# A denoiser for the chain: (z, σ, block) → D.  σ is a Python float, one per step.
Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


def steps_per_block(partition: Partition, sigmas: torch.Tensor) -> list[int]:
    """How many network calls each block makes on a σ grid."""
    counts = [0] * partition.num_blocks
    for s in sigmas.tolist():
        if s > 0:
            counts[partition.block_of(s)] += 1
    return counts


def sample_chain(denoise: Denoiser, z: torch.Tensor, sigmas: torch.Tensor, partition: Partition) -> torch.Tensor:
    """Integrate z along the descending σ grid with Euler steps, each step run by the block that
    owns σ_i.  A trailing σ = 0 makes the last step return D itself (the EDM convention)."""
    s = sigmas.tolist()
    for sigma, sigma_next in zip(s, s[1:]):
        D = denoise(z, sigma, partition.block_of(sigma))
        z = D if sigma_next == 0 else euler_step(z, D, sigma, sigma_next)
    return z
