"""Parallel-training benchmark on this machine (`python -m bench.parallel_bench`): results/parallel/.

  block-parallel  vit_fashion's DiffusionBlocks arm at B = 2: sequential (one process, `--threads`
                  threads) against block-parallel (2 gloo ranks, one thread each, train.shared
                  allreduce and frozen after a warm-up), the same block-steps per block
  data-parallel   the e2e arm: one process (`--threads` threads) against 2 gloo ranks × 1 thread,
                  the same global batch and steps

Each row: wall-clock of the whole command (start-up, training, the final evaluation), the
speed-up over its sequential row, and validation / test accuracy.  These are timings of this
machine (a benchmark, never a pass/fail test); seed noise of the accuracies is that of one seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench import atomic, track

OUT = Path("results/parallel")
SUITE = "suites/vit_fashion/params.yaml"
RUNS = Path("runs/parallel_bench")
PARAMS = str(RUNS / "params.yaml")   # vit_fashion's params with its own runs_dir: the suite's runs stay untouched


def bench_params(suite: str = SUITE, runs: Path = RUNS) -> str:
    """A copy of the suite's params.yaml whose runs go under `runs` (not the suite's DVC outputs)."""
    import yaml
    raw = yaml.safe_load(Path(suite).read_text())
    runs.mkdir(parents=True, exist_ok=True)
    atomic.write_text(runs / "params.yaml", yaml.safe_dump({**raw, "runs_dir": str(runs)}, sort_keys=False))
    return str(runs / "params.yaml")


def run(label: str, arm: str, seed: int, sets: list[str], nproc: int = 1, extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "bench", "train", PARAMS, "--arm", arm, "--seed", str(seed), "--no-progress",
           *extra, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "BENCH_MLFLOW": "0", "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "")}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{label}: {' '.join(cmd)} failed:\n{done.stderr[-1500:]}")
    summary = pd.read_csv(RUNS / "vit_fashion" / arm / f"seed{seed}" / "summary.csv").iloc[0]
    return {"run": label, "ranks": nproc, "wall_s": wall, "optimizer_steps": int(summary["optimizer_steps"]),
            "val_acc": summary.get("val_acc"), "test_acc": summary.get("test_acc"),
            "command": " ".join(["bench", *cmd[3:]])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.parallel_bench", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=float, default=1.0, help="e2e epochs of each run (default 1)")
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process runs (default 2)")
    p.add_argument("--seed", type=int, default=700, help="train.seed (runs/vit_fashion/<arm>/seed<N>)")
    a = p.parse_args(argv)
    bench_params()
    common = [f"train.epochs={a.epochs}", "train.curve_points=1", "eval.final_variants=[]"]
    db = common + ["diffusion.num_blocks=2"]
    rows = [run("DB sequential", "dblocks", a.seed, db + [f"train.threads={a.threads}"]),
            run("DB block-parallel, shared allreduce", "dblocks", a.seed + 1, db + ["train.threads=1"], 2,
                ("--block-parallel",)),
            run("DB block-parallel, shared frozen after 0.25 epoch", "dblocks", a.seed + 2,
                db + ["train.threads=1", "train.shared=frozen", "train.shared_warmup_epochs=0.25"], 2,
                ("--block-parallel",)),
            run("E2E one process", "e2e", a.seed, common + [f"train.threads={a.threads}"]),
            run("E2E data-parallel", "e2e", a.seed + 1, common + ["train.threads=1"], 2)]
    df = pd.DataFrame(rows)
    base = {"DB": df.loc[0, "wall_s"], "E2E": df.loc[3, "wall_s"]}
    df.insert(3, "speedup", [base[r.split()[0]] / w for r, w in zip(df["run"], df["wall_s"])])
    import torch
    prov = track.provenance(torch.device("cpu"))
    from bench.report import _markdown_table
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(OUT / "benchmark.csv", df)
    atomic.write_text(OUT / "benchmark.md", "\n".join([
        "# Parallel training on this machine\n",
        f"Written by `python -m bench.parallel_bench --epochs {a.epochs} --threads {a.threads}` on "
        f"{prov['device_name']} ({os.cpu_count()} CPUs), code {prov['git_sha'][:12]}. vit_fashion at B = 2, one seed; "
        "wall-clock of each whole command (start-up, training, final evaluation). Target: block-parallel speed-up "
        "≥ 0.8 × the ranks the hardware runs at once (2 here).\n",
        _markdown_table(df.drop(columns=["command"])),
        "\nCommands:\n", *[f"- {r.run}: `{r.command}`" for r in df.itertuples()], ""]))
    print(f"wrote {OUT / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
