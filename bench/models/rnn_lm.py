"""A recurrent (GRU or LSTM) next-token LM: the scoring model of another family.

The language-model suites compare a Llama-style (or recurrent-depth) transformer trained end to end
with DiffusionBlocks.  A reference of the e2e arm's own family and recipe finds the e2e samples in
distribution; this model shares neither the architecture (no attention, no RoPE, no adaLN) nor the
recipe (its own optimiser settings, sequence length and seed), and is fit on the train split only.
It scores continuations (`gen_ppl@rnn`) and gives MAUVE's features (`mauve@rnn`: its top-layer
state, layer-normalised, over the continuation) through `bench.metrics.text.RNNReferenceLM`.

  embed (V → E) → `depth` stacked GRU/LSTM layers of `hidden` units → LayerNorm → linear head (→ V)

Trained by `python -m bench.models.rnn_lm PARAMS [--steps N …]` (the suites' `rnn_reference` DVC stage):
random windows of the params' train split, AdamW with a cosine schedule, and its exact validation
perplexity written beside the checkpoint (eval.rnn_reference, and summary.json next to it).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CELLS = ("gru", "lstm")
CHECKPOINT_KIND = "rnn_lm_reference"


@dataclass
class RNNLMConfig:
    vocab_size: int = 0        # 0: from the data
    hidden: int = 256
    depth: int = 2             # stacked recurrent layers
    cell: str = "gru"          # gru | lstm
    embed: int = 0             # embedding width; 0: hidden
    dropout: float = 0.0       # between the recurrent layers


@dataclass
class RNNTrainConfig:
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 96          # tokens per training window (prompt + continuation; a recurrence has no context limit)
    lr: float = 3.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 7              # none of the arms' seeds
    log_every: int = 100
    val_windows: int = 400     # validation windows of seq_len + 1 tokens for its own perplexity


class RNNLM(nn.Module):
    def __init__(self, cfg: RNNLMConfig, conditioned: bool = False):
        super().__init__()
        if conditioned:
            raise ValueError("the RNN LM is a plain next-token model: it has no σ-conditioned (DiffusionBlocks) form")
        if cfg.cell not in CELLS:
            raise ValueError(f"RNN cell must be one of {', '.join(CELLS)}, got {cfg.cell!r}")
        if cfg.vocab_size < 1 or cfg.hidden < 1 or cfg.depth < 1:
            raise ValueError(f"vocab_size, hidden and depth must be >= 1, got {cfg.vocab_size}, {cfg.hidden}, "
                             f"{cfg.depth}")
        self.cfg = cfg
        width = cfg.embed or cfg.hidden
        self.tok_embed = nn.Embedding(cfg.vocab_size, width)
        rnn = nn.GRU if cfg.cell == "gru" else nn.LSTM
        self.rnn = rnn(width, cfg.hidden, num_layers=cfg.depth, batch_first=True,
                       dropout=cfg.dropout if cfg.depth > 1 else 0.0)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab_size)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, hidden): the top layer's state after each token, layer-normalised (MAUVE's features)."""
        h, _ = self.rnn(self.tok_embed(tokens))
        return self.norm(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, T, V) of the token after each position; causal by construction."""
        return self.out(self.hidden_states(tokens))


# ---- training ------------------------------------------------------------------------------------------------
def random_windows(tokens: np.ndarray, length: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n windows of `length` tokens at uniformly random starts: (n, length) int64."""
    starts = rng.integers(0, len(tokens) - length + 1, size=n)
    return torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int64))


def learning_rate(step: int, tc: RNNTrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    done = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(done, 1.0)))


def next_token_loss(model: RNNLM, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train_rnn_lm(train_tokens: np.ndarray, cfg: RNNLMConfig, tc: RNNTrainConfig, device: torch.device,
                 log=print) -> tuple[RNNLM, list[float]]:
    """The model after tc.steps AdamW steps on random windows of `train_tokens`; the loss of every step."""
    if len(train_tokens) < tc.seq_len + 1:
        raise ValueError(f"the train split has {len(train_tokens)} tokens, fewer than one window of {tc.seq_len + 1}")
    torch.manual_seed(tc.seed)
    model = RNNLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    rng = np.random.default_rng(tc.seed)
    losses, t0 = [], time.time()
    model.train()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, tc)
        loss = next_token_loss(model, random_windows(train_tokens, tc.seq_len + 1, tc.batch_size, rng).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if tc.log_every and (step + 1) % tc.log_every == 0:
            log(f"rnn reference step {step + 1}/{tc.steps}: loss {np.mean(losses[-tc.log_every:]):.4f} "
                f"({time.time() - t0:.0f}s)")
    return model.eval(), losses


@torch.no_grad()
def heldout_perplexity(model: RNNLM, tokens: np.ndarray, seq_len: int, n_windows: int, device,
                       batch_size: int = 64) -> float:
    """Exact perplexity over the first n_windows non-overlapping windows of seq_len + 1 tokens."""
    n = min(n_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        return float("nan")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    x = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    total = 0.0
    for s in range(0, n, batch_size):
        xb = x[s:s + batch_size].to(device)
        logits = model(xb[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(total / (n * seq_len))


# ---- the reference checkpoint ----------------------------------------------------------------------------------
def reference_checkpoint(model: RNNLM, tc: RNNTrainConfig, data: dict, metrics: dict) -> dict:
    """What `load_reference` needs, and what `check_rnn_reference` compares with a suite's data section."""
    return {"kind": CHECKPOINT_KIND, "model": model.state_dict(),
            "config": {"model": {"arch": "rnn_lm", **asdict(model.cfg)}, "train": asdict(tc), "data": data},
            "metrics": metrics}


def load_reference(path: str | Path, device) -> tuple[RNNLM, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not an RNN reference checkpoint (python -m bench.models.rnn_lm)")
    fields = {k: v for k, v in ckpt["config"]["model"].items() if k != "arch"}
    model = RNNLM(RNNLMConfig(**fields))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.models.rnn_lm",
                                description="Train the RNN reference LM of a language-model suite on its train split "
                                            "and write it to the suite's eval.rnn_reference.")
    p.add_argument("params", help="the suite's params.yaml (its data section, eval.rnn_reference and train.device)")
    p.add_argument("--out", default="", help="checkpoint path (default: eval.rnn_reference)")
    for f in RNNLMConfig.__dataclass_fields__.values():
        if f.name != "vocab_size":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    for f in RNNTrainConfig.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one on a shared machine)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from bench import atomic
    from bench.config import arm_names, load_config
    from bench.data.text import TextSpec, open_text
    from bench.train import resolve_device
    a = parse_args(argv)
    cfg = load_config(a.params, arm_names(a.params)[0])
    out = Path(a.out or cfg.eval.rnn_reference)
    if not str(out) or str(out) == ".":
        raise SystemExit(f"{a.params}: no eval.rnn_reference and no --out: nowhere to write the RNN reference")
    torch.set_num_threads(a.threads)
    device = resolve_device(cfg.train.device)
    data = open_text(TextSpec.from_data_config(cfg.data), cfg.data.root)
    mc = RNNLMConfig(vocab_size=data.vocab_size, **{k: getattr(a, k) for k in RNNLMConfig.__dataclass_fields__
                                                    if k != "vocab_size"})
    tc = RNNTrainConfig(**{k: getattr(a, k) for k in RNNTrainConfig.__dataclass_fields__})
    model, losses = train_rnn_lm(data.tokens("train"), mc, tc, device)
    metrics = {"val_ppl": heldout_perplexity(model, data.tokens("val"), tc.seq_len, tc.val_windows, device),
               "first_loss": losses[0], "last_loss": float(np.mean(losses[-max(1, tc.log_every):])),
               "params": sum(p.numel() for p in model.parameters())}
    atomic.torch_save(out, reference_checkpoint(model.cpu(), tc, asdict(cfg.data), metrics))
    atomic.write_json(out.parent / "summary.json", {"checkpoint": str(out), **metrics,
                                                    "model": asdict(mc), "train": asdict(tc)})
    print(f"wrote {out}: validation perplexity {metrics['val_ppl']:.4g}, {metrics['params'] / 1e6:.2f}M params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
