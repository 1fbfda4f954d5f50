"""Evaluate a trained arm from its final weights: test accuracy with the default number of
inference steps (B: one call per block, the official code and paper App. H) and with B + 1
(the paper's App. E.1 wording), so the conflict between the two is reported, not chosen."""

from __future__ import annotations

from pathlib import Path

import torch

from bench import atomic
from bench.config import RunConfig
from bench.data.images import load_dataset
from bench.train import build_model, evaluate, make_setup, resolve_device


def evaluate_arm(cfg: RunConfig, log=print) -> dict:
    out = Path(cfg.out_dir)
    final = out / "final.pt"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: train the arm first (bench train … --arm {cfg.arm})")
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ckpt = torch.load(final, map_location=device, weights_only=False)
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    setup = make_setup(cfg)
    test = load_dataset(cfg.data.dataset, cfg.data.root)["test"].head(cfg.data.test_subset)
    result = {"arm": cfg.arm, "mode": cfg.mode, "num_test": len(test)}
    if cfg.is_dblocks:
        B = cfg.diffusion.num_blocks
        default = cfg.diffusion.inference_steps or B
        for steps in sorted({default, B, B + 1}):
            m = evaluate(model, setup, test, cfg, device, inference_steps=steps)
            result[f"test_acc@{steps}steps"] = m["test_acc"]
            log(f"{cfg.suite}/{cfg.arm}: test accuracy {m['test_acc']:.4f} with {steps} inference steps")
        result["inference_steps"] = default
        result["test_acc"] = result[f"test_acc@{default}steps"]
    else:
        result["test_acc"] = evaluate(model, setup, test, cfg, device)["test_acc"]
        log(f"{cfg.suite}/{cfg.arm}: test accuracy {result['test_acc']:.4f}")
    atomic.write_json(out / "eval.json", result)
    return result
