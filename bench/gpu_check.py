"""The prepared GPU check (`scripts/gpu_check.sh`): what a CPU machine cannot measure, in one short
run, written to results/gpu/*.md.

  memory.md     the meter's peak beside the CUDA allocator's (max_memory_allocated / reserved,
                retries, OOMs) on the vit_cifar100 memory config, e2e and DB B = 3 offload
  speed.md      step time and model-FLOPs utilisation (MFU = FlopCounterMode FLOPs per step /
                step time / the GPU's peak dense bf16 FLOP/s) of ViT-12L (the vit_cifar100 model)
                and DiT-S/2 at the paper's batch sizes: fp32, bf16, bf16 + compile; e2e and one
                DB block
  suites.md     every CPU suite's `check:` config trained on CUDA, beside its CPU baseline
  torchrun.md   a single-GPU `torchrun` smoke run of vit_fashion's check config

`--dry` runs the same code on the CPU at tiny batches with one timed step (a wiring check: its
figures are not GPU figures and the files say so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from bench import atomic, track

OUT = Path("results/gpu")
# dense bf16 peak FLOP/s by device name (no sparsity); MFU is left blank for other devices
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
MiB = 2**20


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def time_steps(cfg, device, steps: int) -> dict:
    """Median step time (after warm-up) and FLOPs of one training step of cfg (block 0 for DB)."""
    from bench.flops import step_flops
    from bench.parallelize import parallelize
    from bench.tasks import make_task
    from bench.train import Budget, backward_step, build_model, forward_loss, make_optimizer
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, task).to(device).train()
    flops = step_flops(cfg, task, model, device)["per_step"][0]   # counted in eager fp32: the model's FLOPs
    parallelize(model, cfg)
    optimizer = make_optimizer(cfg, task, model, device, Budget(1, 10**6, 10**6, 0))
    batch = task.example_batch(cfg.train.batch_size, device)
    gen = torch.Generator().manual_seed(0)
    block = 0 if cfg.is_dblocks else None
    times = []
    for i in range(steps + 3):   # three warm-up steps (compile happens there)
        optimizer.activate(block)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, _, _ = forward_loss(cfg, task, model, batch, block, gen)
        backward_step(cfg, model, optimizer, loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"step_ms": 1000 * step_s, "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12,
            "mfu": flops / step_s / peak_flops(device)}


def speed_table(device, dry: bool) -> pd.DataFrame:
    from bench.config import load_config
    models = [("ViT-12L (vit_cifar100)", "suites/vit_cifar100/params.yaml", ["model.dropout=0"], 128),
              ("DiT-S/2", "suites/dit_imagenet/params.yaml", ["model.size=S"], 256)]
    rows = []
    for name, params, extra, batch in models:
        bs = 4 if dry else batch
        for arm in ("e2e", "dblocks"):
            for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
                if dry and compiled:
                    continue   # compiling on the CPU takes minutes and measures nothing about a GPU
                cfg = load_config(params, arm, extra + [f"train.batch_size={bs}", f"train.precision={precision}",
                                                        f"train.compile={str(compiled).lower()}"])
                r = time_steps(cfg, device, 1 if dry else 10)
                rows.append({"model": name, "arm": arm if arm == "e2e" else "dblocks (one block)", "batch": bs,
                             "precision": precision + (" + compile" if compiled else ""), **r})
    df = pd.DataFrame(rows)
    base = df.groupby(["model", "arm"])["step_ms"].transform("first")
    df["speedup_vs_fp32"] = base / df["step_ms"]
    return df


def memory_table(device, dry: bool) -> pd.DataFrame:
    from bench.benchmark import measure, variant
    from bench.config import load_config
    base = load_config("suites/vit_cifar100/params.yaml", "e2e")
    rows = []
    for mode, B, residency in (("e2e", 1, "resident"), ("dblocks", 3, "offload")):
        cfg = variant(base, mode, B, 8 if dry else 128, residency)
        r = measure(cfg, device, time_steps=1)
        rows.append({"mode": mode, "B": B, "residency": residency, "batch": cfg.train.batch_size,
                     "meter_peak_MiB": r["peak_bytes"] / MiB,
                     "allocator_peak_MiB": r["allocator_peak_bytes"] / MiB if r["allocator_peak_bytes"] > 0 else float("nan"),
                     "allocator_reserved_MiB": r["allocator_reserved_bytes"] / MiB if r["allocator_reserved_bytes"] > 0 else float("nan"),
                     "retries": r["allocator_retries"], "ooms": r["allocator_ooms"],
                     "meter_to_allocator": r["meter_to_allocator"]})
    return pd.DataFrame(rows)


def suites_table(device, dry: bool) -> pd.DataFrame:
    from bench.check import BASELINES, measure_suite, suites_with_checks
    rows = []
    for params in suites_with_checks():
        extra = [f"train.device={device.type}"] + (["train.epochs=0.002"] if dry else [])
        t0 = time.perf_counter()
        suite, measured = measure_suite(params, log=lambda *_: None, extra=extra)
        seconds = time.perf_counter() - t0
        baseline = json.loads((BASELINES / f"{suite}.json").read_text()) if (BASELINES / f"{suite}.json").exists() else {}
        for arm, figs in measured["arms"].items():
            metric = next(k for k in figs if k not in ("first_loss", "noise_intervals"))
            cpu = baseline.get("arms", {}).get(arm, {}).get(metric, {}).get("value", float("nan"))
            rows.append({"suite": suite, "arm": arm, "metric": metric, device.type: figs[metric], "cpu_baseline": cpu,
                         "suite_seconds": seconds})
    return pd.DataFrame(rows)


def torchrun_smoke(device, dry: bool) -> str:
    from bench.parallel_bench import bench_params
    params = bench_params(runs=Path("runs/gpu_check"))   # the suite's own runs (DVC outputs) stay untouched
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "bench",
           "train", params, "--arm", "dblocks", "--seed", "900", "--no-progress",
           "--set", f"train.device={device.type}", "--set", f"train.epochs={0.002 if dry else 0.05}",
           "--set", "train.curve_points=1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "BENCH_MLFLOW": "0"})
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return (f"`{' '.join(cmd[2:])}`: exit {done.returncode} in {time.perf_counter() - t0:.0f} s\n\n```text\n"
            + "\n".join(tail) + "\n```\n")


def main(argv=None) -> int:
    from bench.report import _markdown_table
    p = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny batches: a wiring check, not GPU figures")
    p.add_argument("--only", default="memory,speed,suites,torchrun")
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.dry else "cuda")
    if not a.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry for the CPU wiring check", file=sys.stderr)
        return 2
    prov = track.provenance(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else prov["device_name"]
    head = (f"Written by `scripts/gpu_check.sh{' --dry' if a.dry else ''}` on {name}, code {prov['git_sha'][:12]}, "
            f"torch {torch.__version__}." + (" **Dry run on the CPU at tiny batches: a wiring check, these are not "
                                             "GPU figures.**" if a.dry else "") + "\n")
    sections = {"memory": ("Meter vs CUDA allocator (vit_cifar100 memory config)", memory_table),
                "speed": ("Step time and MFU", speed_table), "suites": ("CPU suites' check configs on this device", suites_table)}
    for key in a.only.split(","):
        t0 = time.perf_counter()
        if key == "torchrun":
            atomic.write_text(OUT / "torchrun.md", f"# Single-GPU torchrun smoke run\n\n{head}\n{torchrun_smoke(device, a.dry)}")
        else:
            title, fn = sections[key]
            df = fn(device, a.dry)
            atomic.write_text(OUT / f"{key}.md", f"# {title}\n\n{head}\n{_markdown_table(df)}")
        print(f"gpu_check: {key} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
