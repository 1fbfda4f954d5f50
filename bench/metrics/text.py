"""Language-model metrics: perplexity, BPC, generative perplexity and MAUVE under named scorers, distinct-n.

Definitions (also in the README and in each suite's comparison.md):

  perplexity      exp(mean over predicted tokens of −ln q(x_i | x_<i)), nats → ppl.  For an ordinary
                  (end-to-end) LM, q is its own softmax and this is the exact test perplexity.  For a
                  DiffusionBlocks model q is a noise-averaged denoiser output (`mixture_nll`): a
                  "denoising perplexity", not a likelihood.
  BPC             the same mean in bits, divided by the characters per token of the split
                  (bits per character; equal to bits per token for a character-level tokenizer).
  generative ppl  `gen_ppl@<scorer>` = exp(mean −ln p_s(c_j | prompt, c_<j)) over the tokens c_j of
                  sampled continuations, under a fixed *scorer* LM p_s, in the scorer's tokens; and
                  `gen_ppl@data,<scorer>` the same for the real continuations of the same prompts.
                  Low is not always good: repetitive text scores low; read it next to MAUVE and
                  distinct-n.  The scorers (every key names its scorer):
                    ngram  an interpolated Kneser–Ney n-gram LM of the train split (bench.metrics.ngram):
                           shares nothing with either arm; exact, normalised probabilities
                    rnn    a GRU/LSTM LM trained on the train split (bench.models.rnn_lm): another family
                           and recipe than both arms
                    ref    eval.reference: an e2e run of this harness (by default the e2e arm's own
                           family and recipe trained longer, so e2e samples are in distribution for
                           it; kept for continuity, never ranked) or a local Hugging Face causal LM
  MAUVE           `mauve@<scorer>`: `mauve.compute_mauve` (the mauve-text package) between the scorer's
                  features of the real continuations (P) and of the sampled ones (Q), each text being
                  prompt + continuation; a feature is the scorer's final hidden state averaged over the
                  continuation's positions (`mean`) or taken at its last token (`last`, MAUVE's own
                  convention with GPT-2).  Only scorers with hidden states give it (rnn, ref; not
                  ngram).  k-means with k = max(2, ⌊min(n_P, n_Q)/10⌋) buckets unless given; at least
                  10 texts per bucket per side are required.  Higher is better (1: indistinguishable).
  distinct-n      `distinct4@gen` / `distinct4@data`: unique 4-grams / all 4-grams of the sampled / real
                  continuations.
  variants        `<key>,<variant>` (or `<key>@<variant>` for a key without a scorer): the same figure
                  under another decoding (`greedy`, `top_p`, `paper`) or inference setting (`8steps`, `K16`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import ConfigError

MAUVE_PER_BUCKET = 10     # texts per k-means bucket per side, MAUVE's own heuristic (k = n/10)


# ---- perplexity ----------------------------------------------------------------------------------
def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(Σ −ln q / n)."""
    return math.exp(nll_sum / n_tokens)


def bits_per_char(nll_sum: float, n_tokens: int, chars_per_token: float) -> float:
    """Σ −ln q / n in bits per token, over the characters per token."""
    return nll_sum / n_tokens / math.log(2) / chars_per_token


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−ln softmax(logits)[target] per position, float32 softmax."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def mixture_nll(prob_draws: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−ln of the noise-averaged predictive probability: prob_draws (K, N, T, V) → (N, T).
    (1/K)Σ_k softmax_k is a proper distribution, so its perplexity is well defined; it is the
    perplexity of that average, not of the distribution a greedy sampler draws from."""
    p = prob_draws.mean(0).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -p.clamp_min(1e-30).log()


def distinct_ngrams(sequences: list[list[int]], n: int = 4) -> float:
    """Unique n-grams / all n-grams over the continuations (1.0: nothing repeats)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


# ---- MAUVE ---------------------------------------------------------------------------------------------
def mauve_buckets(n_p: int, n_q: int, buckets: int = 0) -> int:
    """k-means buckets: `buckets`, or max(2, ⌊min(n_P, n_Q)/10⌋) (rounded down, so that every count of at
    least 20 texts per side satisfies `check_mauve_counts`)."""
    return buckets or max(2, min(n_p, n_q) // MAUVE_PER_BUCKET)


def check_mauve_counts(n_p: int, n_q: int, buckets: int = 0) -> None:
    """One-line ConfigError when there are too few texts for MAUVE's clustering."""
    k = mauve_buckets(n_p, n_q, buckets)
    need = MAUVE_PER_BUCKET * k
    if min(n_p, n_q) < need:
        raise ConfigError(f"MAUVE with {k} k-means buckets needs at least {need} texts per side "
                          f"({MAUVE_PER_BUCKET} per bucket), got {n_p} real and {n_q} generated; raise "
                          f"eval.prompts / eval.continuations, lower eval.mauve_buckets, or set eval.mauve: false")


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, scaling: float = 5.0, buckets: int = 0,
                seed: int = 25) -> dict:
    """MAUVE (mauve-text) between feature sets P (real) and Q (generated); counts recorded."""
    check_mauve_counts(len(p_features), len(q_features), buckets)
    try:
        import mauve
    except ImportError:
        raise ConfigError("MAUVE needs the mauve-text package: pip install mauve-text") from None
    import faiss
    k = mauve_buckets(len(p_features), len(q_features), buckets)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)    # k-means on a few thousand points: threads only contend on a shared CPU
    from threadpoolctl import threadpool_limits   # (a scikit-learn dependency) the same for BLAS in the PCA
    try:
        with threadpool_limits(1):
            out = mauve.compute_mauve(p_features=np.asarray(p_features, dtype=np.float32),
                                      q_features=np.asarray(q_features, dtype=np.float32), num_buckets=k,
                                      mauve_scaling_factor=scaling, seed=seed, verbose=False)
    finally:
        faiss.omp_set_num_threads(threads)
    return {"mauve": float(out.mauve), "mauve_buckets": int(k), "mauve_n_real": len(p_features),
            "mauve_n_gen": len(q_features)}


# The table heading every language-model comparison.md (and each arm's MLflow run): what each key is.
METRIC_DEFINITIONS = """\
| metric | arm | definition |
|---|---|---|
| `test_ppl`, `test_bpc` | e2e | exact test perplexity exp(mean −ln p(w_p given w_<p)) of the end-to-end LM over every test token after the first of each window (windows of data.seq_len + 1 tokens overlapping by one), and the same in bits per character |
| `denoise_ppl`, `denoise_bpc` | dblocks | **denoising perplexity, not a likelihood bound**: each test token is predicted teacher-forced (true preceding tokens as clean context) by the chained DiffusionBlocks inference (z = σ_max·ε, Euler steps, one call per block), and q(token) = the average over `eval.noise_draws` fixed noise draws of softmax(final logits); exp of its mean −ln q.  It is the perplexity of that noise-averaged distribution, not of the distribution the sampler draws from |
| *scorers* | | every sample figure names the fixed LM that scores it: **`ngram`** an interpolated Kneser–Ney n-gram LM (order `eval.ngram_order`) of the train split's tokens, sharing nothing with either arm; **`rnn`** a GRU/LSTM LM trained on the train split (`eval.rnn_reference`, the suite's `rnn_reference` stage), another family and recipe than both arms; **`ref`** `eval.reference`, by default the e2e arm's own family and recipe trained longer (so e2e samples are in distribution for it: shown for continuity, never ranked) |
| *decoding* | both | the figures without a decoding variant decode **both arms the same way**, `eval.decoding` (top-p at `eval.top_p`, or greedy), with the decoding draws on one seeded stream shared by the arms |
| `mauve@rnn` (the ranking metric), `mauve@ref` | both | MAUVE (mauve-text) between the scorer's features of the real (P) and sampled (Q) prompt+continuation texts, higher is better (1: indistinguishable); feature = the scorer's final hidden state averaged over the continuation (`eval.mauve_features`); k-means buckets and counts in `mauve_buckets`, `mauve_n_real`, `mauve_n_gen`; scaling `eval.mauve_scaling`.  The n-gram scorer has no features, so no `mauve@ngram` |
| `gen_ppl@ngram`, `gen_ppl@rnn`, `gen_ppl@ref` | both | generative perplexity: exp(mean −ln p_s(c_j given prompt, c_<j)) over the tokens of sampled continuations, under scorer s, in its tokens; lower is not always better (repetitive text scores low: read it with `distinct4@gen` and MAUVE) |
| `gen_ppl@data,ngram`, `gen_ppl@data,rnn`, `gen_ppl@data,ref` | both | the same for the *real* continuations of the same prompts: what a perfect sampler would score under that scorer |
| `distinct4@gen`, `distinct4@data` | both | unique 4-grams / all 4-grams of the sampled and of the real continuations (1: no repetition) |
| `…,greedy`, `…,top_p`, `distinct4@gen,greedy` | both | the sample figures under another decoding (`eval.decoding_variants`), same prompts and continuation count |
| `…,paper` | both | the paper's arm-specific decoding (e2e top-p, dblocks `eval.db_decoding`, greedy): unequal decoding, a labelled variant only |
| `…,Nsteps` (e.g. `mauve@rnn,8steps`) | dblocks (AR) | the sample figures with N = 2B and 4B denoiser calls per token, one continuation per prompt, the shared decoding (the main figures use B calls, the paper's setting) |
| `test_ppl@KN`, `denoise_ppl@KN`, `gen_ppl@rnn,KN`, … | recurrent | the same at N inference iterations (`eval.recurrence_variants`; one continuation per prompt); the main figures use the arm's own K (`inference_recurrence`: e2e its training mean r̄) |
| `train_layer_evals` | both | transformer-layer forward passes per training batch, summed over training (recurrent e2e: every unrolled core iteration, with and without gradient) |
| `train_token_layer_evals` | both | the same × tokens per pass × batch size (the DiffusionBlocks AR layers see 2T tokens: clean and noisy) |
| `infer_layer_evals@per_token` | both | layer evaluations to generate one token (prefix recomputed, no KV cache) |

Splits: the names above are the **test** split's (what the tables publish; its prompts and windows).
Each also exists on the validation split, which every selection reads, as `metric_on` names it:
`test_ppl` → `val_ppl`, `mauve@rnn` → `val_mauve@rnn`, `gen_ppl@data,ngram` → `val_gen_ppl@data,ngram`.
The compute counts belong to no split.
"""


# ---- figures of sampled text under every scorer -------------------------------------------------------------------
def generation_figures(scorers: dict, prompts: list, real: list, gen_prompts: list, conts: list, *,
                       with_data: bool, mauve_tags: tuple = (), mauve_buckets: int = 0, mauve_scaling: float = 2.0,
                       mauve_features: str = "mean", seed: int = 25) -> dict:
    """Figures of the sampled continuations `conts` (of `gen_prompts`) beside the real continuations
    `real` of `prompts`, under every scorer {tag: ReferenceLM}: gen_ppl@<tag> and distinct4@gen; with
    with_data also gen_ppl@data,<tag> and distinct4@data; mauve@<tag> for each of mauve_tags (scorers
    with features), with the k-means counts once (mauve_buckets, mauve_n_real, mauve_n_gen)."""
    out = {"distinct4@gen": distinct_ngrams(conts)}
    for tag, ref in scorers.items():
        nll, cnt = ref.score(gen_prompts, conts)
        out[f"gen_ppl@{tag}"] = perplexity(float(nll.sum()), int(cnt.sum()))
        if with_data:
            nll, cnt = ref.score(prompts, real)
            out[f"gen_ppl@data,{tag}"] = perplexity(float(nll.sum()), int(cnt.sum()))
    if with_data:
        out["distinct4@data"] = distinct_ngrams(real)
    for tag in mauve_tags:
        ref = scorers[tag]
        mv = mauve_score(ref.features(prompts, real, mauve_features), ref.features(gen_prompts, conts, mauve_features),
                         mauve_scaling, mauve_buckets, seed=seed)
        out[f"mauve@{tag}"] = mv.pop("mauve")
        out.update(mv)
    return out


def variant_key(key: str, variant: str) -> str:
    """gen_ppl@rnn + greedy → gen_ppl@rnn,greedy; test_ppl + K16 → test_ppl@K16."""
    return f"{key},{variant}" if "@" in key else f"{key}@{variant}"


def as_variant(figures: dict, variant: str) -> dict:
    """The sample figures of `generation_figures` that depend on the sampler (not the real-text ones,
    nor the counts), keyed as a variant."""
    return {variant_key(k, variant): v for k, v in figures.items()
            if k.startswith(("gen_ppl@", "mauve@", "distinct4@gen")) and not k.startswith("gen_ppl@data")}


# ---- scorers: reference language models ------------------------------------------------------------------------
class ReferenceLM:
    """A fixed LM that scores continuations and (if it has hidden states) gives MAUVE features.

    Both methods take the prompts and continuations as token ids of the *data's* tokenizer; a
    reference with another tokenizer decodes them to text and re-tokenises.  `tag` names the scorer
    in every key it produces (`gen_ppl@<tag>`, `mauve@<tag>`)."""

    name = "reference"
    tag = "ref"
    tokens = "tokens"       # what the per-token figures count
    has_features = True

    def score(self, prompts: list[list[int]], conts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Σ −ln p_ref(continuation token | prompt, earlier continuation) and the token count, per text."""
        raise NotImplementedError

    def features(self, prompts: list[list[int]], conts: list[list[int]], pooling: str = "mean") -> np.ndarray:
        raise NotImplementedError


class TokenLM(ReferenceLM):
    """A causal LM module over the data's own tokens: model(x) → logits (N, T, V) and
    model.hidden_states(x) → (N, T, d), both causal (so right padding never reaches an earlier position)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, batch_size: int = 64):
        self.model, self.device, self.batch_size = model.to(device).eval(), device, batch_size

    def _batches(self, prompts, conts):
        for s in range(0, len(prompts), self.batch_size):
            P, C = prompts[s:s + self.batch_size], conts[s:s + self.batch_size]
            seqs = [list(p) + list(c) for p, c in zip(P, C)]
            L = max(map(len, seqs))
            x = torch.zeros(len(seqs), L, dtype=torch.long)
            for i, q in enumerate(seqs):
                x[i, :len(q)] = torch.tensor(q)   # right padding: causal, so it never affects earlier positions
            yield P, C, x.to(self.device)

    @torch.no_grad()
    def score(self, prompts, conts):
        nll, count = [], []
        for P, C, x in self._batches(prompts, conts):
            per = token_nll(self.model(x[:, :-1]), x[:, 1:]).cpu()
            for i, (p, c) in enumerate(zip(P, C)):
                nll.append(float(per[i, len(p) - 1:len(p) - 1 + len(c)].double().sum()))
                count.append(len(c))
        return np.array(nll), np.array(count)

    @torch.no_grad()
    def features(self, prompts, conts, pooling="mean"):
        out = []
        for P, C, x in self._batches(prompts, conts):
            h = self.model.hidden_states(x).float().cpu()
            for i, (p, c) in enumerate(zip(P, C)):
                span = h[i, len(p):len(p) + len(c)]
                out.append((span.mean(0) if pooling == "mean" else span[-1]).numpy())
        return np.stack(out)


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"


class BenchReferenceLM(TokenLM):
    """The final weights of an end-to-end `autoregressive` (llama) run of this harness (same tokenizer)."""

    tag = "ref"

    def __init__(self, path: str | Path, device: torch.device, batch_size: int = 64):
        from bench.models.llama import Llama, LlamaConfig
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        m = dict(ckpt["config"]["model"])
        m.pop("arch")
        m["vocab_size"] = ckpt["model"]["tok_embed.weight"].shape[0]   # 0 in the params: from the data
        model = Llama(LlamaConfig(**m), conditioned=False)
        model.load_state_dict(ckpt["model"])
        super().__init__(model, device, batch_size)
        self.name = f"{Path(path)} (e2e llama, {_millions(model)})"
        self.context = model.cfg.seq_len


class RNNReferenceLM(TokenLM):
    """The RNN reference of `python -m bench.models.rnn_lm`: another family, trained on the train split."""

    tag = "rnn"

    def __init__(self, path: str | Path, device: torch.device, batch_size: int = 64):
        from bench.models.rnn_lm import load_reference
        model, ckpt = load_reference(path, device)
        super().__init__(model, device, batch_size)
        c, ppl = model.cfg, ckpt.get("metrics", {}).get("val_ppl", float("nan"))
        self.name = (f"{Path(path)} ({c.depth}-layer {c.cell.upper()} LM, hidden {c.hidden}, {_millions(model)}, "
                     f"validation perplexity {ppl:.4g})")


class NGramReferenceLM(ReferenceLM):
    """The interpolated Kneser–Ney n-gram LM of the train split (bench.metrics.ngram); no hidden states."""

    tag = "ngram"
    has_features = False

    def __init__(self, lm):
        self.lm = lm
        self.name = f"interpolated Kneser–Ney {lm.order}-gram LM of the train split ({lm.train_tokens:,} tokens)"

    def score(self, prompts, conts):
        from bench.metrics.ngram import sequence_nll
        nll = [float(sequence_nll(self.lm, list(p) + list(c), start=len(p)).sum()) for p, c in zip(prompts, conts)]
        return np.array(nll), np.array([len(c) for c in conts])

    def features(self, prompts, conts, pooling="mean"):
        raise ValueError("the n-gram scorer has no hidden states: it gives no MAUVE features")


class HFReferenceLM(ReferenceLM):
    """A local Hugging Face causal LM directory (config.json + weights + tokenizer), loaded offline."""

    tokens = "reference-tokenizer tokens"

    def __init__(self, path: str | Path, decode, device: torch.device, batch_size: int = 8):
        transformers = _transformers()
        self.tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        self.model.to(device).eval()
        self.decode, self.device, self.batch_size = decode, device, batch_size
        self.name = f"{path} (Hugging Face {type(self.model).__name__})"

    def _ids(self, prompt, cont) -> tuple[list[int], list[int]]:
        p = self.tok.encode(self.decode(prompt), add_special_tokens=False)
        c = self.tok.encode(self.decode(cont), add_special_tokens=False)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + p, c

    @torch.no_grad()
    def _run(self, ids: list[int]):
        x = torch.tensor([ids], device=self.device)
        return self.model(x, output_hidden_states=True)

    def score(self, prompts, conts):
        nll, count = [], []
        for p, c in zip(prompts, conts):
            pi, ci = self._ids(p, c)
            out = self._run(pi + ci)
            per = token_nll(out.logits[:, :-1], torch.tensor([pi + ci], device=self.device)[:, 1:])[0]
            nll.append(float(per[len(pi) - 1:].double().sum()))
            count.append(len(ci))
        return np.array(nll), np.array(count)

    def features(self, prompts, conts, pooling="mean"):
        out = []
        for p, c in zip(prompts, conts):
            pi, ci = self._ids(p, c)
            h = self._run(pi + ci).hidden_states[-1][0, len(pi):].float().cpu()
            out.append((h.mean(0) if pooling == "mean" else h[-1]).numpy())
        return np.stack(out)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("a Hugging Face reference model needs the transformers package: "
                          "pip install 'bench[hf]' (or pip install transformers)") from None
    return transformers


def check_hf_causal_lm(path: str | Path) -> None:
    """One-line ConfigError unless `path` is a local Hugging Face causal-LM directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"eval.reference {path}: no Hugging Face model there (no config.json); give a local "
                          f"causal-LM directory or a bench final.pt")
    try:
        archs = json.loads(cfg_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ConfigError(f"eval.reference {path}: config.json is not valid JSON ({e})") from None
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not (any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
            or (not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        raise ConfigError(f"eval.reference {path} is not a causal LM (architectures: {', '.join(archs) or 'none'}, "
                          f"model_type {config.model_type!r}); give a *ForCausalLM model")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"eval.reference {path} has a config but no weights (*.safetensors or *.bin)")
