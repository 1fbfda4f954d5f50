"""EDM preconditioning and loss weight (Karras et al. 2022, Table 1; paper App. C).

    D(z; σ) = c_skip(σ)·z + c_out(σ)·F_θ(c_in(σ)·z; c_noise(σ))

Each function takes σ as a tensor (any shape) and returns a tensor of the same shape.
"""

from __future__ import annotations

import torch


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """σ_data² / (σ² + σ_data²): how much of the noisy input passes straight through."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """σ·σ_data / √(σ² + σ_data²): scale of the network's contribution."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """1 / √(σ² + σ_data²): scales the noisy input to unit variance."""
    return 1.0 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """¼·ln σ: the conditioning input that encodes the noise level."""
    return 0.25 * torch.log(sigma)


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_data²) / (σ·σ_data)², the EDM weight; λ·c_out² = 1."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoised(z: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """D = c_skip·z + c_out·F, with σ broadcast over the trailing dimensions of z."""
    s = sigma.reshape(sigma.shape + (1,) * (z.dim() - sigma.dim())).to(z.dtype)
    return c_skip(s, sigma_data) * z + c_out(s, sigma_data) * F


def scale_input(z: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """c_in·z, with σ broadcast over the trailing dimensions of z."""
    s = sigma.reshape(sigma.shape + (1,) * (z.dim() - sigma.dim())).to(z.dtype)
    return c_in(s, sigma_data) * z


WEIGHTINGS = ("lambda", "official", "uniform")


def weighted_loss(per_sample: torch.Tensor, sigma: torch.Tensor, sigma_data: float, weighting: str) -> torch.Tensor:
    """Combine per-sample losses with the EDM weight λ(σ):

      lambda    mean(λ(σ_i)·loss_i), the paper's Eq. 6
      official  mean(loss)·mean(λ): what the official code computes, through an (N,)×(N,1)
                broadcast; every sample in the batch gets the same weight
      uniform   mean(loss)
    """
    if weighting == "uniform":
        return per_sample.mean()
    w = loss_weight(sigma, sigma_data).to(per_sample.dtype)
    w = w.reshape(w.shape + (1,) * (per_sample.dim() - w.dim()))
    if weighting == "lambda":
        return (w * per_sample).mean()
    if weighting == "official":
        return per_sample.mean() * w.mean()
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
