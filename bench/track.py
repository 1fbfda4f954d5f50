"""MLflow tracking and run provenance.

Default store: a local sqlite file, `sqlite:///mlflow.db` in the working directory (browse with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`); $MLFLOW_TRACKING_URI overrides it, and
BENCH_MLFLOW=0 turns tracking off (the tests do).  One experiment per suite; one parent run per
suite run (all arms trained from the same params and code share it); one child run per arm.
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


def git_sha() -> str:
    """HEAD's SHA, with '-dirty' when tracked files have uncommitted changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    return mlflow


def suite_key(params_path: str | Path, sha: str) -> str:
    """Identifies one suite run: the params file's content and the code version."""
    return hashlib.sha1(Path(params_path).read_bytes() + sha.encode()).hexdigest()[:16]


def find_parent_run(suite: str, key: str) -> str:
    """The suite run's parent run: found by its key, created if absent."""
    mlflow = _mlflow()
    mlflow.set_experiment(suite)
    found = mlflow.search_runs(filter_string=f"tags.`bench.suite_key` = '{key}'", output_format="list", max_results=1)
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name(suite).experiment_id,
                                          tags={"bench.suite_key": key, "mlflow.runName": f"{suite} ({key[:7]})"})
    return run.info.run_id


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
                 parent_run_id: str | None = None, main_process: bool = True):
        self.run_id = None
        if not (main_process and enabled()):   # off: a no-op (BENCH_MLFLOW=0, or a rank other than 0)
            return
        mlflow = self._m = _mlflow()
        mlflow.set_experiment(suite)
        if run_id:  # resuming: continue the same child run
            self.run_id = mlflow.start_run(run_id=run_id).info.run_id
            return
        parent = parent_run_id or (find_parent_run(suite, suite_key(params_path, git_sha())) if params_path else None)
        self.run_id = mlflow.start_run(run_name=run_name, parent_run_id=parent).info.run_id

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
    """Attach the comparison table (and its plots) to the suite run's parent run."""
    if not enabled():
        return
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    pid = find_parent_run(suite, suite_key(params_path, git_sha()))
    for f in files:
        if Path(f).exists():
            client.log_artifact(pid, str(f))
    for k, v in (metrics or {}).items():
        client.log_metric(pid, k, float(v))


def log_final(suite: str, arm: str, metrics: dict | None = None, texts: dict | None = None, files=()) -> None:
    """Attach a final evaluation to the arm's latest run (the one its training created): numbers
    as `final/<key>` metrics (MLflow keys allow no '@': it becomes `_at_`), texts and files as
    artifacts.  Nothing happens when tracking is off or the arm was never tracked."""
    if not enabled():
        return
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(suite)
    runs = [] if exp is None else mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`bench.arm` = '{arm}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        return
    client, run_id = mlflow.MlflowClient(), runs[0].info.run_id
    for key, value in (metrics or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            client.log_metric(run_id, "final/" + metric_key(key), float(value))
    for name, text in (texts or {}).items():
        client.log_text(run_id, text, name)
    for f in files:
        if f and Path(f).exists():
            client.log_artifact(run_id, str(f))
