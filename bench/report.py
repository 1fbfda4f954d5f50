"""Comparison tables and plots for a suite, written into results/<suite>/ by the harness.

Every file says which command produced it, from which code version, on which device.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

from bench import atomic, track
from bench.config import arm_names, load_config, read_params

MiB = 2**20


def _command() -> str:
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and sys.argv[0].endswith("bench") \
        else " ".join(shlex.quote(a) for a in sys.argv)


def _markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def collect(params_path: str | Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per-arm summary rows and learning curves from the suite's run directories."""
    rows, curves = [], {}
    for arm in arm_names(params_path):
        cfg = load_config(params_path, arm)
        out = Path(cfg.out_dir)
        if not (out / "summary.csv").exists():
            raise FileNotFoundError(f"{out / 'summary.csv'} not found: run `bench train {params_path} --arm {arm}` first")
        s = pd.read_csv(out / "summary.csv").iloc[0].to_dict()
        ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
        B = cfg.diffusion.num_blocks
        rows.append({
            "arm": arm, "mode": cfg.mode, "B": B if cfg.is_dblocks else "-",
            "weighting": cfg.diffusion.weighting if cfg.is_dblocks else "-",
            "P_mean": cfg.diffusion.P_mean if cfg.is_dblocks else "-",
            "test_acc": ev.get("test_acc", s["test_acc"]),
            f"test_acc_B+1_steps": ev.get(f"test_acc@{B + 1}steps", float("nan")) if cfg.is_dblocks else float("nan"),
            "optimizer_steps": int(s["optimizer_steps"]), "layer_evals": int(s["layer_evals"]),
            "epochs_equiv": s["epochs_equiv"], "train_time_s": s["train_time_s"],
            "median_step_ms": 1000 * s["median_step_s"],
            "peak_mem_MiB": s["peak_mem_bytes"] / MiB, "params_MiB": s["peak_mem_params"] / MiB,
            "grads_MiB": s["peak_mem_grads"] / MiB, "optim_MiB": s["peak_mem_optim"] / MiB,
            "activations_MiB": s["peak_mem_activations"] / MiB,
            "device": s["device"], "git_sha": str(s["git_sha"])[:12],
        })
        curves[arm] = pd.read_csv(out / "history.csv")
    table = pd.DataFrame(rows)
    e2e = table[table["mode"].str.startswith("e2e")]
    if len(e2e):
        table.insert(6, "gap_to_e2e_pts", 100 * (table["test_acc"] - e2e.iloc[0]["test_acc"]))
    return table, curves


def plot_curves(curves: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, df in curves.items():
        ax.plot(df["epochs_equiv"], 100 * df["test_acc"], marker="o", label=arm)
    ax.set_xlabel("training compute (epoch-equivalents of full-depth layer evaluations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def compare(params_path: str | Path, results_dir: str | Path | None = None, notes: str = "") -> Path:
    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(results_dir or raw.get("results_dir") or "results") / suite
    table, curves = collect(params_path)
    curve_png = plot_curves(curves, out / "learning_curve.png",
                            f"{suite}: test accuracy vs training compute (same budget for every arm)")
    atomic.write_csv(out / "comparison.csv", table)

    # the gap along the curve, at equal compute fractions
    along = pd.DataFrame({"fraction_of_budget": [f"{(i + 1)}/{len(next(iter(curves.values())))}"
                                                for i in range(len(next(iter(curves.values()))))]})
    for arm, df in curves.items():
        along[arm] = (100 * df["test_acc"]).round(2).tolist() + [float("nan")] * (len(along) - len(df))
    atomic.write_csv(out / "learning_curve.csv", along)

    device = table["device"].iloc[0]
    md = [f"# {suite}: end-to-end vs DiffusionBlocks\n",
          f"Produced by `{_command()}` on {dt.date.today().isoformat()}, code {table['git_sha'].iloc[0]}, device: {device}.\n",
          notes.strip() + "\n" if notes else "",
          "## Final figures (matched training compute)\n",
          _markdown_table(table.drop(columns=["device", "git_sha"])),
          "\nColumns: `test_acc` with the default inference (B chained calls for DiffusionBlocks); "
          "`test_acc_B+1_steps` with B+1 σ points (the paper's App. E.1 wording); `gap_to_e2e_pts` in percentage "
          "points; `layer_evals` counts transformer-layer forward passes per batch over training (the compute "
          "budget: every arm gets the same); `epochs_equiv` = layer_evals / (steps per epoch × depth); memory is the "
          "measured peak of live tensor bytes during one training step (largest over blocks), by component, "
          "from `bench.memory.MemoryMeter`.\n",
          "## Learning curve (test accuracy %, same fractions of the budget)\n",
          _markdown_table(along), f"\n![learning curve]({curve_png.name})\n"]
    md_path = atomic.write_text(out / "comparison.md", "\n".join(md))
    e2e_acc = table.loc[table["mode"].str.startswith("e2e"), "test_acc"]
    metrics = {f"{r.arm}.test_acc": r.test_acc for r in table.itertuples()}
    if len(e2e_acc):
        metrics["e2e_test_acc"] = float(e2e_acc.iloc[0])
    track.log_suite_artifacts(suite, params_path, [md_path, out / "comparison.csv", curve_png], metrics)
    return md_path
