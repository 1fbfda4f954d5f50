"""`bench memory-matrix`: training memory over model scale, against the baselines a user would pick.

For each model (the paper's configs: vit_cifar100's ViT-12L, DiT-S/2, DiT-L/2, ar_lm1b's 12-layer
LM, the Huginn recurrent model) the meter (bench.memory) measures one training step of:

  DB offload / DB resident   one block's step (largest over blocks), B from the suite
  E2E                        all layers
  E2E+accum                  B micro-batches of b/B, gradients accumulated (the same effective batch)
  E2E+ckpt                   activation checkpointing per layer
  E2E+accum+ckpt             both
  E2E+host optimizer         the optimizer's state and step on the host (ZeRO-offload's footprint):
                             the device holds parameters, gradients and activations only

Where the paper's batch does not fit here the step is measured at `--batch` b and at 2b, and the
peak is extrapolated along the line through the two: peak(x_paper) = p(x₁) + (p(x₂) − p(x₁)) ·
(x_paper − x₁) / (x₂ − x₁), with x the examples a step holds at once (the micro-batch for the
accumulation rows).  A single point scaled by its activations would be wrong where the peak sits
in the optimizer step (its temporaries do not grow with the batch).  The measured figure and the
extrapolated one (labelled) are both in the table.  `crossover` names the smallest model at which DB offload
beats E2E+accum, the baseline with the same effective batch.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from bench import atomic, track
from bench.benchmark import ACCUM, measure, micro_batch_sizes, variant
from bench.config import load_config, read_params
from bench.memory import COMPONENTS, MemoryMeter

MiB = 2**20
OUT = Path("results/memory")
MODELS = [   # label, params, overrides, the paper's batch
    ("ViT-12L (vit_cifar100)", "suites/vit_cifar100/params.yaml", [], 128),
    ("DiT-S/2", "suites/dit_imagenet/params.yaml", ["model.size=S"], 256),
    ("DiT-L/2 (dit_imagenet)", "suites/dit_imagenet/params.yaml", [], 256),
    ("AR 12L d768 (ar_lm1b)", "suites/ar_lm1b/params.yaml", ["model.vocab_size=32768"], 256),
    ("Huginn (recurrent_lm1b)", "suites/recurrent_lm1b/params.yaml", ["model.vocab_size=32768"], 256),
]


def measure_host_optimizer(cfg, device: torch.device) -> dict:
    """E2E with the optimizer state on the host: the meter covers forward and backward with the
    optimizer untracked; the AdamW step (on the host in ZeRO-offload) runs outside it."""
    from bench.tasks import make_task
    from bench.train import Budget, build_model, forward_loss, make_optimizer
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, task).to(device).train()
    optimizer = make_optimizer(cfg, task, model, device, Budget(1, 10**6, 10**6, 0))
    batch = task.example_batch(cfg.train.batch_size, device)
    gen = torch.Generator().manual_seed(0)
    for measured in (False, True):   # the first step creates the (host) Adam state
        optimizer.zero_grad()
        meter = MemoryMeter(model, [], device)
        with meter:
            loss, _, _ = forward_loss(cfg, task, model, batch, None, gen)
            loss.backward()
        optimizer.step()
    r = meter.report()
    return {"peak_bytes": r.peak_bytes, **{c: getattr(r, c) for c in COMPONENTS},
            "host_bytes": sum(v.nbytes for o in optimizer.optimizers for s in o.state.values()
                              for v in s.values() if isinstance(v, torch.Tensor))}


def model_rows(label: str, params: str, overrides: list[str], paper_batch: int, batch: int, device, log) -> list[dict]:
    from bench.protocol import load_protocol
    raw = read_params(params)
    e2e_arm, db_arm = ("e2e", "dblocks") if "protocol" not in raw else load_protocol(params).pairs["paper"]
    base, base_db = (load_config(params, a, overrides, tuning=True) for a in (e2e_arm, db_arm))
    B = base_db.diffusion.num_blocks
    bs = max(batch, B)
    specs = [("DB offload", variant(base_db, "dblocks", B, bs, "offload"), 1),
             ("DB resident", variant(base_db, "dblocks", B, bs, "resident"), 1),
             ("E2E", variant(base, "e2e", 1, bs, "resident"), 1),
             (f"E2E+accum ({B} × b/{B})", variant(base, ACCUM, 1, bs, "resident"), B),
             ("E2E+ckpt", variant(base, "e2e+ckpt", 1, bs, "resident"), 1),
             (f"E2E+accum+ckpt ({B} × b/{B})", variant(base, "e2e+ckpt", 1, bs, "resident"), B),
             ("E2E+host optimizer", None, 1)]
    rows, n_params = [], sum(p.numel() for p in _model(base).parameters()) / 1e6

    def peak(cfg, accum: int, batch_size: int) -> dict:
        if cfg is None:
            return measure_host_optimizer(variant(base, "e2e", 1, batch_size, "resident"), device)
        cfg = variant(cfg, cfg.arm, cfg.diffusion.num_blocks, batch_size, cfg.train.residency)
        return measure(cfg, device, time_steps=0, accum_steps=accum)

    for name, cfg, accum in specs:
        held = (lambda b: max(micro_batch_sizes(b, accum)))   # examples a step holds at once
        r, r2 = peak(cfg, accum, bs), (peak(cfg, accum, 2 * bs) if paper_batch > bs else None)
        slope = (r2["peak_bytes"] - r["peak_bytes"]) / (held(2 * bs) - held(bs)) if r2 else 0.0
        row = {"model": label, "params_M": n_params, "B": B, "row": name, "measured_batch": bs,
               "peak_MiB": r["peak_bytes"] / MiB, **{f"{c}_MiB": r[c] / MiB for c in COMPONENTS},
               "peak_MiB@2x_batch": r2["peak_bytes"] / MiB if r2 else float("nan"), "paper_batch": paper_batch,
               "peak_MiB@paper_batch (extrapolated)": (r["peak_bytes"] + slope * (held(paper_batch) - held(bs))) / MiB}
        rows.append(row)
        log(f"memory-matrix {label}: {name:<28} peak {row['peak_MiB']:9.1f} MiB at batch {bs}, "
            f"{row['peak_MiB@paper_batch (extrapolated)']:9.1f} MiB extrapolated to {paper_batch}")
    return rows


def _model(cfg):
    from bench.tasks import make_task
    from bench.train import build_model
    return build_model(cfg, make_task(cfg))


def crossover(df: pd.DataFrame) -> str:
    """The smallest model (by parameters) whose DB offload peak beats E2E+accum's (extrapolated)."""
    col = "peak_MiB@paper_batch (extrapolated)"
    lines, first = [], None
    for model, g in sorted(df.groupby("model"), key=lambda kv: kv[1]["params_M"].iloc[0]):
        db = float(g.loc[g["row"] == "DB offload", col].iloc[0])
        accum = float(g.loc[g["row"].str.startswith("E2E+accum ("), col].iloc[0])
        lines.append(f"{model} ({g['params_M'].iloc[0]:.1f} M parameters): E2E+accum / DB offload = {accum / db:.2f}")
        if first is None and accum > db:
            first = model
    head = (f"DB offload first beats E2E+accum at **{first}**" if first else
            "DB offload beats E2E+accum at **none** of these models")
    return head + " (peaks at the paper's batch: measured where measured_batch is the paper's, else extrapolated).\n\n" + "\n".join(f"- {x}" for x in lines) + "\n"


def memory_matrix(batch: int = 16, only: list[str] | None = None, log=print) -> Path:
    """Measure the models (those whose label contains one of `only`, or all), keeping the rows of
    the others from an earlier matrix.csv, and write matrix.csv and matrix.md."""
    from bench.train import resolve_device
    device = resolve_device("auto")
    old = pd.read_csv(OUT / "matrix.csv") if (OUT / "matrix.csv").exists() else pd.DataFrame(columns=["model"])
    frames = []
    for label, params, overrides, paper_batch in MODELS:
        if only and not any(o in label for o in only):
            frames.append(old[old["model"] == label])
            continue
        frames.append(pd.DataFrame(model_rows(label, params, overrides, paper_batch, batch, device, log)))
    df = pd.concat([f for f in frames if len(f)], ignore_index=True)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(OUT / "matrix.csv", df)
    return render(df, device)


def render(df: pd.DataFrame, device) -> Path:
    from bench.report import _markdown_table
    prov = track.provenance(device)
    missing = [label for label, *_ in MODELS if label not in set(df["model"])]
    md = ["# Training memory over model scale\n",
          f"Written by `bench memory-matrix` on {prov['device_name']}, code {prov['git_sha'][:12]}. Peak live tensor "
          "bytes of one training step (bench.memory.MemoryMeter), by component, at `measured_batch`; where that is "
          "below the paper's batch, also at twice it, and extrapolated along that line to the paper's batch "
          "(`…(extrapolated)`; it underestimates where a small batch's peak sits in the optimizer step).\n",
          crossover(df) if len(df) else "", _markdown_table(df),
          ("\nNot measured here (CPU time): " + ", ".join(missing) + "; `bench memory-matrix --only <label>` "
           "measures them, fastest on a GPU.\n") if missing else ""]
    return atomic.write_text(OUT / "matrix.md", "\n".join(md))
