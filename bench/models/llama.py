"""Llama-style decoder (RMSNorm, RoPE, SwiGLU) with optional σ-conditioning (adaLN-Zero, as in DiT).

Two forms of one architecture (paper §3.5, App. E.4):
  * plain (`conditioned=False`): the end-to-end next-token LM, causal attention, untied output head;
  * σ-conditioned (`conditioned=True`): the DiffusionBlocks denoiser.  Its input is the concatenated
    sequence [clean; noisy] of Block Diffusion: the clean token embeddings (L2-normalised, the
    diffusion target) at positions 0…Tc−1 and the c_in-scaled noisy embeddings z at chosen
    positions p.  Clean tokens attend causally among themselves; the noisy token at position p
    attends to the clean tokens at positions < p and to itself only, so nothing leaks (see
    `block_diffusion_mask`).  Every layer is modulated by an embedding of c_noise(σ) through
    zero-initialised adaLN, so each layer starts as the identity.

σ enters per sequence (cond (N, d_c)) or per token (cond (N, L, d_c)); the task decides which.

The model exposes a stem (`embed`, `clean_embed`), `layers` (residual layers, the only part split
into blocks), `run_layers` for any range of them, and `head`; it knows nothing of blocks, σ ranges
or training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bench.models.vit import NoiseEmbedder


@dataclass
class LlamaConfig:
    vocab_size: int = 0           # 0: the prepared data's vocabulary (the task fills it in)
    seq_len: int = 256            # the longest context the model is used with (prompt + continuation)
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 0           # SwiGLU width; 0 → Llama's 8/3·hidden rounded up to a multiple of 32
    cond_dim: int = 0             # σ-embedding width; 0 → hidden (DiT)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0          # on the residual branches
    sigma_per: str = "sequence"   # DiffusionBlocks: one σ per sequence | per noisy token (read by the task)

    def __post_init__(self):
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of even width (RoPE)")
        if self.vocab_size < 0 or self.seq_len < 2:
            raise ValueError(f"vocab_size must be >= 0 and seq_len >= 2, got {self.vocab_size}, {self.seq_len}")

    @property
    def ffn(self) -> int:
        return self.mlp_hidden or 32 * -(-(8 * self.hidden // 3) // 32)


# ---- pieces ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x), times a learned gain unless adaLN supplies the modulation."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim/2) of rotary embeddings at integer positions (computed on the fly, so
    any position works and clean and noisy copies of a token can share one)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv[None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_2k, x_2k+1) of x (N, H, L, hd) by the position's angles (Llama/RoFormer)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def block_diffusion_mask(n_clean: int, noisy_positions: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (True = may attend) of the sequence [clean (n_clean); noisy].

    clean row r      sees clean columns c ≤ r                   (causal)
    noisy row at p   sees clean columns c < p, and itself only  (Block Diffusion, block size 1)
    """
    n = len(noisy_positions)
    dev = noisy_positions.device
    c = torch.arange(n_clean, device=dev)
    mask = torch.zeros(n_clean + n, n_clean + n, dtype=torch.bool, device=dev)
    mask[:n_clean, :n_clean] = c[None, :] <= c[:, None]
    mask[n_clean:, :n_clean] = c[None, :] < noisy_positions[:, None]
    mask[n_clean:, n_clean:] = torch.eye(n, dtype=torch.bool, device=dev)
    return mask


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1 + scale) + shift; shift/scale per sequence (N, d) or per token (N, L, d)."""
    if scale.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def _gate(g: torch.Tensor) -> torch.Tensor:
    return g.unsqueeze(1) if g.dim() == 2 else g


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask):
        N, L, C = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:   # plain causal LM
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.drop(self.proj(y.transpose(1, 2).reshape(N, L, C)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * up))


class Layer(nn.Module):
    """Pre-norm Llama layer; with conditioning, adaLN-Zero (shift/scale/gate per branch)."""

    def __init__(self, cfg: LlamaConfig, conditioned: bool):
        super().__init__()
        d = cfg.hidden
        self.attn_norm = RMSNorm(d, cfg.norm_eps, affine=not conditioned)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps, affine=not conditioned)
        self.mlp = SwiGLU(d, cfg.ffn, cfg.dropout)
        self.adaLN = nn.Linear(cfg.cond_dim or d, 6 * d) if conditioned else None

    def forward(self, x, rope, mask=None, cond=None):
        if self.adaLN is None:
            x = x + self.attn(self.attn_norm(x), rope, mask)
            return x + self.mlp(self.mlp_norm(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=-1)
        x = x + _gate(gate1) * self.attn(modulate(self.attn_norm(x), shift1, scale1), rope, mask)
        return x + _gate(gate2) * self.mlp(modulate(self.mlp_norm(x), shift2, scale2))


# ---- the model ---------------------------------------------------------------------------------------
class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, conditioned: bool = False):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("LlamaConfig.vocab_size must be set (the task fills it from the prepared data)")
        self.cfg, self.conditioned = cfg, conditioned
        d, cond_dim = cfg.hidden, cfg.cond_dim or cfg.hidden
        self.grad_checkpointing = False
        # stem: shared by every block (the token table is also the diffusion target's table)
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.noise_embed = NoiseEmbedder(cond_dim) if conditioned else None
        # residual layers: the only part split into blocks
        self.layers = nn.ModuleList(Layer(cfg, conditioned) for _ in range(cfg.depth))
        # head: shared by every block
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.final_adaLN = nn.Linear(cond_dim, 2 * d) if conditioned else None
        self.out = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        for layer in self.layers:   # GPT-2/Llama: scale the residual projections by depth
            for lin in layer.attn.proj, layer.mlp.down:
                nn.init.normal_(lin.weight, std=0.02 / (2 * self.cfg.depth) ** 0.5)
        if self.conditioned:
            for layer in self.layers:   # adaLN-Zero: every layer starts as the identity
                nn.init.zeros_(layer.adaLN.weight)
                nn.init.zeros_(layer.adaLN.bias)
            for lin in self.final_adaLN, self.out:   # the untrained denoiser predicts uniformly
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    # ---- stem / layers / head -------------------------------------------------------------
    def clean_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """y = the L2-normalised token embedding: the diffusion target and the clean context."""
        return F.normalize(self.tok_embed(tokens), dim=-1)

    def target_table(self) -> torch.Tensor:
        """The normalised embedding table Ê (V, d): D̂ = softmax(logits) @ Ê at inference."""
        return F.normalize(self.tok_embed.weight, dim=-1)

    def condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        """SiLU(MLP(sinusoid(c_noise))) for c_noise of shape (N,) or (N, L)."""
        shape = c_noise.shape
        return F.silu(self.noise_embed(c_noise.reshape(-1))).reshape(*shape, -1)

    def rope(self, positions: torch.Tensor):
        return rope_tables(positions, self.cfg.hidden // self.cfg.heads, self.cfg.rope_theta)

    def run_layers(self, x, layers: range, rope, mask=None, cond=None) -> torch.Tensor:
        for i in layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(self.layers[i], x, rope, mask, cond, use_reentrant=False)
            else:
                x = self.layers[i](x, rope, mask, cond)
        return x

    def head(self, h: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from d-vectors (final adaLN modulation when conditioned)."""
        if self.final_adaLN is not None:
            shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale) if h.dim() == 3 else h * (1 + scale) + shift
        return self.out(h)

    # ---- the two uses ---------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, layers: range | None = None) -> torch.Tensor:
        """Plain causal LM: logits (N, T, V) of the next token at every position."""
        layers = range(len(self.layers)) if layers is None else layers
        rope = self.rope(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.run_layers(self.tok_embed(tokens), layers, rope)))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states (N, T, d) of the plain model (reference-LM features)."""
        rope = self.rope(torch.arange(tokens.shape[1], device=tokens.device))
        return self.norm(self.run_layers(self.tok_embed(tokens), range(len(self.layers)), rope))

    def denoiser_output(self, clean: torch.Tensor, z_in: torch.Tensor, noisy_positions: torch.Tensor,
                        c_noise: torch.Tensor, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
        """F_θ for `layers` on [clean; noisy] under the Block-Diffusion mask.

        clean (N, Tc) token ids; z_in (N, n, d) the c_in-scaled noisy embeddings at `noisy_positions`
        (n,); c_noise (N,) per sequence or (N, Tc + n) per token.  Returns the normalised outputs at
        the noisy slots (N, n, d) and their conditioning (needed again by `head`)."""
        Tc = clean.shape[1]
        x = torch.cat([self.clean_embed(clean), z_in.to(self.tok_embed.weight.dtype)], dim=1)
        positions = torch.cat([torch.arange(Tc, device=clean.device), noisy_positions.to(clean.device)])
        mask = block_diffusion_mask(Tc, noisy_positions.to(clean.device))
        cond = self.condition(c_noise.to(clean.device, torch.float32))
        h = self.norm(self.run_layers(x, layers, self.rope(positions), mask, cond))
        return h[:, Tc:], (cond[:, Tc:] if cond.dim() == 3 else cond)
