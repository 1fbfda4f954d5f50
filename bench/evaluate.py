"""Evaluate a trained arm from its final weights with the task's full evaluation (for
classification: accuracy with B inference steps, the official default, and with B + 1, the
paper's App. E.1 wording, so the conflict between the two is reported, not chosen), on the
validation split and then on test (the final number; skipped while test is sealed)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from bench import atomic, track
from bench.config import RunConfig
from bench.splits import test_sealed
from bench.tasks import make_task
from bench.train import build_model, resolve_device


def evaluate_arm(cfg: RunConfig, log=print) -> dict:
    out = Path(cfg.out_dir)
    final = out / "final.pt"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: train the arm first (bench train … --arm {cfg.arm})")
    task = make_task(cfg)
    task.check()
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task.load()
    model = build_model(cfg, task).to(device)
    saved = torch.load(final, map_location=device, weights_only=False)
    result = {"arm": cfg.arm, "mode": cfg.mode, "seed": cfg.train.seed, "metric": task.metric,
              "selection_metric": task.selection_metric}
    # the raw weights, then the EMA weights if the run kept them (train.ema): keys `…@ema`
    weight_sets = [(saved["model"], "")] + ([(saved["ema"], "@ema")] if saved.get("ema") else [])
    # validation first (what any inference-variant choice reads), then test, the published figure
    splits = ["val"] + ([] if test_sealed() else ["test"])
    bar = tqdm(total=len(weight_sets) * len(splits), desc=f"evaluate {cfg.arm}", unit="split", disable=None)
    for weights, suffix in weight_sets:
        model.load_state_dict(weights)
        for split in splits:
            bar.set_postfix_str(split + suffix)
            scores = task.evaluate(model, device, final=True, split=split)
            bar.update(1)
            result.update({k + suffix if suffix and isinstance(v, float) else k: v for k, v in scores.items()
                           if not suffix or isinstance(v, float)})
    bar.close()
    log(f"{cfg.suite}/{cfg.arm}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    atomic.write_json(out / "eval.json", result)
    summary = saved.get("summary") or {}
    track.log_final(cfg.suite, cfg.arm, metrics=result, run_id=summary.get("mlflow_run_id"))   # as final/<key>
    return result
