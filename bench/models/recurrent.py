"""Recurrent-depth LM in the style of Huginn (Geiping et al. 2025; paper §3.6, App. E.5).

    e   = P(embed(x))                                 prelude: `prelude` causal layers, run once
    s_k = norm(R(adapter([s_{k−1}; e])))              recurrent core: `core` layers, weights shared
    p   = head(norm(C(s_r)))                          coda: `coda` layers, then the output head

End-to-end (`conditioned=False`): s_0 ~ N(0, state_std²), r core iterations; the task draws r
per step (log-normal Poisson, mean `mean_recurrence`) and back-propagates through the last `bptt`
iterations only (the earlier ones run without a graph: truncated BPTT).

DiffusionBlocks (`conditioned=True`, B = 1): the state is the noisy target.  At position j the
target is the L2-normalised embedding y of the next token x_{j+1}; z_j = y + σ·ε replaces the
random state, and one pass F = norm(C(norm(R(adapter([c_in·z; e]))))) with the core and coda
modulated by c_noise(σ) (adaLN-Zero) gives D = c_skip·z + c_out·F and the logits head(D).  The
prelude reads only the clean tokens and is not σ-conditioned, so at inference it runs once per
token while the K iterations each run the core and the coda (one denoiser call per σ).

Attention is causal over positions throughout (z_j only carries x_{j+1}, which position j may
predict, and the earlier positions' targets are tokens already in the context), so no
Block-Diffusion doubling of the sequence is needed.  `self.layers` holds the prelude, core and
coda layers (the core once: its weights are shared across iterations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.models.llama import Layer, RMSNorm, modulate, rope_tables
from bench.models.vit import NoiseEmbedder


@dataclass
class RecurrentConfig:
    vocab_size: int = 0            # 0: the prepared data's vocabulary (the task fills it in)
    seq_len: int = 256             # the longest context used (prompt + continuation)
    hidden: int = 512              # Huginn in the paper: Pythia-70M-like, d 512, 8 heads
    heads: int = 8
    prelude: int = 2
    core: int = 4
    coda: int = 2
    mlp_hidden: int = 0            # SwiGLU width; 0 → 8/3·hidden rounded up to a multiple of 32
    cond_dim: int = 0              # σ-embedding width; 0 → hidden
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    mean_recurrence: int = 32      # e2e training: mean core iterations r (Huginn's log-normal Poisson)
    recurrence_std: float = 0.5    # σ of ln(rate) in that distribution
    bptt: int = 8                  # e2e training: back-propagate through the last `bptt` iterations
    state_std: float = 1.0         # e2e: s_0 ~ N(0, state_std²)
    sigma_per: str = "sequence"    # DiffusionBlocks: one σ per sequence | per position (read by the task)

    def __post_init__(self):
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of even width (RoPE)")
        if min(self.prelude, self.core, self.coda) < 1:
            raise ValueError(f"prelude, core and coda need at least one layer each, got "
                             f"{self.prelude}/{self.core}/{self.coda}")
        if self.mean_recurrence < 1 or self.bptt < 1:
            raise ValueError(f"mean_recurrence and bptt must be >= 1, got {self.mean_recurrence} and {self.bptt}")

    @property
    def depth(self) -> int:
        """Distinct layers (the core counted once); what the block layout splits."""
        return self.prelude + self.core + self.coda

    @property
    def ffn(self) -> int:
        return self.mlp_hidden or 32 * -(-(8 * self.hidden // 3) // 32)


class RecurrentLM(nn.Module):
    def __init__(self, cfg: RecurrentConfig, conditioned: bool = False):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("RecurrentConfig.vocab_size must be set (the task fills it from the prepared data)")
        self.cfg, self.conditioned = cfg, conditioned
        d, cond_dim = cfg.hidden, cfg.cond_dim or cfg.hidden
        self.grad_checkpointing = False
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.noise_embed = NoiseEmbedder(cond_dim) if conditioned else None
        # prelude (never σ-conditioned: it reads clean tokens), core, coda
        self.layers = nn.ModuleList([Layer(cfg, False) for _ in range(cfg.prelude)]
                                    + [Layer(cfg, conditioned) for _ in range(cfg.core + cfg.coda)])
        self.adapter = nn.Linear(2 * d, d, bias=False)      # [state; e] → the core's input
        self.state_norm = RMSNorm(d, cfg.norm_eps)          # keeps the iterated state bounded
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
        for layer in self.layers:
            for lin in layer.attn.proj, layer.mlp.down:
                nn.init.normal_(lin.weight, std=0.02 / (2 * self.cfg.depth) ** 0.5)
        if self.conditioned:
            for layer in self.layers[self.cfg.prelude:]:
                nn.init.zeros_(layer.adaLN.weight)
                nn.init.zeros_(layer.adaLN.bias)
            for lin in self.final_adaLN, self.out:
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    # ---- the three stages ------------------------------------------------------------------
    @property
    def prelude_layers(self) -> range:
        return range(self.cfg.prelude)

    @property
    def core_layers(self) -> range:
        return range(self.cfg.prelude, self.cfg.prelude + self.cfg.core)

    @property
    def coda_layers(self) -> range:
        return range(self.cfg.prelude + self.cfg.core, self.cfg.depth)

    def clean_embed(self, tokens):
        return F.normalize(self.tok_embed(tokens), dim=-1)

    def target_table(self):
        return F.normalize(self.tok_embed.weight, dim=-1)

    def condition(self, c_noise):
        shape = c_noise.shape
        return F.silu(self.noise_embed(c_noise.reshape(-1))).reshape(*shape, -1)

    def run_layers(self, x, layers: range, rope, cond=None):
        from torch.utils.checkpoint import checkpoint
        for i in layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self.layers[i], x, rope, None, cond, use_reentrant=False)
            else:
                x = self.layers[i](x, rope, None, cond)
        return x

    def context(self, tokens):
        """(e, rope): the prelude's reading of the clean tokens, and the rotary tables."""
        rope = rope_tables(torch.arange(tokens.shape[1], device=tokens.device), self.cfg.hidden // self.cfg.heads,
                           self.cfg.rope_theta)
        return self.run_layers(self.tok_embed(tokens), self.prelude_layers, rope), rope

    def core_step(self, s, e, rope, cond=None):
        return self.state_norm(self.run_layers(self.adapter(torch.cat([s, e], dim=-1)), self.core_layers, rope, cond))

    def head(self, h, cond=None):
        if self.final_adaLN is not None:
            shift, scale = self.final_adaLN(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale)
        return self.out(h)

    # ---- end-to-end: the recurrence ---------------------------------------------------------
    def forward(self, tokens, iterations: int, s0: torch.Tensor, bptt: int | None = None):
        """Next-token logits after `iterations` core steps from the state s0 (N, T, d); with bptt,
        only the last `bptt` steps are recorded for back-propagation."""
        e, rope = self.context(tokens)
        s = s0.to(e.dtype)
        free = iterations - min(iterations, bptt) if bptt else 0
        with torch.no_grad():
            for _ in range(free):
                s = self.core_step(s, e, rope)
        for _ in range(iterations - free):
            s = self.core_step(s, e, rope)
        return self.head(self.norm(self.run_layers(s, self.coda_layers, rope)))

    @torch.no_grad()
    def hidden_states(self, tokens, iterations: int, s0: torch.Tensor):
        e, rope = self.context(tokens)
        s = s0.to(e.dtype)
        for _ in range(iterations):
            s = self.core_step(s, e, rope)
        return self.norm(self.run_layers(s, self.coda_layers, rope))

    # ---- DiffusionBlocks: one denoiser pass ------------------------------------------------
    def denoiser_output(self, e, rope, z_in, c_noise):
        """F (N, T, d) = norm(C(norm(R(adapter([c_in·z; e]))))) modulated by c_noise (N,) or (N, T);
        and the conditioning (for `head`)."""
        cond = self.condition(c_noise.to(e.device, torch.float32))
        s = self.core_step(z_in.to(e.dtype), e, rope, cond)
        return self.norm(self.run_layers(s, self.coda_layers, rope, cond)), cond
