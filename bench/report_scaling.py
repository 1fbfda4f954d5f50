"""results/scaling/: what `bench scaling` writes from its finished points (bench.scaling).

  <suite>.csv        one row per (pair, arm, seed, budget): FLOPs, validation and test figures
  <suite>_fit.json   per pair: each arm's power-law fit on validation (bench.scaling_fit) with seed
                     bootstrap intervals, the fitted gap's margin crossing, and the paired test gap
                     and verdict at every budget (bench.verdict, the protocol's margin)
  <suite>.png        per pair: test metric vs FLOPs (log x, mean and min–max band over seeds, the
                     validation fit dashed), and the paired test gap with its interval
  README.md          every suite's fits and gaps, written as a scaling section
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import atomic
from bench.report import _command, _markdown_table, display_scale
from bench.scaling_fit import EXTRAPOLATION, bootstrap_fits, fitted_gap, from_loss, saturating_power_law, to_loss
from bench.splits import metric_on
from bench.verdict import compare_pair


def pair_summary(table: pd.DataFrame, spec: dict, pair: str, higher_is_better: bool) -> dict:
    proto = spec["protocol"]
    rows = table[table["pair"] == pair]
    per_budget = []
    for budget, at in rows.groupby("budget"):
        e, d = at[at["role"] == "e2e"].set_index("seed"), at[at["role"] == "db"].set_index("seed")
        shared = sorted(set(e.index) & set(d.index))
        if not shared:
            continue
        test = compare_pair(e.loc[shared, "test"].tolist(), d.loc[shared, "test"].tolist(), higher_is_better,
                            proto.margin, proto.margin_relative)
        val = compare_pair(e.loc[shared, "val"].tolist(), d.loc[shared, "val"].tolist(), higher_is_better,
                           proto.margin, proto.margin_relative)
        per_budget.append({"budget": float(budget), "seeds": len(shared),
                           "e2e_flops": float(e["train_flops"].mean()), "db_flops": float(d["train_flops"].mean()),
                           "e2e_test": test["e2e_mean"], "db_test": test["db_mean"],
                           "e2e_test_sd": float(e.loc[shared, "test"].std(ddof=1)) if len(shared) > 1 else 0.0,
                           "gap_test": test["mean_diff"], "gap_ci": [test["ci_low"], test["ci_high"]],
                           "verdict": test["verdict"], "gap_val": val["mean_diff"],
                           "train_s": float(e["train_time_s"].mean() + d["train_time_s"].mean())})
    summary = {"pair": pair, "arms": list(proto.pairs[pair]), "per_budget": per_budget}
    seeds = sorted(set(rows.loc[rows["role"] == "e2e", "seed"]) & set(rows.loc[rows["role"] == "db", "seed"]))
    if len(per_budget) >= 3 and seeds:   # a 3-parameter law: 3 budgets at least
        pts = {role: (r["seed"].to_numpy(), r["train_flops"].to_numpy(), to_loss(r["val"], higher_is_better))
               for role, r in ((role, rows[(rows["role"] == role) & rows["seed"].isin(seeds)]) for role in ("e2e", "db"))}
        summary["fit"] = bootstrap_fits(pts, seeds, proto.margin, proto.margin_relative, higher_is_better)
    if len(per_budget) >= 2:   # the target: E2E flat (within its seed noise) between the two largest budgets
        last, prev = per_budget[-1], per_budget[-2]
        change = last["e2e_test"] - prev["e2e_test"]
        summary["e2e_last_change"] = change
        summary["e2e_still_improving"] = bool(abs(change) >= last["e2e_test_sd"])
    return summary


def _plot(table: pd.DataFrame, summaries: list[dict], spec: dict, metric: str, higher_is_better: bool,
          path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = display_scale(metric)
    fig, axes = plt.subplots(len(summaries), 2, figsize=(11, 4.2 * len(summaries)), squeeze=False)
    for (left, right), s in zip(axes, summaries):
        rows = table[table["pair"] == s["pair"]]
        for i, role in enumerate(("e2e", "db")):
            r = rows[rows["role"] == role].groupby("budget").agg(C=("train_flops", "mean"), mean=("test", "mean"),
                                                                  lo=("test", "min"), hi=("test", "max"), n=("seed", "count"))
            arm = s["arms"][i]
            left.plot(r["C"], scale * r["mean"], "o-", color=f"C{i}", label=f"{arm}: test (mean of {r['n'].max()} seeds)")
            left.fill_between(r["C"], scale * r["lo"], scale * r["hi"], color=f"C{i}", alpha=0.15)
            if "fit" in s:
                f = s["fit"][role]
                grid = np.geomspace(s["fit"]["C_min"], s["fit"]["C_max"], 100)
                left.plot(grid, scale * from_loss(saturating_power_law(grid, f["floor"], f["a"], f["b"], f["C0"]),
                                                  higher_is_better), "--", color=f"C{i}", alpha=0.7,
                          label=f"{arm}: power-law fit on validation")
        left.set_xscale("log")
        left.set_xlabel("training FLOPs (FlopCounterMode, per run)")
        left.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''} — {'higher' if higher_is_better else 'lower'} is better")
        left.set_title(f"{spec['suite']} / {s['pair']} pair (band: min–max over seeds)", fontsize=10)
        left.grid(alpha=0.3, which="both")
        left.legend(fontsize=7)
        pb = pd.DataFrame(s["per_budget"])
        C = np.sqrt(pb["e2e_flops"] * pb["db_flops"])
        ci = np.array(pb["gap_ci"].tolist())
        relative = spec["protocol"].margin_relative   # gaps and margin as fractions of E2E: shown in %
        gap_scale = 100 if relative else scale
        right.errorbar(C, gap_scale * pb["gap_test"], yerr=gap_scale * np.abs(ci.T - pb["gap_test"].to_numpy()),
                       fmt="o", color="k", capsize=3, label="test gap at equal budget multiple (95% bootstrap)")
        if "fit" in s:
            grid = np.geomspace(s["fit"]["C_min"], s["fit"]["C_max"], 100)
            gap = fitted_gap(s["fit"]["e2e"], s["fit"]["db"], grid)
            if relative:
                e = s["fit"]["e2e"]
                gap = gap / np.abs(from_loss(saturating_power_law(grid, e["floor"], e["a"], e["b"], e["C0"]), higher_is_better))
            right.plot(grid, gap_scale * gap, "--", color="C2", label="fitted gap at equal FLOPs (validation)")
        m = spec["protocol"].margin
        right.axhspan(-gap_scale * m, gap_scale * m, color="C2", alpha=0.12, label="verdict margin")
        right.axhline(0, color="grey", lw=0.8)
        right.set_xscale("log")
        right.set_xlabel("training FLOPs (geometric mean of the two arms)")
        unit = " (% of E2E)" if relative else " (points)" if scale == 100 else ""
        right.set_ylabel(f"DB − E2E{unit} — positive: DB better")
        right.grid(alpha=0.3, which="both")
        right.legend(fontsize=7)
    fig.tight_layout()
    return atomic.save_figure(path, fig)


def write_suite(table: pd.DataFrame, spec: dict, higher_is_better: bool, out: Path) -> Path:
    metric = str(table["metric"].iloc[0])
    atomic.write_csv(out / f"{spec['suite']}.csv", table)
    summaries = [pair_summary(table, spec, pair, higher_is_better) for pair in spec["pairs"]
                 if (table["pair"] == pair).any()]
    proto = spec["protocol"]
    epochs = table.groupby(["arm", "budget"])["epochs"].first().unstack().to_dict(orient="index")
    atomic.write_json(out / f"{spec['suite']}_fit.json", {
        "suite": spec["suite"], "metric": metric, "higher_is_better": higher_is_better, "budgets": spec["budgets"],
        "seeds": spec["seeds"], "margin": proto.margin, "margin_relative": proto.margin_relative,
        "epochs": {arm: {f"{b:g}": e for b, e in v.items()} for arm, v in epochs.items()},
        "git_sha": sorted(set(table["git_sha"])), "device": sorted(set(table["device"])),
        "command": _command(), "date": dt.date.today().isoformat(), "pairs": summaries})
    return _plot(table, summaries, spec, metric, higher_is_better, out / f"{spec['suite']}.png")


def _sci(x: float) -> str:
    return f"{x:.2e}"


def crossing_sentence(fit: dict, margin_text: str) -> str:
    """Where the fitted gap enters the margin, with the extrapolation said in the same sentence."""
    c, top = fit.get("crossing"), fit["C_max"]
    share = f"{100 * fit['crossing_share']:.0f}% of seed resamples find a crossing"
    if c is None:
        return (f"The fitted gap does not enter {margin_text} anywhere up to {EXTRAPOLATION:g}× the largest budget "
                f"run ({_sci(EXTRAPOLATION * top)} FLOPs; {share}).")
    ci = fit.get("crossing_ci")
    ci_text = f" (resamples that cross: {_sci(ci[0])}–{_sci(ci[1])})" if ci else ""
    if c <= top:
        return f"The fitted gap is inside {margin_text} from {_sci(c)} FLOPs on, within the budgets run{ci_text}; {share}."
    return (f"The fitted gap enters {margin_text} only at {_sci(c)} FLOPs, {c / top:.1f}× past the largest budget "
            f"run — an extrapolation of the fit, not a measurement{ci_text}; {share}.")


def suite_section(fit: dict) -> list[str]:
    metric, hib = fit["metric"], fit["higher_is_better"]
    scale = display_scale(metric)
    if fit["margin_relative"]:   # a fraction of the E2E figure (BPC, FID): 0.03 is 3 %
        margin_text = f"±{100 * fit['margin']:g}% of E2E (the verdict margin)"
    else:
        margin_text = f"±{scale * fit['margin']:g}{' points' if scale == 100 else ''} (the verdict margin)"
    val_metric = metric_on(metric, "val")
    loss_name = f"1 − {val_metric}" if hib else val_metric
    lines = [f"## {fit['suite']}\n",
             f"Budgets {', '.join(f'{b:g}×' for b in fit['budgets'])} of the suite's own budget, seeds {fit['seeds']}, "
             f"each budget its own run (the cosine schedule spans it); 1× is the verdict protocol's run. "
             "Epochs per arm: " + "; ".join(f"{arm} " + ", ".join(f"{e:g}" for e in v.values())
                                            for arm, v in fit["epochs"].items())
             + f". Code {', '.join(fit['git_sha'])} on {', '.join(fit['device'])}; `{fit['command']}`.\n",
             f"![{fit['suite']} scaling]({fit['suite']}.png)\n"]
    for s in fit["pairs"]:
        lines.append(f"### `{s['pair']}` pair: {s['arms'][0]} vs {s['arms'][1]}\n")
        pb = pd.DataFrame(s["per_budget"])
        show = pd.DataFrame({"budget": pb["budget"].map(lambda b: f"{b:g}×"), "seeds": pb["seeds"],
                             "E2E FLOPs": pb["e2e_flops"].map(_sci), "DB/E2E FLOPs": pb["db_flops"] / pb["e2e_flops"],
                             f"E2E {metric}": scale * pb["e2e_test"], f"DB {metric}": scale * pb["db_test"],
                             "gap (DB − E2E)": scale * pb["gap_test"],
                             "95% interval": pb["gap_ci"].map(lambda c: f"[{scale * c[0]:.3g}, {scale * c[1]:.3g}]"),
                             "verdict": pb["verdict"], "val gap": scale * pb["gap_val"]})
        lines += ["Test figures at each budget (paired over seeds; positive gap = DiffusionBlocks better):\n",
                  _markdown_table(show), ""]
        if "fit" in s:
            f = s["fit"]
            fits = pd.DataFrame([{"arm": s["arms"][i], f"floor ℓ∞ ({loss_name})": f[r]["floor"],
                                  "floor 95%": f"[{f[r]['floor_ci'][0]:.4g}, {f[r]['floor_ci'][1]:.4g}]",
                                  "exponent b": f[r]["b"], "b 95%": f"[{f[r]['b_ci'][0]:.3g}, {f[r]['b_ci'][1]:.3g}]",
                                  "a": f[r]["a"], "points": f[r]["points"]} for i, r in enumerate(("e2e", "db"))])
            lines += [f"Fit on validation: {loss_name} = ℓ∞ + a·(C/C₀)^(−b), C₀ = {_sci(f['e2e']['C0'])} FLOPs, "
                      f"intervals from {f['resamples']} seed resamples:\n", _markdown_table(fits), "",
                      crossing_sentence(f, margin_text) + "\n"]
        else:
            lines.append("Too few budgets finished for a fit.\n")
        top = pb.iloc[-1]
        if top["budget"] < 8:   # the target: the largest budget ≥ 8× the suite's own
            hours = 8 / top["budget"] * top["train_s"] * top["seeds"] / 3600
            lines.append(f"The largest budget run is {top['budget']:g}× the suite's own. 8× would take about "
                         f"{hours:.0f} core-hours of training here (8/{top['budget']:g} × this pair's measured "
                         f"{top['train_s'] / 60:.0f} min per seed × {int(top['seeds'])} seeds), so it is left to a GPU "
                         "(scripts/gpu_scaling.sh).\n")
        if "e2e_still_improving" in s:
            change = scale * s["e2e_last_change"]
            lines.append(f"E2E between the two largest budgets: {change:+.3g}{' points' if scale == 100 else ''} "
                         + ("— more than its seed sd, so **E2E is still improving**: the largest budget is not yet "
                            "where the arms settle.\n" if s["e2e_still_improving"] else
                            "— within its seed sd: E2E has flattened at this scale.\n"))
    return lines


def write_readme(out: Path) -> Path:
    fits = [json.loads(p.read_text()) for p in sorted(out.glob("*_fit.json"))]
    lines = ["# How the DB − E2E gap scales with training compute\n",
             f"Written by `{_command()}` on {dt.date.today().isoformat()} from {out.as_posix()}/*_fit.json "
             "(bench/scaling.py, bench/scaling_fit.py, bench/report_scaling.py).\n",
             "**What was run.** Each suite's verdict-protocol pairs at several multiples of the suite's own budget "
             "(epochs and warm-up scaled together; every budget its own run, so the cosine schedule spans it), on "
             "the protocol's seeds. Compute is each run's training FLOPs, counted with FlopCounterMode.\n",
             "**What was fitted.** Per arm, a saturating power law of the validation loss (1 − accuracy, or the "
             "lower-is-better metric) against FLOPs; the floor ℓ∞ and exponent b get 95% intervals from resampling "
             "seeds. The fitted gap compares the arms at *equal FLOPs*; the tabulated test gaps compare them at equal "
             "budget multiples (equal epochs), whose FLOP ratio the table gives.\n",
             "**What it says about claim (a).** A CPU suite's budgets are a small fraction of the paper's (100–1000 "
             "epochs on other data), so these runs say how the gap moves at this scale, and whether it is a "
             "small-compute artefact within the range run. The fit is a trend: read past the largest budget it is "
             "an extrapolation, and the sentences below say so where they go there.\n"]
    for fit in fits:
        lines += suite_section(fit)
    if not fits:
        lines.append("No suite has run `bench scaling` yet.\n")
    return atomic.write_text(out / "README.md", "\n".join(lines))


def claim_a_note(suite: str, pair: str, out: Path = Path("results/scaling")) -> str:
    """One line for the verdict table's claim (a) row of a suite and pair that has a scaling result:
    the test gap at each budget and what the fitted gap does."""
    path = out / f"{suite}_fit.json"
    if not path.exists():
        return ""
    fit = json.loads(path.read_text())
    s = next((p for p in fit["pairs"] if p["pair"] == pair), None)
    if s is None or not s["per_budget"]:
        return ""
    scale = display_scale(fit["metric"])
    gaps = ", ".join(f"{b['budget']:g}× {scale * b['gap_test']:+.3g} ({b['verdict']})" for b in s["per_budget"])
    trend = ""
    if "fit" in s:
        c = s["fit"].get("crossing")
        trend = ("; fitted gap never inside the margin up to 4× the largest budget" if c is None else
                 f"; fitted gap inside the margin from {c:.2e} FLOPs ({c / s['fit']['C_max']:.1f}× the largest budget)")
    return f"gap vs budget (results/scaling/README.md): {gaps}{trend}"
