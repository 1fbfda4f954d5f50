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
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import atomic, seeding, track
from bench.config import ConfigError, EvalConfig, model_config
from bench.data.text import (PreparedText, TextDataConfig, TextSpec, check_prepared, num_windows, open_text,
                             prepared_dir, windows)
from bench.diffusion import c_noise, denoised, sample_chain, scale_input, sigmas_equiprobable, weighted_loss
from bench.metrics import text as M
from bench.splits import metric_on
from bench.tasks.base import Task
from bench.tasks.masked_lm import HeldOutText, check_split_sizes

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
def top_p_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability reaches top_p (nucleus
    sampling); the draw is made on the CPU so it is the same on any device."""
    probs = logits.float().softmax(-1).cpu()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p            # the first token is always kept
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def decode_tokens(logits: torch.Tensor, decoding: str, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row of logits (N, V): argmax (`greedy`) or nucleus sampling (`top_p`).
    A function of the logits and the generator only, so both arms decode alike."""
    if decoding == "greedy":
        return logits.argmax(-1).cpu()
    return top_p_sample(logits, top_p, generator)


def paper_decoding(is_dblocks: bool, db_decoding: str) -> str:
    """The paper's arm-specific decoding: e2e top-p; dblocks greedy (or top-p with db_decoding: sample)."""
    return "greedy" if is_dblocks and db_decoding == "greedy" else "top_p"


def generation_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(model noise, decoding draws) for one generation: two streams, so the decoding draws are the same
    for every arm however much noise its model consumes (common random numbers for the shared decoding)."""
    decode_seed = int(np.random.SeedSequence([seed, 0xDEC0DE]).generate_state(1, dtype=np.uint64)[0]) >> 1
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(decode_seed)


def scorer_tags(e: LMEvalConfig) -> list[str]:
    """The scorers eval configures, in ranking order: rnn (another family), ngram, ref (eval.reference)."""
    return [tag for tag, on in (("rnn", e.rnn_reference), ("ngram", e.ngram_order), ("ref", e.reference)) if on]


def feature_tags(e: LMEvalConfig) -> list[str]:
    """The scorers with hidden states, which give MAUVE features."""
    return [t for t in scorer_tags(e) if t != "ngram"]


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


class AutoregressiveTask(Task):
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

    def check_reference(self, data: PreparedText) -> None:
        """One line, before compute, if eval.reference is missing, not a causal LM, or another data's model."""
        path = Path(self.cfg.eval.reference)
        if not path.exists():
            raise ConfigError(f"eval.reference {path} not found: train the reference first (the suite's `reference` "
                              f"stage) or give a local Hugging Face causal-LM directory")
        if path.is_dir():
            M.check_hf_causal_lm(path)
            return
        try:
            ref = torch.load(path, map_location="cpu", weights_only=False)["config"]
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
            raise ConfigError(f"eval.reference {path} is not a bench final.pt nor a Hugging Face model directory "
                              f"({type(e).__name__})") from None
        if ref.get("task") != "autoregressive" or not str(ref.get("mode", "")).startswith("e2e") \
                or ref.get("model", {}).get("arch") != "llama":
            raise ConfigError(f"eval.reference {path} is not a causal LM: it is a {ref.get('task')}/{ref.get('mode')} "
                              f"run of {ref.get('model', {}).get('arch')}; give an e2e autoregressive llama run")
        self.check_same_data("eval.reference", path, ref["data"])
        if ref["model"]["seq_len"] < self.cfg.eval.prompt_len + self.cfg.eval.gen_len:
            raise ConfigError(f"eval.reference {path} has a context of {ref['model']['seq_len']} tokens, shorter than "
                              f"prompt + continuation ({self.cfg.eval.prompt_len + self.cfg.eval.gen_len})")

    def check_rnn_reference(self) -> None:
        """One line, before compute, if eval.rnn_reference is missing, not an RNN reference, or another data's."""
        from bench.models.rnn_lm import CHECKPOINT_KIND
        path = Path(self.cfg.eval.rnn_reference)
        if not path.is_file():
            raise ConfigError(f"eval.rnn_reference {path} not found: train it first (the suite's `rnn_reference` "
                              f"stage: python -m bench.models.rnn_lm PARAMS)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
            raise ConfigError(f"eval.rnn_reference {path} is not a checkpoint ({type(e).__name__})") from None
        if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
            raise ConfigError(f"eval.rnn_reference {path} is not an RNN reference of python -m bench.models.rnn_lm")
        self.check_same_data("eval.rnn_reference", path, ckpt["config"]["data"])

    def check_same_data(self, what: str, path: Path, ref_data: dict) -> None:
        """A scorer must have been trained on this suite's prepared data (same recipe and root)."""
        ours, theirs = self.spec.recipe(), TextSpec.from_data_config(TextDataConfig(**ref_data)).recipe()
        if ours != theirs or ref_data["root"] != self.cfg.data.root:
            diff = sorted(k for k in ours if ours[k] != theirs.get(k)) or ["data.root"]
            raise ConfigError(f"{what} {path} was trained on other data ({', '.join(diff)} differ); "
                              f"retrain it on this suite's data section")

    def _num_train(self, data) -> int:
        n = num_windows(data.meta["splits"]["train"]["tokens"], self.window, self.cfg.data.random_offset)
        return min(n, self.cfg.data.train_subset) if self.cfg.data.train_subset else n

    def load(self) -> None:
        self.data = open_text(self.spec, self.cfg.data.root)
        self.train_tokens = self.data.tokens("train")
        self.num_train = self._num_train(self.data)
        self.val_data = self._held_out("val", self.cfg.data.val_subset)

    def load_test(self) -> HeldOutText:
        return self._held_out("test", self.cfg.data.test_subset)

    def _held_out(self, split: str, subset: int) -> HeldOutText:
        if not hasattr(self, "data"):
            self.data = open_text(self.spec, self.cfg.data.root)
        # scored windows overlap by one token so that every token after the first is predicted once
        return HeldOutText.of(self.data, split, subset, lambda n: max(0, n - 1) // self.seq_len)

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
            more = self.partition.sample_training_sigma(self.block_of_layers(layers), N * (T - 1), generator)
            sigma = torch.cat([sigma[:, None], more.view(N, T - 1)], dim=1)
        sigma = sigma.to(x.device, torch.float32)
        y = model.clean_embed(target)
        eps = torch.randn(y.shape, generator=generator).to(y.device)   # CPU generator: same draws on any device
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

    def resolve_decoding(self, name: str | None = None) -> str:
        """top_p | greedy: `name` (default eval.decoding, the ranking decoding); `paper` is this arm's own."""
        name = name or self.cfg.eval.decoding
        return paper_decoding(self.cfg.is_dblocks, self.cfg.eval.db_decoding) if name == "paper" else name

    def decode(self, logits, generator, decoding: str | None = None) -> torch.Tensor:
        return decode_tokens(logits, self.resolve_decoding(decoding), self.cfg.eval.top_p, generator)

    @torch.no_grad()
    def generate(self, model, prompts: torch.Tensor, n_new: int, generator, decoding: str | None = None,
                 sampler: torch.Generator | None = None) -> torch.Tensor:
        """Continuations (N, n_new) of the prompts (N, P), one token at a time: the model's noise from
        `generator`, the decoding draws from `sampler` (default: the same generator)."""
        seq = prompts
        for _ in range(n_new):
            nxt = self.decode(self.next_token_logits(model, seq, generator), sampler or generator, decoding)
            seq = torch.cat([seq, nxt.to(seq.device)[:, None]], dim=1)
        return seq[:, prompts.shape[1]:]

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
    def scorer_tags(self) -> list[str]:
        return scorer_tags(self.cfg.eval)

    def scorers(self, device) -> dict[str, M.ReferenceLM]:
        """{tag: scorer} of every scorer eval configures, built once (the n-gram LM fit once per data content)."""
        for tag in self.scorer_tags():
            if tag not in self._scorers:
                self._scorers[tag] = self._make_scorer(tag, device)
        return {t: self._scorers[t] for t in self.scorer_tags()}

    def _make_scorer(self, tag: str, device) -> M.ReferenceLM:
        e = self.cfg.eval
        if tag == "ngram":
            from bench.metrics import ngram
            train = self.data.tokens("train")
            train = np.asarray(train[:e.ngram_train_tokens] if e.ngram_train_tokens else train)
            return M.NGramReferenceLM(ngram.fitted(train, self.data.vocab_size, e.ngram_order))
        if tag == "rnn":
            return M.RNNReferenceLM(e.rnn_reference, device, e.batch_size)
        path = Path(e.reference)
        if path.is_dir():
            return M.HFReferenceLM(path, self.data.tokenizer.decode, device)
        return M.BenchReferenceLM(path, device, e.batch_size)

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
        scorer's MAUVE, samples, the decoding and inference variants), on `split`; keys named for it
        (`metric_on`), compute counts unprefixed."""
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
                variants = self.decoding_variants(model, device, held, gen["metrics"])
                result.update({on(k): v for k, v in variants.items()})
            result.update({on(k): v for k, v in self.final_variants(model, device, held).items()})
            track.log_final(self.cfg.suite, self.cfg.arm, texts={"metric_definitions.md": METRIC_DEFINITIONS},
                            files=[result.get(on("samples_file"))])
        model.train(was_training)
        return result

    def decoding_variants(self, model, device, held: HeldOutText, main: dict) -> dict:
        """The final sample figures under each of eval.decoding_variants but eval.decoding, keyed as
        variants (`mauve@rnn,greedy`): the same prompts and number of continuations as the ranking
        figures, so each is comparable with them; a decoding equal to one already run is copied
        (e2e's `paper` decoding is top-p)."""
        e = self.cfg.eval
        done, out = {self.resolve_decoding(): main}, {}
        for name in e.decoding_variants:
            if name == e.decoding:
                continue
            decoding = self.resolve_decoding(name)
            if decoding not in done:
                done[decoding] = self.generation_metrics(model, device, True, held, decoding=decoding)["metrics"]
            out.update(M.as_variant(done[decoding], name))
        return out

    def final_variants(self, model, device, held: HeldOutText) -> dict:
        """Other inference settings of the final evaluation, keyed as on test (the caller renames
        them for the split).  DiffusionBlocks AR: the same prompts (one continuation each, the
        shared decoding) sampled with 2B and 4B denoiser calls per token, to show how the step count
        trades the sample figures against diversity.  The recurrent task overrides this with its recurrences."""
        if not self.cfg.is_dblocks or not self.scorer_tags():
            return {}
        d, out = self.cfg.diffusion, {}
        main = d.inference_steps
        try:
            for steps in (2 * self.partition.num_blocks, 4 * self.partition.num_blocks):
                d.inference_steps = steps
                m = self.generation_metrics(model, device, True, held, continuations=1)["metrics"]
                out.update(M.as_variant(m, f"{steps}steps"))
        finally:
            d.inference_steps = main
        return out

    def generation_metrics(self, model, device, final: bool, held: HeldOutText, continuations: int = 0,
                           decoding: str | None = None) -> dict:
        """Sample continuations of prompts of `held` with `decoding` (default eval.decoding, the same for
        both arms) and score them under every scorer (M.generation_figures): gen_ppl and distinct-4,
        and MAUVE under the ranking scorer; final: also every scorer's MAUVE and the real text's
        figures.  continuations: per prompt (0: eval.continuations when final, else 1)."""
        e = self.cfg.eval
        n_prompts, n_cont = (e.prompts, e.continuations) if final else (e.curve_prompts, 1)
        n_cont = continuations or n_cont
        prompts, real = self.prompt_windows(held, n_prompts)
        noise, sampler = generation_generators(e.seed)
        P = torch.tensor(prompts, device=device)
        conts = []
        for _ in range(n_cont):
            for s in range(0, len(P), e.batch_size):
                conts += self.generate(model, P[s:s + e.batch_size], e.gen_len, noise, decoding, sampler).cpu().tolist()
        gen_prompts = [p for _ in range(n_cont) for p in prompts]
        scorers = self.scorers(device)
        if final:
            mauve_tags = feature_tags(e) if e.mauve else []
        else:   # the learning curve: the ranking MAUVE only (what the curve and the sweeps read)
            mauve_tags = [self.metric.split("@")[1]] if self.metric.startswith("mauve@") else []
        metrics = M.generation_figures(scorers, prompts, real, gen_prompts, conts, with_data=final,
                                       mauve_tags=mauve_tags, mauve_buckets=e.mauve_buckets if final else 0,
                                       mauve_scaling=e.mauve_scaling, mauve_features=e.mauve_features, seed=e.seed)
        if final:
            metrics.update({"gen_samples": len(conts), "gen_prompts": n_prompts, "gen_len": e.gen_len})
        return {"metrics": metrics, "prompts": gen_prompts, "conts": conts, "real": real * n_cont,
                "scorers": {t: ref.name for t, ref in scorers.items()}}

    def decoding_note(self, decoding: str | None = None) -> str:
        e = self.cfg.eval
        decoding = self.resolve_decoding(decoding)
        dec = "greedy (argmax)" if decoding == "greedy" else f"top-p {e.top_p}"
        if self.cfg.is_dblocks:
            return (f"{len(self.inference_sigmas())} denoiser calls per token on the equal-probability σ grid "
                    f"(B = {self.partition.num_blocks}), {dec} decoding of the final logits")
        return f"{dec} decoding"

    def write_samples(self, gen: dict, split: str) -> Path:
        """The first eval.samples_shown continuations: test → <samples_dir>/<suite>/samples_<arm>.md (the
        published file) and samples.md in the run; val → samples_val.md in the run only."""
        e, tok = self.cfg.eval, self.data.tokenizer
        md = [f"# {self.cfg.suite}/{self.cfg.arm}: sampled continuations\n",
              f"{len(gen['conts'])} continuations of {e.gen_len} {tok.kind} tokens after {e.prompt_len}-token prompts "
              f"from the {split} split ({self.decoding_note()}), seed {e.seed}; the first {e.samples_shown} are shown "
              f"with the real continuation.  Scored by: {'; '.join(f'`{t}` {n}' for t, n in gen['scorers'].items())}.  "
              f"Written by `bench evaluate`.\n"]
        for i in range(min(e.samples_shown, len(gen["conts"]))):
            md += [f"## Sample {i + 1}\n", "Prompt:\n", "```text", tok.decode(gen["prompts"][i]), "```",
                   "Generated:\n", "```text", tok.decode(gen["conts"][i]), "```",
                   "Real continuation:\n", "```text", tok.decode(gen["real"][i]), "```\n"]
        text = "\n".join(md)
        if split != "test":
            return atomic.write_text(Path(self.cfg.out_dir) / f"samples_{split}.md", text)
        atomic.write_text(Path(self.cfg.out_dir) / "samples.md", text)
        return atomic.write_text(Path(e.samples_dir) / self.cfg.suite / f"samples_{self.cfg.arm}.md", text)


METRIC_DEFINITIONS = M.METRIC_DEFINITIONS   # the table heading every LM comparison.md (bench/metrics/text.py)


# ---- the suite report ------------------------------------------------------------------------------------------
# the test-split figures of the final variants (the val_ ones are for selections, not the table)
TEST_VARIANT = re.compile(r"(?P<figure>(?:gen_ppl|distinct4|mauve|test_ppl|test_bpc|denoise_ppl|denoise_bpc)"
                          r"(?:@[a-z]+)?)[@,](?P<variant>\d+steps|K\d+|greedy|top_p|paper)")
PPL_KEYS = ("test_ppl", "test_bpc", "denoise_ppl", "denoise_bpc")
COMPUTE_KEYS = ("train_layer_evals", "train_backward_layer_evals", "train_token_layer_evals",
                "infer_layer_evals@per_token", "inference_recurrence")


def lm_columns(metric: str, e: LMEvalConfig) -> list[str]:
    """The main table: the ranking metric, each scorer's MAUVE and gen_ppl of samples and of the real text,
    distinct-4, the arms' own perplexities and the compute counts."""
    tags = scorer_tags(e)
    cols = [metric, *(f"mauve@{t}" for t in feature_tags(e)), *(f"gen_ppl@{t}" for t in tags),
            *(f"gen_ppl@data,{t}" for t in tags), "distinct4@gen", "distinct4@data", *PPL_KEYS, *COMPUTE_KEYS]
    return list(dict.fromkeys(cols))


def variant_rows(rows: list[dict]) -> list[dict]:
    """One row per (arm, variant) holding the figures of the arm's variant keys (`mauve@rnn,greedy` →
    variant greedy, column mauve@rnn)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        for k, v in r.items():
            m = TEST_VARIANT.fullmatch(k)
            if m:
                out.setdefault((r["arm"], m["variant"]), {})[m["figure"]] = v
    return [{"arm": arm, "variant": variant, **figs} for (arm, variant), figs in out.items()]


def report(params_path, log=print) -> Path:
    """`bench lm-report`: `bench compare`'s comparison.md (every metric as a column) headed by the scorers,
    the language-model figures per arm under the shared decoding, their variants, the metric definitions,
    the checks and the samples; plus quality_vs_compute.png (the curve metrics against the *counted*
    training layer evaluations, which for the recurrent e2e arm include every unrolled iteration)."""
    import pandas as pd

    from bench.config import arm_names, load_config, read_params
    from bench.report import _markdown_table, compare

    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(raw.get("results_dir") or "results") / suite
    rows, curves = [], {}
    for arm in arm_names(params_path):
        cfg = load_config(params_path, arm)
        ev_path = Path(cfg.out_dir) / "eval.json"
        if not ev_path.exists():
            raise FileNotFoundError(f"{ev_path} not found: run `bench evaluate {params_path} --arm {arm}` first")
        ev = json.loads(ev_path.read_text())
        curves[arm] = pd.read_csv(Path(cfg.out_dir) / "history.csv")
        rows.append({"arm": arm, "mode": cfg.mode, **ev, "_cfg": cfg})
    first = rows[0]["_cfg"]
    e = first.eval
    metric = rows[0].get("metric") or ranking_metric(e, first.is_dblocks)
    table = pd.DataFrame([{"arm": r["arm"], "mode": r["mode"], **{c: r.get(c, float("nan"))
                                                                  for c in lm_columns(metric, e)}}
                          for r in rows]).dropna(axis=1, how="all")
    variants = pd.DataFrame(variant_rows(rows))
    notes = [f"**Scale.** {first.data.dataset}, {first.data.tokenizer} tokens, context {first.data.seq_len}; "
             f"these are numbers of this corpus and model size only (not LM1B/OWT numbers).  {e.prompts} test prompts "
             f"× {e.continuations} continuations of {e.gen_len} tokens after {e.prompt_len}-token prompts (MAUVE: "
             f"{rows[0].get('mauve_n_real', '–')} real vs {rows[0].get('mauve_n_gen', '–')} generated texts, "
             f"{rows[0].get('mauve_buckets', '–')} buckets, scaling {e.mauve_scaling}).\n",
             f"**Ranking.** `{metric}` ({'higher' if metric.startswith('mauve') else 'lower'} is better), with both "
             f"arms decoded the same way (`eval.decoding`: {e.decoding}"
             f"{f', p = {e.top_p}' if e.decoding == 'top_p' else ''}).\n",
             "**Scorers.**\n", *_scorer_lines(rows[0], e), "",
             "## Language-model figures\n", "Test split (validation figures, `val_*`, are in each eval.json).\n",
             _markdown_table(table), ""]
    if len(variants):
        notes += ["## Variants\n", "The same figures under the other decodings (`greedy`, `top_p`; `paper`: the "
                  "paper's arm-specific decoding, e2e top-p vs DiffusionBlocks greedy) and inference settings "
                  "(`Nsteps`, `KN`).\n",
                  _markdown_table(variants), ""]
    notes += ["## Metric definitions\n", METRIC_DEFINITIONS]
    e2e = [r for r in rows if r["mode"].startswith("e2e")]
    db = [r for r in rows if r["mode"].startswith("dblocks")]
    if e2e and db:
        lines = ["## Checks\n"]
        for b in db:
            lines += _checks(e2e[0], b, metric, scorer_tags(e))
        notes += lines + [""]
    notes += ["## Samples\n", *[f"- `{r['arm']}`: [samples_{r['arm']}.md](samples_{r['arm']}.md)" for r in rows
                                 if r.get("samples_file")], "",
              "Quality against counted training compute: ![quality vs compute](quality_vs_compute.png)\n",
              "The table below and `learning_curve.png` come from `bench compare`; its `layer_evals` and "
              "`epochs_equiv` count forward layer passes (for the recurrent e2e arm every unrolled iteration, as "
              "`train_layer_evals` above).\n"]
    md = compare(params_path, notes="\n".join(notes))
    keys = [metric, *(f"gen_ppl@{t}" for t in scorer_tags(e)), "test_ppl", "denoise_ppl"]
    _plot_quality(curves, out / "quality_vs_compute.png", suite, list(dict.fromkeys(keys)))
    log(f"{suite}: wrote {out / 'quality_vs_compute.png'}")
    return md


def _scorer_lines(row: dict, e: LMEvalConfig) -> list[str]:
    """One line per scorer: what it is (as the evaluation recorded it)."""
    lines = []
    for tag in scorer_tags(e):
        name = row.get(f"scorer_{tag}", {"ngram": f"Kneser–Ney {e.ngram_order}-gram", "rnn": e.rnn_reference,
                                         "ref": e.reference}[tag])
        if tag == "ref":
            ref_eval = Path(e.reference).parent / "eval.json"
            if ref_eval.is_file():
                r = json.loads(ref_eval.read_text())
                name += f"; its own exact test perplexity {r['test_ppl']:.4g}, {r['test_bpc']:.4g} bits per character"
            name += "; the e2e arm's family: shown for continuity, not ranked"
        lines.append(f"- `{tag}`: {name}")
    return lines


def _checks(a: dict, b: dict, metric: str, tags: list[str]) -> list[str]:
    """The ranking metric, each scorer's gen-ppl ratio (target: within 15%) and MAUVE, and the compute
    ratios of arm b against e2e arm a."""
    nan = float("nan")
    lines = []
    if metric in a and metric in b:
        lines.append(f"- `{metric}` {b['arm']} {b[metric]:.4g} vs {a['arm']} {a[metric]:.4g}, the same decoding: "
                     f"{a['arm']} {a.get('decoding') or _decoding(a['_cfg'])}; {b['arm']} "
                     f"{b.get('decoding') or _decoding(b['_cfg'])}.")
    for t in tags:
        k = f"gen_ppl@{t}"
        if k in a and k in b:
            ratio = b[k] / a[k]
            lines.append(f"- {k} {b['arm']} / {a['arm']} = {b[k]:.4g} / {a[k]:.4g} = {ratio:.3f} "
                         f"({'within' if abs(ratio - 1) <= 0.15 else 'NOT within'} 15%); real continuations: "
                         f"{a.get(f'gen_ppl@data,{t}', nan):.4g}"
                         + (f"; mauve@{t} {b.get(f'mauve@{t}', nan):.3g} vs {a.get(f'mauve@{t}', nan):.3g}"
                            if f"mauve@{t}" in a else "") + ".")
    if "distinct4@gen" in a and "distinct4@gen" in b:
        lines.append(f"- distinct-4 {b['arm']} {b['distinct4@gen']:.3g} vs {a['arm']} {a['distinct4@gen']:.3g} "
                     f"(real continuations {a.get('distinct4@data', nan):.3g}).")
    lines.append(f"- training layer evaluations {a['arm']} / {b['arm']} = {a['train_layer_evals']:,} / "
                 f"{b['train_layer_evals']:,} = {a['train_layer_evals'] / b['train_layer_evals']:.2f}× "
                 f"(token-layer evaluations: {a['train_token_layer_evals'] / b['train_token_layer_evals']:.2f}×"
                 + (f"; back-propagated layer evaluations: "
                    f"{a['train_backward_layer_evals'] / b['train_backward_layer_evals']:.2f}×"
                    if "train_backward_layer_evals" in a else "") + ").")
    lines.append(f"- inference layer evaluations per token: {a['arm']} {a['infer_layer_evals@per_token']}, "
                 f"{b['arm']} {b['infer_layer_evals@per_token']}.")
    return lines


def _decoding(cfg) -> str:
    from bench.tasks import make_task
    return make_task(cfg).decoding_note()


def _plot_quality(curves: dict, path: Path, suite: str, candidates: list[str]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in candidates if any(k in df for df in curves.values())]
    if not keys:   # no test points on the curve (trained while the test split was sealed)
        return path
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, df in curves.items():
            if key in df and "train_layer_evals" in df:
                ax.plot(df["train_layer_evals"], df[key], marker="o", label=arm)
        ax.set_xlabel("training layer evaluations (counted, all unrolled iterations)")
        ax.set_ylabel(key + (" (higher is better)" if key.startswith("mauve") else ""))
        ax.set_yscale("linear" if key.startswith("mauve") else "log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{suite}: quality vs training compute", fontsize=10)
    fig.tight_layout()
    atomic.save_figure(path, fig, dpi=110)
    return path
