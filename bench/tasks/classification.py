"""Image classification as denoising of a label embedding (paper §5.1, official ViT code).

Target y = L2-normalised learned label embedding; z_σ = y + σε takes the [CLS] slot (scaled by
c_in); D = c_skip·z_σ + c_out·F; logits = head(D).  The loss is cross-entropy, weighted by

  lambda    per-sample λ(σ)·CE, averaged over the batch (the paper's Eq. 6)
  official  mean(CE)·mean(λ): what the official code computes, through an (N,)×(N,1)
            broadcast; every sample in the batch gets the same weight
  uniform   plain mean(CE)

Inference chains the blocks: z from σ_max·ε, Euler steps on an equal-probability σ grid, each
step run by the block owning σ, with D = softmax(logits) @ normalised label embeddings; the
logits of a final call at the last σ are the prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.blocks import BlockLayout
from bench.diffusion import (LogNormalNoise, Partition, c_noise, denoised, loss_weight, sample_chain,
                             scale_input, sigmas_equiprobable)

WEIGHTINGS = ("lambda", "official", "uniform")


def weighted_loss(per_sample: torch.Tensor, sigma: torch.Tensor, sigma_data: float, weighting: str) -> torch.Tensor:
    """Combine per-sample losses with the EDM weight λ(σ) by one of WEIGHTINGS."""
    if weighting == "uniform":
        return per_sample.mean()
    w = loss_weight(sigma, sigma_data).to(per_sample.dtype)
    if weighting == "lambda":
        return (w * per_sample).mean()
    if weighting == "official":
        return per_sample.mean() * w.mean()
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


class ClassificationTask:
    def __init__(self, noise: LogNormalNoise, weighting: str = "lambda"):
        self.noise, self.weighting = noise, weighting

    # ---- training ---------------------------------------------------------------------------
    def loss(self, model, batch, *, sigma: torch.Tensor | None, layers: range,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Loss of one batch.  sigma None: the plain classifier (end-to-end baseline) over all
        layers.  Otherwise: denoising loss of `layers` at the given per-sample σ's."""
        images, labels = batch
        if sigma is None:
            ce = F.cross_entropy(model(images), labels)
            return ce, {"ce": ce.detach()}
        sigma = sigma.to(images.device, torch.float32)
        y = F.normalize(model.label_embed(labels), dim=-1)
        eps = torch.randn(y.shape, generator=generator).to(y.device)  # CPU generator: same draws on any device
        z = y + sigma[:, None] * eps
        logits = self.logits(model, images, z, sigma, layers)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = weighted_loss(ce, sigma, self.noise.sigma_data, self.weighting)
        return loss, {"ce": ce.mean().detach()}

    def logits(self, model, images, z, sigma, layers: range) -> torch.Tensor:
        """head(c_skip·z + c_out·F(c_in·z; x, c_noise)) for one block's layers."""
        sd = self.noise.sigma_data
        F_out, cond = model.denoiser_output(images, scale_input(z, sigma, sd), c_noise(sigma), layers)
        return model.head(denoised(z, F_out, sigma, sd), cond)

    # ---- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, images, *, partition: Partition | None, layout: BlockLayout | None,
                inference_steps: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits.  partition None: the plain classifier; else the chained denoising blocks."""
        if partition is None:
            return model(images)
        steps = inference_steps or partition.num_blocks
        sigmas = sigmas_equiprobable(self.noise, steps)
        E = F.normalize(model.label_embed.weight, dim=-1)
        n = images.shape[0]

        def run(z, sigma: float, block: int) -> torch.Tensor:
            s = torch.full((n,), sigma, device=images.device)
            return self.logits(model, images, z, s, layout.layers_of(block))

        def denoise(z, sigma: float, block: int) -> torch.Tensor:
            return run(z, sigma, block).softmax(-1) @ E

        eps = torch.randn((n, E.shape[1]), generator=generator).to(images.device)
        z = sample_chain(denoise, self.noise.sigma_max * eps, sigmas, partition)
        last = float(sigmas[-1])
        return run(z, last, partition.block_of(last))
