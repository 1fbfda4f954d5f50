"""Generating and scoring continuations for the language-model tasks (bench/tasks/autoregressive.py, whose
docstring defines the decodings and metrics; bench/tasks/recurrent.py subclasses its task).

The decodings (`decode_tokens`: top-p or greedy, their draws on a stream of their own, `generation_generators`),
the scorers of sampled continuations (`scorer_tags`: rnn, ngram, ref), and `LMGeneration`, the part of
AutoregressiveTask that checks and builds the scorers, samples continuations of held-out prompts, scores them
(`generation_metrics`, the decoding and inference variants) and writes the samples file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench import atomic
from bench.config import ConfigError
from bench.data.text import PreparedText, TextDataConfig, TextSpec
from bench.metrics import text as M
from bench.tasks.text_base import HeldOutText

if TYPE_CHECKING:
    from bench.tasks.autoregressive import LMEvalConfig


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


class LMGeneration:
    """The sampling and scoring methods of AutoregressiveTask (a mixin; RecurrentTask overrides some).  They use
    the task's cfg, spec, data, metric, _scorers, partition, inference_sigmas, next_token_logits and
    prompt_windows."""

    # ---- scorers ---------------------------------------------------------------------------------------------
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

    # ---- decoding --------------------------------------------------------------------------------------------
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

    # ---- sample figures --------------------------------------------------------------------------------------
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
        """Other inference settings of the final evaluation, on test only (reported beside the
        published figures, never chosen among).  DiffusionBlocks AR: the same prompts (one continuation each, the
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
        """The first eval.samples_shown continuations: test → samples.md in the run and the published
        <samples_dir>/<suite>/samples_<arm>.md (TextTask.publish_samples); val → samples_val.md in the run only."""
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
        return self.publish_samples(text)
