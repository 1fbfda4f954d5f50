"""Masked diffusion (MD4, Shi et al. 2024) and its DiffusionBlocks partition (paper §3.4, App. D).

Symbols are the paper's:

  α(t)       masking schedule, [0, 1] → [1, 0]: the probability that a token is still unmasked at
             time t.  Linear (MD4's text8 setting): α(t) = 1 − t.  Also `cosine`,
             α(t) = 1 − cos(π/2·(1 − t)), and `polyK`, α(t) = 1 − t^K (MD4's other schedules).
  z_t        x with each token independently replaced by [MASK] with probability 1 − α(t).
  w(t)       −α′(t) / (1 − α(t)): MD4's continuous-time weight; 1/t for the linear schedule.
  L          ∫₀¹ w(t) E_{z_t}[ Σ_{i masked} CE(f_θ(z_t, t)_i, x_i) ] dt   (Eq. 8), in nats.  With
             α(0) = 1 and α(1) = 0 the reconstruction and prior terms of the ELBO vanish, so
             L is the whole negative ELBO: −log p(x) ≤ L.

Partition in t (App. D).  The expected number of tokens unmasked while t crosses [t_a, t_b] is
n·(α(t_a) − α(t_b)), so that difference is the interval's *mass* ("demasking work").  Equal mass
gives t_k = α⁻¹(1 − k/B) (t_k = k/B for the linear schedule).  Edges are ascending in t; as for σ,
block 0 (the first layers) owns the *highest* noise, t ∈ [t_{B−1}, 1], and runs first when sampling.

Overlap γ (the paper leaves it open for MDM; our choice): each end of a block's interval moves
out by γ·(t_b − t_{b−1}), clipped to [0, 1].  This is the σ-partition's rule (widen by γ times the
interval's width) applied in t, the coordinate the model is conditioned on; for the linear
schedule t is also the mass coordinate, so γ = 0.05 adds 5% of a block's work at each end.

Training t inside a block: U(training range), the restriction of MD4's t ~ U(0, 1), drawn
stratified (MD4's "antithetic" sampling: one uniform offset, n evenly spaced points).  All t
arithmetic is float64, as in `bench.diffusion.noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_F64 = torch.float64
_TIE_RTOL = 1e-9   # t within this relative distance of a boundary counts as on it (→ higher-noise block)
MASKING_STRATEGIES = ("equiprobable", "linear", "explicit")   # equal mass | equal widths in t | given


# ---- the schedule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingSchedule:
    """α(t) and what is derived from it.  kind: 'linear', 'cosine' or 'polyK' (K > 0, e.g. poly2)."""

    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in ("linear", "cosine") and not (self.kind.startswith("poly") and _poly_power(self.kind) > 0):
            raise ValueError(f"unknown masking schedule {self.kind!r}; choose linear, cosine or polyK (e.g. poly2)")

    def alpha(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=_F64)
        if self.kind == "linear":
            return 1 - t
        if self.kind == "cosine":
            return 1 - torch.cos(math.pi / 2 * (1 - t))
        return 1 - t ** _poly_power(self.kind)

    def dalpha(self, t) -> torch.Tensor:
        """α′(t)."""
        t = torch.as_tensor(t, dtype=_F64)
        if self.kind == "linear":
            return -torch.ones_like(t)
        if self.kind == "cosine":
            return -math.pi / 2 * torch.sin(math.pi / 2 * (1 - t))
        k = _poly_power(self.kind)
        return -k * t ** (k - 1)

    def alpha_inv(self, a) -> torch.Tensor:
        """t with α(t) = a."""
        a = torch.as_tensor(a, dtype=_F64)
        if self.kind == "linear":
            return 1 - a
        if self.kind == "cosine":
            return 1 - 2 / math.pi * torch.arccos(1 - a)
        return (1 - a) ** (1 / _poly_power(self.kind))

    def weight(self, t) -> torch.Tensor:
        """w(t) = −α′(t)/(1 − α(t)), the MD4 weight of the masked cross-entropy at t (1/t if linear)."""
        t = torch.as_tensor(t, dtype=_F64)
        return -self.dalpha(t) / (1 - self.alpha(t))

    def mass(self, lo: float, hi: float) -> float:
        """α(lo) − α(hi): the expected fraction of tokens unmasked while t goes from hi down to lo."""
        return float(self.alpha(lo) - self.alpha(hi))


def _poly_power(kind: str) -> float:
    try:
        return float(kind[4:])
    except ValueError:
        return -1.0


# ---- the partition --------------------------------------------------------------------------
def masking_edges(schedule: MaskingSchedule, num_blocks: int, strategy: str = "equiprobable",
                  explicit: Sequence[float] | None = None) -> tuple[float, ...]:
    """Ascending boundaries 0 = t_0 < … < t_B = 1.

    equiprobable  equal mass: t_k = α⁻¹(1 − k/B)  (paper App. D; k/B for the linear schedule)
    linear        equal widths in t
    explicit      interior boundaries given (B − 1 values, or B + 1 with 0 and 1)
    """
    B = num_blocks
    if B < 1:
        raise ValueError(f"num_blocks must be >= 1, got {B}")
    if strategy == "equiprobable":
        inner = schedule.alpha_inv(1 - torch.arange(1, B, dtype=_F64) / B).tolist()
    elif strategy == "linear":
        inner = [k / B for k in range(1, B)]
    elif strategy == "explicit":
        if explicit is None:
            raise ValueError("masking partition 'explicit' needs boundaries (diffusion.sigma_edges, read as t)")
        inner = [float(x) for x in explicit]
        if len(inner) == B + 1:
            if inner[0] != 0 or inner[-1] != 1:
                raise ValueError(f"explicit t boundaries must start at 0 and end at 1, got {inner}")
            inner = inner[1:-1]
        if len(inner) != B - 1:
            raise ValueError(f"explicit t boundaries for B={B}: give {B - 1} interior values (or {B + 1} with 0 and 1), "
                             f"got {len(explicit)}")
    else:
        raise ValueError(f"masked diffusion has no partition {strategy!r}; choose one of {', '.join(MASKING_STRATEGIES)}")
    edges = (0.0, *inner, 1.0)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"t boundaries must be strictly increasing inside (0, 1), got {list(edges)}")
    return edges


@dataclass(frozen=True)
class MaskingPartition:
    """B intervals of t ∈ [0, 1] with overlap γ; the same interface as `Partition` (σ), in t.

    `sample_training_sigma` returns t (the trainer's name for "the noise level of a sample")."""

    schedule: MaskingSchedule
    edges: tuple[float, ...]
    gamma: float = 0.0
    strategy: str = "equiprobable"
    antithetic: bool = True

    def __post_init__(self):
        if self.edges[0] != 0 or self.edges[-1] != 1 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"t edges must increase strictly from 0 to 1, got {list(self.edges)}")
        if self.gamma < 0:
            raise ValueError(f"overlap gamma must be >= 0, got {self.gamma}")

    @property
    def num_blocks(self) -> int:
        return len(self.edges) - 1

    def interval(self, block: int) -> tuple[float, float]:
        """The t interval block `block` owns (no overlap); block 0 owns the highest t."""
        k = self._interval_index(block)
        return self.edges[k], self.edges[k + 1]

    def training_range(self, block: int) -> tuple[float, float]:
        """The interval widened by γ·width at each end, clipped to [0, 1]."""
        lo, hi = self.interval(block)
        pad = self.gamma * (hi - lo)
        return max(lo - pad, 0.0), min(hi + pad, 1.0)

    def mass(self, block: int) -> float:
        return self.schedule.mass(*self.interval(block))

    def training_mass(self, block: int) -> float:
        return self.schedule.mass(*self.training_range(block))

    def sample_training_t(self, block: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_t(n, *self.training_range(block), generator=generator, antithetic=self.antithetic)

    # the trainer's name for it: the noise level of each sample in a training batch
    sample_training_sigma = sample_training_t

    def block_of(self, t: float) -> int:
        """The block that owns t at evaluation and sampling (a boundary belongs to the higher-t block)."""
        s = min(max(float(t), 0.0), 1.0)
        k = 0
        for i, e in enumerate(self.edges[1:-1], start=1):
            if s >= e * (1 - _TIE_RTOL):
                k = i
        return self.num_blocks - 1 - k

    def blocks_of(self, t: torch.Tensor) -> torch.Tensor:
        """`block_of` for a tensor of t's."""
        return torch.tensor([self.block_of(v) for v in t.tolist()], dtype=torch.long)

    def _interval_index(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range for B={self.num_blocks}")
        return self.num_blocks - 1 - block


def make_masking_partition(num_blocks: int, strategy: str = "equiprobable", gamma: float = 0.0,
                           schedule: MaskingSchedule | None = None, edges: Sequence[float] | None = None,
                           antithetic: bool = True) -> MaskingPartition:
    schedule = schedule or MaskingSchedule()
    return MaskingPartition(schedule, masking_edges(schedule, num_blocks, strategy, edges), gamma, strategy, antithetic)


def sample_t(n: int, lo: float = 0.0, hi: float = 1.0, generator: torch.Generator | None = None,
             antithetic: bool = True) -> torch.Tensor:
    """n draws of t ~ U(lo, hi), float64.  antithetic: u = (u₀ + i/n) mod 1 for i < n — stratified,
    still uniform for every i (MD4's antithetic time sampling); else n independent draws."""
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    if antithetic:
        u0 = torch.rand(1, dtype=_F64, generator=generator)
        u = torch.remainder(u0 + torch.arange(n, dtype=_F64) / n, 1.0)
    else:
        u = torch.rand(n, dtype=_F64, generator=generator)
    return lo + (hi - lo) * u


# ---- forward process, loss, ELBO --------------------------------------------------------------
def mask_tokens(x: torch.Tensor, t: torch.Tensor, schedule: MaskingSchedule, mask_id: int,
                generator: torch.Generator | None = None, u: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t ~ q(z_t | x): each token of x (N, L) replaced by mask_id with probability 1 − α(t_n).
    Returns (z_t, masked).  The uniforms u (N, L) are drawn on the CPU from `generator` (or given),
    so a run is the same on any device."""
    if u is None:
        u = torch.rand(x.shape, dtype=_F64, generator=generator)
    masked = u.to(x.device) < (1 - schedule.alpha(t.cpu())).to(x.device)[:, None]
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def masked_ce_sum(logits: torch.Tensor, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Σ_{i masked} CE(logits_i, x_i) per sequence (N,), in nats; float32 softmax."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
    return (ce * masked).sum(dim=1)


def md4_nelbo(ce_sum: torch.Tensor, t: torch.Tensor, schedule: MaskingSchedule) -> torch.Tensor:
    """w(t)·Σ_{i masked} CE: the one-sample estimate of the negative ELBO of each sequence (Eq. 8), nats.
    A sequence with no masked token contributes exactly 0 (the integrand is 0 there, even at t = 0
    where w is infinite)."""
    w = schedule.weight(t.cpu()).to(ce_sum.device, ce_sum.dtype)
    return torch.where(ce_sum > 0, w * ce_sum, torch.zeros_like(ce_sum))


def mc_mean_stderr(draws: torch.Tensor) -> tuple[float, float]:
    """Mean of an (N, K) table of K Monte-Carlo draws for each of N fixed items, and the standard
    error of that mean *given the items*: √(Σ_n s_n²/K)/N with s_n² the sample variance of item n's
    draws.  (The spread between items is not noise here: the test set is fixed.)  Needs K ≥ 2."""
    N, K = draws.shape
    if K < 2:
        raise ValueError("the standard error needs at least 2 draws per item")
    d = draws.double()
    return float(d.mean()), float(d.var(dim=1, unbiased=True).sum().div(K).sqrt() / N)


# ---- sampling ---------------------------------------------------------------------------------
# A predictor for the sampler: (z_t, t, block) → probabilities (N, L, V) of the clean tokens.
Predictor = Callable[[torch.Tensor, float, int], torch.Tensor]


def ancestral_step(z: torch.Tensor, probs: torch.Tensor, t: float, s: float, schedule: MaskingSchedule,
                   mask_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of MD4's ancestral sampler from t to s < t: a masked token is revealed with
    probability (α(s) − α(t))/(1 − α(t)), as a draw from `probs`; unmasked tokens stay."""
    a_t, a_s = float(schedule.alpha(t)), float(schedule.alpha(s))
    reveal_p = (a_s - a_t) / (1 - a_t)
    N, L, V = probs.shape
    reveal = torch.rand((N, L), generator=generator).to(z.device) < reveal_p
    u = torch.rand((N, L, 1), generator=generator).to(z.device)
    # inverse-CDF draw from probs (one uniform per position: same draws on any device)
    tokens = (probs.double().cumsum(-1) < u.double()).sum(-1).clamp_max(V - 1)
    return torch.where((z == mask_id) & reveal, tokens, z)


def sample_masked(predict: Predictor, n: int, length: int, steps: int, partition: MaskingPartition, mask_id: int,
                  device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate n sequences: start fully masked at t = 1 and take `steps` ancestral steps on the
    uniform t grid down to 0.  The step from t to s is predicted (at t) by the block that owns the
    step's midpoint, so a step never goes to a block for a grid point that only touches its range
    (with steps a multiple of B every block takes steps/B of them)."""
    z = torch.full((n, length), mask_id, dtype=torch.long, device=device)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=_F64).tolist()
    for t, s in zip(grid, grid[1:]):
        block = partition.block_of((t + s) / 2)
        z = ancestral_step(z, predict(z, t, block), t, s, partition.schedule, mask_id, generator)
    return z
