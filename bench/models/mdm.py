"""A DiT-style transformer over tokens for masked diffusion (MD4/MDLM/SEDD's "DiT" backbone).

  tokens z_t (N, L), with [MASK] = id vocab_size
    → stem:   token embedding (positions enter as rotary embeddings in attention, as SEDD/MDLM)
    → layers: bidirectional pre-LN transformer layers, each modulated by t through adaLN-Zero
              (shift/scale/gate per branch, zero-initialised, so every layer starts as the identity)
    → head:   LayerNorm, adaLN shift/scale, linear to vocab_size logits (zero-initialised, so the
              untrained model predicts the uniform distribution)

The model knows nothing of blocks, t ranges or training: `forward(z, t, layers)` runs any range of
its layers between the shared stem and head.  The masking schedule is kept in this config, as MD4
keeps it in its model, but it is read by the task, not by the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench.models.vit import NoiseEmbedder, modulate


@dataclass
class MDMConfig:
    vocab_size: int = 0           # data tokens (without [MASK]); 0: the prepared data's vocabulary size
    seq_len: int = 256            # the longest sequence the task may give
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    cond_dim: int = 128           # width of the t embedding (MDLM/SEDD DiT: 128)
    dropout: float = 0.0          # on embeddings and residual branches
    schedule: str = "linear"      # masking schedule α(t): linear | cosine | polyK (read by the task)
    ln_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.vocab_size < 0 or self.seq_len < 1:
            raise ValueError(f"vocab_size must be >= 0 and seq_len >= 1, got {self.vocab_size}, {self.seq_len}")

    @property
    def mask_id(self) -> int:
        return self.vocab_size


class TimeEmbedder(NoiseEmbedder):
    """t ∈ [0, 1] → the σ embedder's sinusoidal features of 1000·t (DiT's timestep range) → MLP."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(1000.0 * t.float())


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE) of q or k, (N, heads, T, head_dim): pairs of channels are
    rotated by position-dependent angles, so q·k depends on the tokens' *relative* position.  The
    masked-diffusion DiTs (SEDD, MDLM) use it: with learned absolute positions a small model takes
    long to learn to read its neighbours, and stays near the unigram entropy meanwhile."""
    T, D = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freqs[None]   # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention (every token sees every token) with RoPE."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotary(q), rotary(k), v)
        return self.drop(self.proj(y.transpose(1, 2).reshape(N, T, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Layer(nn.Module):
    """Pre-LN transformer layer with adaLN-Zero modulation by the t embedding (DiT block)."""

    def __init__(self, cfg: MDMConfig):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps, elementwise_affine=False)
        self.attn = Attention(d, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps, elementwise_affine=False)
        self.mlp = Mlp(d, int(cfg.mlp_ratio * d), cfg.dropout)
        self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class MDM(nn.Module):
    def __init__(self, cfg: MDMConfig, conditioned: bool = True):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("MDMConfig.vocab_size must be set (the task fills it from the prepared data)")
        # a masked-diffusion model is always t-conditioned (both arms are denoisers): `conditioned`
        # is accepted for the common model signature and must be True
        if not conditioned:
            raise ValueError("the masked-diffusion model is always conditioned on t")
        self.cfg = cfg
        d = cfg.hidden
        self.grad_checkpointing = False
        # stem: shared by every block
        self.tok_embed = nn.Embedding(cfg.vocab_size + 1, d)          # + [MASK]; positions: RoPE in attention
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.time_embed = TimeEmbedder(cfg.cond_dim)
        # residual layers: the only part split into blocks
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.depth))
        # head: shared by every block
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps, elementwise_affine=False)
        self.final_adaLN = nn.Linear(cfg.cond_dim, 2 * d)
        self.out = nn.Linear(d, cfg.vocab_size)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        for layer in self.layers:  # adaLN-Zero: every layer starts as the identity
            nn.init.zeros_(layer.adaLN.weight)
            nn.init.zeros_(layer.adaLN.bias)
        for lin in self.final_adaLN, self.out:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ---- stem / layers / head -------------------------------------------------------------
    def stem(self, z: torch.Tensor) -> torch.Tensor:
        return self.embed_drop(self.tok_embed(z))

    def condition(self, t: torch.Tensor) -> torch.Tensor:
        return F.silu(self.time_embed(t))

    def run_layers(self, x: torch.Tensor, layers: range, cond: torch.Tensor) -> torch.Tensor:
        for i in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(self.layers[i], x, cond, use_reentrant=False)
            else:
                x = self.layers[i](x, cond)
        return x

    def head(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)
        return self.out(modulate(self.norm(x), shift, scale))

    def forward(self, z: torch.Tensor, t: torch.Tensor, layers: range | None = None) -> torch.Tensor:
        """Logits (N, L, vocab_size) of the clean tokens given z_t and t (N,), through `layers`
        (default: all)."""
        cond = self.condition(t.to(self.tok_embed.weight.device, torch.float32))
        layers = range(len(self.layers)) if layers is None else layers
        return self.head(self.run_layers(self.stem(z), layers, cond), cond)
