"""Autoregressive language modelling: an end-to-end next-token LM vs DiffusionBlocks (paper §3.5, App. E.4).

Data: windows w of data.seq_len + 1 tokens; both arms learn to predict w_1 … w_T, each from the
tokens before it in the window (the same prediction problems, so the arms' numbers line up).

e2e        the plain causal Llama (sigma None): mean next-token cross-entropy.
dblocks    the paper's formulation.  The target of position p is y_p = normalise(E[w_p]), the L2-
           normalised token embedding; z_p = y_p + σ·ε.  The model reads [clean w_0 … w_{T−1};
           c_in·z_1 … c_in·z_T] (length 2T) under the Block-Diffusion mask (clean tokens causal
           among themselves; noisy token p sees the clean tokens < p and itself), runs one block's
           layers, and D_p = c_skip·z_p + c_out·F_p; the loss is the λ(σ)-weighted cross-entropy of
           head(D_p) to the token w_p (diffusion.weighting; `lambda` = per token λ(σ), Eq. 6).
           σ per sequence (model.sigma_per: sequence, default: the trainer's one draw per sample
           conditions every token of the sequence, as the ViT code draws one σ per sample) or per
           token (model.sigma_per: token: each noisy token draws its own σ from the block's range;
           clean tokens are conditioned on σ_min, "noise-free").  The paper does not say which.

Inference (dblocks): for the token at position p, z = σ_max·ε (or diffusion.sample_sigma_max) and the
chain of `sample_chain` on the equal-probability σ grid of diffusion.inference_steps points (0 → B: one call per block), each
step by the block that owns σ, with D̂ = softmax(logits) @ Ê (Ê: the normalised embedding table);
the logits of the final call (at σ_min) predict the token.

Decoding (`decode_tokens`): the ranking figures decode BOTH arms the same way, eval.decoding — `top_p`
(nucleus sampling at eval.top_p, the default) or `greedy` (argmax) — with the decoding draws on their own
seeded stream, so that with identical logits both arms pick identical tokens whatever noise the
denoiser consumes.  The other decodings of eval.decoding_variants are reported beside them as variants
(`mauve@rnn,greedy`, …); `paper` is the paper's arm-specific decoding (e2e top-p, dblocks
eval.db_decoding: greedy), kept as a labelled variant only.

Metrics (definitions in bench/metrics/text.py, its METRIC_DEFINITIONS table and the README), on the split
`evaluate` is given: validation (the text layer's recorded val split, data.val_subset windows; keys
`val_ppl`, `val_denoise_ppl`, `val_mauve@rnn`, …: what selections read) or test (read only by
`load_test`, through the seal of bench.splits; keys `test_ppl`, `denoise_ppl`, `mauve@rnn`, …: what the
tables publish).  Prompts for generation are windows of the same split.
  test_ppl / test_bpc        e2e: exact perplexity / bits per character.
  denoise_ppl / denoise_bpc  dblocks: "denoising perplexity", teacher-forced: every token is
                             predicted by the chained inference above from the true preceding tokens,
                             and its probability is the average of softmax(final logits) over
                             eval.noise_draws fixed noise draws.  NOT a likelihood bound: it is the
                             perplexity of that noise-averaged distribution, not of the sampler.
  gen_ppl@<scorer>           perplexity of sampled continuations under a scorer LM: `ngram` (Kneser–Ney
                             n-gram of the train split, eval.ngram_order), `rnn` (GRU/LSTM reference,
                             eval.rnn_reference), `ref` (eval.reference: same family as the e2e arm).
  mauve@<scorer>             MAUVE (mauve-text) of sampled vs real continuations on the scorer's features.
  The ranking metric (`metric`) is mauve@rnn (higher is better) under the shared decoding; without an
  RNN reference mauve@ref, without features gen_ppl@<first scorer>, without any scorer the perplexity.
Compute: layer evaluations per training step (the trainer's count; the denoiser's layers see 2T
tokens, so `train_token_layer_evals` is also given) and per generated token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from bench import seeding, track
from bench.config import ConfigError, EvalConfig, model_config
from bench.data.text import (PreparedText, TextDataConfig, TextSpec, check_prepared, num_windows,
                             prepared_dir, windows)
from bench.diffusion import c_noise, denoised, sample_chain, scale_input, sigmas_equiprobable, weighted_loss
from bench.metrics import text as M
from bench.splits import metric_on
from bench.tasks.base import Task
from bench.tasks.lm_generation import LMGeneration, feature_tags, scorer_tags
from bench.tasks.text_base import HeldOutText, TextTask, check_split_sizes

SIGMA_PER = ("sequence", "token")
DECODINGS = ("top_p", "greedy")              # what eval.decoding may be: one decoding for both arms
DECODING_VARIANTS = (*DECODINGS, "paper")    # paper: e2e top-p, dblocks eval.db_decoding


@dataclass
class LMEvalConfig(EvalConfig):
    batch_size: int = 64
    reference: str = ""            # scorer `ref`: final.pt of an e2e autoregressive run, or a local HF causal LM dir
    rnn_reference: str = ""        # scorer `rnn`: a GRU/LSTM reference of `python -m bench.models.rnn_lm`; "": none
    ngram_order: int = 0           # scorer `ngram`: interpolated Kneser–Ney of this order on the train split; 0: none
    ngram_train_tokens: int = 0    # fit the n-gram LM on the first N train tokens (0: all; a cap for paper-scale corpora)
    ppl_sequences: int = 0         # final: windows of the split for exact/denoising perplexity (0: all)
    curve_ppl_sequences: int = 64  # learning curve: windows for the same
    noise_draws: int = 4           # dblocks: noise draws averaged per token in the denoising perplexity
    prompts: int = 128             # final: prompts (windows of the split, evenly spaced) for generation
    continuations: int = 2         # final: continuations sampled per prompt
    curve_prompts: int = 32        # learning curve: prompts (one continuation each) for gen_ppl and the ranking MAUVE
    prompt_len: int = 32           # tokens of prompt
    gen_len: int = 64              # tokens generated per continuation
    decoding: str = "top_p"        # the ranking decoding, the same for both arms: top_p | greedy
    decoding_variants: list = field(default_factory=lambda: list(DECODING_VARIANTS))   # final: also these decodings
    top_p: float = 0.95            # nucleus of top-p decoding (1.0: plain sampling)
    db_decoding: str = "greedy"    # dblocks decoding of the `paper` variant: greedy (paper) | sample (top-p)
    mauve: bool = True             # MAUVE of sampled vs real continuations under the scorers with features (rnn, ref)
    mauve_scaling: float = 2.0     # MAUVE's scaling constant c (paper v4: 2; mauve-text's default: 5)
    mauve_buckets: int = 0         # final: k-means buckets; 0: max(2, n/10) (the learning curve always uses 0)
    mauve_features: str = "mean"   # scorer hidden state averaged over the continuation (mean) or its last token
    samples_shown: int = 6         # continuations written to results/<suite>/samples_<arm>.md
    samples_dir: str = "results"


# ---- small pure functions ------------------------------------------------------------------------------------
def ranking_metric(e: LMEvalConfig, is_dblocks: bool) -> str:
    """mauve@<first scorer with features>; without MAUVE gen_ppl@<first scorer>; without any scorer the
    arm's own perplexity (then e2e and dblocks are not ranked by the same number)."""
    if e.mauve and feature_tags(e):
        return f"mauve@{feature_tags(e)[0]}"
    if scorer_tags(e):
        return f"gen_ppl@{scorer_tags(e)[0]}"
    return "denoise_ppl" if is_dblocks else "test_ppl"


def evenly_spaced(n_available: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(n_available) (all of them if n is 0 or too large)."""
    if n <= 0 or n >= n_available:
        return np.arange(n_available)
    return np.unique(np.linspace(0, n_available - 1, n).round().astype(np.int64))


def strided_windows(tokens: np.ndarray, length: int, stride: int, indices) -> np.ndarray:
    """Windows of `length` tokens starting at index·stride: (n, length) int64."""
    idx = np.asarray(indices, dtype=np.int64)[:, None] * stride + np.arange(length)
    return np.asarray(tokens[idx], dtype=np.int64)


class AutoregressiveTask(LMGeneration, TextTask):
    name = "autoregressive"
    # the suites' ranking metric (sweeps and tuning read the class); an instance without an RNN
    # reference ranks by ranking_metric(eval) and sets its own higher_is_better
    metric = "mauve@rnn"
    higher_is_better = True
    e2e_denoiser = False
    data_config = TextDataConfig
    eval_config = LMEvalConfig
    arch = "llama"

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.model.get("arch") != cls.arch:
            raise ConfigError(f"task {cls.name} needs model.arch {cls.arch}, got {cfg.model.get('arch')!r}")
        TextSpec.from_data_config(cfg.data).validate()
        m, e = model_config(cfg.model), cfg.eval
        if getattr(m, "sigma_per", "sequence") not in SIGMA_PER:
            raise ConfigError(f"model.sigma_per must be one of {', '.join(SIGMA_PER)}, got {m.sigma_per!r}")
        if not 1 <= cfg.data.seq_len <= m.seq_len:
            raise ConfigError(f"data.seq_len {cfg.data.seq_len} must be between 1 and the context model.seq_len {m.seq_len}")
        if e.prompt_len < 1 or e.gen_len < 1:
            raise ConfigError(f"eval.prompt_len and eval.gen_len must be >= 1, got {e.prompt_len} and {e.gen_len}")
        if e.prompt_len >= m.seq_len:
            raise ConfigError(f"eval.prompt_len {e.prompt_len} must be shorter than the context model.seq_len {m.seq_len}")
        if e.prompt_len + e.gen_len > m.seq_len:
            raise ConfigError(f"eval.prompt_len {e.prompt_len} + eval.gen_len {e.gen_len} exceeds the context "
                              f"model.seq_len {m.seq_len}")
        if not 0 < e.top_p <= 1:
            raise ConfigError(f"eval.top_p must be in (0, 1], got {e.top_p}")
        if e.decoding not in DECODINGS:
            raise ConfigError(f"eval.decoding must be one of {', '.join(DECODINGS)} (the same for both arms), "
                              f"got {e.decoding!r}")
        if any(d not in DECODING_VARIANTS for d in e.decoding_variants):
            raise ConfigError(f"eval.decoding_variants must be among {', '.join(DECODING_VARIANTS)}, "
                              f"got {e.decoding_variants}")
        if e.db_decoding not in ("greedy", "sample"):
            raise ConfigError(f"eval.db_decoding must be greedy or sample, got {e.db_decoding!r}")
        if e.ngram_order < 0 or e.ngram_train_tokens < 0:
            raise ConfigError(f"eval.ngram_order and eval.ngram_train_tokens must be >= 0, got {e.ngram_order} "
                              f"and {e.ngram_train_tokens}")
        if e.mauve_features not in ("mean", "last"):
            raise ConfigError(f"eval.mauve_features must be mean or last, got {e.mauve_features!r}")
        for k in ("noise_draws", "prompts", "continuations", "curve_prompts"):
            if getattr(e, k) < 1:
                raise ConfigError(f"eval.{k} must be >= 1, got {getattr(e, k)}")
        if feature_tags(e) and e.mauve:
            M.check_mauve_counts(e.prompts, e.prompts * e.continuations, e.mauve_buckets)
            if ranking_metric(e, cfg.is_dblocks).startswith("mauve"):   # every curve point scores it
                try:
                    M.check_mauve_counts(e.curve_prompts, e.curve_prompts)
                except ConfigError as err:
                    raise ConfigError(f"the learning curve ranks by MAUVE: eval.curve_prompts {e.curve_prompts} is "
                                      f"too few ({err}); raise it to 20 or more") from None

    def __init__(self, cfg):
        super().__init__(cfg)
        self.spec = TextSpec.from_data_config(cfg.data)
        self.seq_len = cfg.data.seq_len
        self.metric = ranking_metric(cfg.eval, cfg.is_dblocks)
        self.higher_is_better = self.metric.startswith("mauve")
        self._scorers: dict[str, M.ReferenceLM] = {}

    # ---- data and model ---------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Tokens per training/scored window: seq_len inputs and the token after the last."""
        return self.seq_len + 1

    def check(self) -> None:
        data = PreparedText(check_prepared(self.spec, self.cfg.data.root))
        m, e = model_config(self.cfg.model), self.cfg.eval
        if m.vocab_size and m.vocab_size != data.vocab_size:
            raise ConfigError(f"model.vocab_size {m.vocab_size} differs from the prepared data's {data.vocab_size} "
                              f"({data.dir}); set model.vocab_size: 0 to take it from the data")
        check_split_sizes(data, self.window, self.cfg.data.random_offset, f"data.seq_len {self.seq_len}")
        for split in ("val", "test"):
            n_prompts = num_windows(data.meta["splits"][split]["tokens"], e.prompt_len + e.gen_len)
            if scorer_tags(e) and n_prompts < e.prompts:
                raise ConfigError(f"eval.prompts {e.prompts} is more than the {n_prompts} {split} windows of "
                                  f"{e.prompt_len + e.gen_len} tokens")
        if self._num_train(data) < self.cfg.train.batch_size:
            raise ConfigError(f"train.batch_size {self.cfg.train.batch_size} is larger than the "
                              f"{self._num_train(data)} training windows of {self.window} tokens")
        if e.reference:
            self.check_reference(data)
        if e.rnn_reference:
            self.check_rnn_reference()
        if e.ngram_order:
            from bench.metrics.ngram import check_order
            try:
                check_order(e.ngram_order, data.vocab_size)
            except ValueError as err:
                raise ConfigError(f"eval.ngram_order: {err}") from None

    @property
    def train_window(self) -> int:
        return self.window

    def scored_windows(self, n_tokens: int) -> int:
        # scored windows overlap by one token so that every token after the first is predicted once
        return max(0, n_tokens - 1) // self.seq_len

    @property
    def vocab_size(self) -> int:
        if hasattr(self, "data"):
            return self.data.vocab_size
        m = model_config(self.cfg.model)
        if m.vocab_size:
            return m.vocab_size
        meta = prepared_dir(self.spec, self.cfg.data.root) / "meta.json"
        if not meta.is_file():
            raise ConfigError(f"model.vocab_size is 0 (from the data) but {meta.parent} is not prepared")
        return int(json.loads(meta.read_text())["vocab_size"])

    def model_config(self):
        from bench.models import ARCHS
        cfg_cls, _ = ARCHS[self.arch]
        fields = {k: v for k, v in self.cfg.model.items() if k != "arch"}
        return cfg_cls(**{**fields, "vocab_size": self.vocab_size})

    def build_model(self):
        from bench.models import ARCHS
        return ARCHS[self.arch][1](self.model_config(), conditioned=self.conditioned)

    def example_batch(self, batch_size, device):
        g = torch.Generator().manual_seed(0)
        return torch.randint(self.vocab_size, (batch_size, self.window), generator=g).to(device)

    def batch(self, indices, seed, device):
        """Training windows of seq_len + 1 tokens; with data.random_offset all windows of a step shift by
        one offset in [0, window) drawn from the step's seed."""
        offset = int(np.random.default_rng(seed).integers(self.window)) if self.cfg.data.random_offset else 0
        return torch.from_numpy(windows(self.train_tokens, self.window, indices.numpy(), offset)).to(device)

    # ---- training ---------------------------------------------------------------------------------------------
    @property
    def sigma_per(self) -> str:
        return getattr(model_config(self.cfg.model), "sigma_per", "sequence")

    def block_of_layers(self, layers: range) -> int:
        for b in range(self.layout.num_blocks):
            if self.layout.layers_of(b) == layers:
                return b
        raise ValueError(f"layers {layers} are not one block")

    def loss(self, model, batch, *, sigma, layers: range, generator=None) -> tuple[torch.Tensor, dict]:
        x = batch
        clean, target = x[:, :-1], x[:, 1:]
        if sigma is None:                       # e2e: the plain next-token LM
            ce = M.token_nll(model(clean, layers), target).mean()
            return ce, {"ce": ce.detach()}
        N, T = target.shape
        if self.sigma_per == "token":           # the trainer's σ for the first token, fresh draws (same block) after
            block = self.block_of_layers(layers)
            more = self.shard.draw(lambda shape, generator: self.partition.sample_training_sigma(
                block, shape[0] * shape[1], generator).view(shape), (N, T - 1), generator)
            sigma = torch.cat([sigma[:, None], more], dim=1)
        sigma = sigma.to(x.device, torch.float32)
        y = model.clean_embed(target)
        eps = self.shard.draw(torch.randn, y.shape, generator).to(y.device)   # CPU generator: same draws on any device
        z = y + (sigma[:, None, None] if sigma.dim() == 1 else sigma[..., None]) * eps
        logits = self.denoise_logits(model, clean, z, torch.arange(1, T + 1), sigma, layers)
        ce = M.token_nll(logits, target)                                # (N, T)
        loss = weighted_loss(ce, sigma, self.noise.sigma_data, self.cfg.diffusion.weighting)
        return loss, {"ce": ce.mean().detach()}

    def denoise_logits(self, model, clean, z, positions, sigma, layers: range) -> torch.Tensor:
        """head(c_skip·z + c_out·F(c_in·z; clean, c_noise)) at the noisy positions, one block's layers.
        sigma (N,) per sequence, or (N, n) per noisy token (clean tokens then conditioned on σ_min)."""
        sd = self.noise.sigma_data
        if sigma.dim() == 2:
            clean_c = torch.full((clean.shape[0], clean.shape[1]), self.noise.sigma_min, device=sigma.device)
            cn = torch.cat([c_noise(clean_c), c_noise(sigma)], dim=1)
        else:
            cn = c_noise(sigma)
        F_out, cond = model.denoiser_output(clean, scale_input(z, sigma, sd), positions, cn, layers)
        return model.head(denoised(z, F_out, sigma, sd), cond)

    # ---- inference ----------------------------------------------------------------------------------------
    def inference_sigmas(self) -> torch.Tensor:
        """The equal-probability σ grid of the chain (diffusion.inference_steps points; 0: B)."""
        return self.sigma_grid(self.cfg.diffusion.inference_steps or self.partition.num_blocks)

    def sigma_grid(self, n: int) -> torch.Tensor:
        """n equal-probability σ points from diffusion.sample_sigma_max (0: σ_max) down to σ_min."""
        return sigmas_equiprobable(self.noise, n, self.cfg.diffusion.sample_sigma_max or None)

    def chain_logits(self, model, clean, positions, generator) -> torch.Tensor:
        """Logits (N, n, V) of the tokens at `positions` from the chained blocks, given clean tokens."""
        sigmas = self.inference_sigmas()
        E = model.target_table()
        N, n = clean.shape[0], len(positions)
        dev = clean.device

        def sig(s: float) -> torch.Tensor:
            return torch.full((N, n) if self.sigma_per == "token" else (N,), s, device=dev)

        def denoise(z, s: float, block: int) -> torch.Tensor:
            logits = self.denoise_logits(model, clean, z, positions, sig(s), self.layout.layers_of(block))
            return logits.float().softmax(-1) @ E.float()

        eps = torch.randn((N, n, E.shape[1]), generator=generator).to(dev)
        z = sample_chain(denoise, float(sigmas[0]) * eps, sigmas, self.partition)
        last = float(sigmas[-1])
        return self.denoise_logits(model, clean, z, positions, sig(last), self.layout.layers_of(self.partition.block_of(last)))

    def next_token_logits(self, model, seq, generator) -> torch.Tensor:
        """Logits (N, V) of the token after `seq` (N, i)."""
        if not self.cfg.is_dblocks:
            return model(seq[:, -model.cfg.seq_len:])[:, -1]
        return self.chain_logits(model, seq, torch.tensor([seq.shape[1]]), generator)[:, 0]

    def inference_layer_evals_per_token(self) -> int:
        """Transformer-layer evaluations to produce one token (the prefix is recomputed: no KV cache)."""
        if not self.cfg.is_dblocks:
            return self.layout.depth
        return sum(len(self.layout.layers_of(self.partition.block_of(float(s)))) for s in self.inference_sigmas())

    # ---- perplexities ---------------------------------------------------------------------------------------
    def ppl_windows(self, held: HeldOutText, n: int, device) -> torch.Tensor:
        """n windows of seq_len + 1 tokens of `held`, evenly spread; window k starts at k·seq_len."""
        ids = evenly_spaced(held.num_windows, n)
        return torch.from_numpy(strided_windows(held.tokens, self.window, self.seq_len, ids)).to(device)

    def nll_table(self, model, x: torch.Tensor, draws: int) -> torch.Tensor:
        """−ln q(w_p | w_<p) for p = 1…T of each window (N, T): exact for e2e; for dblocks the
        noise-averaged chained inference with `draws` draws seeded by (eval.seed, window batch)."""
        bs, out = self.cfg.eval.batch_size, []
        for s in range(0, len(x), bs):
            xb = x[s:s + bs]
            if not self.cfg.is_dblocks:
                out.append(M.token_nll(model(xb[:, :-1]), xb[:, 1:]).cpu())
                continue
            g = torch.Generator().manual_seed(self.cfg.eval.seed * 1_000_003 + s)
            pos = torch.arange(1, xb.shape[1])
            probs = torch.stack([self.chain_logits(model, xb[:, :-1], pos, g).float().softmax(-1).cpu()
                                 for _ in range(draws)])
            out.append(M.mixture_nll(probs, xb[:, 1:].cpu()))
        return torch.cat(out).double()

    # ---- evaluation --------------------------------------------------------------------------------------------
    def prompt_windows(self, held: HeldOutText, n: int) -> tuple[list[list[int]], list[list[int]]]:
        """Prompts and their real continuations: n windows of prompt_len + gen_len of `held`, evenly spaced."""
        e = self.cfg.eval
        L = e.prompt_len + e.gen_len
        w = strided_windows(held.tokens, L, L, evenly_spaced(num_windows(len(held.tokens), L), n))
        return [r[:e.prompt_len].tolist() for r in w], [r[e.prompt_len:].tolist() for r in w]

    def train_compute(self, steps: int) -> dict:
        """Training compute after `steps` optimizer steps: the trainer's layer count, replayed exactly
        (dblocks: the same block draws as the trainer's BlockSampler); overridden by the recurrent task."""
        if self.cfg.is_dblocks:
            from bench.blocks import BlockSampler
            if getattr(self, "_replay", None) is None or self._replay[0] > steps:
                self._replay = [0, 0, BlockSampler(self.layout.num_blocks,
                                                   seeding.stream_seed(self.cfg.train.seed, "block"))]
            done, evals, sampler = self._replay
            evals += sum(len(self.layout.layers_of(sampler.sample())) for _ in range(steps - done))
            self._replay = [steps, evals, sampler]
        else:
            evals = steps * self.layout.depth
        per_pass = 2 * self.seq_len if self.cfg.is_dblocks else self.seq_len   # [clean; noisy] vs the sequence
        return {"train_layer_evals": evals,
                "train_token_layer_evals": evals * per_pass * self.cfg.train.batch_size}

    def _steps_done(self, final: bool) -> int:
        if final:
            from bench.train import make_budget
            return make_budget(self.cfg, self.num_train).total_steps
        return self.step + 1  # evaluated during training, after the trainer's current step

    def perplexity(self, model, held: HeldOutText, n: int, device) -> tuple[float, float, int]:
        """(perplexity, bits per character, tokens scored) over n windows of `held`: exact (e2e) or
        denoising (dblocks)."""
        nll = self.nll_table(model, self.ppl_windows(held, n, device), self.cfg.eval.noise_draws)
        total, n_tok = float(nll.sum()), nll.numel()
        return M.perplexity(total, n_tok), M.bits_per_char(total, n_tok, held.chars_per_token), n_tok

    @torch.no_grad()
    def evaluate(self, model, device, final: bool = False, split: str = "val") -> dict:
        """Perplexity, and with scorers the sample figures under the shared decoding (final: every
        scorer's MAUVE, samples, and on test the decoding and inference variants), on `split`; keys
        named for it (`metric_on`), compute counts unprefixed."""
        held = self.split_data(split)

        def on(key: str) -> str:   # test_ppl → val_ppl, mauve@rnn → val_mauve@rnn on validation
            return metric_on(key, split)

        was_training = model.training
        model.eval()
        e = self.cfg.eval
        kind = "denoise" if self.cfg.is_dblocks else "test"
        ppl, bpc, n_tok = self.perplexity(model, held, e.ppl_sequences if final else e.curve_ppl_sequences, device)
        result = {on(f"{kind}_ppl"): ppl, on(f"{kind}_bpc"): bpc}
        # sampled continuations of prompts of this split, scored by every scorer
        if self.scorer_tags():
            gen = self.generation_metrics(model, device, final, held)
            result.update({on(k): v for k, v in gen["metrics"].items()})
        compute = self.train_compute(self._steps_done(final))
        result.update(compute)
        if final:
            tag = f"{e.noise_draws}draws" if self.cfg.is_dblocks else "exact"
            result.update({on(f"{kind}_ppl@{tag}"): ppl, on(f"{kind}_bpc@{tag}"): bpc,
                           on("ppl_tokens"): n_tok, on("chars_per_token"): held.chars_per_token,
                           "infer_layer_evals@per_token": self.inference_layer_evals_per_token(),
                           **{f"{k}@total": v for k, v in compute.items()}})
            if self.cfg.is_dblocks:
                result["inference_steps"] = len(self.inference_sigmas())
            if self.scorer_tags():
                result[on("samples_file")] = str(self.write_samples(gen, split))
                result.update({f"scorer_{t}": name for t, name in gen["scorers"].items()})
                result["decoding"] = self.decoding_note()
            # the variants are reported beside the published figures, never chosen among: test only
            # (validation keeps the ranking figures, which every selection reads)
            if split == "test":
                if self.scorer_tags():
                    result.update(self.decoding_variants(model, device, held, gen["metrics"]))
                result.update(self.final_variants(model, device, held))
            track.log_final(self.cfg.suite, self.cfg.arm, texts={"metric_definitions.md": METRIC_DEFINITIONS},
                            files=[result.get(on("samples_file"))])
        model.train(was_training)
        return result


METRIC_DEFINITIONS = M.METRIC_DEFINITIONS   # the table heading every LM comparison.md (bench/metrics/text.py)
