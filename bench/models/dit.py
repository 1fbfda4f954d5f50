"""Diffusion Transformer (Peebles & Xie 2023) as the EDM network F_θ, class-conditional.

    tokens   = patchify(c_in·z) + fixed 2-D sin-cos position embedding        (stem)
    c        = embed(c_noise(σ)) + embed(class)                               (condition)
    tokens   = layers[i](tokens, c) for i in the layers asked for             (self.layers)
    F        = unpatchify(Linear(adaLN(LN(tokens), c)))                       (head)

Every layer is adaLN-Zero: LayerNorm without affine, shift/scale from c, and a gate on each
residual branch, all zero at initialisation, so every layer starts as the identity and a block of
layers starts as the identity map on the tokens.  The head is zero too (F = 0 at init).

Class conditioning: the label table has one extra row, the "null" class (index num_classes), which
the task substitutes for 10 % of labels during training and uses for the unconditional half of
classifier-free guidance.  The model never drops labels itself (that needs the trainer's generator
to stay resumable).

Sizes (DiT paper, Table 1): S 12 layers × 384 / 6 heads, B 12 × 768 / 12, L 24 × 1024 / 16,
XL 28 × 1152 / 16.  `size: S` fills depth/hidden/heads; `size: ""` takes them as given.  The
model knows nothing of blocks, σ ranges or training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench.models.vit import NoiseEmbedder, modulate

DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, hidden, heads


@dataclass
class DiTConfig:
    size: str = "S"               # S | B | L | XL (DiT paper) or "" to give depth/hidden/heads
    image_size: int = 32          # input side in pixels (or latent side for a VAE latent)
    patch_size: int = 2           # DiT-S/2: p = 2
    in_channels: int = 3
    num_classes: int = 10
    depth: int = 0                # 0: from size
    hidden: int = 0               # 0: from size
    heads: int = 0                # 0: from size
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.size:
            if self.size not in DIT_SIZES:
                raise ValueError(f"unknown DiT size {self.size!r}; choose one of {', '.join(DIT_SIZES)} or '' (explicit)")
            for name, value in zip(("depth", "hidden", "heads"), DIT_SIZES[self.size]):
                given = getattr(self, name)
                if given and given != value:
                    raise ValueError(f"model.{name}={given} conflicts with DiT-{self.size} ({name} {value}); "
                                     f"set model.size: '' to choose depth, hidden and heads yourself")
                setattr(self, name, value)
        elif not (self.depth and self.hidden and self.heads):
            raise ValueError("with model.size '' give model.depth, model.hidden and model.heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid², dim): half the channels encode the row, half
    the column (DiT's get_2d_sincos_pos_embed)."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(dim // 2, xs), one_axis(dim // 2, ys)], dim=1).float()


class LabelEmbedder(nn.Module):
    """Class label → vector; row `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTLayer(nn.Module):
    """A DiT block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p×p×C patch."""

    def __init__(self, dim: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, conditioned: bool = True):
        super().__init__()
        # DiT is a denoiser in both arms: `conditioned` is accepted for the shared model API only
        self.cfg = cfg
        d = cfg.hidden
        self.grad_checkpointing = False
        # stem: shared by every block
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.grid)[None], persistent=False)
        self.noise_embed = NoiseEmbedder(d)
        self.label_embed = LabelEmbedder(cfg.num_classes, d)
        # residual layers: the only part split into blocks
        self.layers = nn.ModuleList(DiTLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        # head: shared by every block
        self.final = FinalLayer(d, cfg.patch_size, cfg.in_channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # like a linear layer on the flattened patch (DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for lin in self.noise_embed.mlp[0], self.noise_embed.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        for layer in self.layers:   # adaLN-Zero: every layer starts as the identity
            nn.init.zeros_(layer.adaLN[-1].weight)
            nn.init.zeros_(layer.adaLN[-1].bias)
        for lin in self.final.adaLN[-1], self.final.linear:   # F = 0 at init: D = c_skip·z
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- stem / layers / head -------------------------------------------------------------
    def stem(self, z_in: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, T, d) patch tokens with position embedding."""
        return self.patch_embed(z_in).flatten(2).transpose(1, 2) + self.pos_embed

    def condition(self, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.noise_embed(c_noise) + self.label_embed(labels)

    def run_layers(self, x: torch.Tensor, layers: range, c: torch.Tensor) -> torch.Tensor:
        for i in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(self.layers[i], x, c, use_reentrant=False)
            else:
                x = self.layers[i](x, c)
        return x

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(N, T, d) → (N, C, H, W)."""
        p, g, C = self.cfg.patch_size, self.cfg.grid, self.cfg.in_channels
        x = self.final(x, c).view(-1, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, C, g * p, g * p)

    def forward(self, z_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor,
                layers: range | None = None) -> torch.Tensor:
        """F_θ(c_in·z; c_noise, class) through the given layers (all by default)."""
        c = self.condition(c_noise, labels)
        x = self.run_layers(self.stem(z_in), range(len(self.layers)) if layers is None else layers, c)
        return self.head(x, c)
