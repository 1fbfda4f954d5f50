"""Reports of the DiT generation suites, written into results/<suite>/ by the harness.

  main suite    sample grids per arm, FID/KID table (test, validation, train minus validation),
                the FID of each σ grid with the grid chosen on validation FID, the DB/E2E FID ratio,
                sampling cost per Euler step and per image (both arms timed interleaved in one
                process, so machine load hits both alike) and the E2E/DB ratio
  ablations     the paper's Table 7 (partition × layer distribution, B = 3, γ = 0) and Table A2
                (B), ours beside the paper's, each with a PNG

`bench compare` still writes the generic comparison table and the FID learning curve.
The paper's numbers are DiT-S/2 on CIFAR-10 with 50 000 samples; ours are a small DiT on
Fashion-MNIST with a few hundred to a thousand samples: different data and scale, so only the
ordering can be compared, never the values.  Every FID column and figure names its resize: ours
is torch-fidelity's TF-legacy bilinear resize, the paper's clean-fid's (bench/metrics/fid.py).
Inference choices (the σ grid) are made on validation FID; the test FID of the choice is reported.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from bench import atomic, track
from bench.config import arm_names, load_config, model_config, read_params
from bench.metrics import fid as fidlib
from bench.report import _command, _markdown_table

# The paper (v4): DiT-S/2, CIFAR-10, test FID-50k, γ = 0.  Table 7 and Table 10 [A2].
PAPER_TABLE7 = {("log-uniform", (4, 4, 4)): 43.53, ("log-uniform", (3, 6, 3)): 43.59,
                ("log-uniform", (6, 4, 2)): 47.49, ("log-uniform", (2, 4, 6)): 42.37,
                ("equiprobable", (4, 4, 4)): 38.03, ("equiprobable", (3, 6, 3)): 41.64,
                ("equiprobable", (6, 4, 2)): 45.42, ("equiprobable", (2, 4, 6)): 40.40}
PAPER_TABLEA2 = {1: 39.83, 2: 35.47, 3: 38.03, 4: 45.43, 6: 53.32}
PAPER_TABLE2_CIFAR = {"e2e": (32.84, 39.83), "dblocks": (30.59, 37.20)}   # train / test FID
PAPER_RESIZE = "clean-fid resize"    # the paper's FIDs: clean-fid (antialiased bicubic to 299)
PAPER_LABEL = f"paper: DiT-S/2, CIFAR-10, FID-50k ({PAPER_RESIZE})"


def _suite(params_path) -> tuple[str, Path]:
    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    return suite, Path(raw.get("results_dir") or "results") / suite


def _header(title: str, device: str, sha: str) -> list[str]:
    return [f"# {title}\n", f"Produced by `{_command()}` on {dt.date.today().isoformat()}, code {sha}, "
            f"device: {device}.\n"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic.save_figure(path, fig)
    return path


# ---- sampling cost ----------------------------------------------------------------------------
def load_arm(params_path, arm: str, device="cpu", seed: int | None = None):
    from bench.tasks import make_task
    from bench.train import build_model
    cfg = load_config(params_path, arm, seed=seed)
    task = make_task(cfg)
    model = build_model(cfg, task).to(device)
    model.load_state_dict(torch.load(Path(cfg.out_dir) / "final.pt", map_location=device, weights_only=False)["model"])
    return cfg, task, model.eval()


@torch.no_grad()
def sampling_cost(params_path, arms: list[str], batch: int = 50, rounds: int = 3, device="cpu",
                  seed: int | None = None) -> pd.DataFrame:
    """Median seconds per network call and per image for each arm, the arms timed in turn in
    `rounds` rounds so that a change of machine load affects all of them alike."""
    loaded = {arm: load_arm(params_path, arm, device, seed) for arm in arms}
    per_call = {arm: [] for arm in arms}
    for _ in range(rounds):
        for arm, (cfg, task, model) in loaded.items():
            labels = torch.arange(batch) % task.mcfg.num_classes
            stamps = [time.perf_counter()]
            task.sample(model, labels, torch.Generator().manual_seed(0), step_hook=lambda: stamps.append(time.perf_counter()))
            per_call[arm] += [b - a for a, b in zip(stamps, stamps[1:])]
    rows = []
    for arm, (cfg, task, _) in loaded.items():
        step = statistics.median(per_call[arm])
        rows.append({"arm": arm, "mode": cfg.mode, "B": cfg.diffusion.num_blocks if cfg.is_dblocks else 1,
                     "steps": cfg.eval.steps, "grid": cfg.eval.grid_dblocks if cfg.is_dblocks else cfg.eval.grid_e2e,
                     "cfg_scale": cfg.eval.cfg_scale, "batch": batch,
                     "ms_per_step": 1000 * step, "ms_per_image": 1000 * step * cfg.eval.steps / batch,
                     "layer_evals_per_image": task.layer_evals_per_sample()})
    return pd.DataFrame(rows)


# ---- the main suite ---------------------------------------------------------------------------
FID_COUNTS = ("fid_n", "fid_repeats", "fid_ref_n", "fid_resize")   # columns about the FID, not FIDs


def _fid_labelled(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every FID/KID column named with the resize its Inception input had
    (ours: torch-fidelity's; the paper's: clean-fid's)."""
    def label(c: str) -> str:
        if c in FID_COUNTS or c.startswith("chosen") or not ("fid" in c or "kid" in c):
            return c
        return f"{c} ({PAPER_RESIZE if c.startswith('paper_') else fidlib.RESIZE})"
    return df.rename(columns=label)


def grid_choice(evals: dict[str, tuple[str, dict]]) -> pd.DataFrame:
    """Each arm's FIDs on every σ grid evaluated (its default and eval.final_variants' grids),
    with `chosen`: the grid of the lowest *validation* FID; its test FID is the one reported."""
    rows = []
    for arm, (default_grid, ev) in evals.items():
        rows.append({"arm": arm, "grid": default_grid, "default": True,
                     "val_fid": ev["val_fid"], "test_fid": ev.get("test_fid", float("nan"))})
        for key, value in ev.items():
            if key.startswith("val_fid@grid_"):
                variant = key.split("@", 1)[1]
                rows.append({"arm": arm, "grid": variant.split("=", 1)[1], "default": False, "val_fid": value,
                             "test_fid": ev.get(f"test_fid@{variant}", float("nan"))})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    table.loc[table.groupby("arm")["val_fid"].idxmin(), "chosen"] = True
    return table


def shown_runs(params_path) -> tuple[list[str], int | None]:
    """The arms and seed the report shows: a protocol suite's arms at its first seed (the other
    seeds are in `bench verdict`'s tables), otherwise every arm's unseeded run."""
    if "protocol" not in read_params(params_path):
        return arm_names(params_path), None
    from bench.protocol import load_protocol
    proto = load_protocol(params_path)
    return proto.arms, proto.seeds[0]


def report_main(params_path, log=print) -> Path:
    suite, out = _suite(params_path)
    arms, seed = shown_runs(params_path)
    rows, grids, evals = [], [], {}
    for arm in arms:
        cfg = load_config(params_path, arm, seed=seed)
        run = Path(cfg.out_dir)
        ev = json.loads((run / "eval.json").read_text())
        evals[arm] = (cfg.eval.grid_dblocks if cfg.is_dblocks else cfg.eval.grid_e2e, ev)
        s = pd.read_csv(run / "summary.csv").iloc[0].to_dict()
        rows.append({"arm": arm, "mode": cfg.mode, "B": cfg.diffusion.num_blocks if cfg.is_dblocks else 1,
                     "gamma": cfg.diffusion.gamma if cfg.is_dblocks else "-",
                     "test_fid": ev.get("test_fid", float("nan")), "val_fid": ev["val_fid"],
                     "train_fid": ev.get("train_fid", float("nan")),
                     "test_kid": ev.get("test_kid", float("nan")), "test_kid_std": ev.get("test_kid_std", float("nan")),
                     "fid_n": ev["fid_n"], "fid_repeats": ev["fid_repeats"], "fid_ref_n": ev["fid_ref_n"] or "all",
                     "fid_resize": ev.get("fid_resize", fidlib.RESIZE),
                     "layer_evals_train": int(s["layer_evals"]), "optimizer_steps": int(s["optimizer_steps"]),
                     "train_time_s": s["train_time_s"],
                     "peak_mem_MiB": s["peak_mem_bytes"] / 2**20, "device": s["device"], "git_sha": str(s["git_sha"])[:12]})
        png = out / f"samples_{arm}.png"
        atomic.write_bytes(png, (run / "samples.png").read_bytes())
        grids.append((arm, png))
    table = pd.DataFrame(rows)
    atomic.write_csv(out / "fid.csv", table)
    by_grid = grid_choice(evals)
    atomic.write_csv(out / "fid_by_grid.csv", by_grid)
    log("timing the samplers (interleaved) …")
    cost = sampling_cost(params_path, arms, seed=seed)
    e2e = cost[cost["mode"].str.startswith("e2e")]
    if len(e2e):
        cost["time_ratio_e2e_over_arm"] = e2e.iloc[0]["ms_per_image"] / cost["ms_per_image"]
        cost["layer_eval_ratio_e2e_over_arm"] = e2e.iloc[0]["layer_evals_per_image"] / cost["layer_evals_per_image"]
    atomic.write_csv(out / "sampling_cost.csv", cost)

    md = _header(f"{suite}: image generation, end-to-end DiT vs DiffusionBlocks", table["device"].iloc[0],
                 table["git_sha"].iloc[0])
    if seed is not None:
        md.append(f"**Seed {seed} only** (runs/{suite}/<arm>/seed{seed}): its samples, σ grids and sampling cost. "
                  "The verdict over every seed, with intervals, is in [comparison.md](comparison.md).\n")
    md.append(f"## FID and KID (final weights, matched training compute; {fidlib.RESIZE})\n")
    md.append(_markdown_table(_fid_labelled(table.drop(columns=["device", "git_sha"]))))
    md.append(f"\nFID@N: N = `fid_n` generated images (classes balanced), minimum over `fid_repeats` sample sets, "
              "against the first `fid_ref_n` images of the test split (`test_fid`), of the validation images carved "
              "from train (`val_fid`, `data.val_fraction`, `data.val_seed`) and of the train split minus validation "
              "(`train_fid`); Inception-v3 of the standard FID (TF 2015-12-05 weights, torch-fidelity). "
              f"**Resize: {fidlib.RESIZE_NOTE}.** FID at small N is biased upwards "
              "(Fashion-MNIST train vs test at N = 1000 already gives about 23), so compare arms only at equal N. "
              "KID (unbiased) against the test split. The Inception Score is not reported: the offline weights have no "
              "classifier head, so it cannot be computed.\n")
    by_mode = {r["mode"]: r for r in rows}
    if "e2e" in by_mode and "dblocks" in by_mode:
        ratio = by_mode["dblocks"]["test_fid"] / by_mode["e2e"]["test_fid"]
        md.append(f"**DB / E2E test FID ({fidlib.RESIZE}): {ratio:.3f}** ({'within' if ratio <= 1.1 else 'outside'} the "
                  f"1.1× bound); the paper's CIFAR-10 ratio (clean-fid) is "
                  f"{PAPER_TABLE2_CIFAR['dblocks'][1] / PAPER_TABLE2_CIFAR['e2e'][1]:.3f} "
                  f"({PAPER_TABLE2_CIFAR['e2e'][1]} → {PAPER_TABLE2_CIFAR['dblocks'][1]}; different data and scale).\n")
    if by_grid["grid"].nunique() > 1:
        md.append(f"### The same weights on each σ grid (validation and test FID, {fidlib.RESIZE})\n")
        shown = by_grid.sort_values(["arm", "grid"]).rename(columns={"chosen": "chosen (lowest val_fid)"})
        md.append(_markdown_table(_fid_labelled(shown)))
        chosen = by_grid[by_grid["chosen"]]
        md.append("\nThe grid is an inference choice, not part of the method: each arm's row in the FID table above uses "
                  "its default (`eval.grid_dblocks`, `eval.grid_e2e`). **Each arm at its best grid, the grid chosen on "
                  "validation FID** (the test split plays no part in the choice), with the test FID of the chosen grid: "
                  + ", ".join(f"{r.arm} {r.test_fid:.1f} ({r.grid}; val {r.val_fid:.1f})" for r in chosen.itertuples())
                  + f" ({fidlib.RESIZE}; `fid_by_grid.csv`).\n")
    md.append("## Sampling cost\n")
    md.append(_markdown_table(cost))
    md.append(f"\nOne call = one Euler step of a batch of {int(cost['batch'].iloc[0])} images with classifier-free "
              "guidance (conditional and unconditional halves in one batch of twice the size); `ms_per_image` = per-step "
              "time × steps / batch. Both arms were timed in alternation in one process. The paper: B× fewer layer "
              "evaluations per step (12×50 → 4×50 for DiT-S, B = 3).\n")
    md.append("## Samples (one row per class, fixed seeds)\n")
    md += [f"**{arm}**\n\n![{arm}]({png.name})\n" for arm, png in grids]
    md_path = atomic.write_text(out / "generation.md", "\n".join(md))
    metrics = {f"{r['arm']}.test_fid": r["test_fid"] for r in rows}
    track.log_suite_artifacts(suite, params_path, [md_path, out / "fid.csv", out / "fid_by_grid.csv",
                                                    out / "sampling_cost.csv", *[p for _, p in grids]], metrics)
    return md_path


# ---- ablations --------------------------------------------------------------------------------
def _ablation_rows(params_path) -> pd.DataFrame:
    rows = []
    for arm in arm_names(params_path):
        cfg = load_config(params_path, arm)
        run = Path(cfg.out_dir)
        if not (run / "summary.csv").exists():
            raise FileNotFoundError(f"{run / 'summary.csv'} not found: train arm {arm} first")
        s = pd.read_csv(run / "summary.csv").iloc[0].to_dict()
        from bench.blocks import make_layout
        d = cfg.diffusion
        layout = make_layout(model_config(cfg.model).depth, d.num_blocks, d.layer_distribution or None)
        rows.append({"arm": arm, "partition": d.partition, "layers": str(list(layout.layers_per_block)),
                     "B": d.num_blocks, "gamma": d.gamma, "test_fid": s["test_fid"], "val_fid": s["val_fid"],
                     "test_kid": s["test_kid"],
                     "fid_n": int(s.get("fid_n", cfg.eval.curve_fid_n)), "layer_evals": int(s["layer_evals"]),
                     "train_time_s": s["train_time_s"], "device": s["device"], "git_sha": str(s["git_sha"])[:12]})
    return pd.DataFrame(rows)


def report_ablations(params_path, log=print) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    suite, out = _suite(params_path)
    df = _ablation_rows(params_path)
    n = int(df["fid_n"].iloc[0])

    # Table 7: partition × layer distribution at B = 3
    t7 = df[df["B"] == 3].copy()
    t7["paper_test_fid"] = [PAPER_TABLE7.get((p, tuple(json.loads(l)))) for p, l in zip(t7["partition"], t7["layers"])]
    t7 = t7.sort_values(["partition", "layers"])
    atomic.write_csv(out / "ablation_partition.csv", t7)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, title in ((axes[0], "test_fid", f"ours: Fashion-MNIST, FID@{n} ({fidlib.RESIZE})"),
                           (axes[1], "paper_test_fid", PAPER_LABEL)):
        layouts = sorted(t7["layers"].unique())
        for i, part in enumerate(("equiprobable", "log-uniform")):
            sub = t7[t7["partition"] == part].set_index("layers").reindex(layouts)
            ax.bar([j + 0.4 * i for j in range(len(layouts))], sub[col], width=0.4, label=part)
        ax.set_xticks([j + 0.2 for j in range(len(layouts))], layouts)
        values = t7[col].dropna()
        if len(values):   # the bars start near the smallest value, so the spread is visible
            lo, hi = float(values.min()), float(values.max())
            ax.set_ylim(lo - 0.25 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
        ax.set_xlabel("layers per block (first block = highest noise)")
        ax.set_ylabel("test FID, lower is better (one seed; resize in the title)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle("Partitioning × layer distribution (B = 3, γ = 0): different data, scale and FID resize — "
                 "compare orderings only",
                 fontsize=9)
    png7 = _save(fig, out / "ablation_partition.png")

    # Table A2: number of blocks, equiprobable, equal layers
    tb = df[(df["partition"] == "equiprobable")].copy()
    tb = tb[[len(set(json.loads(l))) == 1 for l in tb["layers"]]].sort_values("B")
    tb["paper_test_fid"] = [PAPER_TABLEA2.get(int(b)) for b in tb["B"]]
    tb["sampling_speedup"] = tb["B"]   # layer evaluations per step: L → L/B
    atomic.write_csv(out / "ablation_blocks.csv", tb)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tb["B"], tb["test_fid"], marker="o", label=f"ours: Fashion-MNIST, FID@{n} ({fidlib.RESIZE})")
    ax2 = ax.twinx()
    ax2.plot(tb["B"], tb["paper_test_fid"], marker="s", color="C1", label=PAPER_LABEL)
    ax.set_xlabel("number of blocks B (12 layers, equiprobable, γ = 0)")
    ax.set_ylabel(f"ours: test FID@{n} ({fidlib.RESIZE}), lower is better", color="C0")
    ax2.set_ylabel(f"paper: test FID-50k ({PAPER_RESIZE}), lower is better", color="C1")
    ax.set_title("Block count: different data, scale and FID resize — compare trends only", fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.3)
    fig.legend(fontsize=8, loc="lower center", ncol=1)   # below the axes: covers neither the title nor the lines
    atomic.save_figure(out / "ablation_blocks.png", fig)
    pngb = out / "ablation_blocks.png"

    cols = ["arm", "partition", "layers", "B", "test_fid", "val_fid", "test_kid", "paper_test_fid", "layer_evals",
            "train_time_s"]
    md = _header(f"{suite}: partition and block-count ablations (γ = 0)", df["device"].iloc[0], df["git_sha"].iloc[0])
    md += ["Ours: a small DiT on Fashion-MNIST, each arm trained for the same layer-evaluation budget, test FID with "
           f"N = {n} generated images against the suite's test reference (biased upwards at this N; compare rows, not "
           "absolute values). Paper: DiT-S/2 on CIFAR-10, FID-50k (Table 7 and Table 10 [A2]). **Different data and "
           f"scale, and a different FID resize: {fidlib.RESIZE_NOTE}; only orderings are comparable.**\n",
           "## Partitioning × layer distribution (paper Table 7)\n", _markdown_table(_fid_labelled(t7[cols])),
           f"\n![partition]({png7.name})\n"]
    eq = t7[(t7["partition"] == "equiprobable") & (t7["layers"] == "[4, 4, 4]")]["test_fid"]
    lu = t7[(t7["partition"] == "log-uniform") & (t7["layers"] == "[4, 4, 4]")]["test_fid"]
    if len(eq) and len(lu):
        md.append(f"At [4, 4, 4], test FID ({fidlib.RESIZE}): equiprobable {eq.iloc[0]:.2f} vs log-uniform {lu.iloc[0]:.2f} "
                  f"({'equiprobable better' if eq.iloc[0] < lu.iloc[0] else 'log-uniform better'}; paper 38.03 vs 43.53).\n")
    md += ["## Number of blocks (paper Table 10 [A2])\n", _markdown_table(_fid_labelled(tb[cols + ["sampling_speedup"]])),
           f"\n![blocks]({pngb.name})\n"]
    md_path = atomic.write_text(out / "ablations.md", "\n".join(md))
    track.log_suite_artifacts(suite, params_path, [md_path, png7, pngb, out / "ablation_partition.csv",
                                                    out / "ablation_blocks.csv"])
    return md_path
