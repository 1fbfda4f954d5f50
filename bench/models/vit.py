"""Vision Transformer with optional σ-conditioning (adaLN-Zero, as in DiT).

Two forms of one architecture:
  * plain (`conditioned=False`): the end-to-end baseline, a learned [CLS] token, pre-LN layers;
  * σ-conditioned (`conditioned=True`): the DiffusionBlocks denoiser.  As in the official code,
    the c_in-scaled noisy label embedding takes the [CLS] slot; every layer is modulated by an
    embedding of c_noise(σ) through zero-initialised adaLN (so each layer starts as the identity).

The model exposes `stem` (images → tokens), `layers` (a list of residual layers), and `head`
(token 0 → logits); it knows nothing of blocks, σ ranges or training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    num_classes: int = 10
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0          # on embeddings and residual branches (official CIFAR ViT: 0.1)
    attn_dropout: float = 0.0     # on attention probabilities (official CIFAR ViT: 0.1)
    cond_dim: int = 0             # σ-embedding width; 0 → hidden (DiT).  Official ViT: hidden // 6
    adaln_post_silu: bool = False  # official code applies SiLU after the adaLN linear; DiT does not
    ln_eps: float = 1e-6          # official (HF ViT): 1e-12

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class NoiseEmbedder(nn.Module):
    """c_noise → sinusoidal features (256, max period 10⁴, cos then sin) → MLP (DiT's TimestepEmbedder)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
        args = c_noise.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(N, T, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Layer(nn.Module):
    """Pre-LN transformer layer; with conditioning, adaLN-Zero (shift/scale/gate per branch)."""

    def __init__(self, cfg: ViTConfig, conditioned: bool):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps, elementwise_affine=not conditioned)
        self.attn = Attention(d, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps, elementwise_affine=not conditioned)
        self.mlp = Mlp(d, cfg.mlp_dim, cfg.dropout)
        self.post_silu = cfg.adaln_post_silu
        self.adaLN = nn.Linear(cfg.cond_dim or d, 6 * d) if conditioned else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        mod = self.adaLN(cond)
        if self.post_silu:
            mod = F.silu(mod)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, conditioned: bool):
        super().__init__()
        self.cfg, self.conditioned = cfg, conditioned
        d, cond_dim = cfg.hidden, cfg.cond_dim or cfg.hidden
        self.grad_checkpointing = False
        # stem: shared by every block
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.embed_drop = nn.Dropout(cfg.dropout)
        if conditioned:
            self.noise_embed = NoiseEmbedder(cond_dim)
            self.label_embed = nn.Embedding(cfg.num_classes, d)  # the diffusion target table
        else:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # residual layers: the only part split into blocks
        self.layers = nn.ModuleList(Layer(cfg, conditioned) for _ in range(cfg.depth))
        # head: shared by every block
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.final_adaLN = nn.Linear(cond_dim, 2 * d) if conditioned else None
        self.classifier = nn.Linear(d, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.conditioned:
            nn.init.normal_(self.label_embed.weight, std=0.02)
            for lin in self.noise_embed.mlp[0], self.noise_embed.mlp[2]:
                nn.init.normal_(lin.weight, std=0.02)
            for layer in self.layers:  # adaLN-Zero: every layer starts as the identity
                nn.init.zeros_(layer.adaLN.weight)
                nn.init.zeros_(layer.adaLN.bias)
            for lin in self.final_adaLN, self.classifier:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        else:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ---- stem / layers / head -------------------------------------------------------------
    def stem(self, images: torch.Tensor, first_token: torch.Tensor) -> torch.Tensor:
        """[first_token, patches] + position embeddings; first_token is (N, d)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([first_token.unsqueeze(1), patches], dim=1) + self.pos_embed
        return self.embed_drop(x)

    def condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        return F.silu(self.noise_embed(c_noise))

    def run_layers(self, x: torch.Tensor, layers: range, cond: torch.Tensor | None = None) -> torch.Tensor:
        for i in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(self.layers[i], x, cond, use_reentrant=False)
            else:
                x = self.layers[i](x, cond)
        return x

    def head(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a d-vector per sample (final adaLN modulation when conditioned)."""
        if self.final_adaLN is not None:
            mod = self.final_adaLN(cond)
            if self.cfg.adaln_post_silu:
                mod = F.silu(mod)
            shift, scale = mod.chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return self.classifier(h)

    # ---- the two uses ---------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain classifier (end-to-end baseline): logits from the [CLS] token."""
        x = self.stem(images, self.cls_token.expand(images.shape[0], -1, -1)[:, 0])
        return self.head(self.norm(self.run_layers(x, range(len(self.layers))))[:, 0])

    def denoiser_output(self, images: torch.Tensor, z_in: torch.Tensor, c_noise: torch.Tensor,
                        layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """F_θ(c_in·z; x, c_noise) for the given layers: the normalised token 0, and the
        conditioning vector (needed again by `head`)."""
        cond = self.condition(c_noise)
        x = self.run_layers(self.stem(images, z_in), layers, cond)
        return self.norm(x)[:, 0], cond
