"""EDM training-noise distribution: log σ ~ N(P_mean, P_std²), restricted to [σ_min, σ_max].

Every σ used for training anywhere in `bench` is drawn by `sample_sigma` below; this is the
one place where σ is sampled.  Sampling inside an interval [lo, hi] is exact: draw the CDF
value u ~ U(Φ(z_lo), Φ(z_hi)) and map it back through Φ⁻¹ (inverse-CDF sampling of the
truncated log-normal, as the official code does).  All arithmetic is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_F64 = torch.float64


@dataclass(frozen=True)
class LogNormalNoise:
    """EDM's p_noise (Karras et al. 2022): ln σ ~ N(P_mean, P_std²) on [sigma_min, sigma_max]."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if not (self.sigma_min > 0 and self.sigma_max > 0):
            raise ValueError(f"sigma_min and sigma_max must be positive, got {self.sigma_min}, {self.sigma_max}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be smaller than sigma_max ({self.sigma_max})")
        if self.P_std <= 0:
            raise ValueError(f"P_std must be positive, got {self.P_std}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")

    # Φ((ln σ − P_mean)/P_std): the log-normal CDF, untruncated.
    def cdf(self, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=_F64)
        return torch.special.ndtr((torch.log(s) - self.P_mean) / self.P_std)

    # exp(P_mean + P_std·Φ⁻¹(q)): inverse of `cdf`.
    def icdf(self, q) -> torch.Tensor:
        q = torch.as_tensor(q, dtype=_F64)
        return torch.exp(self.P_mean + self.P_std * torch.special.ndtri(q))

    @property
    def q_min(self) -> float:
        return float(self.cdf(self.sigma_min))

    @property
    def q_max(self) -> float:
        return float(self.cdf(self.sigma_max))

    def mass(self, lo: float, hi: float) -> float:
        """Probability of [lo, hi] under p_noise truncated to [σ_min, σ_max]."""
        return float((self.cdf(hi) - self.cdf(lo)) / (self.q_max - self.q_min))

    def quantile(self, p) -> torch.Tensor:
        """σ at probability p ∈ [0, 1] of the *truncated* distribution (p=0 → σ_min, p=1 → σ_max)."""
        p = torch.as_tensor(p, dtype=_F64)
        sigma = self.icdf(self.q_min + p * (self.q_max - self.q_min))
        # pin the end points exactly: Φ⁻¹(Φ(x)) is not bit-exact in float64
        sigma = torch.where(p <= 0, torch.full_like(sigma, self.sigma_min), sigma)
        return torch.where(p >= 1, torch.full_like(sigma, self.sigma_max), sigma)


def sample_sigma(noise: LogNormalNoise, n: int, lo: float, hi: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws of σ from p_noise restricted to [lo, hi] and renormalised (float64, CPU).

    Inverse-CDF sampling: u ~ U(Φ(z_lo), Φ(z_hi)), σ = exp(P_mean + P_std·Φ⁻¹(u)).
    """
    if not (0 < lo < hi):
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    q_lo, q_hi = float(noise.cdf(lo)), float(noise.cdf(hi))
    u = torch.rand(n, dtype=_F64, generator=generator)
    sigma = noise.icdf(q_lo + u * (q_hi - q_lo))
    # Φ⁻¹ round-off can leave the interval by an ulp; clamp so callers can rely on [lo, hi].
    return sigma.clamp(lo, hi)


def log_normal_pdf(noise: LogNormalNoise, sigma) -> torch.Tensor:
    """Density of σ under the *untruncated* log-normal (for plots)."""
    s = torch.as_tensor(sigma, dtype=_F64)
    x = (torch.log(s) - noise.P_mean) / noise.P_std
    return torch.exp(-0.5 * x * x) / (s * noise.P_std * math.sqrt(2 * math.pi))
