"""MLflow tracking and run provenance.

Default store: a local sqlite file, `sqlite:///mlflow.db` in the working directory (browse with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`, training runs at
`http://127.0.0.1:5000/#/experiments?workflowType=machine_learning`); $MLFLOW_TRACKING_URI
overrides it, and BENCH_MLFLOW=0 turns tracking off (most tests do).  One experiment per suite;
one parent run per suite run (the params file, the code's commit and any --set overrides; opened
by `bench prepare`, ended by the suite's comparison or verdict); one child run per arm and seed,
with system metrics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

DEFAULT_URI = "sqlite:///mlflow.db"


# paths the harness and DVC write during a suite run: changes there do not make the code "dirty"
WRITTEN_BY_RUNS = (":!dvc.lock", ":!**/dvc.lock", ":!data.dvc", ":!results", ":!README.md")


PACKAGE_ROOT = Path(__file__).resolve().parent.parent   # the checkout whose code is imported


def git_sha() -> str:
    """The commit of the code actually imported: read once, when this module was imported, so a
    long-lived process (a `bench scaling` worker, a sweep) keeps naming the code it runs after a
    later commit.  See _checkout_sha."""
    return IMPORTED_SHA


def _checkout_sha() -> str:
    """This package's own checkout (whatever the working directory), with `-dirty-<hash of the
    diff>` when its tracked source files have uncommitted changes (not the lock files, results and
    README tables a run itself rewrites); 'unknown' when the package is not in a git checkout
    (e.g. a wheel install)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout
    try:
        sha = git("rev-parse", "HEAD").strip()
        if git("status", "--porcelain", "--untracked-files=no", "--", ".", *WRITTEN_BY_RUNS).strip():
            diff = git("diff", "HEAD", "--", ".", *WRITTEN_BY_RUNS)
            return f"{sha}-dirty-{hashlib.sha256(diff.encode()).hexdigest()[:8]}"
        return sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


IMPORTED_SHA = _checkout_sha()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def provenance(device: torch.device) -> dict:
    return {"git_sha": git_sha(), "device": str(device), "device_name": device_name(device),
            "torch": str(torch.__version__), "python": platform.python_version(), "host": platform.node()}


def metric_key(key: str) -> str:
    """An MLflow-legal metric name: keys allow no '@' (it becomes `_at_`) nor ',' and the like."""
    return re.sub(r"[^\w\-. /]", "_", key.replace("@", "_at_"))


def enabled() -> bool:
    return os.environ.get("BENCH_MLFLOW", "1") != "0"


def _mlflow():
    import mlflow
    logging.getLogger("alembic").setLevel(logging.WARNING)  # silence sqlite schema migrations
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _READY:
        # the first use creates and migrates the database: two runs started at once would race on it
        from filelock import FileLock
        with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
            mlflow.MlflowClient().search_experiments(max_results=1)
        _READY.add(uri)
    return mlflow


_READY: set[str] = set()


def _experiment(mlflow, suite: str) -> None:
    """mlflow.set_experiment, safe when two processes create the experiment at once."""
    try:
        mlflow.set_experiment(suite)
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(suite) is None:
            raise
        mlflow.set_experiment(suite)


def suite_key(params_path: str | Path, sha: str, overrides=()) -> str:
    """Identifies one suite run: the params file's content, the code version and any --set
    overrides (a smoke run with --set is a suite run of its own)."""
    return hashlib.sha1(Path(params_path).read_bytes() + sha.encode() + "\n".join(sorted(overrides)).encode()).hexdigest()[:16]


def find_parent_run(suite: str, key: str, params_path: str | Path | None = None, overrides=()) -> str:
    """The suite run's parent run, found by its key; created if absent, named `<suite> <short
    sha>`, tagged with the commit and holding the suite's params (and the overrides)."""
    mlflow = _mlflow()
    _experiment(mlflow, suite)
    found = mlflow.search_runs(filter_string=f"tags.`bench.suite_key` = '{key}'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    sha = git_sha()
    name = f"{suite} {sha[:7]}{'-dirty' if '-dirty' in sha else ''}" + "".join(f" --set {o}" for o in sorted(overrides))
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(suite).experiment_id,
                            tags={"bench.suite_key": key, "mlflow.runName": name, "mlflow.source.git.commit": sha,
                                  "bench.params_file": str(params_path or "")})
    if params_path:
        from mlflow.entities import Param
        from bench.config import read_params
        params = [Param(k, str(v)[:6000]) for k, v in flatten(read_params(params_path)).items()]
        params += [Param(f"--set.{o.split('=', 1)[0]}", o.split("=", 1)[-1]) for o in overrides]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def find_sweep_run(suite: str, study_name: str) -> str:
    """The parent run of a sweep's trials, found by its study name; created if absent."""
    mlflow = _mlflow()
    _experiment(mlflow, suite)
    found = mlflow.search_runs(filter_string=f"tags.`bench.sweep` = '{study_name}'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    return mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name(suite).experiment_id, tags={
        "bench.sweep": study_name, "mlflow.runName": f"sweep {study_name}"}).info.run_id


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """A child run for one arm (or a no-op when tracking is off)."""

    def __init__(self, suite: str, run_name: str, params_path: str | Path | None, run_id: str | None = None,
                 parent_run_id: str | None = None, main_process: bool = True, overrides=()):
        self.run_id = None
        if not (main_process and enabled()):   # off: a no-op (BENCH_MLFLOW=0, or a rank other than 0)
            return
        mlflow = self._m = _mlflow()
        _experiment(mlflow, suite)
        if run_id:  # resuming: continue the same child run
            self.run_id = mlflow.start_run(run_id=run_id, log_system_metrics=True).info.run_id
            return
        parent = parent_run_id or (find_parent_run(suite, suite_key(params_path, git_sha(), overrides), params_path,
                                                   overrides) if params_path else None)
        self.run_id = mlflow.start_run(run_name=run_name, parent_run_id=parent, log_system_metrics=True,
                                       tags={"mlflow.source.git.commit": git_sha()}).info.run_id

    def log_params(self, params: dict) -> None:
        if self.run_id:
            self._m.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    def set_tags(self, tags: dict) -> None:
        if self.run_id:
            self._m.set_tags(tags)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.run_id:
            self._m.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_metric_batch(self, items: list[tuple[str, float, int]]) -> None:
        """Many (key, value, step) points in few requests (per-step losses)."""
        if not self.run_id or not items:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        client = self._m.MlflowClient()
        for i in range(0, len(items), 1000):
            client.log_batch(self.run_id, metrics=[Metric(metric_key(k), float(v), now, s) for k, v, s in items[i:i + 1000]])

    def log_artifact(self, path: str | Path) -> None:
        if self.run_id and Path(path).exists():
            self._m.log_artifact(str(path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._m.end_run(status=status)
            self.run_id = None


def log_suite_artifacts(suite: str, params_path: str | Path, files: list[Path], metrics: dict | None = None) -> None:
    """Attach the comparison table (and its plots) to the suite run's parent run, and end it."""
    if not enabled():
        return
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    pid = find_parent_run(suite, suite_key(params_path, git_sha()), params_path)
    for f in files:
        if Path(f).exists():
            client.log_artifact(pid, str(f))
    for k, v in (metrics or {}).items():
        client.log_metric(pid, metric_key(k), float(v))
    client.set_terminated(pid, "FINISHED")


def log_final(suite: str, arm: str, metrics: dict | None = None, texts: dict | None = None, files=(),
              run_id: str | None = None) -> None:
    """Attach a final evaluation to the arm's run (run_id: the one its training created, from its
    summary.csv; else the arm's latest): numbers as `final/<key>` metrics (MLflow keys allow no
    '@': it becomes `_at_`), texts and files as artifacts.  Nothing happens when tracking is off
    or the arm was never tracked."""
    if not enabled():
        return
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    if not run_id:
        exp = mlflow.get_experiment_by_name(suite)
        runs = [] if exp is None else mlflow.search_runs(
            [exp.experiment_id], filter_string=f"tags.`bench.arm` = '{arm}'",
            order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
        if not runs:
            return
        run_id = runs[0].info.run_id
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            client.log_metric(run_id, "final/" + metric_key(key), float(value))
    for name, text in (texts or {}).items():
        client.log_text(run_id, text, name)
    for f in files:
        if f and Path(f).exists():
            client.log_artifact(run_id, str(f))
