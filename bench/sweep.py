"""`bench sweep`: an Optuna study over block counts, partitions, overlap, layer distribution,
training noise and loss weighting — "how many blocks, which partition, for my model?".

A suite declares its sweep in params.yaml:

    sweep:
      arm: dblocks                  # trials start from this arm's settings
      trials: 8                     # completed trials wanted
      objectives: [val_acc]         # the suite's metric on validation; add peak_mem_bytes for a Pareto front
      seeds: [0]                    # every trial is repeated over these seeds (mean), apart from the search
      overrides: {train.epochs: 0.5}  # what makes a trial cheap
      pruning: true                 # median pruner on the learning-curve values (single objective)
      searchable: [train.lr]        # params beyond the default searchable set
      space:
        diffusion.num_blocks: [1, 2, 3, 6]        # a list: a categorical choice
        diffusion.gamma: {low: 0.0, high: 0.1}    # a range: uniform (int if both ends are ints)
        diffusion.P_mean: {low: -1.2, high: 1.2}

The study is stored in sqlite (runs/<suite>/sweep/optuna.db) under a name fingerprinting the
space, the trial budget and the arm's settings, so a killed sweep continues with `--resume`: an
unfinished trial is retried with the same params (and its training resumes from its checkpoint);
a proposal identical to a finished trial is discarded, so no configuration is trained twice.  The
sampler is re-seeded from the study's history before each proposal, so a resumed sweep proposes
what an uninterrupted one would.  Each trial is an MLflow child run under the sweep's parent run
(tagged with its trial number; the trial records the run's id).

Outputs in results/<suite>/: sweep.csv, sweep_front.png (Pareto front, or the optimisation
history for one objective; Optuna's own plots), sweep_importance.png and .csv (fANOVA, the bars as drawn), best_params.yaml (params.yaml sections,
usable with `dvc exp run -S`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import warnings
from pathlib import Path

import pandas as pd
import yaml

from bench import atomic, track
from bench.seeding import stream_seed
from bench.config import ConfigError, load_config, read_params, section_class
from bench.splits import metric_on, selection

SEARCHABLE = ("diffusion.num_blocks", "diffusion.partition", "diffusion.gamma", "diffusion.layer_distribution",
              "diffusion.P_mean", "diffusion.P_std", "diffusion.weighting", "diffusion.sigma_edges")
MEMORY_OBJECTIVE = "peak_mem_bytes"


def _spec(raw: dict, params_path) -> dict:
    spec = raw.get("sweep")
    if not isinstance(spec, dict) or not spec.get("space"):
        raise ConfigError(f"{params_path} has no `sweep:` section with a `space:`; see `bench sweep --help`")
    known = {"arm", "trials", "objectives", "seeds", "overrides", "pruning", "searchable", "space", "sampler"}
    unknown = set(spec) - known
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{sorted(unknown)[0]}' in {params_path}; known: {', '.join(sorted(known))}")
    return spec


def search_distributions(space: dict, searchable: set, task: str, arch: str, params_path) -> dict:
    import optuna
    dists = {}
    for name, rng in space.items():
        section, _, key = name.partition(".")
        if name not in searchable:
            raise ConfigError(f"sweep.space: {name!r} is not searchable; searchable params: {', '.join(sorted(searchable))} "
                              "(mark more under sweep.searchable)")
        try:
            fields = {f.name for f in __import__("dataclasses").fields(section_class(section, task, arch))}
        except (KeyError, TypeError):
            fields = set()
        if key not in fields:
            raise ConfigError(f"sweep.space: unknown param {name!r} in {params_path}")
        if isinstance(rng, list):
            if not rng:
                raise ConfigError(f"sweep.space.{name}: empty list of choices")
            dists[name] = optuna.distributions.CategoricalDistribution(
                [json.dumps(v) if isinstance(v, list) else v for v in rng])
        elif isinstance(rng, dict) and {"low", "high"} <= set(rng):
            lo, hi = rng["low"], rng["high"]
            if lo > hi:
                raise ConfigError(f"sweep.space.{name}: low ({lo}) is larger than high ({hi})")
            if isinstance(lo, int) and isinstance(hi, int):
                dists[name] = optuna.distributions.IntDistribution(lo, hi)
            else:
                dists[name] = optuna.distributions.FloatDistribution(float(lo), float(hi), log=bool(rng.get("log")))
        else:
            raise ConfigError(f"sweep.space.{name}: give a list of choices or {{low: …, high: …}}")
    return dists


def as_overrides(params: dict) -> list[str]:
    out = []
    for k, v in params.items():
        if isinstance(v, str) and v.startswith("["):
            v = json.loads(v)
        out.append(f"{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


def _key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def run_sweep(params_path: str | Path, study_name: str | None = None, trials: int | None = None,
              resume: bool = False, log=print) -> Path:
    import optuna
    from optuna.trial import TrialState

    from bench.tasks import task_class
    from bench.train import train

    raw = read_params(params_path)
    spec = _spec(raw, params_path)
    arm = spec.get("arm") or next(iter(raw.get("arms") or {}), None)
    base = load_config(params_path, arm, as_overrides(spec.get("overrides") or {}))
    suite = base.suite
    n_trials = int(trials or spec.get("trials", 8))
    seeds = [int(s) for s in spec.get("seeds", [base.train.seed])]
    task_cls = task_class(base.task)
    selection_metric = metric_on(task_cls.metric, "val")   # trials are scored on validation only
    objectives = list(spec.get("objectives") or [selection_metric])
    for o in objectives:
        if o not in (selection_metric, MEMORY_OBJECTIVE):
            raise ConfigError(f"sweep.objectives: unknown objective {o!r}; use {selection_metric} and/or {MEMORY_OBJECTIVE} "
                              "(trials are scored on the validation split; test is sealed during a sweep)")
    directions = ["maximize" if (o == selection_metric and task_cls.higher_is_better) else "minimize" for o in objectives]
    searchable = set(SEARCHABLE) | set(spec.get("searchable") or [])
    dists = search_distributions(spec["space"], searchable, base.task, base.model["arch"], params_path)
    # everything a trial's figure depends on: a changed space, budget or base param (`dvc exp run
    # -S train.lr=…`) is another study, named by this fingerprint unless --study names one
    fingerprint = json.dumps({"space": spec["space"], "objectives": objectives, "arm": arm,
                              "overrides": spec.get("overrides") or {}, "seeds": seeds,
                              "sampler": spec.get("sampler", "tpe"), "pruning": spec.get("pruning", True),
                              "base": base.to_dict()}, sort_keys=True, default=str)
    study_name = study_name or f"{suite}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:8]}"

    root = Path(raw.get("runs_dir", "runs")) / suite / "sweep"
    root.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{root / 'optuna.db'}"
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if study_name in existing:
        study = optuna.load_study(study_name=study_name, storage=storage)
        if study.user_attrs.get("fingerprint") != fingerprint:
            n = 2
            while f"{study_name}-{n}" in existing:
                n += 1
            raise ConfigError(f"study {study_name!r} in {root / 'optuna.db'} was made with a different search space, "
                              f"objectives or trial settings; refusing to mix them. Restore them, or start a new "
                              f"study with --study {study_name}-{n}")
        if not resume:
            raise ConfigError(f"study {study_name!r} already exists in {root / 'optuna.db'}; continue it with --resume "
                              f"or name a new one with --study")
    else:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=directions)
        study.set_user_attr("fingerprint", fingerprint)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) \
        if spec.get("pruning", True) and len(objectives) == 1 else optuna.pruners.NopPruner()
    with warnings.catch_warnings():   # set_metric_names is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["peak memory (bytes)" if o == MEMORY_OBJECTIVE else o for o in objectives])

    def sampler_for_next_trial():
        """Seeded by the study's history (finished and discarded trials), not by how many times
        this process asked: a killed and resumed sweep proposes what an uninterrupted one would."""
        key = (len(done()), sum(1 for t in study.get_trials(deepcopy=False) if "discarded" in t.user_attrs
                                or "invalid" in t.user_attrs))
        seed = stream_seed(seeds[0], "sweep", *key) % 2**32
        return optuna.samplers.TPESampler(seed=seed, multivariate=True) if spec.get("sampler", "tpe") == "tpe" \
            else optuna.samplers.RandomSampler(seed=seed)

    # a trial that was running when the sweep was killed (one process per study): failed, retried
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log(f"sweep {study_name}: trial {t.number} was interrupted; retrying its params")

    parent = track.find_sweep_run(suite, study_name) if track.enabled() else None

    def done() -> list:
        return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]

    from tqdm import tqdm
    bar = tqdm(total=n_trials, initial=len(done()), desc=f"sweep {study_name}", unit="trial", disable=None)
    attempts = 0
    while len(done()) < n_trials and attempts < 10 * n_trials:
        attempts += 1
        bar.n = len(done())
        bar.refresh()
        study.sampler = sampler_for_next_trial()
        trial = study.ask(dists)
        params = {k: trial.params[k] for k in dists}
        if any(t.params == params for t in done()):
            trial.set_user_attr("discarded", "duplicate of a finished trial")
            study.tell(trial, state=TrialState.FAIL)
            log(f"sweep {study_name}: trial {trial.number} discarded (same params as a finished trial)")
            continue
        try:
            cfgs = [load_config(params_path, arm, as_overrides(spec.get("overrides") or {}) + as_overrides(params)
                                + [f"train.seed={s}"]) for s in seeds]
        except ConfigError as e:  # e.g. a layer distribution that does not fit the sampled B
            trial.set_user_attr("invalid", str(e))
            study.tell(trial, state=TrialState.FAIL)
            log(f"sweep {study_name}: trial {trial.number} skipped: {e}")
            continue
        log(f"sweep {study_name}: trial {trial.number} {params}")
        values, key = [], _key(params)
        try:
            for s, cfg in zip(seeds, cfgs):
                cfg.arm = f"trial-{key}-seed{s}"
                cfg.out_dir = str(root / study_name / cfg.arm)

                def report(step, metrics, seed_index=seeds.index(s)):
                    if len(objectives) == 1 and seed_index == 0:
                        trial.report(float(metrics[selection_metric]), step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned at step {step}")

                with selection(f"sweep {study_name}"):
                    summary = train(cfg, resume="auto", progress=False, log=log, on_eval=report, parent_run_id=parent,
                                    tags={"optuna.study": study_name, "optuna.trial_number": trial.number})
                values.append([float(summary[o]) for o in objectives])
                if summary.get("mlflow_run_id"):   # the trial ↔ its MLflow runs (one per seed)
                    trial.set_user_attr(f"mlflow_run_id.seed{s}", summary["mlflow_run_id"])
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            log(f"sweep {study_name}: trial {trial.number} pruned")
            continue
        study.tell(trial, [statistics.mean(v[i] for v in values) for i in range(len(objectives))])
    bar.n = len(done())
    bar.close()
    if len(done()) < n_trials:
        log(f"sweep {study_name}: only {len(done())} distinct trials after {attempts} proposals "
            f"(the search space may hold fewer distinct configurations)")
    return write_outputs(study, suite, objectives, directions, raw, params_path)


def write_outputs(study, suite: str, objectives: list[str], directions: list[str], raw: dict, params_path) -> Path:
    from optuna.trial import TrialState
    out = Path(raw.get("results_dir") or "results") / suite
    rows = []
    for t in study.get_trials(deepcopy=False):
        note = t.user_attrs.get("discarded") or t.user_attrs.get("invalid") or (
            f"retry of trial {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
        row = {"trial": t.number, "state": t.state.name, "note": note,
               **{f"param.{k}": v for k, v in t.params.items()}}
        for i, o in enumerate(objectives):
            row[o] = t.values[i] if t.values else float("nan")
        row["duration_s"] = t.duration.total_seconds() if t.duration else float("nan")
        rows.append(row)
    df = pd.DataFrame(rows)
    atomic.write_csv(out / "sweep.csv", df)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return out / "sweep.csv"
    best = (study.best_trials if len(objectives) > 1 else [study.best_trial])
    sign = 1 if directions[0] == "maximize" else -1
    best = max(best, key=lambda t: sign * t.values[0])
    nested: dict = {}
    for k, v in best.params.items():
        section, _, key = k.partition(".")
        nested.setdefault(section, {})[key] = json.loads(v) if isinstance(v, str) and v.startswith("[") else v
    dvc_cmd = " ".join(f"-S '{params_path}:{k}={json.loads(v) if isinstance(v, str) and v.startswith('[') else v}'"
                       for k, v in best.params.items())
    header = (f"# best trial {best.number} of study {study.study_name}: "
              + ", ".join(f"{o}={v:.4g}" for o, v in zip(objectives, best.values))
              + f"\n# apply with: dvc exp run {dvc_cmd} {Path(params_path).parent / 'dvc.yaml'}\n")
    atomic.write_text(out / "best_params.yaml", header + yaml.safe_dump(nested, sort_keys=True))
    _plot_front(study, complete, objectives, directions, out / "sweep_front.png")
    _plot_importance(study, objectives, out / "sweep_importance.png")
    return out / "sweep.csv"


def _optuna_figure(draw, path: Path, title: str) -> dict:
    """One of Optuna's own matplotlib plots, saved (its experimental warning silenced); returns
    the bars it drew (label → length), for a bar chart."""
    import matplotlib
    matplotlib.use("Agg")
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = draw(optuna.visualization.matplotlib)
    ax = ax[0] if hasattr(ax, "__len__") else ax
    fig = ax.figure
    fig.set_size_inches(7, 4.5)
    ax.set_title("", loc="left")   # Optuna's generic heading: ours says which study and evaluator
    ax.set_title(title, fontsize=9)
    bars = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}   # what a bar chart shows
    fig.tight_layout()
    atomic.save_figure(path, fig)
    return bars


def _plot_front(study, complete, objectives, directions, path: Path) -> None:
    """Multi-objective: Optuna's Pareto front; one objective: its optimisation history."""
    names = [f"{o} ({'higher' if d == 'maximize' else 'lower'} is better)" for o, d in zip(objectives, directions)]
    if len(objectives) > 1:
        _optuna_figure(lambda vis: vis.plot_pareto_front(study, target_names=names), path,
                       f"{study.study_name}: Pareto front (red: non-dominated trials)")
    else:
        _optuna_figure(lambda vis: vis.plot_optimization_history(study, target_name=names[0]), path,
                       f"{study.study_name}: optimisation history")


def _plot_importance(study, objectives, path: Path) -> None:
    """fANOVA importances, named explicitly (Optuna's default evaluator is not a promise) and
    seeded, so the plot can be recomputed from the same trials."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    target = (lambda t: t.values[0]) if len(objectives) > 1 else None
    try:
        shown = _optuna_figure(lambda vis: vis.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target,
            target_name=objectives[0]), path, f"{study.study_name}: parameter importance for {objectives[0]} (fANOVA)")
        atomic.write_csv(path.with_suffix(".csv"), pd.DataFrame({"param": list(shown), "fanova_importance": list(shown.values())}))
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # too few or too uniform trials
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.text(0.5, 0.5, f"importance not computable yet:\n{e}", ha="center", va="center", fontsize=8, wrap=True)
        ax.set_axis_off()
        atomic.save_figure(path, fig)
