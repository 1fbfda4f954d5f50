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
from bench.config import arm_names, load_config, read_params, tuned_from

MiB = 2**20


def _command() -> str:
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and sys.argv[0].endswith("bench") \
        else " ".join(shlex.quote(a) for a in sys.argv)


def display_scale(metric: str) -> int:
    """Accuracies are shown in points (×100); every other metric as it is."""
    return 100 if metric.endswith("acc") else 1


def _markdown_table(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def collect(params_path: str | Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], str]:
    """Per-arm summary rows, learning curves, and the name of the suite's metric."""
    rows, curves, metric = [], {}, None
    for arm in arm_names(params_path):
        cfg = load_config(params_path, arm)
        out = Path(cfg.out_dir)
        if not (out / "summary.csv").exists():
            raise FileNotFoundError(f"{out / 'summary.csv'} not found: run `bench train {params_path} --arm {arm}` first")
        s = pd.read_csv(out / "summary.csv").iloc[0].to_dict()
        ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
        metric = s.get("metric", "test_acc")  # runs from before the metric column: classification
        row = {"arm": arm, "mode": cfg.mode, "B": cfg.diffusion.num_blocks if cfg.is_dblocks else "-",
               "weighting": cfg.diffusion.weighting if cfg.is_dblocks else "-",
               "P_mean": cfg.diffusion.P_mean if cfg.is_dblocks else "-",
               metric: ev.get(metric, s[metric])}
        # the final evaluation's variants (e.g. accuracy with B+1 inference steps)
        row.update({k: v for k, v in ev.items() if "@" in k and _is_number(v)})
        row.update({
            "optimizer_steps": int(s["optimizer_steps"]), "layer_evals": int(s["layer_evals"]),
            "epochs_equiv": s["epochs_equiv"], "train_time_s": s["train_time_s"],
            "median_step_ms": 1000 * s["median_step_s"],
            "peak_mem_MiB": s["peak_mem_bytes"] / MiB, "params_MiB": s["peak_mem_params"] / MiB,
            "grads_MiB": s["peak_mem_grads"] / MiB, "optim_MiB": s["peak_mem_optim"] / MiB,
            "activations_MiB": s["peak_mem_activations"] / MiB,
            "device": s["device"], "git_sha": str(s["git_sha"])[:12],
        })
        try:   # FLOPs counted, not assumed: one step of each block with FlopCounterMode × its steps
            from bench.report_verdict import arm_compute
            row.update(arm_compute(cfg))
        except (NotImplementedError, FileNotFoundError, KeyError):   # a task without an example batch
            pass
        rows.append(row)
        curves[arm] = pd.read_csv(out / "history.csv")
    table = pd.DataFrame(rows)
    if "train_flops" in table and len(e2e_rows := table[table["mode"].str.startswith("e2e")]):
        table["flop_ratio_to_e2e"] = table["train_flops"] / float(e2e_rows.iloc[0]["train_flops"])
    e2e = table[table["mode"].str.startswith("e2e")]
    if len(e2e):
        scale = display_scale(metric)
        table.insert(6, "gap_to_e2e" + ("_pts" if scale == 100 else ""), scale * (table[metric] - e2e.iloc[0][metric]))
    return table, curves, metric


def flop_note(table: pd.DataFrame) -> str:
    """What may be said about the arms' compute: "matched" only where every arm's counted training
    FLOPs are within 10% of the e2e arm's."""
    ratios = table["flop_ratio_to_e2e"].dropna() if "flop_ratio_to_e2e" in table else pd.Series(dtype=float)
    if len(ratios) < len(table):
        return "training FLOPs not counted for this task: compute not shown to be matched"
    if bool(((ratios - 1).abs() <= 0.10).all()):
        return "matched training compute: every arm within 10% of the e2e arm's FLOPs"
    return ("training compute NOT matched: FLOP ratio to e2e " +
            ", ".join(f"{a} {r:.2f}" for a, r in zip(table["arm"], ratios) if abs(r - 1) > 0.10))


LOWER_IS_BETTER = ("ppl", "bpc", "fid", "kid", "_ce", "loss")


def better(metric: str) -> str:
    """What a y axis says about its metric."""
    return "lower is better" if any(k in metric for k in LOWER_IS_BETTER) else "higher is better"


def plot_curves(curves: dict[str, pd.DataFrame], metric: str, path: Path, title: str, note: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scale = display_scale(metric)
    for arm, df in curves.items():
        ax.plot(df["epochs_equiv"], scale * df[metric], marker="o", label=arm)
    ax.set_xlabel("training compute (epoch-equivalents of full-depth layer evaluations)")
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''}{note}, {better(metric)}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.save_figure(path, fig)
    return path


def compare(params_path: str | Path, results_dir: str | Path | None = None, notes: str = "") -> Path:
    raw = read_params(params_path)
    if "protocol" in raw:   # seeds and pairs: the verdict report replaces the one-seed comparison
        from bench.report_verdict import write_verdict
        return write_verdict(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(results_dir or raw.get("results_dir") or "results") / suite
    table, curves, metric = collect(params_path)
    scale = display_scale(metric)
    curve_n = (read_params(params_path).get("eval") or {}).get("curve_fid_n")
    note = f" at {curve_n} samples (the table: eval.fid_n)" if "fid" in metric and curve_n else ""
    curve_png = plot_curves(curves, metric, out / "learning_curve.png",
                            f"{suite}: {metric} vs training compute (same budget for every arm)", note)
    atomic.write_csv(out / "comparison.csv", table)

    # the gap along the curve, at equal compute fractions
    points = max(len(df) for df in curves.values())
    along = pd.DataFrame({"fraction_of_budget": [round((i + 1) / points, 4) for i in range(points)]})   # numeric: DVC plots
    for arm, df in curves.items():
        along[arm] = (scale * df[metric]).round(4).tolist() + [float("nan")] * (points - len(df))
    atomic.write_csv(out / "learning_curve.csv", along)

    device = table["device"].iloc[0]
    compute_note = flop_note(table)
    md = [f"# {suite}: end-to-end vs DiffusionBlocks\n",
          f"Produced by `{_command()}` on {dt.date.today().isoformat()}, code {table['git_sha'].iloc[0]}, device: {device}.\n",
          notes.strip() + "\n" if notes else "",
          "**One seed, no interval: pre-protocol figures, not a verdict.**\n",
          f"## Final figures ({compute_note})\n",
          _markdown_table(table.drop(columns=["device", "git_sha"])),
          f"\nColumns: `{metric}` from the final evaluation (`bench evaluate`); columns with `@` are the same metric "
          "with another inference setting (for classification: `steps` σ points — the default is B, one call per block, "
          "the paper's App. E.1 says B+1 — `draws` inference noises averaged, `sigma_start` where the chain starts); "
          "`gap_to_e2e` is the difference to the e2e arm (in percentage "
          "points for accuracies); `layer_evals` counts transformer-layer forward passes per batch over training (the "
          "budget the arms were given); `train_flops`: FlopCounterMode on one step of each block × the steps that "
          "trained it, and `flop_ratio_to_e2e`; `epochs_equiv` = layer_evals / (steps per epoch × depth); memory is the "
          "measured peak of live tensor bytes during one training step (largest over blocks), by component, "
          "from `bench.memory.MemoryMeter`.\n",
          f"## Learning curve ({metric}{' %' if scale == 100 else ''}, same fractions of the budget)\n",
          _markdown_table(along), f"\n![learning curve]({curve_png.name})\n"]
    md_path = atomic.write_text(out / "comparison.md", "\n".join(md))
    metrics = {f"{arm}.{metric}": float(v) for arm, v in zip(table["arm"], table[metric])}
    atomic.write_json(out / "metrics.json", {"metric": metric, **metrics})
    track.log_suite_artifacts(suite, params_path, [md_path, out / "comparison.csv", curve_png], metrics)
    return md_path


def _paper_rows(paper: dict) -> pd.DataFrame:
    ref = pd.read_csv("results/paper_reference.csv")
    rows = ref[ref["table_id"] == paper.get("table")]
    if paper.get("metric"):
        rows = rows[rows["metric"] == paper["metric"]]
    if paper.get("setting"):
        rows = rows[rows["setting"] == paper["setting"]]
    return rows


def _memory_line(suite: str, B: int, table: pd.DataFrame | None = None) -> str:
    path = Path("results/memory") / f"{suite}.csv"
    if not path.exists():
        if table is None or "peak_mem_MiB" not in table or not (table["mode"] == "e2e").any():
            return "no memory benchmark for this suite."
        e2e = float(table.loc[table["mode"] == "e2e", "peak_mem_MiB"].iloc[0])
        db = table[table["mode"] == "dblocks"]
        return ("no `bench memory` run for this suite; the training runs' own measured step peaks (`resident`, "
                "largest over blocks): e2e " + f"{e2e:.0f} MiB, "
                + ", ".join(f"{r.arm} {r.peak_mem_MiB:.0f} MiB ({e2e / r.peak_mem_MiB:.2f}×)" for r in db.itertuples())
                + ".")
    m = pd.read_csv(path)
    parts = []
    for mode in ("dblocks", "dblocks+ckpt"):
        for residency in ("offload", "resident"):
            r = m[(m["mode"] == mode) & (m["residency"] == residency) & (m["B"] == B)]
            if len(r):
                r = r[r["batch_size"] == r["batch_size"].max()].iloc[0]
                parts.append(f"{mode} {residency} {r['mem_ratio']:.2f}×")
    return (f"measured peak-memory ratio e2e / DiffusionBlocks at B = {B} (batch {int(m['batch_size'].max())}; "
            "the +ckpt arms against e2e+ckpt): "
            + ", ".join(parts) + f" — the paper claims {B}×. Details: [memory/{suite}.md](memory/{suite}.md).")


VERDICT_COLUMNS = ["suite", "claim", "statement", "pair", "metric", "seeds", "mean_diff", "ci_low", "ci_high",
                   "p_db_ge_e2e", "margin", "verdict", "flop_ratio_db_e2e", "param_ratio_db_e2e", "note", "scaling"]
README_MARKERS = ("<!-- verdicts: written by `bench report` from results/verdicts.csv -->", "<!-- /verdicts -->")


def collect_verdicts(results: Path = Path("results")) -> pd.DataFrame:
    """Every suite's verdict.csv (from `bench verdict`) in one table: results/verdicts.csv."""
    from bench.report_scaling import claim_a_note
    frames = [pd.read_csv(p) for p in sorted(results.glob("*/verdict.csv"))]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=VERDICT_COLUMNS)
    # claim (a) rows cite the gap-vs-budget result where `bench scaling` ran that suite and pair
    table["scaling"] = [claim_a_note(r.suite, r.pair, results / "scaling") if r.claim == "a" else ""
                        for r in table[["suite", "claim", "pair"]].itertuples()]
    table = table[[c for c in VERDICT_COLUMNS if c in table.columns]]
    atomic.write_csv(results / "verdicts.csv", table)
    return table


def verdict_markdown(table: pd.DataFrame) -> str:
    """The verdicts that were tested, for the READMEs (the untested claims are in verdicts.csv)."""
    tested = table[table["verdict"] != "not tested"] if len(table) else table
    if not len(tested):
        return "No suite has run the verdict protocol yet (`bench verdict`).\n"
    show = tested[[c for c in ("suite", "claim", "statement", "pair", "seeds", "mean_diff", "ci_low", "ci_high",
                               "margin", "verdict", "scaling") if c in tested]].copy()
    if "scaling" in show and not show["scaling"].fillna("").astype(bool).any():
        show = show.drop(columns="scaling")
    return (_markdown_table(show.fillna("")) + "\nDifferences are signed so that positive means DiffusionBlocks is "
            "better (claims b, c: the paper's choice — equiprobable partition, B = 3 — is better than the alternative), "
            "in the metric's units (accuracy: a fraction, 0.01 = 1 point; MAUVE: its own 0–1 scale), or as a fraction "
            "of E2E's mean where the suite's margin is relative (BPC, FID: 0.1 = 10 %); claims d and e: the measured "
            "ratio / B − 1 (0 = exactly B× less, one measurement, no interval); interval: 95% bootstrap over paired "
            "seeds; the margin was fixed in the suite's params.yaml before the runs. Untested claims: "
            "[results/verdicts.csv](results/verdicts.csv).\n")


def update_readme_verdicts(table: pd.DataFrame, readme: Path = Path("README.md")) -> None:
    """Rewrite the block between README_MARKERS in the top-level README (its "What we found")."""
    if not readme.exists():
        return
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic.write_text(readme, head + start + "\n" + verdict_markdown(table) + end + tail)


def write_results_readme(out: str | Path = "results/README.md", suites_root: str | Path = "suites") -> Path:
    """results/README.md: the verdict table, then one section per suite with our figures beside
    the paper's."""
    from bench.report_scaling import write_readme as write_scaling_readme
    verdicts = collect_verdicts(Path(out).parent)
    update_readme_verdicts(verdicts)
    scaling = Path(out).parent / "scaling"
    if any(scaling.glob("*_fit.json")):
        write_scaling_readme(scaling)
    lines = ["# Results\n",
             f"Written by `{_command()}` on {dt.date.today().isoformat()} from the files in this directory, "
             f"code {track.git_sha()[:12]}. Every table and plot below was produced by the harness; the paper's "
             "numbers come from [paper_reference.csv](paper_reference.csv) (typed in once from the paper, with "
             "its table ids).\n",
             "**Read the last column first.** A CPU-scale suite runs a substitute — other data, a smaller model, a "
             "shorter budget — and its numbers are not comparable with the paper's; they show whether the two arms "
             "behave alike under the same budget, not whether the paper's figures reproduce.\n",
             "Compare arms interactively: `mlflow ui --backend-store-uri sqlite:///mlflow.db`, open the suite's "
             "experiment, expand its parent run, tick the child runs (one per arm) and press *Compare*.\n",
             "## Verdicts (the verdict protocol: validation-only tuning, equal budgets, seeds, intervals)\n",
             verdict_markdown(verdicts).replace("](results/", "]("),
             "A suite below without a verdict row still shows **pre-protocol** results: one seed, and choices "
             "(levers, variants, learning rates) that were read off the test split. They are kept as history, "
             "not as verdicts.\n"]
    suite_dirs = {p.parent.name for p in Path(suites_root).glob("*/params.yaml")}
    for params in sorted(Path(suites_root).glob("*/params.yaml")):
        raw = read_params(params)
        suite = str(raw.get("suite") or params.parent.name)
        paper = raw.get("paper") or {}
        comparison = Path("results") / suite / "comparison.csv"
        lines.append(f"## {suite}\n")
        if (Path("results") / suite / "verdict.csv").exists():
            donor = tuned_from(raw)
            tuning = (f"; tuned settings reused from [{donor}/tuning.md]({donor}/tuning.md), no trial on this suite" if donor
                      else f"; tuning: [{suite}/tuning.md]({suite}/tuning.md)" if (Path("results") / suite / "tuning.md").exists()
                      else "; no tuned pair")
            lines.append(f"Under the verdict protocol: [{suite}/comparison.md]({suite}/comparison.md) "
                         f"(seeds, intervals, verdicts{tuning}).\n")
            if (Path("results") / suite / "generation.md").exists():
                lines.append(f"Samples, FID per σ grid and sampling cost (seed 0): [{suite}/generation.md]({suite}/generation.md).\n")
            if (scaling / f"{suite}_fit.json").exists():
                lines.append(f"The gap against training budget: [scaling/README.md](scaling/README.md#{suite}).\n")
            if paper.get("substitute"):
                lines.append(f"*CPU-scale substitute:* {paper['substitute']}\n")
            for png in sorted((Path("results") / suite).glob("*.png")):
                lines.append(f"![{suite} {png.stem}]({suite}/{png.name})\n")
            lines += _extra_reports(suite, suite_dirs, "pre-protocol, one run per arm")
            continue
        if paper.get("substitute"):
            lines.append(f"*CPU-scale substitute:* {paper['substitute']}\n")
        elif paper:
            lines.append("*The paper's setting.*\n")
        ref = _paper_rows(paper) if paper else pd.DataFrame()
        if len(ref):
            lines.append("Paper (" + ", ".join(f"Table {t}" for t in ref["table_id"].unique()) + "): "
                         + "; ".join(f"{r.setting}, {r.metric}: end-to-end {r.e2e:g}, DiffusionBlocks {r.db:g} "
                                     f"(B = {r.B:g})" for r in ref.itertuples()) + ".\n")
        if not comparison.exists():
            lines.append(f"Not run here. `dvc repro suites/{suite}/dvc.yaml` produces it where its data and "
                         "hardware exist (see the suite's params.yaml).\n")
            if (Path("results/memory") / f"{suite}.csv").exists():
                B = int(raw.get("diffusion", {}).get("num_blocks", 3))
                lines.append("Memory (needs no dataset, measured here): " + _memory_line(suite, B) + "\n")
            continue
        table = pd.read_csv(comparison)
        metric = json.loads((comparison.parent / "metrics.json").read_text())["metric"]
        keep = [c for c in ["arm", "mode", "B", metric, "gap_to_e2e_pts", "gap_to_e2e", "optimizer_steps",
                            "layer_evals", "peak_mem_MiB"] if c in table.columns]
        show = table[keep].copy()
        same = ref[ref["metric"] == metric] if len(ref) else ref
        if len(same):   # the paper's figure beside ours only where it is the same metric
            show[f"paper_{metric}_e2e"] = same.iloc[0]["e2e"]
            show[f"paper_{metric}_db"] = same.iloc[0]["db"]
        show["ours_is"] = ("CPU-scale substitute" if paper.get("substitute") else
                           "paper setting" if paper else "not declared (no `paper:` section)")
        lines += [_markdown_table(show), ""]
        B = int(read_params(params).get("diffusion", {}).get("num_blocks", 3))
        lines.append("Memory: " + _memory_line(suite, B, table) + "\n")
        for png in sorted((Path("results") / suite).glob("*.png")):
            lines.append(f"![{suite} {png.stem}]({suite}/{png.name})\n")
        lines.append(f"Full table: [{suite}/comparison.md]({suite}/comparison.md)\n")
        lines += _extra_reports(suite, suite_dirs)
    return atomic.write_text(out, "\n".join(lines))


def _extra_reports(suite: str, suite_dirs: set[str], note: str = "") -> list[str]:
    """Links to results/<suite>_*/ reports that are not suites of their own (dit_fashion_ablations)."""
    also = f"Also ({note})" if note else "Also"
    return [f"{also}: [{p.parent.name}/{p.name}]({p.parent.name}/{p.name})\n"
            for p in sorted(Path("results").glob(f"{suite}_*/*.md")) if p.parent.name not in suite_dirs]


def suite_summary(params_path) -> str:
    """What a finished `dvc repro suites/<name>` prints: the suite's tested verdicts, or where its
    one-seed comparison is (a read-only step: it writes nothing)."""
    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(raw.get("results_dir") or "results") / suite
    if (out / "verdict.csv").exists():
        table = pd.read_csv(out / "verdict.csv")
        return f"{suite}: {out / 'comparison.md'}\n" + verdict_markdown(table)
    if (out / "comparison.md").exists():
        return f"{suite} (pre-protocol, one seed): {out / 'comparison.md'}\n"
    raise FileNotFoundError(f"{suite} has no results in {out}: run `dvc repro suites/{suite}/dvc.yaml` first")
