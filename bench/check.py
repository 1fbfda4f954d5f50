"""`bench check`: regression checks that CI runs after the tests.

Each suite with a `check:` section in its params.yaml has a small CI configuration:

    check:
      arms: [e2e, dblocks]                       # which arms to run (default: all)
      overrides: {train.epochs: 0.2, data.train_subset: 2000, data.test_subset: 500}
      tolerance: {test_acc: 0.03}                # absolute, per metric (defaults below)

`bench check` trains and evaluates those arms and compares three kinds of figures with the
committed baselines in results/baselines/<suite>.json:

  <metric>         the suite's quality metric after the short run     (absolute tolerance)
  first_loss       the training loss of the very first step            (relative tolerance)
  noise_intervals  every block's noise interval and training range     (relative tolerance)

The first loss depends on the data order, σ sampling, the partition, preconditioning, the
weighting and the model's initialisation, so a change to any of them moves it even when the
short run's metric stays inside its band.  Each tolerance is stored beside its baseline.
Baselines change only through `bench check --update`, never in CI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from bench import atomic, track
from bench.config import ConfigError, arm_names, load_config, read_params

DEFAULT_TOLERANCE = {"first_loss": 1e-3, "noise_intervals": 1e-6}   # relative
DEFAULT_METRIC_TOLERANCE = 0.03                                       # absolute, on the suite's metric
BASELINES = Path("results/baselines")


def suites_with_checks(root: str | Path = "suites") -> list[Path]:
    return sorted(p for p in Path(root).glob("*/params.yaml") if "check" in (read_params(p) or {}))


def measure_suite(params_path: str | Path, log=print, extra: list[str] = ()) -> tuple[str, dict]:
    """Run the suite's check configuration (plus `extra` overrides); {arm: {figure: value}}."""
    from bench.tasks import make_task
    from bench.train import train
    raw = read_params(params_path)
    spec = raw.get("check") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"`check:` in {params_path} must be a mapping")
    arms = spec.get("arms") or arm_names(params_path)
    overrides = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in (spec.get("overrides") or {}).items()]
    overrides += ["train.log_every=1", "train.curve_points=1", *extra]
    figures, suite = {}, None
    os.environ["BENCH_MLFLOW"] = "0"  # checks leave no runs in the user's store
    for arm in arms:
        cfg = load_config(params_path, arm, overrides)
        suite = cfg.suite
        cfg.out_dir = str(Path("runs") / "check" / cfg.suite / arm)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        log(f"check {cfg.suite}/{arm}")
        summary = train(cfg, progress=False, log=lambda *_: None)
        first = pd.read_csv(Path(cfg.out_dir) / "log.csv").iloc[0]["train/loss"]
        task = make_task(cfg)
        p = task.partition if cfg.is_dblocks else task.full_range
        intervals = [float(x) for b in range(p.num_blocks) for x in (*p.interval(b), *p.training_range(b))]
        figures[arm] = {summary["metric"]: float(summary[summary["metric"]]), "first_loss": float(first),
                        "noise_intervals": intervals}
    return suite, {"metric_tolerance": spec.get("tolerance") or {}, "arms": figures}


def _within(value, base, tol, kind) -> bool:
    if isinstance(base, list):
        return isinstance(value, list) and len(value) == len(base) and all(
            _within(v, b, tol, kind) for v, b in zip(value, base))
    if kind == "rel":
        return abs(value - base) <= tol * max(abs(base), 1e-12)
    return abs(value - base) <= tol


def run_checks(params_paths: list[Path], update: bool = False, log=print) -> int:
    rows, failed = [], False
    for params_path in params_paths:
        suite, measured = measure_suite(params_path, log)
        path = BASELINES / f"{suite}.json"
        if update:
            baseline = {"suite": suite, "params": str(params_path), "written_by": "bench check --update",
                        "git_sha": track.git_sha(), "arms": {}}
            for arm, figs in measured["arms"].items():
                baseline["arms"][arm] = {}
                for name, value in figs.items():
                    if name in DEFAULT_TOLERANCE:
                        tol, kind = DEFAULT_TOLERANCE[name], "rel"
                    else:
                        tol, kind = float(measured["metric_tolerance"].get(name, DEFAULT_METRIC_TOLERANCE)), "abs"
                    baseline["arms"][arm][name] = {"value": value, "tolerance": tol, "kind": kind}
            atomic.write_json(path, baseline)
            log(f"wrote {path}")
            continue
        if not path.exists():
            raise FileNotFoundError(f"no baseline for suite {suite} ({path}); create it with "
                                    f"`bench check --update {params_path}` and commit it")
        baseline = json.loads(path.read_text())
        for arm, figs in baseline["arms"].items():
            for name, b in figs.items():
                now = measured["arms"].get(arm, {}).get(name)
                ok = now is not None and _within(now, b["value"], b["tolerance"], b["kind"])
                failed |= not ok
                show = (lambda v: "[…]" if isinstance(v, list) else f"{v:.6g}")
                diff = "" if isinstance(b["value"], list) or now is None else f"{now - b['value']:+.3g}"
                if isinstance(b["value"], list) and now is not None and not ok:
                    diff = "moved"
                rows.append({"suite": suite, "arm": arm, "figure": name, "baseline": show(b["value"]),
                             "now": "missing" if now is None else show(now), "diff": diff,
                             "tolerance": f"{b['tolerance']:g} ({b['kind']})", "status": "ok" if ok else "MOVED"})
    if rows:
        table = pd.DataFrame(rows)
        log(table.to_string(index=False))
        if failed:
            log("bench check: some figures moved beyond their tolerance (see MOVED above). If the change is "
                "intended, refresh the baselines with `bench check --update` and commit them.")
    return 1 if failed else 0
