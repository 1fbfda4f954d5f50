"""The NoProp-DT CNN (Li, Teh & Pascanu 2025, Fig. 5) with NoProp-CT's time conditioning, as residual
layers: the architecture of the DiffusionBlocks paper's NoProp comparison (§5.6.1, App. E.6.1, Table 6).

One residual layer is one NoProp denoising module u_ℓ, acting on a d-vector h (d = `hidden`, the
label-embedding width) and seeing the image itself:

  image path   [Conv 3×3 → ReLU → MaxPool 2 → Dropout] per entry of conv_channels → Flatten → FC → norm
  label path   a = ReLU(norm(FC(h)));  a + norm(FC(ReLU(norm(FC(a)))))       (two stages, a skip)
  time path    (conditioned) sinusoidal features of c_noise(σ) (time_freq_dim) → FC → ReLU   (NoProp-CT)
  fused        concat → [FC → norm → ReLU] per entry of fuse_dims → FC → d
  layer        h ← h + fused                              (the output FC starts at zero: the identity)

  * plain (`conditioned=False`): the backprop arm, the same modules chained and trained end to end
    from a learned start vector h₀, no time path; logits = classifier(h_L).  h₀ is the same for every
    sample, so the first module's label path has no batch norm (its batch variance would be 0);
  * σ-conditioned (`conditioned=True`): the DiffusionBlocks denoiser, h₀ = c_in·z_σ (the noisy label
    embedding), each module conditioned on σ through its time path; F = h after the block's layers.

The model exposes `stem` (h₀; no shared image stem: every module has its own CNN, as in NoProp),
`layers` (the modules), and `head` (classifier); it knows nothing of blocks, σ ranges or training.
Where the figure leaves a choice open it is a field of NoPropConfig (suites/noprop_cifar100/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

NORMS = ("batch", "layer", "none")


@dataclass
class NoPropConfig:
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 100
    hidden: int = 256             # d: the residual vector and the label embedding (NoProp's class embedding)
    depth: int = 3                # modules (residual layers); the DiffusionBlocks comparison: one per block, B = 3
    conv_channels: list = field(default_factory=lambda: [32, 64, 128])   # Fig. 5: 3×3 convolutions
    image_dim: int = 256          # FC after the convolutions
    label_dim: int = 256          # width of the label path
    time_freq_dim: int = 64       # NoProp-CT: positional (sinusoidal) embedding of the noise level
    time_dim: int = 64            # NoProp-CT: FC after it
    fuse_dims: list = field(default_factory=lambda: [256, 128])   # FC → norm → ReLU after the concatenation
    dropout: float = 0.2          # after each pooling (Fig. 5)
    norm: str = "batch"           # batch (Fig. 5's batch norm) | layer | none
    zero_init: bool = True        # conditioned: every module's output FC and the classifier start at zero

    def __post_init__(self):
        for name in ("image_dim", "label_dim", "time_freq_dim", "time_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
        for name in ("conv_channels", "fuse_dims"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers ≥ 1, got {values!r}")
        if self.time_freq_dim % 2:
            raise ValueError(f"time_freq_dim {self.time_freq_dim} must be even (cos and sin halves)")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose {', '.join(NORMS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.image_size >> len(self.conv_channels) < 1:
            raise ValueError(f"image_size {self.image_size} is too small for {len(self.conv_channels)} 2×2 poolings")

    @property
    def feature_side(self) -> int:
        """Side of the last feature map (each pooling halves it, rounding down)."""
        return self.image_size >> len(self.conv_channels)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.BatchNorm1d(dim) if kind == "batch" else nn.LayerNorm(dim) if kind == "layer" else nn.Identity()


def time_features(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of c_noise: cos then sin at dim/2 frequencies, max period 10⁴."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Module(nn.Module):
    """One NoProp denoising module as a residual layer: h → h + u(x, h[, t])."""

    def __init__(self, cfg: NoPropConfig, conditioned: bool, label_norm: str | None = None):
        super().__init__()
        convs, c = [], cfg.in_channels
        for out in cfg.conv_channels:
            convs += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(cfg.dropout)]
            c = out
        self.image = nn.Sequential(*convs, nn.Flatten(), nn.Linear(c * cfg.feature_side ** 2, cfg.image_dim),
                                   _norm(cfg.norm, cfg.image_dim))
        L, ln = cfg.label_dim, label_norm or cfg.norm
        self.label_in = nn.Sequential(nn.Linear(cfg.hidden, L), _norm(ln, L), nn.ReLU())
        self.label_skip = nn.Sequential(nn.Linear(L, L), _norm(ln, L), nn.ReLU(), nn.Linear(L, L), _norm(ln, L))
        self.time = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.time_dim), nn.ReLU()) if conditioned else None
        fuse, width = [], cfg.image_dim + L + (cfg.time_dim if conditioned else 0)
        for d in cfg.fuse_dims:
            fuse += [nn.Linear(width, d), _norm(cfg.norm, d), nn.ReLU()]
            width = d
        self.fuse = nn.Sequential(*fuse)
        self.out = nn.Linear(width, cfg.hidden)

    def forward(self, h: torch.Tensor, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a = self.label_in(h)
        parts = [self.image(images), a + self.label_skip(a)]
        if self.time is not None:
            parts.append(self.time(cond))
        return h + self.out(self.fuse(torch.cat(parts, dim=-1)))


class NoProp(nn.Module):
    def __init__(self, cfg: NoPropConfig, conditioned: bool):
        super().__init__()
        self.cfg, self.conditioned = cfg, conditioned
        self.grad_checkpointing = False
        # stem: h₀ (shared by every block)
        if conditioned:
            self.label_embed = nn.Embedding(cfg.num_classes, cfg.hidden)   # the diffusion target table
            nn.init.normal_(self.label_embed.weight, std=0.02)
        else:
            self.start = nn.Parameter(torch.zeros(1, cfg.hidden))
            nn.init.trunc_normal_(self.start, std=0.02)
        # residual layers: the only part split into blocks
        # the plain arm's first module reads the same h₀ for every sample: a batch norm of a batch-constant
        # vector has zero variance, so its running variance decays to 0 and evaluation divides by √eps
        # (every prediction wrong). Its label path is left unnormalised (a constant needs none).
        first_norm = "none" if not conditioned and cfg.norm == "batch" else None
        self.layers = nn.ModuleList(Module(cfg, conditioned, first_norm if i == 0 else None) for i in range(cfg.depth))
        # head: shared by every block (NoProp's output classifier)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)
        if conditioned and cfg.zero_init:
            for lin in [layer.out for layer in self.layers] + [self.classifier]:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    # ---- stem / layers / head -------------------------------------------------------------
    def stem(self, images: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """h₀: the (N, d) start vector; the image enters every module, not the stem."""
        return first

    def condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        return time_features(c_noise, self.cfg.time_freq_dim)

    def run_layers(self, h: torch.Tensor, images: torch.Tensor, layers: range,
                   cond: torch.Tensor | None = None) -> torch.Tensor:
        for i in layers:
            if self.grad_checkpointing and self.training:
                h = checkpoint(self.layers[i], h, images, cond, use_reentrant=False)
            else:
                h = self.layers[i](h, images, cond)
        return h

    def head(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from a d-vector per sample (σ does not enter the classifier)."""
        return self.classifier(h)

    # ---- the two uses ---------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain classifier (the backprop arm): every module in turn from the learned h₀."""
        h = self.stem(images, self.start.expand(images.shape[0], -1))
        return self.head(self.run_layers(h, images, range(len(self.layers))))

    def denoiser_output(self, images: torch.Tensor, z_in: torch.Tensor, c_noise: torch.Tensor,
                        layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """F_θ(c_in·z; x, c_noise) for the given layers, and the conditioning (passed to `head`)."""
        cond = self.condition(c_noise)
        return self.run_layers(self.stem(images, z_in), images, layers, cond), cond
