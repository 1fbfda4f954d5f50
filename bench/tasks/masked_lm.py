"""Masked-diffusion language modelling (MD4; paper §3.4, §5.3, App. D): BPC from the ELBO.

Training, one batch x (N, L) at noise levels t (N,) handed over by the trainer:
  z_t = x with each token masked with probability 1 − α(t)              (bench.diffusion.masking)
  loss = mean_n w(t_n)·Σ_{i masked} CE(f_θ(z_t, t)_i, x_i) / L            (Eq. 8: nats per token)
with w(t) = −α′/(1 − α) (1/t for the linear schedule).  `e2e` trains all layers with t ~ U(0, 1);
`dblocks` trains one block's layers with t ~ U(its range) (Eq. 13 up to the block's constant
width); the embedding, t embedder and output head are shared by every block.
diffusion.weighting: `lambda` = this ELBO weight (default); `uniform` = the plain mean CE over
masked tokens (not an ELBO; a lever).  The σ keys of `diffusion` (P_mean, sigma_*, …) do not apply.

Metric: BPC = the negative ELBO of each held-out sequence (Eq. 8, which is the whole ELBO here:
α(0) = 1 and α(1) = 0 leave no reconstruction or prior term), estimated by Monte Carlo with a fixed
number of t draws per sequence, in bits per *character* (bits per token ÷ characters per token).
Each draw of t is evaluated by the block that owns t (dblocks) or by all layers (e2e).  The draws
are seeded per (sequence, draw), so both arms and every curve point see the same t's and masks
(common random numbers: the difference between arms is less noisy than either number).  The
standard error is that of the Monte-Carlo estimate given the fixed held-out set (`mc_mean_stderr`).
Splits: validation is the text layer's recorded val split (data.val_subset: its first N windows),
scored as `val_bpc`, …; the test split (data.test_subset) is read only by `load_test`, through the
seal of bench.splits, and scored as `test_bpc`, ….
  curve points  eval.t_draws draws on eval.curve_sequences sequences of the split (cheap);
  final         eval.final_t_draws draws on every sequence of the split, the standard error and
                the BPC contributed by each block's t range; with the test split also eval.samples
                generated passages (MD4's ancestral sampler, eval.seed; unconditional, so they do not
                depend on a split), written to <eval.samples_dir>/<suite>/samples_<arm>.md and logged
                to the arm's MLflow run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import atomic, track
from bench.config import ConfigError, DiffusionConfig, EvalConfig, model_config
from bench.data.text import (PreparedText, TextDataConfig, TextSpec, check_prepared, num_windows,
                             prepared_dir, windows)
from bench.diffusion.masking import (MASKING_STRATEGIES, MaskingSchedule, make_masking_partition, mask_tokens,
                                     masked_ce_sum, mc_mean_stderr, md4_nelbo, sample_masked)
from bench.splits import metric_on
from bench.tasks.text_base import HeldOutText, TextTask, check_split_sizes

_EDM_ONLY = ("P_mean", "P_std", "sigma_min", "sigma_max", "sigma_data", "inference_steps", "sample_sigma_max")


@dataclass
class MaskedLMEvalConfig(EvalConfig):
    batch_size: int = 64
    t_draws: int = 2               # t draws per sequence at each learning-curve point (>= 2)
    curve_sequences: int = 64      # sequences at each curve point, spread evenly over the split (0: all)
    final_t_draws: int = 4         # t draws per sequence in the final evaluation (>= 2)
    samples: int = 3               # passages generated per arm in the final evaluation (0: none)
    sample_steps: int = 0          # ancestral sampling steps; 0: the sequence length
    samples_dir: str = "results"   # samples go to <samples_dir>/<suite>/samples_<arm>.md


class MaskedLMTask(TextTask):
    name = "masked_lm"
    metric = "test_bpc"
    higher_is_better = False
    e2e_denoiser = True
    data_config = TextDataConfig
    eval_config = MaskedLMEvalConfig

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.model.get("arch") != "mdm":
            raise ConfigError(f"task masked_lm needs model.arch mdm, got {cfg.model.get('arch')!r}")
        TextSpec.from_data_config(cfg.data).validate()
        m = model_config(cfg.model)
        MaskingSchedule(m.schedule)
        d, e = cfg.diffusion, cfg.eval
        if cfg.data.seq_len < 1 or cfg.data.seq_len > m.seq_len:
            raise ConfigError(f"data.seq_len {cfg.data.seq_len} must be between 1 and model.seq_len {m.seq_len}")
        if d.partition not in MASKING_STRATEGIES:
            raise ConfigError(f"masked_lm partitions t: diffusion.partition must be one of "
                              f"{', '.join(MASKING_STRATEGIES)}, got {d.partition!r}")
        if d.weighting not in ("lambda", "uniform"):
            raise ConfigError(f"masked_lm: diffusion.weighting is lambda (the MD4 ELBO weight) or uniform, "
                              f"got {d.weighting!r}")
        for key in _EDM_ONLY:
            if hasattr(DiffusionConfig, key) and getattr(d, key) != getattr(DiffusionConfig, key):
                raise ConfigError(f"masked_lm has no σ: diffusion.{key} does not apply (masking schedule: model.schedule)")
        if d.partition == "explicit":
            make_masking_partition(d.num_blocks, "explicit", d.gamma, MaskingSchedule(m.schedule), d.sigma_edges)
        if e.t_draws < 2 or e.final_t_draws < 2:
            raise ConfigError(f"eval.t_draws and eval.final_t_draws must be >= 2 (the standard error needs two draws), "
                              f"got {e.t_draws} and {e.final_t_draws}")
        if e.curve_sequences < 0 or e.samples < 0 or e.sample_steps < 0:
            raise ConfigError("eval.curve_sequences, eval.samples and eval.sample_steps must be >= 0")

    def __init__(self, cfg):
        m = model_config(cfg.model)
        self.schedule = MaskingSchedule(m.schedule)
        super().__init__(cfg)
        self.spec = TextSpec.from_data_config(cfg.data)
        self.seq_len = cfg.data.seq_len

    def make_partition(self, num_blocks: int, gamma: float):
        """The t partition (bench.diffusion.masking) in place of the σ partition."""
        d = self.cfg.diffusion
        strategy = d.partition if num_blocks == d.num_blocks else "equiprobable"
        edges = d.sigma_edges if strategy == "explicit" else None
        return make_masking_partition(num_blocks, strategy, gamma, self.schedule, edges)

    # ---- data and model ---------------------------------------------------------------------
    def check(self) -> None:
        data = PreparedText(check_prepared(self.spec, self.cfg.data.root))
        m = model_config(self.cfg.model)
        if m.vocab_size and m.vocab_size != data.vocab_size:
            raise ConfigError(f"model.vocab_size {m.vocab_size} differs from the prepared data's {data.vocab_size} "
                              f"({data.dir}); set model.vocab_size: 0 to take it from the data")
        L, bs = self.seq_len, self.cfg.train.batch_size
        check_split_sizes(data, L, self.cfg.data.random_offset, f"data.seq_len {L}")
        n_train = self._num_train(data)
        if n_train < bs:
            raise ConfigError(f"train.batch_size {bs} is larger than the {n_train} training sequences of length {L}")

    @property
    def train_window(self) -> int:
        return self.seq_len

    def scored_windows(self, n_tokens: int) -> int:
        return num_windows(n_tokens, self.seq_len)

    @property
    def vocab_size(self) -> int:
        """The data's vocabulary (model.vocab_size 0), from the loaded or prepared data."""
        if hasattr(self, "data"):
            return self.data.vocab_size
        m = model_config(self.cfg.model)
        if m.vocab_size:
            return m.vocab_size
        meta = prepared_dir(self.spec, self.cfg.data.root) / "meta.json"
        if not meta.is_file():
            raise ConfigError(f"model.vocab_size is 0 (from the data) but {meta.parent} is not prepared; "
                              f"prepare it or set model.vocab_size")
        return int(json.loads(meta.read_text())["vocab_size"])

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def build_model(self):
        from bench.models import ARCHS
        cfg_cls, model_cls = ARCHS["mdm"]
        fields = {k: v for k, v in self.cfg.model.items() if k != "arch"}
        return model_cls(cfg_cls(**{**fields, "vocab_size": self.vocab_size}), conditioned=True)

    def example_batch(self, batch_size, device):
        """Random tokens of the training shape (for `bench memory`; no data is read)."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(self.vocab_size, (batch_size, self.seq_len), generator=g).to(device)

    def batch(self, indices, seed, device):
        """Training windows; with data.random_offset all windows of a step shift by one offset in
        [0, seq_len) drawn from the step's seed, so every token is seen in every position."""
        offset = int(np.random.default_rng(seed).integers(self.seq_len)) if self.cfg.data.random_offset else 0
        return torch.from_numpy(windows(self.train_tokens, self.seq_len, indices.numpy(), offset)).to(device)

    # ---- training ---------------------------------------------------------------------------
    def loss(self, model, batch, *, sigma, layers: range, generator=None) -> tuple[torch.Tensor, dict]:
        """Eq. 8 for a batch at the given t's (the trainer's `sigma`), in nats per token."""
        x, t = batch, sigma
        u = self.shard.draw(torch.rand, x.shape, generator, dtype=torch.float64)
        z, masked = mask_tokens(x, t, self.schedule, self.mask_id, u=u)
        ce = masked_ce_sum(model(z, t, layers), x, masked)
        n_masked = masked.sum().clamp_min(1)
        if self.cfg.diffusion.weighting == "uniform":
            loss = ce.sum() / n_masked
        else:
            loss = md4_nelbo(ce, t, self.schedule).mean() / x.shape[1]
        return loss, {"ce": (ce.sum() / n_masked).detach()}

    # ---- evaluation -------------------------------------------------------------------------
    def _route(self):
        """(partition, layers of a block) for inference: dblocks chains its blocks, e2e is one block."""
        if self.cfg.is_dblocks:
            return self.partition, self.layout.layers_of
        return self.full_range, lambda b: self.layout.all_layers()

    def _draw(self, seq: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t and the mask uniforms of draw k of held-out sequence `seq`: seeded by (eval.seed, seq, k)
        alone, so they do not depend on batching, on the arm or on when the evaluation runs."""
        g = torch.Generator().manual_seed(self.cfg.eval.seed * 1_000_003 + seq * 1009 + k)
        return torch.rand(1, dtype=torch.float64, generator=g), torch.rand(self.seq_len, dtype=torch.float64, generator=g)

    def nelbo_table(self, model, device, held: HeldOutText, seqs: np.ndarray,
                    draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) one-draw negative-ELBO estimates in nats per sequence of `held`, and the t of each."""
        partition, layers_of = self._route()
        table = torch.zeros(len(seqs), draws, dtype=torch.float64)
        ts = torch.zeros(len(seqs), draws, dtype=torch.float64)
        bs = self.cfg.eval.batch_size
        for start in range(0, len(seqs), bs):
            ids = seqs[start:start + bs]
            x = torch.from_numpy(windows(held.tokens, self.seq_len, ids)).to(device)
            for k in range(draws):
                tu = [self._draw(int(i), k) for i in ids]
                t = torch.cat([a for a, _ in tu])
                z, masked = mask_tokens(x, t, self.schedule, self.mask_id, u=torch.stack([u for _, u in tu]))
                blocks = partition.blocks_of(t)
                ce = torch.zeros(len(ids), device=device)
                for b in blocks.unique().tolist():
                    sel = (blocks == b).to(device)
                    ce[sel] = masked_ce_sum(model(z[sel], t[sel.cpu()], layers_of(b)), x[sel], masked[sel])
                table[start:start + len(ids), k] = md4_nelbo(ce, t, self.schedule).double().cpu()
                ts[start:start + len(ids), k] = t
        return table, ts

    @torch.no_grad()
    def evaluate(self, model, device, final: bool = False, split: str = "val") -> dict:
        """BPC of `split` (keys named for it: val_bpc / test_bpc, …); see the module docstring."""
        held = self.split_data(split)

        def on(key: str) -> str:   # test_bpc → val_bpc on validation
            return metric_on(key, split)

        was_training = model.training
        model.eval()
        e = self.cfg.eval
        n_all = held.num_windows
        if final:
            seqs, draws = np.arange(n_all), e.final_t_draws
        else:
            n = min(e.curve_sequences or n_all, n_all)
            seqs, draws = np.unique(np.linspace(0, n_all - 1, n).round().astype(np.int64)), e.t_draws
        table, ts = self.nelbo_table(model, device, held, seqs, draws)
        mean, se = mc_mean_stderr(table)
        # nats per sequence → bits per character
        to_bpc = 1 / (self.seq_len * math.log(2) * held.chars_per_token)
        result = {on("test_bpc"): mean * to_bpc, on("test_bpc_se"): se * to_bpc}
        if final:
            result.update({on(f"test_bpc_se@{draws}draws"): se * to_bpc, on("test_sequences"): len(seqs),
                           "t_draws": draws, "seq_len": self.seq_len, on("chars_per_token"): held.chars_per_token,
                           on("test_unk_rate"): held.unk_rate})
            # where the bits are spent: the BPC contributed by each block's own t range (the config's
            # B ranges, for either arm), so the arms can be compared range by range
            for b in range(self.partition.num_blocks):
                lo, hi = self.partition.interval(b)
                inside = (ts >= lo) & ((ts < hi) | (hi == 1.0))
                result[on(f"test_bpc@t{lo:.2f}-{hi:.2f}")] = float((table * inside).mean()) * to_bpc
            # the passages are unconditional (no split in them): written once, with the published evaluation
            samples = self.write_samples(model, device) if e.samples and split == "test" else None
            if samples:
                result["samples_file"] = str(samples)
                track.log_final(self.cfg.suite, self.cfg.arm, texts={"samples.md": samples.read_text()})
        model.train(was_training)
        return result

    # ---- samples ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, device, n: int, steps: int = 0, seed: int | None = None) -> list[str]:
        """n passages of seq_len tokens from MD4's ancestral sampler (`steps` on the uniform t grid,
        default seq_len), each step predicted by the block that owns it (`sample_masked`)."""
        partition, layers_of = self._route()

        def predict(z, t: float, block: int) -> torch.Tensor:
            tt = torch.full((z.shape[0],), t, dtype=torch.float64)
            return model(z, tt, layers_of(block)).float().softmax(-1)

        g = torch.Generator().manual_seed(self.cfg.eval.seed if seed is None else seed)
        z = sample_masked(predict, n, self.seq_len, steps or self.seq_len, partition, self.mask_id, device, g)
        return [self.data.tokenizer.decode(row.tolist()) for row in z.cpu()]

    def write_samples(self, model, device) -> Path:
        e = self.cfg.eval
        steps = e.sample_steps or self.seq_len
        passages = self.generate(model, device, e.samples, steps)
        md = [f"# {self.cfg.suite}/{self.cfg.arm}: generated passages\n",
              f"{len(passages)} passages of {self.seq_len} {self.data.tokenizer.kind} tokens, MD4 ancestral sampling "
              f"with {steps} steps from all-[MASK] at t = 1, seed {e.seed}"
              + (f", each step by the block that owns t (B = {self.partition.num_blocks})" if self.cfg.is_dblocks else "")
              + ".  Written by `bench evaluate`.\n"]
        for i, text in enumerate(passages):
            md += [f"## Passage {i + 1}\n", "```text", text, "```\n"]
        text = "\n".join(md)
        return self.publish_samples(text)
