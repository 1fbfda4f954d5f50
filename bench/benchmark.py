"""`bench memory`: measured peak memory and step time of every arm, for any model config.

For each (mode, B, batch size, residency) the benchmark builds the model and its optimizer(s),
trains one step of every block (so every block has Adam state, as after the first steps of a real
run), then measures one step of every block with `bench.memory.MemoryMeter` (the figure is the
largest over blocks) and times `time_steps` further steps per block (median).  Memory of a step
needs no dataset: the input is random data of the right shape.

Besides e2e and e2e+ckpt, the memory-saving baseline a user would pick instead of DiffusionBlocks:
  e2e+accum    (benchmark only, not a training mode) one E2E step as B micro-batches of
               ceil(batch/B), gradients accumulated: the same effective batch as e2e, with
               activations of a micro-batch only; the trainer's own backward_step ends it

Reading the table:
  mem_ratio          peak of e2e at the same batch size (the +ckpt rows: e2e+ckpt) / peak of
                     this row (the paper claims B)
  mem_ratio_vs_accum dblocks rows: peak of e2e+accum with the same B / peak of this row
  mem_ratio_vs_ckpt  dblocks rows: peak of e2e+ckpt at the same batch size / peak of this row
  speed_ratio        (this row's median step time) / (e2e step time / B): time per block step
                     relative to the ideal share of an end-to-end step (the paper: ≈ 1.07 on an
                     H100); e2e+accum rows: its step / the e2e step (the cost of micro-batching)
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils._pytree import tree_map_only

from bench import atomic, track
from bench.config import RunConfig, load_config, arm_names, model_config, read_params, validate
from bench.memory import COMPONENTS, MemoryMeter
from bench.tasks import make_task
from bench.train import Budget, backward_step, build_model, forward_loss, make_optimizer, resolve_device

MiB, GiB = 2**20, 2**30
ACCUM = "e2e+accum"                 # gradient accumulation: an arm of this benchmark, not a training mode
BENCHMARK_ONLY_ARMS = (ACCUM,)
MEMORY_ARMS = ("e2e", ACCUM, "e2e+ckpt", "dblocks", "dblocks+ckpt")   # `bench memory --arms` default
RATIO_COLUMNS = ("mem_ratio", "mem_ratio_vs_accum", "mem_ratio_vs_ckpt", "speed_ratio", "note")


def variant(base: RunConfig, mode: str, num_blocks: int, batch_size: int, residency: str,
            depth: int | None = None) -> RunConfig:
    """The config of one benchmark arm; e2e+accum runs an e2e config (its micro-batch count is
    `measure`'s accum_steps)."""
    cfg = copy.deepcopy(base)
    cfg.mode, cfg.arm = ("e2e" if mode == ACCUM else mode), mode
    cfg.diffusion.num_blocks = num_blocks
    cfg.diffusion.layer_distribution = []
    cfg.train.batch_size, cfg.train.residency = batch_size, residency
    if depth is not None:
        cfg.model["depth"] = depth
    validate(cfg)
    return cfg


def micro_batch_sizes(batch_size: int, steps: int) -> list[int]:
    """`steps` micro-batches summing to batch_size, the largest ceil(batch_size / steps)."""
    if not 1 <= steps <= batch_size:
        raise ValueError(f"cannot split a batch of {batch_size} into {steps} micro-batches")
    base, extra = divmod(batch_size, steps)
    return [base + (i < extra) for i in range(steps)]


def split_batch(cfg: RunConfig, batch, steps: int) -> list[tuple[RunConfig, object, float]]:
    """(config, micro-batch, loss weight) per micro-batch: views of `batch` along dim 0 (every
    task's batch is a tensor or a tuple of them), each config at its micro-batch size (σ draws),
    weighted by its share so the accumulated gradient is the full batch's mean."""
    out, start = [], 0
    for n in micro_batch_sizes(cfg.train.batch_size, steps):
        micro = copy.deepcopy(cfg)
        micro.train.batch_size = n
        out.append((micro, tree_map_only(torch.Tensor, lambda t, a=start, b=start + n: t[a:b], batch),
                    n / cfg.train.batch_size))
        start += n
    return out


class _KeepGrads:
    """The optimizer as backward_step sees it on the last micro-batch: zero_grad would drop the
    earlier micro-batches' gradients, so it is skipped; clipping and the AdamW step are the trainer's."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        self.optimizer.step()


def accumulation_step(cfg: RunConfig, task, model, optimizer, micro_batches, generator) -> None:
    """One E2E optimizer step over micro-batches (from `split_batch`), gradients accumulated."""
    optimizer.zero_grad()
    *first, last = micro_batches
    for micro, batch, weight in first:
        loss, _, _ = forward_loss(micro, task, model, batch, None, generator)
        (weight * loss).backward()
    micro, batch, weight = last
    loss, _, _ = forward_loss(micro, task, model, batch, None, generator)
    backward_step(cfg, model, _KeepGrads(optimizer), weight * loss)


def measure(cfg: RunConfig, device: torch.device, time_steps: int = 3, first_block_only: bool = False,
            accum_steps: int = 1) -> dict:
    """Peak memory (largest over blocks) and median step time of one configuration.
    first_block_only: with `offload` the blocks of an equal split peak alike, so measuring block 0
    is enough (the deepest-model search uses it to save time).  accum_steps > 1 (e2e only): each
    step is `accumulation_step` over that many micro-batches of the batch."""
    if accum_steps > 1 and cfg.is_dblocks:
        raise ValueError("gradient accumulation is an e2e baseline; a dblocks step already trains one block")
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, task).to(device).train()
    budget = Budget(1, 10**6, 10**6, 0)
    optimizer = make_optimizer(cfg, task, model, device, budget)
    batch = task.example_batch(cfg.train.batch_size, device)
    micro_batches = split_batch(cfg, batch, accum_steps) if accum_steps > 1 else None
    gen = torch.Generator().manual_seed(0)
    blocks = list(range(task.layout.num_blocks)) if cfg.is_dblocks else [None]
    if first_block_only and cfg.train.residency == "offload":
        blocks = blocks[:1]

    def step(block):
        optimizer.activate(block)
        if micro_batches:
            accumulation_step(cfg, task, model, optimizer, micro_batches, gen)
            return
        loss, _, _ = forward_loss(cfg, task, model, batch, block, gen)
        backward_step(cfg, model, optimizer, loss)

    for b in blocks:  # warm-up: every block gets its Adam state
        step(b)
    reports = []
    for b in blocks:
        optimizer.activate(b)
        with MemoryMeter(model, optimizer.resident_optimizers(), device) as meter:
            step(b)
        r = meter.report()
        r.host_parked_bytes = optimizer.parked_bytes()
        reports.append(r)
    times = []
    for _ in range(time_steps):
        for b in blocks:
            optimizer.activate(b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    peak = max(reports, key=lambda r: r.peak_bytes)
    with optimizer.materialize():
        n_params = sum(p.numel() for p in model.parameters())
    return {"peak_bytes": peak.peak_bytes, **{c: getattr(peak, c) for c in COMPONENTS},
            "host_parked_bytes": peak.host_parked_bytes, "allocator_peak_bytes": peak.allocator_peak_bytes,
            "allocator_reserved_bytes": peak.allocator_reserved_bytes, "allocator_retries": peak.allocator_retries,
            "allocator_ooms": peak.allocator_ooms, "meter_to_allocator": peak.meter_to_allocator,
            "median_step_s": statistics.median(times) if times else float("nan"), "parameters_count": n_params}


def _note(row: pd.Series, e2e: pd.Series) -> str:
    """For a dblocks row that misses 0.9·B: the component furthest above its ideal share."""
    if not row["mode"].startswith("dblocks") or row["mem_ratio"] >= 0.9 * row["B"]:
        return ""
    excess = {c: row[c] - e2e[c] / row["B"] for c in COMPONENTS}
    worst = max(excess, key=excess.get)
    return (f"misses 0.9·B: {worst} is {excess[worst] / MiB:.1f} MiB above e2e/B"
            + (" (every block's weights and Adam state stay on the device)" if row["residency"] == "resident"
               and worst in ("parameters", "optimizer_state") else "")
            + (" (shared stem/head and σ-conditioning are not split)" if row["residency"] == "offload"
               and worst in ("parameters", "optimizer_state", "gradients") else ""))


def arm_grid(mode: str, blocks: list[int], residencies: list[str]) -> list[tuple[int, str]]:
    """(B, residency) of each row of an arm: dblocks over both; e2e+accum over B (its number of
    micro-batches); e2e and e2e+ckpt one row."""
    if mode.startswith("dblocks"):
        return [(B, r) for B in blocks for r in residencies]
    return [(B, "-") for B in blocks] if mode == ACCUM else [(1, "-")]


def _peer_peak(df: pd.DataFrame, mode: str, batch_size: int, B: int | None = None) -> float:
    """The peak of `mode`'s row at this batch size (and B), NaN if the benchmark has none."""
    rows = df[(df["mode"] == mode) & (df["batch_size"] == batch_size)]
    if B is not None:
        rows = rows[rows["B"] == B]
    return float(rows.iloc[0]["peak_bytes"]) if len(rows) else float("nan")


def with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """The ratio columns (see the module docstring) and the notes."""
    df = df.copy()
    cols = {c: [] for c in RATIO_COLUMNS}
    for _, row in df.iterrows():
        dblocks, bs = row["mode"].startswith("dblocks"), row["batch_size"]
        same = "e2e+ckpt" if row["mode"].endswith("+ckpt") else "e2e"
        e2e = df[(df["mode"] == same) & (df["batch_size"] == bs)]
        e2e = e2e.iloc[0] if len(e2e) else None
        cols["mem_ratio"].append(_peer_peak(df, same, bs) / row["peak_bytes"])
        cols["mem_ratio_vs_accum"].append(_peer_peak(df, ACCUM, bs, row["B"]) / row["peak_bytes"] if dblocks else float("nan"))
        cols["mem_ratio_vs_ckpt"].append(_peer_peak(df, "e2e+ckpt", bs) / row["peak_bytes"] if dblocks else float("nan"))
        share = row["B"] if dblocks else 1   # a block step's ideal is e2e / B; e2e+accum's is e2e itself
        cols["speed_ratio"].append(row["median_step_s"] / (e2e["median_step_s"] / share) if e2e is not None else float("nan"))
        row = row.copy()
        row["mem_ratio"] = cols["mem_ratio"][-1]
        cols["note"].append(_note(row, e2e) if e2e is not None else "")
    for c, values in cols.items():
        df[c] = values
    return df


def memory_benchmark(params_path: str | Path, blocks: list[int], batch_sizes: list[int], modes: list[str] = MEMORY_ARMS,
                     residencies: list[str] = ("resident", "offload"), name: str | None = None, out_dir: str | Path = "results/memory",
                     time_steps: int = 3, budget: int | None = None, max_depth: int = 96, resume: bool = False,
                     log=print) -> Path:
    """Measure every (batch size, arm, B, residency) row; the CSV is rewritten after each row, so a
    killed benchmark continues with `resume=True` (rows of the same config and depth are kept as
    measured).  The Markdown table is written before the optional depth search and again after it."""
    base = load_config(params_path, arm_names(params_path)[0], tuning=True)
    base_db = base
    if "protocol" in read_params(params_path):   # each side of the paper pair measured with its own model
        from bench.protocol import load_protocol
        e2e_arm, db_arm = load_protocol(params_path).pairs.get("paper", next(iter(load_protocol(params_path).pairs.values())))
        base, base_db = load_config(params_path, e2e_arm, tuning=True), load_config(params_path, db_arm, tuning=True)
    name = name or base.suite
    device = resolve_device(base.train.device)
    if base.train.threads:
        torch.set_num_threads(base.train.threads)
    depth = model_config(base.model).depth
    bad = [B for B in blocks if B > depth]
    if bad:
        raise ValueError(f"B={bad[0]} is larger than the model's depth ({depth})")
    if ACCUM in modes and max(blocks) > min(batch_sizes):
        raise ValueError(f"{ACCUM}: B={max(blocks)} micro-batches do not fit in a batch of {min(batch_sizes)}")
    out = Path(out_dir)
    key = ["mode", "residency", "B", "batch_size", "depth"]
    done = {}
    if resume and (out / f"{name}.csv").exists():
        for r in pd.read_csv(out / f"{name}.csv").to_dict("records"):
            done[tuple(r[k] for k in key)] = {k: v for k, v in r.items() if k not in RATIO_COLUMNS}
    rows = []
    for bs in batch_sizes:
        for mode in modes:
            for B, residency in arm_grid(mode, blocks, residencies):
                accum = B if mode == ACCUM else 1
                row = {"config": name, "mode": mode, "residency": residency, "B": B, "batch_size": bs,
                       "micro_batch": max(micro_batch_sizes(bs, accum)), "depth": depth}
                kept = done.get(tuple(row[k] for k in key))
                cfg = variant(base_db if mode.startswith("dblocks") else base, mode, B if mode.startswith("dblocks") else 1, bs,
                              residency if mode.startswith("dblocks") else "resident")
                row.update(kept or measure(cfg, device, time_steps, accum_steps=accum))
                rows.append(row)
                log(f"memory {name}: {mode:<13} B={row['B']} batch {bs:<4} {row['residency']:<9} "
                    f"peak {row['peak_bytes'] / MiB:9.1f} MiB  step {1000 * row['median_step_s']:8.1f} ms"
                    + ("  (kept from the earlier run)" if kept else ""))
                atomic.write_csv(out / f"{name}.csv", pd.DataFrame(rows))   # progress survives a kill
    df = with_ratios(pd.DataFrame(rows))
    atomic.write_csv(out / f"{name}.csv", df)
    png = plot_memory(df, out / f"{name}.png", name)
    atomic.write_text(out / f"{name}.md", render_markdown(df, name, device, params_path, None, budget))
    extra = largest_trainable(base, device, budget, modes, max_depth, log=log) if budget else None
    md = render_markdown(df, name, device, params_path, extra, budget, max_depth)
    atomic.write_text(out / f"{name}.md", md)
    if track.enabled():
        t = track.Tracker("memory", name, None)
        t.log_params({"params_file": str(params_path), "blocks": blocks, "batch_sizes": batch_sizes,
                      "modes": modes, "residencies": residencies, **track.provenance(device)})
        for i, r in df.iterrows():
            t.log_metrics({"peak_MiB": r["peak_bytes"] / MiB, "mem_ratio": r["mem_ratio"]}, step=i)
        for f in (out / f"{name}.csv", out / f"{name}.md", png):
            t.log_artifact(f)
        t.end()
    return out / f"{name}.md"


def plot_memory(df: pd.DataFrame, path: Path, name: str) -> Path:
    """Peak memory against B by component, one panel per (mode, residency) at the largest batch,
    with e2e's peak / B as the ideal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bs = df["batch_size"].max()
    d = df[df["batch_size"] == bs]
    panels = d[d["mode"].str.startswith("dblocks")][["mode", "residency"]].drop_duplicates().values.tolist()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 4), sharey=True, squeeze=False)
    colors = {"parameters": "#2a7", "gradients": "#36c", "optimizer_state": "#db3", "activations": "#c33"}
    for ax, (mode, residency) in zip(axes[0], panels):
        rows = d[(d["mode"] == mode) & (d["residency"] == residency)].sort_values("B")
        e2e = d[d["mode"] == ("e2e+ckpt" if mode.endswith("+ckpt") else "e2e")]
        bottom = [0.0] * len(rows)
        for c in COMPONENTS:
            vals = (rows[c] / MiB).tolist()
            ax.bar([str(b) for b in rows["B"]], vals, bottom=bottom, color=colors[c], label=c.replace("_", " "))
            bottom = [a + b for a, b in zip(bottom, vals)]
        if len(e2e):
            ideal = [e2e.iloc[0]["peak_bytes"] / MiB / b for b in rows["B"]]
            ax.plot([str(b) for b in rows["B"]], ideal, "k--o", label=f"{e2e.iloc[0]['mode']} peak / B")
        accum = d[d["mode"] == ACCUM].set_index("B")["peak_bytes"]
        if len(accum):  # the baseline at the same B: E2E over B accumulated micro-batches
            ax.plot([str(b) for b in rows["B"]], [accum.get(b, float("nan")) / MiB for b in rows["B"]], "b:s",
                    label=f"{ACCUM} peak (B micro-batches)")
        ax.set_title(f"{mode}, {residency}", fontsize=9)
        ax.set_xlabel("blocks B")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)   # per panel: the ideal line is e2e/B or e2e+ckpt/B depending on the panel
    axes[0][0].set_ylabel("peak memory of a training step (MiB), lower is better")
    fig.suptitle(f"{name}: measured peak memory by component (batch {bs})", fontsize=10)
    fig.tight_layout()
    atomic.save_figure(path, fig)
    return path


def largest_trainable(base: RunConfig, device: torch.device, budget: int, modes: list[str], max_depth: int = 96,
                      log=print) -> pd.DataFrame:
    """The deepest model of this width each arm can train within `budget` bytes, found by
    measuring (exponential then binary search over depth; dblocks keeps the config's B).  The
    search stops at `max_depth` (a probe's step costs time in proportion to its depth); an arm
    that still fits there is reported as `>= max_depth`."""
    B = base.diffusion.num_blocks
    bs = base.train.batch_size
    rows = []
    for mode in modes:
        dblocks = mode.startswith("dblocks")
        residency = "offload" if dblocks else "resident"
        step = B if dblocks else 1
        accum = B if mode == ACCUM else 1   # e2e+accum: B micro-batches, like the B blocks of dblocks

        def peak(depth):
            m = measure(variant(base, mode, B if dblocks else 1, bs, residency, depth), device, 0,
                        first_block_only=True, accum_steps=accum)
            log(f"largest {mode}: depth {depth}: {m['peak_bytes'] / MiB:.0f} MiB")
            return m["peak_bytes"]

        cap = max(step, max_depth // step * step)
        lo, hi = 0, step
        while peak(hi) <= budget:
            if hi >= cap:
                lo = hi = cap
                break
            lo, hi = hi, min(hi * 2, cap)
        while hi - lo > step:  # invariant: lo fits (or 0), hi does not
            mid = (lo + hi) // 2 // step * step
            if mid <= lo:
                break
            lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
        rows.append({"mode": mode, "residency": residency, "B": B if dblocks or mode == ACCUM else 1,
                     "batch_size": bs, "deepest_depth": f">= {lo}" if lo == cap else lo})
    return pd.DataFrame(rows)


def baseline_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each dblocks row's peak beside every memory-saving baseline's (what the claim is judged by)."""
    rows = []
    for _, r in df[df["mode"].str.startswith("dblocks")].iterrows():
        peaks = {"e2e": _peer_peak(df, "e2e", r["batch_size"]), ACCUM: _peer_peak(df, ACCUM, r["batch_size"], r["B"]),
                 "e2e+ckpt": _peer_peak(df, "e2e+ckpt", r["batch_size"])}
        rows.append({"mode": r["mode"], "residency": r["residency"], "B": r["B"], "batch_size": r["batch_size"],
                     "dblocks_MiB": r["peak_bytes"] / MiB, **{f"{k}_MiB": v / MiB for k, v in peaks.items()},
                     **{f"×{k}": v / r["peak_bytes"] for k, v in peaks.items()}})
    return pd.DataFrame(rows)


def render_markdown(df: pd.DataFrame, name: str, device, params_path, extra: pd.DataFrame | None, budget,
                    max_depth: int = 96) -> str:
    from bench.report import _command, _markdown_table
    show = df.copy()
    for c in ["peak_bytes", *COMPONENTS, "host_parked_bytes"]:
        show[c] = show[c] / MiB
    show["allocator_peak_MiB"] = [v / MiB if v >= 0 else float("nan") for v in df["allocator_peak_bytes"]]
    show["median_step_ms"] = 1000 * show["median_step_s"]
    show = show.rename(columns={"peak_bytes": "peak_MiB", "parameters": "params_MiB", "gradients": "grads_MiB",
                                "optimizer_state": "optim_MiB", "activations": "activations_MiB",
                                "host_parked_bytes": "host_parked_MiB"})
    cols = [c for c in ["mode", "residency", "B", "batch_size", "micro_batch", "peak_MiB", "params_MiB", "grads_MiB",
                        "optim_MiB", "activations_MiB", "host_parked_MiB", "allocator_peak_MiB", "mem_ratio",
                        "mem_ratio_vs_accum", "mem_ratio_vs_ckpt", "median_step_ms", "speed_ratio", "note"]
            if c in show]   # a CSV kept from before a column existed lacks it
    lines = [f"# Memory and speed: {name}\n",
             f"Produced by `{_command()}` (params {params_path}), code {track.git_sha()[:12]}, "
             f"device {track.device_name(device)}.\n",
             "Peak of live tensor bytes on the compute device during one training step, measured by "
             "`bench.memory.MemoryMeter` (every tensor created in forward, backward and optimizer step), split by "
             "component at the peak, largest over blocks. `allocator_peak_MiB` is CUDA's own allocator peak (blank "
             "on CPU). `host_parked_MiB`: inactive blocks' weights and Adam state parked on the host (`offload`). "
             f"`{ACCUM}` is E2E with gradient accumulation: B micro-batches of `micro_batch` = ceil(batch/B), "
             "the same effective batch as e2e (a benchmark arm, not a training mode). "
             "Each ratio is a baseline's peak / this row's peak (> 1: this row needs less): "
             "`mem_ratio` against e2e at the same batch (the +ckpt rows against e2e+ckpt) — the paper claims B; "
             f"`mem_ratio_vs_accum` (dblocks rows) against {ACCUM} with the same B; "
             "`mem_ratio_vs_ckpt` (dblocks rows) against e2e+ckpt (activation checkpointing per layer), same batch. "
             "`speed_ratio` = this step / (e2e step / B); the paper's H100 figure is 0.0181 / (0.0507 / 3) ≈ 1.07; "
             f"for `{ACCUM}` rows it is this step / the e2e step (what micro-batching costs). "
             "Step times on a shared CPU are indicative only.\n",
             _markdown_table(show[cols]), f"\n![memory by component]({name}.png)\n"]
    versus = baseline_table(df)
    if len(versus):
        lines += ["\n## DiffusionBlocks against the baselines a user would pick instead\n",
                  "Peak MiB of each dblocks row and of each baseline; `×<baseline>` = that baseline's peak / the "
                  f"dblocks peak. `e2e`: end-to-end at the same batch; `{ACCUM}`: E2E over the row's B "
                  "micro-batches, gradients accumulated (same effective batch); `e2e+ckpt`: E2E with activation "
                  "checkpointing per layer, same batch. nan: that baseline was not measured.\n",
                  _markdown_table(versus)]
    if extra is not None:
        lines += [f"\n## Deepest trainable model within {budget / GiB:.3g} GiB (width and batch of the config; "
                  f"found by measuring; the search stops at depth {max_depth})\n", _markdown_table(extra)]
    return "\n".join(lines)
