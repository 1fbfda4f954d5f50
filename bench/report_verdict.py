"""`bench verdict`: a suite's results under the verdict protocol, from finished runs only (it
never trains).

Reads runs/<suite>/<arm>/seed<N>/{eval.json, summary.csv, history.csv} for every arm of
protocol.pairs and every seed, and writes into results/<suite>/:

  seeds.csv           one row per (arm, seed): validation and test figures, steps, FLOPs, params
  verdict.csv         one row per claim of the paper: metric, seeds, mean paired difference, 95%
                      bootstrap interval, P(DB ≥ E2E), the pre-set margin, the verdict
  comparison.md       the protocol, the per-arm table (mean ± sd over seeds), the verdicts, the
                      compute and parameter ratios of each pair, the per-seed figures
  learning_curve.csv / .png   test metric vs training compute, mean over seeds with the min–max band
  metrics.json        per-arm means and per-pair verdicts, declared as DVC metrics

Test figures are the final evaluation's (`bench evaluate`); validation figures are reported
beside them because every choice (tuning, variants) was made on them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import atomic, track
from bench.config import ConfigError, load_config, read_params
from bench.protocol import CLAIMS, Protocol, load_protocol
from bench.report import _command, _markdown_table, display_scale
from bench.splits import metric_on
from bench.verdict import compare_pair
from bench.verdict_measured import measured_rows

# comparison.md's verdict section: its heading and rule, then the table, up to the next heading
# (`bench verdict --measured-only` replaces what lies between them)
VERDICTS_HEAD = ("## Verdicts\n\nPositive difference = DiffusionBlocks better. Interval: percentile bootstrap of the "
                 "mean paired (same-seed) difference, 95%. matches: the whole interval inside ±margin; better / worse: "
                 "the interval above / below 0; otherwise inconclusive.\n")
COMPUTE_HEADING = "## Compute and size of each pair\n"
MATCHED = 0.10   # "matched compute" is claimed only where the FLOP ratio is within 10%


def arm_compute(cfg, steps: int | None = None) -> dict:
    """Training FLOPs (FlopCounterMode on one step of each block, times the steps that trained
    it, replaying the run's own block draws) and the parameter count of an arm.  With `steps`
    given (a run whose summary is gone), the blocks' expected shares steps / B are used."""
    import torch

    from bench import seeding
    from bench.blocks import BlockSampler
    from bench.flops import param_counts, run_flops, step_flops
    from bench.tasks import make_task
    from bench.train import Budget, build_model

    replay = steps is None
    if replay:
        summary = pd.read_csv(Path(cfg.out_dir) / "summary.csv").iloc[0]
        steps, run_evals = int(summary["optimizer_steps"]), int(summary["layer_evals"])
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, task)
    per_step = step_flops(cfg, task, model, torch.device("cpu"))
    counts = None
    if cfg.is_dblocks and replay:
        sampler = BlockSampler(cfg.diffusion.num_blocks, seeding.stream_seed(cfg.train.seed, "block"))
        counts = np.bincount([sampler.sample() for _ in range(steps)], minlength=cfg.diffusion.num_blocks).tolist()
    flops = run_flops(cfg, per_step, Budget(0, 0, steps, 0), counts)
    measured = per_step["layer_evals"][0]
    if replay and not cfg.is_dblocks and measured * steps != run_evals:
        # a random unroll (recurrent e2e): one step was measured at one draw of r; scale its forward
        # FLOPs by the run's own counted layer evaluations (the backward, truncated BPTT, is fixed)
        flops = steps * per_step["backward"][0] + per_step["forward"][0] * run_evals / measured
    return {"train_flops": float(flops), "params": param_counts(model)["total"]}


def collect_seeds(params_path, proto: Protocol, log=print, arms: list[str] | None = None,
                  seeds: list[int] | None = None) -> pd.DataFrame:
    """Every finished (arm, seed).  A seed not yet run is left out with a printed line, and the
    verdict rows count only the seeds both arms of a pair finished (their `seeds` column says how
    many; `missing_seeds` names the others)."""
    rows = []
    for arm in arms or proto.arms:
        for seed in seeds or proto.seeds:
            try:
                cfg = load_config(params_path, arm, seed=seed)
            except ConfigError as e:   # a tuned arm before `bench tune` has run
                log(f"{proto.suite}/{arm}: {e}; left out")
                break
            out = Path(cfg.out_dir)
            missing = [f for f in ("eval.json", "summary.csv") if not (out / f).exists()]
            if missing:
                log(f"{proto.suite}/{arm} seed {seed}: no {out / missing[0]} (run `bench train {params_path} --arm {arm} "
                    f"--seed {seed}` and `bench evaluate …`, or scripts/run_seeds.sh); left out")
                continue
            ev = json.loads((out / "eval.json").read_text())
            s = pd.read_csv(out / "summary.csv").iloc[0]
            metric = ev["metric"]
            rows.append({"arm": arm, "seed": seed, "mode": cfg.mode, "metric": metric,
                         "val": ev[metric_on(metric, "val")], "test": ev[metric],
                         **{k: v for k, v in ev.items() if "@" in k and isinstance(v, (int, float))},
                         "optimizer_steps": int(s["optimizer_steps"]), "layer_evals": int(s["layer_evals"]),
                         "train_time_s": float(s["train_time_s"]), "peak_mem_MiB": float(s["peak_mem_bytes"]) / 2**20,
                         **arm_compute(cfg), "git_sha": str(s["git_sha"])[:12], "device": s["device"]})
    return pd.DataFrame(rows)


def paired(seeds: pd.DataFrame, ref: str, other: str, seed_list: list[int], higher_is_better: bool,
           proto: Protocol):
    """The seeds both arms finished, their per-seed rows, and compare_pair on test and on val
    (None when no seed is shared)."""
    done = [s for s in seed_list if s in set(seeds.loc[seeds["arm"] == ref, "seed"])
            and s in set(seeds.loc[seeds["arm"] == other, "seed"])] if len(seeds) else []
    if not done:
        return done, None, None, None, None
    a = seeds[seeds["arm"] == ref].set_index("seed").loc[done]
    b = seeds[seeds["arm"] == other].set_index("seed").loc[done]
    test, val = (compare_pair(a[c].tolist(), b[c].tolist(), higher_is_better, proto.margin, proto.margin_relative)
                 for c in ("test", "val"))
    return done, a, b, test, val


def pair_rows(seeds: pd.DataFrame, proto: Protocol, higher_is_better: bool) -> list[dict]:
    rows = []
    for name, (e2e, db) in proto.pairs.items():
        done, a, b, r, val = paired(seeds, e2e, db, proto.seeds, higher_is_better, proto)
        if not done:
            rows.append({"claim": "a", "statement": CLAIMS["a"], "pair": name, "e2e_arm": e2e, "db_arm": db,
                         "verdict": "not tested", "note": "no seed finished for both arms"})
            continue
        flop_ratio = float(b["train_flops"].mean() / a["train_flops"].mean())
        param_ratio = float(b["params"].mean() / a["params"].mean())
        matched = abs(flop_ratio - 1) <= MATCHED
        rows.append({"claim": "a", "statement": CLAIMS["a"] if matched else
                     f"DB vs E2E (compute NOT matched: FLOP ratio DB/E2E {flop_ratio:.2f})",
                     "pair": name, "e2e_arm": e2e, "db_arm": db, "metric": a["metric"].iloc[0], **r,
                     "val_mean_diff": val["mean_diff"], "flop_ratio_db_e2e": flop_ratio,
                     "param_ratio_db_e2e": param_ratio, "compute": "matched" if matched else "not matched",
                     "missing_seeds": " ".join(str(s) for s in proto.seeds if s not in done),
                     "note": "" if len(done) == len(proto.seeds) else
                     f"{len(done)} of the protocol's {len(proto.seeds)} seeds finished"})
    return rows


def recurrent_rows(pairs: list[dict], seeds: pd.DataFrame, claimed_saving: float = 10.0,
                   margin: float = 0.2) -> list[dict]:
    """Claim (f) for a recurrent suite, per pair: (1) the training-compute saving E2E / DB in counted
    FLOPs against the paper's ≈10× (a measurement, no interval: signed saving/10 − 1, matches within
    ±margin); (2) the quality at that saving, the pair's paired difference and verdict (claim (a)'s
    numbers, restated: the claim is "as good at ~10× less compute")."""
    rows, layer = [], seeds.groupby("arm")["layer_evals"].mean()
    for p in pairs:
        if p.get("verdict") == "not tested":
            continue
        saving = 1.0 / p["flop_ratio_db_e2e"]
        layer_saving = float(layer[p["e2e_arm"]] / layer[p["db_arm"]])
        d = saving / claimed_saving - 1
        common = {"claim": "f", "pair": p["pair"], "e2e_arm": p["e2e_arm"], "db_arm": p["db_arm"]}
        rows.append({**common, "statement": f"{CLAIMS['f']} (training FLOPs saved)", "metric": f"FLOP saving / {claimed_saving:g}",
                     "seeds": 1, "mean_diff": d, "ci_low": d, "ci_high": d, "margin": margin,
                     "verdict": "matches" if abs(d) < margin else "better" if d > 0 else "worse",
                     "note": f"E2E / DB training FLOPs = {saving:.2f}× (layer evaluations {layer_saving:.2f}×; counted, "
                             f"deterministic); the paper's ≈{claimed_saving:g}× counts 32 recurrent iterations → 1 pass at 3× the epochs"})
        rows.append({**{k: v for k, v in p.items() if k not in ("statement", "claim", "compute", "note")}, **common,
                     "statement": f"{CLAIMS['f']} (quality at {saving:.1f}× less training FLOPs)",
                     "note": "claim (a)'s paired difference at these budgets, restated for (f)"})
    return rows


def claim_rows(params_path, proto: Protocol, higher_is_better: bool, log=print) -> list[dict]:
    """Claims (b) and (c): each [the paper's choice, the alternative] over protocol.claim_seeds,
    signed so that positive = the paper's choice is better ("better" supports the claim)."""
    rows = []
    for letter, entries in proto.claims.items():
        for name, (choice, alternative) in entries.items():
            seeds = collect_seeds(params_path, proto, log, [choice, alternative], proto.claim_seeds)
            done, _, b, r, val = paired(seeds, alternative, choice, proto.claim_seeds, higher_is_better, proto)
            row = {"claim": letter, "statement": f"{CLAIMS[letter]} ({name}: {choice} vs {alternative})",
                   "pair": name, "e2e_arm": alternative, "db_arm": choice}
            if not done:
                rows.append({**row, "verdict": "not tested", "note": "no seed finished for both arms"})
                continue
            rows.append({**row, "metric": b["metric"].iloc[0], **r, "val_mean_diff": val["mean_diff"],
                         "missing_seeds": " ".join(str(s) for s in proto.claim_seeds if s not in done),
                         "note": "positive: the paper's choice is better" + (
                             "" if len(done) == len(proto.claim_seeds) else
                             f"; {len(done)} of the protocol's {len(proto.claim_seeds)} seeds finished")})
    return rows


def ablation_rows(params_path, proto: Protocol, higher_is_better: bool, log=print) -> pd.DataFrame:
    """Each ablation [reference arm, changed arm] over protocol.ablation_seeds: the paired
    difference changed − reference (positive: the change helps), its interval and the same
    verdict rule.  Ablations are reported apart from the paper's claims."""
    rows = []
    for name, (ref, changed) in proto.ablations.items():
        seeds = collect_seeds(params_path, proto, log, [ref, changed], proto.ablation_seeds)
        done, a, b, r, val = paired(seeds, ref, changed, proto.ablation_seeds, higher_is_better, proto)
        if not done:
            rows.append({"ablation": name, "reference": ref, "changed": changed, "verdict": "not run"})
            continue
        rows.append({"ablation": name, "reference": ref, "changed": changed, **r, "val_mean_diff": val["mean_diff"],
                     "param_ratio": float(b["params"].mean() / a["params"].mean())})
    return pd.DataFrame(rows)


def untested_rows(present: set[str], task: str) -> list[dict]:
    # (e) is a block-wise sampling saving: a recurrent DB model is one block (B = 1) over the whole range
    applies = {"e": task in ("generation", "autoregressive"), "f": task == "recurrent"}
    return [{"claim": c, "statement": s, "verdict": "not tested",
             "note": "not run under the protocol in this suite" if applies.get(c, True) else
             f"does not apply to {'an' if task[0] in 'aeiou' else 'a'} {task} suite"} for c, s in CLAIMS.items() if c not in present]


def _curve(params_path, proto: Protocol, metric: str, higher_is_better: bool, out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for arm in proto.arms:
        for seed in proto.seeds:
            try:
                path = Path(load_config(params_path, arm, seed=seed).out_dir) / "history.csv"
            except ConfigError:
                break
            if not (path.parent / "eval.json").exists():
                continue
            h = pd.read_csv(path)
            rows += [{"arm": arm, "seed": seed, "epochs_equiv": round(e, 4), "value": v}
                     for e, v in zip(h["epochs_equiv"], h[metric])]
    df = pd.DataFrame(rows)
    curve = df.groupby(["arm", "epochs_equiv"])["value"].agg(["mean", "min", "max", "count"]).reset_index()
    atomic.write_csv(out / "learning_curve.csv", curve)
    # the same means one column per arm: what `dvc plots show` draws (it cannot split rows by arm)
    # (the k-th point of every arm on one row, at their mean compute: E2E's and DB's points sit at the
    # same fractions of the budget but differ slightly in counted epochs)
    k = curve.sort_values("epochs_equiv").groupby("arm").cumcount()
    wide = curve.assign(point=k).pivot_table(index="point", columns="arm", values="mean").reindex(columns=proto.arms)
    wide.insert(0, "epochs_equiv", curve.assign(point=k).groupby("point")["epochs_equiv"].mean().round(4))
    atomic.write_csv(out / "learning_curve_by_arm.csv", wide.reset_index(drop=True))
    scale = display_scale(metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(proto.arms):
        c = curve[curve["arm"] == arm]
        n = int(c["count"].max()) if len(c) else 0
        ax.plot(c["epochs_equiv"], scale * c["mean"], marker="o", color=f"C{i}", label=f"{arm} (mean of {n} seeds)")
        ax.fill_between(c["epochs_equiv"], scale * c["min"], scale * c["max"], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("training compute (epoch-equivalents of full-depth layer evaluations)")
    better = "higher" if higher_is_better else "lower"
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''} — {better} is better")
    ax.set_title(title + " (band: min–max over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.save_figure(out / "learning_curve.png", fig)
    return out / "learning_curve.png"


def _scaled(table: pd.DataFrame, scale: float) -> pd.DataFrame:
    out = table.copy()
    for c in ("e2e_mean", "db_mean", "mean_diff", "ci_low", "ci_high", "margin", "val_mean_diff"):
        if c in out:
            out[c] = scale * out[c]
    return out.rename(columns={"e2e_mean": "reference_mean", "db_mean": "changed_mean", "p_db_ge_e2e": "p_changed_ge_ref"})


def verdict_markdown_table(verdicts: pd.DataFrame, scale: float) -> str:
    """comparison.md's verdict table: metric differences (a, b, c, f's paired rows) in the suite's
    display unit (accuracy points: ×100), measured ratios (d, e, f's saving) as they are."""
    show = verdicts[[c for c in ("claim", "statement", "pair", "metric", "seeds", "mean_diff", "ci_low", "ci_high",
                                 "p_db_ge_e2e", "margin", "verdict", "note") if c in verdicts]].copy()
    for c in ("mean_diff", "ci_low", "ci_high", "margin"):
        scored = show["claim"].isin(["a", "b", "c"]) | ((show["claim"] == "f") & (show["seeds"] != 1))   # metric differences (d, f's saving: ratios, unscaled)
        show.loc[scored, c] = scale * show.loc[scored, c].astype(float)
    return _markdown_table(show.astype(object).fillna(""))


def _tuning_sentence(proto: Protocol) -> str:
    if proto.tuned_from:
        return (f"Tuned arms: the settings {proto.tuned_from}'s tuning chose "
                f"([tuning.md](../{proto.tuned_from}/tuning.md), the same number of validation-only trials for every "
                "arm), reused unchanged: no trial saw this suite's data. ")
    if proto.tune:
        return "Tuned arms: see [tuning.md](tuning.md) (the same number of validation-only trials for every arm). "
    return "No tuned pair: every arm runs its params as written (no tuning for any arm). "


def write_verdict(params_path) -> Path:
    from bench.tasks import task_class
    raw = read_params(params_path)
    proto = load_protocol(params_path)
    out = Path(raw.get("results_dir") or "results") / proto.suite
    first = load_config(params_path, proto.arms[0], seed=proto.seeds[0])
    task_cls = task_class(first.task)
    seeds = collect_seeds(params_path, proto)
    if seeds.empty:   # nothing to judge: say so before any result file is written
        raise ConfigError(f"bench verdict {params_path}: no arm of protocol.pairs has an evaluated seed yet "
                          f"(bench train … --seed N, then bench evaluate … --seed N)")
    atomic.write_csv(out / "seeds.csv", seeds)
    rows = pair_rows(seeds, proto, task_cls.higher_is_better)
    if first.task == "recurrent":
        rows += recurrent_rows(rows, seeds)
    rows += claim_rows(params_path, proto, task_cls.higher_is_better)
    rows += measured_rows(params_path, proto, first.task, out)   # (d), (e): bench.verdict_measured
    rows += untested_rows({r["claim"] for r in rows}, first.task)
    verdicts = pd.DataFrame(rows)
    verdicts.insert(0, "suite", proto.suite)
    atomic.write_csv(out / "verdict.csv", verdicts)
    ablations = ablation_rows(params_path, proto, task_cls.higher_is_better) if proto.ablations else pd.DataFrame()
    if len(ablations):
        atomic.write_csv(out / "ablations.csv", ablations)
    png = _curve(params_path, proto, task_cls.metric, task_cls.higher_is_better, out, f"{proto.suite}: {task_cls.metric} vs training compute")

    scale = display_scale(task_cls.metric)
    unit = " (points)" if scale == 100 else ""
    per_arm = seeds.groupby("arm", sort=False).agg(
        mode=("mode", "first"), seeds=("seed", "count"), test_mean=("test", "mean"), test_sd=("test", "std"),
        val_mean=("val", "mean"), val_sd=("val", "std"), optimizer_steps=("optimizer_steps", "first"),
        train_flops=("train_flops", "mean"), params=("params", "first"), peak_mem_MiB=("peak_mem_MiB", "max"),
        train_time_s=("train_time_s", "mean")).reset_index()
    for c in ("test_mean", "test_sd", "val_mean", "val_sd"):
        per_arm[c] = scale * per_arm[c]
    pair_cols = [c for c in ("pair", "e2e_arm", "db_arm", "seeds", "missing_seeds", "flop_ratio_db_e2e",
                             "param_ratio_db_e2e", "compute", "val_mean_diff") if c in verdicts]
    pairs = verdicts[verdicts["claim"] == "a"][pair_cols].copy()
    if "val_mean_diff" in pairs:
        pairs["val_mean_diff"] = scale * pairs["val_mean_diff"]
    per_seed = seeds.pivot(index="seed", columns="arm", values="test") * scale
    extra = [c for c in seeds.columns if "@" in c and c != task_cls.metric and seeds[c].notna().any()]
    others = (seeds.groupby("arm", sort=False)[extra].mean().T.reset_index().rename(columns={"index": "figure"})
              if extra else pd.DataFrame())
    md = [f"# {proto.suite}: end-to-end vs DiffusionBlocks under the verdict protocol\n",
          f"Produced by `{_command()}` on {dt.date.today().isoformat()}, from runs of code "
          f"{', '.join(sorted(set(seeds['git_sha'])))} on {seeds['device'].iloc[0]}.\n",
          f"Protocol (params.yaml `protocol:`, fixed before the runs): seeds {proto.seeds}; pairs "
          + "; ".join(f"`{n}` = {e} vs {d}" for n, (e, d) in proto.pairs.items())
          + f"; margin ±{scale * proto.margin:g}{unit}{' (relative to E2E)' if proto.margin_relative else ''}. "
          + _tuning_sentence(proto)
          + "Test was read only by each run's final evaluation and its learning curve.\n",
          f"## Arms (mean ± sd over seeds; {task_cls.metric}{unit if scale == 100 else ''})\n",
          _markdown_table(per_arm),
          "\n`train_flops`: FlopCounterMode on one step of each block × the steps that trained it; `params`: the "
          "arm's parameter count; `peak_mem_MiB`: the training runs' measured step peak (largest over blocks and seeds).\n",
          VERDICTS_HEAD,
          verdict_markdown_table(verdicts, scale),
          "\n" + COMPUTE_HEADING,
          _markdown_table(pairs.fillna("")),
          f"\n`val_mean_diff`: the same paired difference on validation{unit}.\n",
          f"## Per seed (test {task_cls.metric}{unit})\n", _markdown_table(per_seed.reset_index()),
          *(["\n## Other figures of the final evaluation (mean over seeds, in their own units; test unless named val_…)\n",
             "Read beside the ranking metric, never instead of it (definitions: the task's metric table).\n",
             _markdown_table(others.fillna(""))] if len(others) else []),
          *(["\n## Ablations of the DB arm (not claims of the paper)\n",
             f"Changed − reference, paired over seeds {proto.ablation_seeds} (positive: the change helps), test "
             f"{task_cls.metric}{unit}; the same interval and verdict rule; `param_ratio`: changed / reference parameters.\n",
             _markdown_table(_scaled(ablations, scale).fillna(""))] if len(ablations) else []),
          f"\n![learning curve]({png.name})\n"]
    # the figures as DVC metrics (`dvc metrics show` / `diff`): per arm mean over seeds, per pair the verdict
    metrics = {"metric": task_cls.metric,
               "arms": {r.arm: {"test_mean": float(r.test_mean) / scale, "val_mean": float(r.val_mean) / scale,
                                "seeds": int(r.seeds)} for r in per_arm.itertuples()},
               "pairs": {str(r["pair"]): {k: (float(r[k]) if isinstance(r[k], (int, float, np.floating)) else str(r[k]))
                                          for k in ("mean_diff", "ci_low", "ci_high", "verdict", "seeds") if k in r and pd.notna(r[k])}
                         for _, r in verdicts[verdicts["claim"] == "a"].iterrows()}}
    atomic.write_json(out / "metrics.json", metrics)
    written = atomic.write_text(out / "comparison.md", "\n".join(md))
    track.log_suite_artifacts(proto.suite, params_path, [written, out / "verdict.csv", out / "seeds.csv", png])
    return written
