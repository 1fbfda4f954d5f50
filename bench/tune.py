"""`bench tune`: equal tuning effort for every arm, on validation only (AlgoPerf's "external
tuning" idea).

Every arm with `tuned: true` in the suite's pairs gets its own Optuna study with the same number
of trials (protocol.tune.trials), the same proxy budget (protocol.tune.overrides) and the same
TPE sampler seed.  The space is the shared optimiser knobs (protocol.tune.shared_space: lr,
weight decay, warm-up) for every arm, plus the method's own knobs (protocol.tune.method_space:
P_mean, P_std, weighting, γ) for DiffusionBlocks arms.  Each trial trains from the arm's base
settings inside `bench.splits.selection`, so the test split cannot be opened, and is scored by
the task's metric on the validation split at the end of the proxy budget (no pruning: every trial
spends the same budget; a diverged trial counts as a trial and scores nothing).

Outputs: results/<suite>/tuned.yaml (the chosen overrides per arm, read by the pipeline's tuned
arms), results/<suite>/tuning.csv (every trial of every arm: its params and validation score) and
results/<suite>/tuning.md.  Studies live in runs/<suite>/tune/optuna.db, named by a fingerprint
of the arm's base settings, space and budget; a killed `bench tune` continues where it stopped (retrying the
interrupted trial's params).  Unlike `bench sweep`, its sampler is seeded once per process, as
when the committed tunings ran, so those reproduce exactly; a resumed tuning proposes different
later trials from an uninterrupted one.  Each trial's MLflow run carries its trial number, and
the trial records the run's id.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import pandas as pd
import yaml

from bench import atomic
from bench.config import ConfigError, TUNED_KEY, load_config, read_params, tuned_path
from bench.protocol import load_protocol
from bench.splits import metric_on, selection
from bench.sweep import as_overrides, search_distributions


def tuned_arms(params_path) -> list[str]:
    raw, proto = read_params(params_path), load_protocol(params_path)
    return [a for a in proto.arms if (raw["arms"][a] or {}).get(TUNED_KEY) is True]


def _space(proto, cfg) -> dict:
    space = dict(proto.tune.shared_space)
    if cfg.is_dblocks:
        space.update(proto.tune.method_space)
    return space


def _study_name(base, space: dict, spec) -> str:
    """suite-arm-<fingerprint of the base settings, space and budget>: a study resumes only where
    all of them are unchanged (a changed batch size or model starts a new study, not a mixed one)."""
    settings = base.to_dict()
    settings.pop("out_dir")
    settings["data"].pop("root")   # where the data lives is not what it is
    blob = json.dumps({"base": settings, "space": space, "trials": spec.trials, "seed": spec.seed,
                       "overrides": spec.overrides}, sort_keys=True, default=str)
    return f"{base.suite}-{base.arm}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def _open_study(optuna, name: str, db: Path, maximize: bool, seed: int):
    """The study `name` in `db`, created if new.  Two `bench tune --arm` started together race to
    create the database's schema; the loser's IntegrityError is retried once the winner is done."""
    import sqlalchemy.exc
    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=f"sqlite:///{db}", load_if_exists=True,
                                       direction="maximize" if maximize else "minimize",
                                       sampler=optuna.samplers.TPESampler(seed=seed))
        except sqlalchemy.exc.IntegrityError:
            if attempt == 4:
                raise
            time.sleep(1 + attempt)


def tune_arm(params_path, arm: str, log=print) -> dict:
    """Run (or continue) the arm's study; return its record for tuned.yaml."""
    import optuna
    from optuna.trial import TrialState

    from bench.tasks import task_class
    from bench.train import NonFiniteLoss, train

    proto = load_protocol(params_path)
    spec = proto.tune
    base = load_config(params_path, arm, as_overrides(spec.overrides), tuning=True)
    task_cls = task_class(base.task)
    metric = metric_on(task_cls.metric, "val")
    space = _space(proto, base)
    dists = search_distributions(space, set(space), base.task, base.model["arch"], params_path)
    name = _study_name(base, space, spec)
    root = Path(read_params(params_path).get("runs_dir", "runs")) / proto.suite / "tune"
    root.mkdir(parents=True, exist_ok=True)
    study = _open_study(optuna, name, root / "optuna.db", task_cls.higher_is_better, spec.seed)
    with warnings.catch_warnings():   # set_metric_names is marked experimental in Optuna 3/4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])

    def finished() -> list:   # a trial killed mid-way is not counted: its params are tried again
        interrupted = set(study.user_attrs.get("interrupted", []))
        return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and t.number not in interrupted]

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.set_user_attr("interrupted", [*study.user_attrs.get("interrupted", []), t.number])
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params)
        log(f"tune {arm}: trial {t.number} was interrupted; its params are queued again")
    from tqdm import tqdm
    bar = tqdm(total=spec.trials, initial=len(finished()), desc=f"tune {arm}", unit="trial", disable=None)
    while len(finished()) < spec.trials:
        bar.n = len(finished())
        bar.refresh()
        trial = study.ask(dists)
        overrides = as_overrides(spec.overrides) + as_overrides(trial.params)
        try:
            cfg = load_config(params_path, arm, overrides, tuning=True)
        except ConfigError as e:
            trial.set_user_attr("invalid", str(e))
            study.tell(trial, state=TrialState.FAIL)
            continue
        cfg.arm = f"trial{trial.number:03d}"
        cfg.out_dir = str(root / name / cfg.arm)
        log(f"tune {arm}: trial {trial.number + 1}/{spec.trials} {trial.params}")
        try:
            with selection(f"bench tune ({arm})"):
                summary = train(cfg, resume="auto", progress=False, log=log,
                                tags={"optuna.study": name, "optuna.trial_number": trial.number})
        except NonFiniteLoss as e:
            trial.set_user_attr("diverged", str(e).split(";")[0])
            study.tell(trial, state=TrialState.FAIL)
            continue
        if summary.get("mlflow_run_id"):
            trial.set_user_attr("mlflow_run_id", summary["mlflow_run_id"])
        study.tell(trial, float(summary[metric]))
    bar.n = len(finished())
    bar.close()
    best = study.best_trial
    trials = finished()
    return {"overrides": {k: (json.loads(v) if isinstance(v, str) and v.startswith("[") else v)
                          for k, v in best.params.items()},
            "study": name, "metric": metric, "best_value": float(best.value), "best_trial": best.number,
            "trials": len(trials), "space": space, "rows": [
                {"arm": arm, "trial": t.number, "state": t.state.name, metric: t.value if t.values else float("nan"),
                 "note": t.user_attrs.get("diverged") or t.user_attrs.get("invalid") or "",
                 **{f"param.{k}": v for k, v in t.params.items()}} for t in trials]}


def run_tuning(params_path, log=print) -> Path:
    proto = load_protocol(params_path)
    if proto.tuned_from:
        raise ConfigError(f"{params_path}: protocol.tuned_from reuses {proto.tuned_from}'s tuned settings; "
                          f"tune that suite instead (bench tune suites/{proto.tuned_from}/params.yaml)")
    if proto.tune is None:
        raise ConfigError(f"{params_path} has no protocol.tune section; see bench/protocol.py")
    arms = tuned_arms(params_path)
    if not arms:
        raise ConfigError(f"{params_path}: no arm of protocol.pairs has `tuned: true`")
    records = {arm: tune_arm(params_path, arm, log) for arm in arms}
    raw = read_params(params_path)
    out = tuned_path(raw, params_path)
    rows = [r for rec in records.values() for r in rec.pop("rows")]
    atomic.write_csv(out.parent / "tuning.csv", pd.DataFrame(rows))
    header = (f"# written by `bench tune {params_path}`: {proto.tune.trials} Optuna TPE trials per arm (sampler seed "
              f"{proto.tune.seed}), each at the proxy budget {proto.tune.overrides}, scored on the validation split "
              "(test sealed). Every trial: tuning.csv\n")
    atomic.write_text(out, header + yaml.safe_dump({"trials_per_arm": proto.tune.trials,
                                                    "proxy_overrides": proto.tune.overrides,
                                                    "sampler_seed": proto.tune.seed, "arms": records}, sort_keys=False))
    lines = [f"# {proto.suite}: equal tuning budget\n", header.lstrip("# "),
             "| arm | trials | best trial | best validation | chosen settings |", "|---|---|---|---|---|"]
    for arm, rec in records.items():
        chosen = ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in rec["overrides"].items())
        lines.append(f"| {arm} | {rec['trials']} | {rec['best_trial']} | {rec['metric']} {rec['best_value']:.4f} | {chosen} |")
    lines.append("\nThe shared space (every arm): " + ", ".join(f"`{k}`" for k in proto.tune.shared_space)
                 + "; DiffusionBlocks arms also: " + (", ".join(f"`{k}`" for k in proto.tune.method_space) or "nothing") + ".")
    atomic.write_text(out.parent / "tuning.md", "\n".join(lines) + "\n")
    return out
