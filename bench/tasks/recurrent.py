"""Recurrent-depth LM (Huginn-style, paper §3.6, App. E.5): end-to-end recurrence vs a one-pass denoiser.

Data, prompts and metrics are the autoregressive task's (windows of data.seq_len + 1 tokens;
position j reads x_0…x_j and predicts x_{j+1}).

e2e      r core iterations per step, r drawn per step from Huginn's log-normal Poisson,
         r = 1 + Poisson(exp(τ)), τ ~ N(ln(r̄ − 1) − s²/2, s), so E[r] = r̄ (model.mean_recurrence,
         s = model.recurrence_std), seeded by the step's "augment" stream (bench.seeding);
         s_0 ~ N(0, state_std²) from the trainer's generator; truncated BPTT: only the last
         model.bptt iterations are back-propagated.
dblocks  B = 1: one denoiser over the whole noise range, σ from the full (truncated) log-normal
         p_noise, one pass (prelude, core once, coda) per step; λ(σ)-weighted cross-entropy of
         head(D_j) to x_{j+1} (see bench/models/recurrent.py).

Inference with K iterations:
  e2e      K = eval.e2e_recurrence (0, the default → model.mean_recurrence r̄: the depth it was
           trained at on average) core iterations from s_0 ~ N(0, state_std²) (eval.seed).
  dblocks  K = eval.recurrence (0 → r̄) denoiser calls on the K-point equal-probability σ grid
           from σ_max to σ_min (sigmas_equiprobable): K − 1 Euler steps with D̂ = softmax(logits) @ Ê,
           and the logits of the call at σ_min predict the token.  So iteration k of the recurrence runs at σ_k, the
           k-th of K equally likely quantiles of p_noise, descending.  In the teacher-forced
           perplexity all positions' chains run jointly (a position attends to the earlier positions'
           current iterates); in generation the earlier positions, whose next tokens are known,
           hold noisy copies y + σ_k·ε of them, as in training, and only the new position is iterated.
The final evaluation also scores every other K of eval.recurrence_variants (`test_ppl@K16`, …).

Compute: the e2e recurrence evaluates prelude + core·r + coda layers per step; the loss reports
that count to the trainer (its layer_evals and learning curve use it), and `train_layer_evals`
(in every evaluation, hence in history.csv) recounts it by replaying the seeded draws of r;
`train_backward_layer_evals` counts the layers that are also back-propagated
(prelude + core·min(r, bptt) + coda).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from bench import seeding
from bench.config import ConfigError, model_config
from bench.diffusion import c_noise, denoised, sample_chain, scale_input, weighted_loss
from bench.metrics import text as M
from bench.tasks.autoregressive import AutoregressiveTask, LMEvalConfig
from bench.tasks.text_base import HeldOutText


@dataclass
class RecurrentEvalConfig(LMEvalConfig):
    recurrence: int = 0            # dblocks: K denoiser calls at inference; 0: model.mean_recurrence
    e2e_recurrence: int = 0        # e2e: K core iterations at inference; 0: model.mean_recurrence (its training mean)
    recurrence_variants: list = field(default_factory=list)   # final: also at these K (keys @K<k>), e.g. [16]


def sample_recurrence(seed: int, mean: int, std: float) -> int:
    """r = 1 + Poisson(exp(τ)), τ ~ N(ln(mean − 1) − std²/2, std): Huginn's log-normal Poisson, E[r] = mean."""
    if mean <= 1:
        return 1
    rng = np.random.default_rng([seed, 0x5EC])
    tau = rng.normal(np.log(mean - 1) - std ** 2 / 2, std)
    return 1 + int(rng.poisson(np.exp(tau)))


class RecurrentTask(AutoregressiveTask):
    name = "recurrent"
    arch = "recurrent"
    eval_config = RecurrentEvalConfig

    @classmethod
    def validate_config(cls, cfg) -> None:
        super().validate_config(cfg)
        if cfg.diffusion.num_blocks != 1:
            raise ConfigError(f"the recurrent model is one denoiser (paper: no block partitioning): "
                              f"diffusion.num_blocks must be 1, got {cfg.diffusion.num_blocks}")
        e = cfg.eval
        if e.recurrence < 0 or e.e2e_recurrence < 0:
            raise ConfigError(f"eval.recurrence and eval.e2e_recurrence must be >= 0, got {e.recurrence} and "
                              f"{e.e2e_recurrence}")
        if not all(isinstance(k, int) and k >= 1 for k in e.recurrence_variants):
            raise ConfigError(f"eval.recurrence_variants must be iteration counts >= 1, got {e.recurrence_variants}")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._K_override = 0      # set by `at_recurrence` (the final variants)
        self._rs: list[int] = []  # the training recurrences replayed so far (train_compute)

    @property
    def mcfg(self):
        return model_config(self.cfg.model)

    @property
    def K(self) -> int:
        """Inference iterations: the e2e arm at its training mean r̄ unless eval.e2e_recurrence says
        otherwise (fewer iterations than it trained at would understate it); dblocks eval.recurrence."""
        e = self.cfg.eval
        return self._K_override or (e.recurrence if self.cfg.is_dblocks else e.e2e_recurrence) \
            or self.mcfg.mean_recurrence

    @contextlib.contextmanager
    def at_recurrence(self, k: int):
        before, self._K_override = self._K_override, k
        try:
            yield
        finally:
            self._K_override = before

    def step_recurrence(self, step: int) -> int:
        """r of training step `step`, from the step's own stream (the seed `batch` gets; sample_recurrence
        keys it further, so r and the window offset are independent draws)."""
        m = self.mcfg
        return sample_recurrence(seeding.stream_seed(self.cfg.train.seed, "augment", step), m.mean_recurrence,
                                 m.recurrence_std)

    # ---- training ----------------------------------------------------------------------------------------
    def loss(self, model, batch, *, sigma, layers: range, generator=None):
        x = batch
        clean, target = x[:, :-1], x[:, 1:]
        N, T = target.shape
        if sigma is None:                              # e2e: the truncated-BPTT recurrence
            r = self.step_recurrence(self.step)
            s0 = self.shard.draw(torch.randn, (N, T, self.mcfg.hidden), generator).to(x.device) * self.mcfg.state_std
            ce = M.token_nll(model(clean, r, s0, bptt=self.mcfg.bptt), target).mean()
            m = self.mcfg  # the trainer counts compute with the layers this recurrence really ran
            return ce, {"ce": ce.detach(), "layer_evals": m.prelude + m.core * r + m.coda}
        if self.sigma_per == "token":
            more = self.shard.draw(lambda shape, generator: self.partition.sample_training_sigma(
                0, shape[0] * shape[1], generator).view(shape), (N, T - 1), generator)
            sigma = torch.cat([sigma[:, None], more], dim=1)
        sigma = sigma.to(x.device, torch.float32)
        y = model.clean_embed(target)
        eps = self.shard.draw(torch.randn, y.shape, generator).to(y.device)
        z = y + (sigma[:, None, None] if sigma.dim() == 1 else sigma[..., None]) * eps
        e, rope = model.context(clean)
        ce = M.token_nll(self.recurrent_logits(model, e, rope, z, sigma), target)
        return weighted_loss(ce, sigma, self.noise.sigma_data, self.cfg.diffusion.weighting), {"ce": ce.mean().detach()}

    def recurrent_logits(self, model, e, rope, z, sigma):
        """head(c_skip·z + c_out·F(c_in·z; e, σ)) at every position."""
        sd = self.noise.sigma_data
        F_out, cond = model.denoiser_output(e, rope, scale_input(z, sigma, sd), c_noise(sigma))
        return model.head(denoised(z, F_out, sigma, sd), cond)

    # ---- inference -------------------------------------------------------------------------------------------
    def inference_sigmas(self) -> torch.Tensor:
        return self.sigma_grid(self.K)

    def _sig(self, s: float, N: int, T: int, device):
        return torch.full((N, T) if self.sigma_per == "token" else (N,), s, device=device)

    def chain(self, model, tokens, generator, known: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, T, V) after K denoiser calls at every position of `tokens` (N, T).  known: the
        next tokens (N, T − 1) of all positions but the last; those positions then hold noisy copies
        of them at each σ instead of iterating (generation)."""
        N, T = tokens.shape
        E = model.target_table()
        e, rope = model.context(tokens)
        eps = torch.randn((N, T, E.shape[1]), generator=generator).to(tokens.device)
        y_known = model.clean_embed(known) if known is not None else None

        def full(z, s: float):
            if y_known is None:
                return z
            return torch.cat([y_known + s * eps[:, :-1], z], dim=1)   # noisy copies, then the iterate

        def denoise(z, s: float, block: int):
            logits = self.recurrent_logits(model, e, rope, full(z, s), self._sig(s, N, T, tokens.device))
            D = logits.float().softmax(-1) @ E.float()
            return D if y_known is None else D[:, -1:]

        sigmas = self.inference_sigmas()
        z0 = float(sigmas[0]) * (eps if y_known is None else eps[:, -1:])
        z = sample_chain(denoise, z0, sigmas, self.full_range)
        last = float(sigmas[-1])
        return self.recurrent_logits(model, e, rope, full(z, last), self._sig(last, N, T, tokens.device))

    def e2e_logits(self, model, tokens, generator):
        s0 = torch.randn((*tokens.shape, self.mcfg.hidden), generator=generator).to(tokens.device) * self.mcfg.state_std
        return model(tokens, self.K, s0)

    def next_token_logits(self, model, seq, generator):
        seq = seq[:, -self.mcfg.seq_len:]
        if not self.cfg.is_dblocks:
            return self.e2e_logits(model, seq, generator)[:, -1]
        return self.chain(model, seq, generator, known=seq[:, 1:])[:, -1]

    def nll_table(self, model, x, draws: int) -> torch.Tensor:
        bs, out = self.cfg.eval.batch_size, []
        for s in range(0, len(x), bs):
            xb = x[s:s + bs]
            g = torch.Generator().manual_seed(self.cfg.eval.seed * 1_000_003 + s)
            if not self.cfg.is_dblocks:
                out.append(M.token_nll(self.e2e_logits(model, xb[:, :-1], g), xb[:, 1:]).cpu())
                continue
            probs = torch.stack([self.chain(model, xb[:, :-1], g).float().softmax(-1).cpu() for _ in range(draws)])
            out.append(M.mixture_nll(probs, xb[:, 1:].cpu()))
        return torch.cat(out).double()

    def final_variants(self, model, device, held: HeldOutText) -> dict:
        """The final evaluation at every other K of eval.recurrence_variants (e.g. the e2e arm at K = 16
        as well as at r̄): perplexity, and with scorers the sample figures of one continuation per
        prompt under the shared decoding (`gen_ppl@rnn,K16`, `mauve@rnn,K16`, `distinct4@gen,K16`, …).
        Keys as on test: the final evaluation runs them on test only."""
        e, out = self.cfg.eval, {}
        kind = "denoise" if self.cfg.is_dblocks else "test"
        for k in e.recurrence_variants:
            if k == self.K:
                continue
            with self.at_recurrence(k):
                out[f"{kind}_ppl@K{k}"], out[f"{kind}_bpc@K{k}"], _ = self.perplexity(model, held, e.ppl_sequences,
                                                                                     device)
                if self.scorer_tags():
                    m = self.generation_metrics(model, device, True, held, continuations=1)["metrics"]
                    out.update(M.as_variant(m, f"K{k}"))
        return out

    def evaluate(self, model, device, final: bool = False, split: str = "val") -> dict:
        result = super().evaluate(model, device, final, split)
        if final:
            result["inference_recurrence"] = self.K
        return result

    def decoding_note(self, decoding: str | None = None) -> str:
        if self.cfg.is_dblocks:
            return super().decoding_note(decoding).replace(f"(B = {self.partition.num_blocks})",
                                                           f"(K = {self.K} iterations)")
        return f"K = {self.K} core iterations, {super().decoding_note(decoding)}"

    def inference_layer_evals_per_token(self) -> int:
        m = self.mcfg
        if self.cfg.is_dblocks:
            return m.prelude + (m.core + m.coda) * self.K
        return m.prelude + m.core * self.K + m.coda

    # ---- compute --------------------------------------------------------------------------------------------
    def train_compute(self, steps: int) -> dict:
        m = self.mcfg
        if self.cfg.is_dblocks:
            fwd = bwd = steps * m.depth
        else:
            # the draws replayed so far are kept: every curve point (val and test) asks again
            self._rs += [self.step_recurrence(k) for k in range(len(self._rs), steps)]
            rs = np.array(self._rs[:steps], dtype=np.int64)
            fwd = int((m.prelude + m.core * rs + m.coda).sum())
            bwd = int((m.prelude + m.core * np.minimum(rs, m.bptt) + m.coda).sum())
        return {"train_layer_evals": fwd, "train_backward_layer_evals": bwd,
                "train_token_layer_evals": fwd * self.seq_len * self.cfg.train.batch_size}
