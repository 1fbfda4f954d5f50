"""`bench scaling`: the DB − E2E gap against training budget, for the verdict protocol's pairs.

    bench scaling suites/vit_fashion/params.yaml --budgets 0.125,0.25,0.5,1 --pairs tuned --seeds 0,1,2

The budgets, pairs and seeds are the command's arguments (in a suite's dvc.yaml: its `scaling`
stage's cmd, fixed before the runs); pairs default to every pair of the protocol, seeds to its
seeds.  A budget k multiplies each arm's resolved train.epochs and warm-up by k.

Each (arm, seed, budget) is its own run, because the cosine schedule spans its budget: a longer
budget is not a continuation of a shorter one.  Budget 1 *is* the verdict protocol's run
(runs/<suite>/<arm>/seed<N>), reused as it is; budget k lives in runs/<suite>/scaling/x<k>/<arm>/
seed<N>.  A point whose run finished with the same resolved params is never rerun, so adding a
budget runs only that budget; a killed run resumes from its checkpoint.

Then, from finished runs only: results/scaling/<suite>.csv (one row per point: compute, validation
and test figures), <suite>_fit.json (bench.scaling_fit on validation), <suite>.png and the shared
README.md (bench.report_scaling).  Validation figures make the fit; test figures are the published
points and gaps, read from each run's final evaluation.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import yaml

from bench.checkpoint import config_diff
from bench.config import ConfigError, load_config, read_params
from bench.protocol import load_protocol
from bench.splits import metric_on

NEW_RUN_OVERRIDES = {"train.curve_points": 1}   # a point publishes its final evaluation only


def scaling_spec(params_path, budgets, pairs=None, seeds=None) -> dict:
    """What to run, validated against the suite's protocol before anything runs."""
    raw = read_params(params_path)
    proto = load_protocol(params_path)
    if not budgets or len(budgets) < 2 or not all(x > 0 for x in budgets):
        raise ConfigError(f"--budgets must list ≥ 2 positive multiples of the suite's budget, got {budgets!r}")
    for name in pairs or []:
        if name not in proto.pairs:
            raise ConfigError(f"--pairs: unknown pair {name!r}; protocol.pairs in {params_path}: {', '.join(proto.pairs)}")
    return {"budgets": sorted(float(x) for x in set(budgets)), "pairs": list(pairs or proto.pairs),
            "seeds": list(seeds if seeds is not None else proto.seeds), "overrides": NEW_RUN_OVERRIDES,
            "suite": proto.suite, "protocol": proto, "runs_dir": Path(raw.get("runs_dir", "runs")),
            "results_dir": Path(raw.get("results_dir") or "results") / "scaling"}


def point_config(params_path, spec: dict, arm: str, seed: int, budget: float):
    """The run of one point: budget 1 is the protocol's own run; budget k scales the arm's
    resolved epochs and warm-up by k (the schedule keeps its shape) in its own directory."""
    cfg = load_config(params_path, arm, seed=seed)
    if budget == 1.0:
        return cfg
    overrides = [f"train.epochs={cfg.train.epochs * budget!r}", f"train.warmup_epochs={cfg.train.warmup_epochs * budget!r}",
                 *(f"{k}={v}" for k, v in spec["overrides"].items())]
    cfg = load_config(params_path, arm, overrides, seed=seed)
    cfg.out_dir = str(spec["runs_dir"] / spec["suite"] / "scaling" / f"x{budget:g}" / arm / f"seed{seed}")
    return cfg


def finished(cfg) -> bool:
    """Trained and evaluated with exactly these params (anything else is (re)run)."""
    out = Path(cfg.out_dir)
    if not ((out / "eval.json").exists() and (out / "summary.csv").exists() and (out / "params.yaml").exists()):
        return False
    recorded = yaml.safe_load((out / "params.yaml").read_text()) or {}
    for written_beside in ("provenance", "budget"):   # the run's record of where and how long, not params
        recorded.pop(written_beside, None)
    return not config_diff(recorded, cfg)


def points(params_path, spec: dict) -> list[tuple[str, str, int, float]]:
    """Every (pair, arm, seed, budget), seed-major so a stopped run leaves whole seeds."""
    proto = spec["protocol"]
    return [(pair, arm, seed, b) for b in spec["budgets"] for seed in spec["seeds"]
            for pair in spec["pairs"] for arm in proto.pairs[pair]]


def _run_point(params_path: str, spec: dict, arm: str, seed: int, budget: float) -> str:
    from bench.evaluate import evaluate_arm
    from bench.train import train
    cfg = point_config(params_path, spec, arm, seed, budget)
    train(cfg, params_path=params_path, resume="auto", progress=False, tags={"scaling_budget": f"{budget:g}"})
    evaluate_arm(cfg)
    return f"{arm} seed {seed} ×{budget:g}"


def run_points(params_path, spec: dict, jobs: int = 1, log=print) -> None:
    todo = []
    for _, arm, seed, budget in points(params_path, spec):
        cfg = point_config(params_path, spec, arm, seed, budget)
        if not finished(cfg) and (arm, seed, budget) not in todo:
            todo.append((arm, seed, budget))
    log(f"{spec['suite']} scaling: {len(todo)} point(s) to run"
        + (f" ({jobs} side by side, {load_config(params_path, todo[0][0]).train.threads or 'all'} thread(s) each)" if todo else ""))
    failed = []

    def report(point, result) -> None:   # a point that fails (e.g. diverges) is named; the others go on
        try:
            log("done: " + result())
        except Exception as e:   # noqa: BLE001 — any failure of one run; its message is kept
            failed.append(f"{point[0]} seed {point[1]} ×{point[2]:g}: {e}")
            log("FAILED: " + failed[-1])

    if jobs <= 1:
        for point in todo:
            report(point, lambda point=point: _run_point(str(params_path), spec, *point))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for point, future in [(p, pool.submit(_run_point, str(params_path), spec, *p)) for p in todo]:
                report(point, future.result)
    if failed:
        log(f"{spec['suite']} scaling: {len(failed)} point(s) failed and are left out of the results: "
            + "; ".join(failed))


def collect(params_path, spec: dict, log=print) -> pd.DataFrame:
    """One row per finished point: its compute (bench.report_verdict.arm_compute), validation
    and test figures.  Unfinished points are named and left out."""
    from bench.report_verdict import arm_compute
    rows = []
    for pair, arm, seed, budget in points(params_path, spec):
        cfg = point_config(params_path, spec, arm, seed, budget)
        out = Path(cfg.out_dir)
        if not finished(cfg):
            log(f"{spec['suite']} scaling: {arm} seed {seed} ×{budget:g} not finished ({out}); left out")
            continue
        ev = json.loads((out / "eval.json").read_text())
        s = pd.read_csv(out / "summary.csv").iloc[0]
        role = "e2e" if arm == spec["protocol"].pairs[pair][0] else "db"
        rows.append({"suite": spec["suite"], "pair": pair, "role": role, "arm": arm, "seed": seed, "budget": budget,
                     "epochs": cfg.train.epochs, "optimizer_steps": int(s["optimizer_steps"]),
                     "layer_evals": int(s["layer_evals"]), **arm_compute(cfg), "metric": ev["metric"],
                     "val": ev[metric_on(ev["metric"], "val")], "test": ev[ev["metric"]],
                     "train_time_s": float(s["train_time_s"]), "git_sha": str(s["git_sha"])[:12],
                     "device": s["device"], "run": str(out)})
    return pd.DataFrame(rows)


def run_scaling(params_path, budgets, pairs=None, seeds=None, jobs: int = 1, train: bool = True,
                log=print) -> Path:
    from bench.report_scaling import write_suite, write_readme
    from bench.tasks import task_class
    spec = scaling_spec(params_path, budgets, pairs, seeds)   # bad input fails here, before any compute
    if train:
        run_points(params_path, spec, jobs, log)
    table = collect(params_path, spec, log)
    if not len(table):
        raise FileNotFoundError(f"{spec['suite']}: no scaling point has finished; run `bench scaling {params_path} --budgets …` without --no-train")
    cfg = load_config(params_path, spec["protocol"].arms[0])
    out = write_suite(table, spec, task_class(cfg.task).higher_is_better, spec["results_dir"])
    write_readme(spec["results_dir"])
    return out
