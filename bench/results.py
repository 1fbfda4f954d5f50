"""What a finished run leaves beside its checkpoint (timm style): final.pt, history.csv (the
learning curve), log.csv (losses), summary.csv and metrics.json (the final figures), and the same
logged to the arm's MLflow run."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from bench import atomic

UNMEASURED = {k: -1 for k in ("peak_bytes", "parameters", "gradients", "optimizer_state", "activations",
                              "allocator_peak_bytes", "rss_peak_bytes")}   # a run too short to measure


def run_summary(cfg, task, state: dict, prov: dict, epochs_equiv: float) -> dict:
    """One row: the last curve point's metrics, the compute spent, time and measured memory."""
    final = state["history"][-1] if state["history"] else {}
    mem = max(state["memory"].values(), key=lambda m: m["peak_bytes"], default=None) or UNMEASURED
    times = state["step_times"]
    return {
        "suite": cfg.suite, "arm": cfg.arm, "mode": cfg.mode,
        "num_blocks": cfg.diffusion.num_blocks if cfg.is_dblocks else 1,
        "metric": task.metric, "selection_metric": task.selection_metric,
        **{k: v for k, v in final.items() if k not in ("step", "layer_evals", "epochs_equiv", "train_time_s")},
        "optimizer_steps": state["step"], "layer_evals": state["layer_evals"], "epochs_equiv": epochs_equiv,
        "train_time_s": state["train_time"], "median_step_s": statistics.median(times) if times else float("nan"),
        "peak_mem_bytes": mem["peak_bytes"], "peak_mem_params": mem["parameters"], "peak_mem_grads": mem["gradients"],
        "peak_mem_optim": mem["optimizer_state"], "peak_mem_activations": mem["activations"],
        "cuda_allocator_peak_bytes": mem["allocator_peak_bytes"], "rss_peak_bytes": mem["rss_peak_bytes"],
        "device": prov["device_name"], "git_sha": prov["git_sha"], "seed": cfg.train.seed,
    }


def summary_metrics(summary: dict) -> dict:
    """The summary's results as MLflow metrics: memory in MiB (an unmeasured -1 left out), and
    not the settings (seed, B: params of the run already)."""
    out = {}
    for k, v in summary.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k in ("seed", "num_blocks"):
            continue
        if k.endswith("_bytes") or k.startswith("peak_mem_"):
            if v >= 0:
                out[k.removesuffix("_bytes") + "_MiB"] = v / 2**20
        else:
            out[k] = v
    return out


def write_outputs(out: Path, cfg, summary: dict, state: dict, weights: dict, tracker, ema_weights=None) -> None:
    atomic.torch_save(out / "final.pt", {"config": cfg.to_dict(), "model": weights, "summary": summary,
                                         **({"ema": ema_weights} if ema_weights is not None else {})})
    atomic.write_csv(out / "history.csv", pd.DataFrame(state["history"]))
    atomic.write_csv(out / "log.csv", pd.DataFrame(state["log"]))
    atomic.write_csv(out / "summary.csv", pd.DataFrame([summary]))
    atomic.write_json(out / "metrics.json", {**summary, "memory_by_block": state["memory"],
                                              "param_changes_on_resume": state.get("changes", [])})
    if tracker is None:
        return
    tracker.log_metrics(summary_metrics(summary))
    for name in ("summary.csv", "history.csv", "params.yaml"):
        tracker.log_artifact(out / name)
