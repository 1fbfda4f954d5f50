"""Partitions of the noise range [σ_min, σ_max] into B intervals, one per block (paper §3.3).

Convention (the official code's): the *first* layers own the *highest* noise.  Intervals are
indexed in ascending σ (k = 0 is [σ_min, e_1]); block j owns interval k = B − 1 − j, so block 0
runs first at inference, from σ_max downwards.

Strategies for the interior boundaries e_1 < … < e_{B−1}:
  equiprobable  equal probability mass under p_noise: e_b = Φ⁻¹ at q_min + (b/B)(q_max − q_min)
  log-uniform   equal widths in ln σ (the paper's "uniform" ablation, App. E.6.2)
  linear        equal widths in σ (the paper's §3.3 wording of "uniform")
  explicit      boundaries given by the user

Overlap γ widens block b's training range in log space by (hi/lo)^γ at each end, clipped to
[σ_min, σ_max] (paper App. C; the clip is the official code's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from bench.diffusion.noise import LogNormalNoise, sample_sigma

STRATEGIES = ("equiprobable", "log-uniform", "linear", "explicit")

# σ values within this relative distance of a boundary count as on it; a boundary σ belongs
# to the higher-noise interval (the official `bucketize(right=True)`).  Without the snap,
# float round-off decides which block runs a step that lands on a boundary.
_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class Partition:
    """B noise intervals with overlap γ.  `edges` ascending, edges[0] = σ_min, edges[-1] = σ_max."""

    noise: LogNormalNoise
    edges: tuple[float, ...]
    gamma: float = 0.0
    strategy: str = "equiprobable"

    def __post_init__(self):
        e = self.edges
        if len(e) < 2:
            raise ValueError("a partition needs at least two edges")
        if any(b <= a for a, b in zip(e, e[1:])):
            raise ValueError(f"partition edges must be strictly increasing, got {list(e)}")
        if not (math.isclose(e[0], self.noise.sigma_min) and math.isclose(e[-1], self.noise.sigma_max)):
            raise ValueError(f"partition edges must run from sigma_min={self.noise.sigma_min} "
                             f"to sigma_max={self.noise.sigma_max}, got {e[0]} … {e[-1]}")
        if self.gamma < 0:
            raise ValueError(f"overlap gamma must be >= 0, got {self.gamma}")

    @property
    def num_blocks(self) -> int:
        return len(self.edges) - 1

    def interval(self, block: int) -> tuple[float, float]:
        """The σ interval block `block` owns (no overlap)."""
        k = self._interval_index(block)
        return self.edges[k], self.edges[k + 1]

    def training_range(self, block: int) -> tuple[float, float]:
        """The interval widened by γ in log space, clipped to [σ_min, σ_max]."""
        lo, hi = self.interval(block)
        widen = (hi / lo) ** self.gamma
        return max(lo / widen, self.noise.sigma_min), min(hi * widen, self.noise.sigma_max)

    def mass(self, block: int) -> float:
        """Probability mass of the block's own interval under p_noise."""
        return self.noise.mass(*self.interval(block))

    def training_mass(self, block: int) -> float:
        """Probability mass of the block's (overlapping) training range under p_noise."""
        return self.noise.mass(*self.training_range(block))

    def sample_training_sigma(self, block: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n σ's for a training step of `block`: p_noise restricted to its training range."""
        return sample_sigma(self.noise, n, *self.training_range(block), generator=generator)

    def block_of(self, sigma: float) -> int:
        """The block that owns σ at inference (a boundary belongs to the higher-noise block)."""
        s = min(max(float(sigma), self.edges[0]), self.edges[-1])
        k = 0
        for i, e in enumerate(self.edges[1:-1], start=1):
            if s >= e * (1 - _TIE_RTOL):
                k = i
        return self.num_blocks - 1 - k

    def _interval_index(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range for B={self.num_blocks}")
        return self.num_blocks - 1 - block


def partition_edges(noise: LogNormalNoise, num_blocks: int, strategy: str,
                    explicit: Sequence[float] | None = None) -> tuple[float, ...]:
    """Ascending boundaries σ_min = e_0 < … < e_B = σ_max for a strategy."""
    B = num_blocks
    if B < 1:
        raise ValueError(f"num_blocks must be >= 1, got {B}")
    lo, hi = noise.sigma_min, noise.sigma_max
    if strategy == "equiprobable":
        inner = noise.quantile(torch.arange(1, B, dtype=torch.float64) / B).tolist()
    elif strategy == "log-uniform":
        inner = [math.exp(math.log(lo) + b / B * (math.log(hi) - math.log(lo))) for b in range(1, B)]
    elif strategy == "linear":
        inner = [lo + b / B * (hi - lo) for b in range(1, B)]
    elif strategy == "explicit":
        if explicit is None:
            raise ValueError("strategy 'explicit' needs boundaries (sigma_edges)")
        inner = [float(x) for x in explicit]
        if len(inner) == B + 1:  # the full list, end points included
            if not (math.isclose(inner[0], lo) and math.isclose(inner[-1], hi)):
                raise ValueError(f"explicit boundaries must start at sigma_min={lo} and end at sigma_max={hi}")
            inner = inner[1:-1]
        if len(inner) != B - 1:
            raise ValueError(f"explicit boundaries for B={B}: give {B - 1} interior values "
                             f"(or {B + 1} including sigma_min and sigma_max), got {len(explicit)}")
        if any(not (lo < x < hi) for x in inner):
            raise ValueError(f"explicit boundaries must lie strictly inside ({lo}, {hi}), got {inner}")
    else:
        raise ValueError(f"unknown partition strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if explicit is not None and strategy != "explicit":
        raise ValueError(f"sigma_edges given but strategy is {strategy!r}; use strategy 'explicit'")
    return (lo, *inner, hi)


def make_partition(num_blocks: int, strategy: str = "equiprobable", gamma: float = 0.0,
                   noise: LogNormalNoise | None = None, edges: Sequence[float] | None = None) -> Partition:
    noise = noise or LogNormalNoise()
    return Partition(noise, partition_edges(noise, num_blocks, strategy, edges), gamma, strategy)
