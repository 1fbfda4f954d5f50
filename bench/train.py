"""One training loop for every arm.

  e2e       backprop through all layers (the task's baseline: a plain classifier for ViT)
  dblocks   each step samples one block uniformly, draws σ from that block's range, and runs
            forward and backward through that block's layers plus the shared stem and head only
  …+ckpt    the same with activation checkpointing per layer

Budgets are matched in layer evaluations as in the official code: one dblocks step trains one
block, so dblocks runs B× the steps (and B× the warm-up) of e2e.  Whether that matches FLOPs (the
shared stem, head and conditioning run once per block step) is measured by bench/flops.py and
reported by `bench verdict` / `bench compare` as a ratio.

Splits: learning-curve points score the validation split, and the test split too unless a
selection has sealed it (bench/splits.py).  Random streams: bench/seeding.py.

A run leaves in its out_dir (timm style): params.yaml (resolved config + provenance), log.csv
(losses), history.csv (learning curve), summary.csv and metrics.json (final figures), ckpt.pt
(full state for --resume, written atomically every ckpt_every steps) and final.pt (weights).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml
from tqdm import tqdm

from bench import atomic, distributed, parallelize, seeding, track
from bench.blocks import BlockOptimizer, BlockSampler
from bench.config import RunConfig
from bench.data.images import EpochBatches
from bench.memory import MemoryMeter
from bench.splits import test_sealed
from bench.tasks import make_task
from bench.tasks.base import Task


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ---- building blocks of a run -----------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available on this machine")
    return device


def build_model(cfg: RunConfig, task: Task) -> torch.nn.Module:
    model = task.build_model()
    model.grad_checkpointing = cfg.checkpointing
    return model


@dataclass
class Budget:
    steps_per_epoch: int
    e2e_steps: int      # optimizer steps of the end-to-end arm
    total_steps: int    # optimizer steps of this arm
    warmup_steps: int


def make_budget(cfg: RunConfig, num_train: int) -> Budget:
    spe = num_train // cfg.train.batch_size
    if spe < 1:
        raise ValueError(f"batch size {cfg.train.batch_size} is larger than the training set ({num_train})")
    factor = cfg.diffusion.num_blocks if (cfg.is_dblocks and cfg.train.compute_match) else 1
    e2e = max(1, round(cfg.train.epochs * spe))
    return Budget(spe, e2e, e2e * factor, round(cfg.train.warmup_epochs * spe) * factor)


def lr_factor(step: int, budget: Budget, lr: float, min_lr: float) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < budget.warmup_steps:
        return (step + 1) / budget.warmup_steps
    span = max(1, budget.total_steps - budget.warmup_steps)
    progress = min(1.0, (step - budget.warmup_steps) / span)
    return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / lr


def curve_steps(budget: Budget, points: int) -> set[int]:
    """Steps after which the learning curve is evaluated (the last one is the end of training)."""
    return {round(budget.total_steps * k / points) for k in range(1, points + 1)} if points > 0 else {budget.total_steps}


# ---- one training step -------------------------------------------------------------------------
def forward_loss(cfg: RunConfig, task: Task, model, batch, block: int | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict, range]:
    """The loss of one batch (this rank's rows of it).  dblocks: `block`'s layers at σ drawn from
    that block's range; e2e: all layers, at σ from the whole range if the task's baseline is a
    denoiser.  σ is drawn for the global batch and sliced (bench.distributed: rank-independent)."""
    n, rows = cfg.train.batch_size, task.shard.rows(cfg.train.batch_size)
    if cfg.is_dblocks:
        layers = task.layout.layers_of(block)
        sigma = task.partition.sample_training_sigma(block, n, generator)[rows]
    elif task.e2e_denoiser:
        layers = task.layout.all_layers()
        sigma = task.full_range.sample_training_sigma(0, n, generator)[rows]
    else:
        layers, sigma = task.layout.all_layers(), None
    device = batch[0].device if isinstance(batch, (tuple, list)) else batch.device
    with parallelize.autocast(cfg, device):
        loss, extra = task.loss(model, batch, sigma=sigma, layers=layers, generator=generator)
    return loss.float(), extra, layers


def backward_step(cfg: RunConfig, model, optimizer: BlockOptimizer, loss: torch.Tensor,
                  env: distributed.DistEnv = distributed.DistEnv(), scaler=None) -> torch.Tensor:
    """Backward, average the gradients over the ranks, clip the gradient norm, AdamW step,
    advance the schedule; returns the norm."""
    optimizer.zero_grad()
    (scaler.scale(loss) if scaler else loss).backward()
    distributed.average_gradients(env, model.parameters())
    if scaler:
        optimizer.unscale(scaler)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step(scaler)
    return grad_norm


def make_optimizer(cfg: RunConfig, task: Task, model, device, budget: "Budget") -> BlockOptimizer:
    extra = parallelize.adamw_kwargs(cfg, device)
    return BlockOptimizer(
        model, task.layout, cfg.train.residency if cfg.is_dblocks else "resident", device,
        lambda params: torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **extra),
        lambda s: lr_factor(s, budget, cfg.train.lr, cfg.train.min_lr))


def curve_metrics(task: Task, model, device) -> dict:
    """A learning-curve point: validation always (what a selection may read, e.g. to prune);
    test too, for the published curve, unless the test split is sealed (bench.splits)."""
    metrics = task.evaluate(model, device, split="val")
    if not test_sealed():
        metrics.update(task.evaluate(model, device, split="test"))
    return metrics


# ---- checkpoints ------------------------------------------------------------------------------
# settings that do not change what is trained: a checkpoint made under other values still resumes
RESUME_IGNORED = {"train.log_every", "train.ckpt_every", "train.device", "train.threads", "out_dir", "arm"}


def _resume_ignored(key: str) -> bool:
    """Evaluation settings never change the weights: a run resumes across them (curve points
    before and after the change were measured with the settings of their time)."""
    return key in RESUME_IGNORED or key.startswith("eval.")


def _field_default(cfg: RunConfig, dotted: str):
    """The default of a params key (a key newer than a checkpoint had this value implicitly)."""
    import dataclasses
    from bench.config import DEFAULT_TASK, section_class
    section, _, name = dotted.partition(".")
    if not name:  # a top-level key
        return DEFAULT_TASK if section == "task" else dataclasses.MISSING
    try:
        f = {f.name: f for f in dataclasses.fields(section_class(section, cfg.task, cfg.model["arch"]))}[name]
    except (KeyError, TypeError):
        return dataclasses.MISSING
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _config_diff(old: dict, cfg: RunConfig) -> list[str]:
    """Params that differ between a checkpoint's config and this run's."""
    fa, fb = track.flatten(old), track.flatten(cfg.to_dict())
    diff = []
    for k in set(fa) | set(fb):
        if _resume_ignored(k) or fa.get(k) == fb.get(k):
            continue
        if k not in fa and fb[k] == _field_default(cfg, k):  # added to bench after the checkpoint
            continue
        diff.append(k)
    return sorted(diff)


# ---- the loop ---------------------------------------------------------------------------------
def train(cfg: RunConfig, params_path: str | Path | None = None, resume: bool | str = False,
          progress: bool = True, log=print, on_eval=None, parent_run_id: str | None = None) -> dict:
    """Train one arm.  resume: False (start afresh), True (continue from ckpt.pt; refuse if it was
    made with other params) or "auto" (continue if it was made with the same params, otherwise
    move it aside to ckpt.stale.pt and start afresh: what a pipeline rerun after a params edit needs).
    on_eval(step, metrics) is called at every learning-curve point (a sweep prunes from it);
    parent_run_id puts the MLflow run under that run instead of the suite's parent run."""
    task = make_task(cfg)
    task.check()
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    env = distributed.init(cfg.train.device)   # one process without a launcher (torchrun sets WORLD_SIZE)
    if cfg.train.batch_size % env.world_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} (the global batch) does not split over "
                         f"{env.world_size} ranks")
    task.shard = env.shard
    device = distributed.device_for(env, resolve_device(cfg.train.device))
    parallelize.enable_cuda_speedups(device)
    task.load()
    budget = make_budget(cfg, task.num_train)
    seed = cfg.train.seed   # every stream below is its own child of SeedSequence(seed): bench/seeding.py
    batches = EpochBatches(task.num_train, cfg.train.batch_size, seed)

    torch.manual_seed(seeding.stream_seed(seed, "init"))
    model = build_model(cfg, task).to(device)
    if env.active:   # dropout masks: distinct per rank (one process keeps the stream it always had)
        torch.manual_seed(seeding.stream_seed(seed, "dropout", env.rank))
    ema = parallelize.make_ema(model, cfg)       # before compiling: the EMA copy stays eager
    parallelize.parallelize(model, cfg)
    scaler = parallelize.make_scaler(cfg, device)
    optimizer = make_optimizer(cfg, task, model, device, budget)
    block_sampler = BlockSampler(cfg.diffusion.num_blocks, seeding.stream_seed(seed, "block"))
    noise_gen = seeding.generator(seed, "noise")   # σ and ε draws

    state = {"step": 0, "layer_evals": 0, "train_time": 0.0, "history": [], "log": [], "step_times": [],
             "memory": {}, "mlflow_run_id": None}
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if resume and ckpt_path.exists() else None
    if ckpt is not None:
        diff = _config_diff(ckpt["config"], cfg)
        if diff and resume == "auto":
            log(f"{ckpt_path} was made with different params ({', '.join(diff)}); moved to ckpt.stale.pt, starting afresh")
            ckpt_path.replace(out / "ckpt.stale.pt")
            ckpt = None
        elif diff:
            raise ValueError(f"{ckpt_path} was made with different params ({', '.join(diff)}); "
                             f"start afresh without --resume or restore the params")
    if ckpt is not None:
        with optimizer.materialize():
            model.load_state_dict(ckpt["model"])
        opt_state = ckpt["optimizer"]
        if "residency" not in opt_state:  # a checkpoint from before per-block optimizers: one AdamW
            opt_state = {"residency": "resident", "optimizers": [opt_state], "schedulers": [ckpt["scheduler"]]}
        optimizer.load_state_dict(opt_state)
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        block_sampler.load_state_dict(ckpt["block_sampler"])
        noise_gen.set_state(ckpt["noise_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        state = ckpt["state"]
        log(f"resumed {cfg.suite}/{cfg.arm} from {ckpt_path} at step {state['step']}/{budget.total_steps}")
    elif resume is True:
        log(f"--resume: no checkpoint at {ckpt_path}; starting afresh")

    prov = {**track.provenance(device), "world_size": env.world_size}
    if env.is_main:   # rank 0 alone writes files and MLflow; the other ranks train and wait at barriers
        atomic.write_text(out / "params.yaml", yaml.safe_dump({**cfg.to_dict(), "provenance": prov,
                                                              "budget": budget.__dict__}, sort_keys=False))
    tracker = track.Tracker(cfg.suite, cfg.arm, params_path, run_id=state["mlflow_run_id"], parent_run_id=parent_run_id,
                            main_process=env.is_main)
    state["mlflow_run_id"] = tracker.run_id
    if state["step"] == 0:
        tracker.log_params({**cfg.to_dict(), "budget": budget.__dict__})
        tracker.set_tags({"bench.arm": cfg.arm, "bench.mode": cfg.mode, **{f"bench.{k}": v for k, v in prov.items()}})

    def save_checkpoint() -> None:
        if env.is_main:   # every rank holds the same state (bench.distributed), so one file resumes them all
            with optimizer.materialize():
                weights, opt_state = model.state_dict(), optimizer.state_dict()
                atomic.torch_save(ckpt_path, {
                    "config": cfg.to_dict(), "model": weights, "optimizer": opt_state,
                    "ema": ema.state_dict() if ema is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "block_sampler": block_sampler.state_dict(),
                    "noise_rng": noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "state": state})
        distributed.barrier(env)

    evals_at = curve_steps(budget, cfg.train.curve_points)
    pending: list[tuple[str, float, int]] = []   # per-step metrics, flushed to MLflow in batches
    window: dict[str, list[float]] = {}
    model.train()
    bar = tqdm(total=budget.total_steps, initial=state["step"], disable=not (progress and env.is_main),
               desc=f"{cfg.suite}/{cfg.arm}", unit="step", dynamic_ncols=True)
    try:
        while state["step"] < budget.total_steps:
            step = state["step"]
            task.step = step
            # the global batch, then this rank's rows (augmentation applied before the slice)
            batch = env.shard.take(task.batch(batches.indices(step), seed=seeding.stream_seed(seed, "augment", step),
                                              device=device))
            block = block_sampler.sample() if cfg.is_dblocks else None
            # memory is measured once per block (its first step after two warm-up steps)
            meter_key = "all" if block is None else f"block{block}"
            measure = step >= min(2, budget.total_steps // 2) and meter_key not in state["memory"]
            optimizer.activate(block)  # offload: only this block's weights on the device
            meter = MemoryMeter(model, optimizer.resident_optimizers(), device) if measure else None
            t0 = time.perf_counter()
            if meter:
                meter.__enter__()
            loss, extra, layers = forward_loss(cfg, task, model, batch, block, noise_gen)
            if not distributed.all_finite(env, loss):   # every rank stops together
                if meter:
                    meter.__exit__(None, None, None)
                raise NonFiniteLoss(
                    f"{cfg.suite}/{cfg.arm}: loss is {loss.item()} at step {step}"
                    + (f" (block {block})" if block is not None else "")
                    + f", lr {optimizer.lr:.3g}; stopped. Last good checkpoint: "
                    + (f"{ckpt_path} (step {torch.load(ckpt_path, weights_only=False)['state']['step']})"
                       if ckpt_path.exists() else "none yet")
                    + ". Lower train.lr or raise train.warmup_epochs, then rerun with --resume")
            grad_norm = backward_step(cfg, model, optimizer, loss, env, scaler)
            if ema is not None:
                ema.update_parameters(model)
            if meter:
                meter.__exit__(None, None, None)
                report = meter.report()
                report.host_parked_bytes = optimizer.parked_bytes()
                state["memory"][meter_key] = report.to_dict()
            else:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                state["step_times"].append(time.perf_counter() - t0)
            state["train_time"] += time.perf_counter() - t0
            state["step"] = step = step + 1
            state["layer_evals"] += int(extra.get("layer_evals", len(layers)))  # a recurrence may unroll more

            values = {"train/loss": loss.item(), "train/ce": float(extra["ce"]), "train/grad_norm": float(grad_norm),
                      "train/lr": optimizer.lr}
            if block is not None:
                values[f"train/loss_block{block}"] = values["train/loss"]
                values[f"train/ce_block{block}"] = values["train/ce"]
            pending += [(k, v, step) for k, v in values.items()]
            for k, v in values.items():
                window.setdefault(k, []).append(v)
            if step % cfg.train.log_every == 0 or step == budget.total_steps:
                row = {"step": step, "layer_evals": state["layer_evals"],
                       **{k: sum(v) / len(v) for k, v in window.items()}}
                state["log"].append(row)
                tracker.log_metric_batch(pending)
                pending, window = [], {}
                bar.set_postfix(loss=f"{row['train/loss']:.3g}")
            if step in evals_at and not env.is_main:
                distributed.barrier(env)   # rank 0 evaluates
            elif step in evals_at:
                with optimizer.materialize():
                    metrics = curve_metrics(task, model, device)
                distributed.barrier(env)
                point = {"step": step, "layer_evals": state["layer_evals"],
                         "epochs_equiv": state["layer_evals"] / (budget.steps_per_epoch * task.layout.depth),
                         "train_time_s": state["train_time"], **metrics}
                state["history"].append(point)
                tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                shown = task.metric if task.metric in metrics else task.selection_metric
                bar.write(f"{cfg.suite}/{cfg.arm} step {step}/{budget.total_steps}: {shown} {metrics[shown]:.4f}")
                if on_eval is not None:
                    on_eval(step, metrics)
            if step % cfg.train.ckpt_every == 0 or step == budget.total_steps:
                save_checkpoint()
            bar.update(1)
    except BaseException as e:
        bar.close()
        tracker.log_metric_batch(pending)
        tracker.end("FAILED" if isinstance(e, NonFiniteLoss) else "KILLED")
        raise
    bar.close()
    if not env.is_main:
        distributed.barrier(env)   # rank 0 writes the results
        return {}

    # ---- results --------------------------------------------------------------------------
    final = state["history"][-1]
    mem = max(state["memory"].values(), key=lambda m: m["peak_bytes"], default=None) or {
        k: -1 for k in ("peak_bytes", "parameters", "gradients", "optimizer_state", "activations",
                        "allocator_peak_bytes", "rss_peak_bytes")}  # a run too short to measure
    times = state["step_times"]
    summary = {
        "suite": cfg.suite, "arm": cfg.arm, "mode": cfg.mode, "num_blocks": cfg.diffusion.num_blocks if cfg.is_dblocks else 1,
        "metric": task.metric, "selection_metric": task.selection_metric, **{k: v for k, v in final.items() if k not in ("step", "layer_evals", "epochs_equiv", "train_time_s")},
        "optimizer_steps": state["step"],
        "layer_evals": state["layer_evals"], "epochs_equiv": final["epochs_equiv"],
        "train_time_s": state["train_time"], "median_step_s": statistics.median(times) if times else float("nan"),
        "peak_mem_bytes": mem["peak_bytes"], "peak_mem_params": mem["parameters"], "peak_mem_grads": mem["gradients"],
        "peak_mem_optim": mem["optimizer_state"], "peak_mem_activations": mem["activations"],
        "cuda_allocator_peak_bytes": mem["allocator_peak_bytes"], "rss_peak_bytes": mem["rss_peak_bytes"],
        "device": prov["device_name"], "git_sha": prov["git_sha"], "seed": cfg.train.seed,
    }
    with optimizer.materialize():
        atomic.torch_save(out / "final.pt", {"config": cfg.to_dict(), "model": model.state_dict(), "summary": summary,
                                             **({"ema": ema.module.state_dict()} if ema is not None else {})})
    atomic.write_csv(out / "history.csv", pd.DataFrame(state["history"]))
    atomic.write_csv(out / "log.csv", pd.DataFrame(state["log"]))
    atomic.write_csv(out / "summary.csv", pd.DataFrame([summary]))
    atomic.write_json(out / "metrics.json", {**summary, "memory_by_block": state["memory"]})
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for name in ("summary.csv", "history.csv", "params.yaml"):
        tracker.log_artifact(out / name)
    tracker.end()
    distributed.barrier(env)
    return summary
