"""`bench` command line: thin wrappers around the library.

  bench partition -B 3 --strategy equiprobable --gamma 0.05   what each block will train on
  bench data fashion-mnist                                    obtain a dataset offline
  bench data shakespeare [--tokenizer bpe]                    prepare a text corpus (or: text --source FILE)
  bench data images --source DIR --name NAME [--image-size 32] an ImageFolder → data/images/NAME (data.dataset: imagefolder)
  bench prepare suites/vit_fashion/params.yaml                validate every arm, print the budgets
  bench train   suites/vit_fashion/params.yaml --arm dblocks [--resume] [--set train.lr=5e-4]
  bench evaluate suites/vit_fashion/params.yaml --arm dblocks
  bench compare suites/vit_fashion/params.yaml                results/<suite>/comparison.{csv,md,png}
  bench memory  suites/vit_cifar100/params.yaml --budget 2GiB results/memory/: peak memory and speed per arm
  bench sweep   suites/vit_fashion/params.yaml [--resume]    Optuna study: B, partition, γ, noise, weighting
  bench tune    suites/vit_fashion/params.yaml              equal tuning budget per arm, on validation only
  bench train   suites/vit_fashion/params.yaml --arm e2e --seed 3   one seed of the verdict protocol
  bench verdict suites/vit_fashion/params.yaml              paired differences over seeds, intervals, verdicts
  bench scaling suites/vit_fashion/params.yaml --budgets 0.25,0.5,1,2   the gap vs training budget: results/scaling/
  bench report                                                results/README.md: our numbers beside the paper's
  bench summary suites/vit_fashion/params.yaml              print a suite's verdicts
  bench check [--update]                                      regression check of every suite's CI config
  bench run     suites/vit_fashion/params.yaml                all of the above, without DVC
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from bench import atomic, track
from bench.config import ConfigError, arm_names, load_config


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def cmd_partition(a) -> None:
    from bench.blocks import make_layout
    from bench.diffusion import LogNormalNoise, loss_weight, make_partition, sigmas_equiprobable, steps_per_block
    import torch
    noise = LogNormalNoise(a.P_mean, a.P_std, a.sigma_min, a.sigma_max, a.sigma_data)
    strategy = "explicit" if a.edges and a.strategy == "equiprobable" else a.strategy
    p = make_partition(a.num_blocks, strategy, a.gamma, noise, _floats(a.edges) if a.edges else None)
    layout = make_layout(a.depth, a.num_blocks, _ints(a.layers) if a.layers else None)
    steps = a.steps or a.num_blocks
    calls = steps_per_block(p, sigmas_equiprobable(noise, steps))
    print(f"{p.strategy} partition of σ ∈ [{noise.sigma_min:g}, {noise.sigma_max:g}], B={p.num_blocks}, γ={a.gamma:g}, "
          f"p_noise: ln σ ~ N({noise.P_mean:g}, {noise.P_std:g}²), depth {layout.depth}")
    print("edges (ascending): " + ", ".join(f"{e:.4f}" for e in p.edges))
    head = f"{'block':>5}  {'layers':>9}  {'owns σ in':>19}  {'mass':>6}  {'trains on σ in (γ)':>21}  {'mass':>6}  {'λ(σ) range':>19}  {'calls@' + str(steps):>8}"
    print(head)
    print("-" * len(head))
    for b in range(p.num_blocks):
        lo, hi = p.interval(b)
        tlo, thi = p.training_range(b)
        layers = layout.layers_of(b)
        w = loss_weight(torch.tensor([thi, tlo], dtype=torch.float64), noise.sigma_data).tolist()
        print(f"{b:>5}  {f'{layers.start}-{layers.stop - 1}':>9}  {f'[{lo:.4g}, {hi:.4g}]':>19}  {p.mass(b):>6.3f}  "
              f"{f'[{tlo:.4g}, {thi:.4g}]':>21}  {p.training_mass(b):>6.3f}  {f'{w[0]:.3g} … {w[1]:.3g}':>19}  {calls[b]:>8}")
    print("block 0 = first layers = highest noise; inference runs block 0 first, from σ_max down.")


def cmd_data(a) -> None:
    from bench.data import text
    from bench.data.images import fetch_fashion_mnist
    if a.dataset in ("fashion-mnist", "fashion_mnist"):
        out = fetch_fashion_mnist(Path(a.root) / "fashion_mnist", a.source)
        print(f"Fashion-MNIST ready in {out} (content verified against the published SHA-256)")
    elif a.dataset == "text" or a.dataset in text.DATASETS:
        text.cli_data(a.dataset, a.source, a.root, a.tokenizer, a.vocab_size, a.params, a.name)
    elif a.dataset in ("images", "imagefolder"):
        from bench.data.imagefolder import cli_data
        cli_data(a.source, a.name, a.root, a.image_size, a.channels, a.resize, source_format=a.source_format)
    else:
        raise ConfigError(f"unknown dataset {a.dataset!r} for `bench data`; available: fashion-mnist, images, text, "
                          f"{', '.join(text.DATASETS)}. CIFAR-10/100 are read from a user path (data.root in params.yaml)")


def cmd_prepare(a) -> None:
    """Validate every arm and the data before any compute, and record each arm's budget."""
    from bench.tasks import make_task
    from bench.train import make_budget
    plan = {}
    arms = a.arm or arm_names(a.params)
    if not arms:
        raise ConfigError(f"{a.params} defines no arms")
    for arm in arms:
        cfg = load_config(a.params, arm, a.set, tuning=True)   # a tuned arm at its base settings (tuned.yaml may not exist yet)
        task = make_task(cfg)
        task.check()
        task.load()
        b = make_budget(cfg, task.num_train)
        plan[arm] = {"mode": cfg.mode, **b.__dict__}
        print(f"{arm:>24}: {cfg.mode:<13} {b.total_steps:>8} steps (e2e-equivalent {b.e2e_steps}), warm-up {b.warmup_steps}")
    first = load_config(a.params, arms[0], tuning=True)
    suite = first.suite
    record = {"arms": plan}
    if track.enabled():   # the suite run's MLflow parent, opened once here (DVC's prepare stage)
        sha = track.git_sha()
        key = track.suite_key(a.params, sha, a.set)
        track.find_parent_run(suite, key, a.params, a.set)   # opened here; every arm's run finds it by this key
        record["mlflow"] = {"suite_key": key, "git_sha": sha}   # deterministic: no run id in a DVC output
    atomic.write_json(Path(first.out_dir).parent / "plan.json", record)   # runs/<suite>/plan.json


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """`bench train … --nproc N` as the torchrun command that runs it (without --nproc)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "bench", *rest]


def run_config(a, extra=()):
    """The arm's config from the command line.  A run with --set overrides is a smoke run, never
    the suite's own: it lives in a subdirectory named by its overrides (so `bench compare` and
    `bench verdict` never read it) and `bench evaluate` with the same --set scores it."""
    cfg = load_config(a.params, a.arm, [*a.set, *extra], seed=a.seed)
    if a.set:
        tag = "set-" + hashlib.sha1("\n".join(sorted(a.set)).encode()).hexdigest()[:8]
        cfg.out_dir = str(Path(cfg.out_dir) / tag)
        print(f"--set {' '.join(a.set)}: a smoke run in {cfg.out_dir} (not the suite's results)", flush=True)
    return cfg


def cmd_train(a) -> None:
    from bench.train import train
    cfg = run_config(a, ["train.block_parallel=true"] if a.block_parallel else [])   # bad params fail here
    if a.nproc > 1:
        argv = torchrun_argv(a.nproc, sys.argv[1:])
        print("launching: " + " ".join(argv[2:]), flush=True)
        os.execv(sys.executable, argv)
    s = train(cfg, params_path=a.params, resume="auto" if a.resume_if_compatible else a.resume,
              progress=not a.no_progress, overrides=a.set, allow_change=a.allow_change)
    if not s:   # a rank other than 0: rank 0 reports
        return
    print(f"{cfg.suite}/{cfg.arm}: {s['metric']} {s[s['metric']]:.4f} after {s['optimizer_steps']} steps "
          f"({s['layer_evals']} layer evaluations, {s['train_time_s']:.0f} s); outputs in {cfg.out_dir}")


def cmd_evaluate(a) -> None:
    from bench.evaluate import evaluate_arm
    evaluate_arm(run_config(a))


def cmd_compare(a) -> None:
    if a.relabel:
        from bench.report_relabel import relabel
        print(f"wrote {relabel(a.params)}")
        return
    from bench.report import compare
    print(f"wrote {compare(a.params, a.results)}")


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    if not number or t[len(number):] not in units:
        raise ConfigError(f"cannot read {text!r} as a memory size; write e.g. 2GiB or 512MiB")
    return int(float(number) * units[t[len(number):]])


def cmd_memory_matrix(a) -> None:
    from bench.memory_matrix import memory_matrix
    print(f"wrote {memory_matrix(a.batch, a.only.split(',') if a.only else None)}")


def cmd_memory(a) -> None:
    from bench.benchmark import BENCHMARK_ONLY_ARMS, memory_benchmark
    from bench.config import MODES, RESIDENCY
    modes, residencies = a.arms.split(","), a.residency.split(",")
    for m in modes:
        if m not in MODES + BENCHMARK_ONLY_ARMS:
            raise ConfigError(f"unknown arm {m!r} for --arms; choose from {', '.join(MODES + BENCHMARK_ONLY_ARMS)}")
    for r in residencies:
        if r not in RESIDENCY:
            raise ConfigError(f"unknown residency {r!r}; choose from {', '.join(RESIDENCY)}")
    md = memory_benchmark(a.params, _ints(a.blocks), _ints(a.batch_sizes), modes, residencies, name=a.name,
                          out_dir=a.out, time_steps=a.time_steps, budget=parse_bytes(a.budget) if a.budget else None,
                          max_depth=a.max_depth, resume=a.resume)
    print(f"wrote {md}")


def cmd_sweep(a) -> None:
    from bench.sweep import run_sweep
    print(f"wrote {run_sweep(a.params, a.study, a.trials, a.resume)}")


def cmd_tune(a) -> None:
    from bench.tune import run_tuning, tune_arm
    if a.arm:   # one arm's study only (arms can run side by side); a later plain `bench tune` writes the files
        rec = tune_arm(a.params, a.arm)
        print(f"{a.arm}: {rec['trials']} trials, best {rec['metric']} {rec['best_value']:.4f} {rec['overrides']}")
    else:
        print(f"wrote {run_tuning(a.params)}")


def cmd_verdict(a) -> None:
    if a.measured_only:
        from bench.verdict_measured import rejudge_measured
        print(f"wrote {rejudge_measured(a.params)}")
        return
    from bench.report_verdict import write_verdict
    print(f"wrote {write_verdict(a.params)}")


def cmd_scaling(a) -> None:
    from bench.scaling import run_scaling
    pairs = a.pairs.split(",") if a.pairs else None
    seeds = _ints(a.seeds) if a.seeds else None
    print(f"wrote {run_scaling(a.params, _floats(a.budgets), pairs, seeds, a.jobs, train=not a.no_train)}")


def cmd_check(a) -> None:
    from bench.check import run_checks, suites_with_checks
    paths = [Path(p) for p in a.params] or suites_with_checks()
    if not paths:
        raise ConfigError("no suite has a `check:` section")
    code = run_checks(paths, update=a.update)
    if code:
        sys.exit(code)


def cmd_report(a) -> None:
    from bench.report import write_results_readme
    print(f"wrote {write_results_readme(a.out)}")


def cmd_code_deps(a) -> None:
    from bench.code_deps import write
    print(f"wrote {len(write())} files under code/ (the files each pipeline command reads)")


def cmd_summary(a) -> None:
    from bench.report import suite_summary
    print(suite_summary(a.params))


def cmd_lm_report(a) -> None:
    from bench.tasks.lm_report import report
    print(f"wrote {report(a.params)}")


def cmd_run(a) -> None:
    from bench.evaluate import evaluate_arm
    from bench.report import compare
    from bench.train import train
    from bench.config import read_params
    if a.set:
        raise ConfigError("bench run writes the suite's own results: it takes no --set (for a smoke run: "
                          "bench train PARAMS --arm ARM --set …, which writes under runs/ only)")
    cmd_prepare(argparse.Namespace(params=a.params, arm=None, set=a.set))
    if "protocol" in read_params(a.params):   # tune, then every arm of every pair over the protocol's seeds
        from bench.protocol import load_protocol
        from bench.tune import run_tuning
        proto = load_protocol(a.params)
        if proto.tune is not None:
            run_tuning(a.params)
        runs = [(arm, seed) for arm in proto.arms for seed in proto.seeds]
    else:
        runs = [(arm, None) for arm in arm_names(a.params)]
    for arm, seed in runs:
        cfg = load_config(a.params, arm, a.set, seed=seed)
        train(cfg, params_path=a.params, resume="auto", progress=not a.no_progress)
        evaluate_arm(cfg)
    print(f"wrote {compare(a.params)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("partition", help="print each block's σ range, layers and probability mass")
    q.add_argument("-B", "--num-blocks", type=int, default=3, help="number of blocks B (default 3)")
    q.add_argument("--strategy", default="equiprobable", help="equiprobable | log-uniform | linear | explicit")
    q.add_argument("--gamma", type=float, default=0.0, help="overlap γ (default 0)")
    q.add_argument("--depth", type=int, default=12, help="number of residual layers (default 12)")
    q.add_argument("--layers", default="", help="layer distribution, first block first, e.g. 2,4,6")
    q.add_argument("--edges", default="", help="explicit boundaries (B-1 interior values, or B+1 with the ends)")
    q.add_argument("--steps", type=int, default=0, help="inference σ points to assign to blocks (default B)")
    q.add_argument("--P-mean", dest="P_mean", type=float, default=-1.2, help="mean of ln σ under the EDM log-normal")
    q.add_argument("--P-std", dest="P_std", type=float, default=1.2, help="standard deviation of ln σ")
    q.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level σ_min")
    q.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level σ_max")
    q.add_argument("--sigma-data", type=float, default=0.5, help="σ_data of the EDM preconditioning")
    q.set_defaults(func=cmd_partition)

    q = sub.add_parser("data", help="obtain a dataset offline into data/")
    q.add_argument("dataset", help="fashion-mnist | shakespeare | austen | brown | text8 | lm1b | owt | "
                                   "text (with --source FILE_OR_DIR, or --params PARAMS: a suite's data section) | "
                                   "images (with --source DIR: an ImageFolder, train/<class>/… and test/ or val/; "
                                   "or Tiny-ImageNet: tiny-imagenet-200/ or zh-plus/tiny-imagenet parquet files)")
    q.add_argument("--source", default=None, help="a directory that already holds the files (text: a file or "
                   "directory; images: the ImageFolder)")
    q.add_argument("--root", default="data", help="directory the dataset goes into (default data/)")
    q.add_argument("--params", default=None, help="text: prepare what this suite's data section says")
    q.add_argument("--tokenizer", default=None, help="text: char (default) | bpe")
    q.add_argument("--vocab-size", type=int, default=None, help="text, bpe: vocabulary size (default 4096)")
    q.add_argument("--name", default=None, help="text --source / images: the dataset name, data.name in params "
                   "(default: the file or folder name)")
    q.add_argument("--image-size", type=int, default=None, help="images: side in pixels to convert to "
                   "(default 32; a run needs its model.image_size)")
    q.add_argument("--channels", type=int, default=None, help="images: 1 (Pillow \"L\") or 3 (\"RGB\", default); "
                   "a run needs its model.in_channels")
    q.add_argument("--resize", default=None, choices=("resize", "center_crop"), help="images: resize (the short "
                   "side, then a centre crop; default) or center_crop (the centre square, then resize); data.resize")
    q.add_argument("--source-format", default=None, choices=("auto", "imagefolder", "tiny_imagenet"),
                   help="images: what --source holds; auto (default: detected), imagefolder (class folders) or "
                   "tiny_imagenet (the tiny-imagenet-200/ folder or the zh-plus/tiny-imagenet parquet files); "
                   "data.source_format")
    q.set_defaults(func=cmd_data)

    def suite_cmd(name, func, help_, arm=True, arm_required=True):
        q = sub.add_parser(name, help=help_)
        q.add_argument("params", help="a suite's params.yaml")
        if arm:
            q.add_argument("--arm", required=arm_required, action=None if arm_required else "append",
                           help="an arm of the suite's `arms:`" + ("" if arm_required else " (repeatable; default: all)"))
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a param (repeatable)")
        if arm and arm_required:
            q.add_argument("--seed", type=int, default=None,
                           help="train.seed of this run, in its own directory runs/<suite>/<arm>/seed<N> (the verdict protocol)")
        q.set_defaults(func=func)
        return q

    suite_cmd("prepare", cmd_prepare, "validate every arm and the dataset; print budgets", arm_required=False)
    q = suite_cmd("train", cmd_train, "train one arm")
    q.add_argument("--resume", action="store_true",
                   help="continue from the arm's ckpt.pt (refused if it was made with other params)")
    q.add_argument("--allow-change", action="append", default=[], metavar="SECTION.KEY",
                   help="with --resume: accept a checkpoint whose value of this param differs (e.g. train.lr after "
                        "a divergence); the change is recorded in the run (repeatable)")
    q.add_argument("--resume-if-compatible", action="store_true",
                   help="continue from ckpt.pt if it was made with the same params, else start afresh (DVC uses this)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars (clean logs under DVC)")
    q.add_argument("--nproc", type=int, default=1, help="data-parallel ranks on this machine: runs itself under "
                   "torchrun (gloo on CPU, NCCL on CUDA); train.batch_size is the global batch")
    q.add_argument("--block-parallel", action="store_true", help="dblocks: ranks grouped by block (B × dp of them), "
                   "each group trains only its block; rank 0 assembles final.pt (bench/parallel.py)")
    suite_cmd("evaluate", cmd_evaluate, "evaluate one arm's final weights on the test set")
    q = suite_cmd("compare", cmd_compare, "write results/<suite>/comparison.{csv,md} and plots", arm=False)
    q.add_argument("--results", default=None, help="results directory (default: results)")
    q.add_argument("--relabel", action="store_true", help="without the runs: count the committed arms' training "
                   "FLOPs and label results/<suite>/*.md with them (pre-protocol suites; bench/report_relabel.py)")
    q = sub.add_parser("memory-matrix", help="memory over model scale (the paper's configs) against every baseline: "
                       "results/memory/matrix.md")
    q.add_argument("--batch", type=int, default=16, help="measured batch (and 2x; extrapolated to the paper's; default 16)")
    q.add_argument("--only", default="", help="comma-separated parts of model labels, e.g. ViT,DiT-S")
    q.set_defaults(func=cmd_memory_matrix)
    q = sub.add_parser("memory", help="measured peak memory and step time of every arm (random input)")
    q.add_argument("params", help="a suite's params.yaml (its model and diffusion settings)")
    q.add_argument("--blocks", default="1,2,3,4,6", help="values of B (default 1,2,3,4,6)")
    q.add_argument("--batch-sizes", default="128", help="e.g. 32,128 (default 128)")
    q.add_argument("--arms", default="e2e,e2e+accum,e2e+ckpt,dblocks,dblocks+ckpt",
                   help="arms to measure; e2e+accum: E2E as B micro-batches with accumulated gradients")
    q.add_argument("--residency", default="resident,offload",
                   help="DB block residency policies to measure: resident (all blocks on the device), offload")
    q.add_argument("--budget", default=None, help="also find the deepest model each arm trains within e.g. 2GiB")
    q.add_argument("--time-steps", type=int, default=3, help="timed steps per block (median)")
    q.add_argument("--max-depth", type=int, default=96, help="--budget: the depth search stops here (default 96)")
    q.add_argument("--resume", action="store_true",
                   help="keep the rows a killed run already measured (same arm, B, residency, batch, depth)")
    q.add_argument("--name", default=None, help="results/memory/<name>.{csv,md,png} (default: the suite)")
    q.add_argument("--out", default="results/memory", help="output directory (default results/memory)")
    q.set_defaults(func=cmd_memory)

    from bench.cli_generation import add_commands as add_generation_commands  # fid-weights, fid-stats, latents, gen-report
    add_generation_commands(sub, suite_cmd)

    q = sub.add_parser("sweep", help="Optuna study over B, partition, γ, layer distribution, noise, weighting")
    q.add_argument("params", help="a suite's params.yaml with a `sweep:` section")
    q.add_argument("--study", default=None, help="study name (default: the suite)")
    q.add_argument("--trials", type=int, default=None, help="completed trials wanted (default: sweep.trials)")
    q.add_argument("--resume", action="store_true", help="continue a study that exists (e.g. after a kill)")
    q.set_defaults(func=cmd_sweep)

    q = sub.add_parser("tune", help="equal tuning budget per arm on validation (protocol.tune): results/<suite>/tuned.yaml")
    q.add_argument("params", help="a suite's params.yaml with a `protocol:` section")
    q.add_argument("--arm", default=None, help="run (or continue) this tuned arm's study only, writing nothing "
                   "else; a later `bench tune` without --arm finds it finished and writes tuned.yaml")
    q.set_defaults(func=cmd_tune)

    q = sub.add_parser("verdict", help="paired seed differences, bootstrap intervals and verdicts: results/<suite>/verdict.csv")
    q.add_argument("params", help="a suite's params.yaml with a `protocol:` section")
    q.add_argument("--measured-only", action="store_true",
                   help="re-judge only the measured claims (d: results/memory, e: sampling_cost.csv) into the existing "
                        "verdict.csv and comparison.md; needs no runs")
    q.set_defaults(func=cmd_verdict)

    q = sub.add_parser("scaling", help="DB − E2E against training budget, fitted per arm: results/scaling/")
    q.add_argument("params", help="a suite's params.yaml with a `protocol:` section")
    q.add_argument("--budgets", required=True, help="multiples of the suite's budget, e.g. 0.5,1,2,4,8 (1: the protocol's runs)")
    q.add_argument("--pairs", default=None, help="protocol pairs, e.g. paper,tuned (default: all)")
    q.add_argument("--seeds", default=None, help="e.g. 0,1,2 (default: protocol.seeds)")
    q.add_argument("--jobs", type=int, default=1, help="runs side by side (each at the suite's train.threads)")
    q.add_argument("--no-train", action="store_true", help="only collect finished points and write the results")
    q.set_defaults(func=cmd_scaling)

    q = sub.add_parser("check", help="regression check: small CI configs against results/baselines/")
    q.add_argument("params", nargs="*", help="suites' params.yaml (default: every suite with a `check:` section)")
    q.add_argument("--update", action="store_true", help="write the baselines instead of comparing (never in CI)")
    q.set_defaults(func=cmd_check)

    q = sub.add_parser("report", help="results/README.md: every suite side by side with the paper")
    q.add_argument("--out", default="results/README.md", help="the report's path (default results/README.md)")
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("code-deps", help="code/*.sha256: the source files each pipeline command reads (DVC deps)")
    q.set_defaults(func=cmd_code_deps)
    q = sub.add_parser("summary", help="print a suite's verdicts (the last step of `dvc repro suites/<name>`)")
    q.add_argument("params", help="a suite's params.yaml")
    q.set_defaults(func=cmd_summary)
    suite_cmd("lm-report", cmd_lm_report, "language-model suite: comparison.md with metric definitions, "
              "quality vs counted compute", arm=False)
    q = suite_cmd("run", cmd_run, "prepare, train (resuming), evaluate every arm, compare", arm=False)
    q.add_argument("--no-progress", action="store_true", help="no progress bars (clean logs under DVC)")
    return p


def main(argv: list[str] | None = None) -> int:
    from bench.data.images import DatasetMissing
    from bench.splits import TestSealed
    from bench.checkpoint import RunDirBusy
    from bench.train import Interrupted, NonFiniteLoss
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Interrupted as e:
        print(f"bench: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, DatasetMissing, NonFiniteLoss, TestSealed, ValueError, RunDirBusy, OSError) as e:
        if os.environ.get("BENCH_DEBUG"):
            raise
        where = ""
        if isinstance(e, (DatasetMissing, FileNotFoundError)) and not Path("suites").is_dir():
            where = (f" (relative paths in params files resolve against the working directory, here {Path.cwd()}: "
                     "run bench from the repository root)")
        print(f"bench: error: {e}{where}", file=sys.stderr)  # BENCH_DEBUG=1 shows the traceback
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
