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

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from bench import atomic, checkpoint, distributed, parallel, parallelize, results, seeding, track
from bench.blocks import BlockOptimizer, BlockSampler
from bench.config import ConfigError, RunConfig
from bench.data.images import EpochBatches
from bench.memory import MemoryMeter
from bench.parallel import GradSync
from bench.steplog import StepLog
from bench.splits import test_sealed
from bench.tasks import make_task
from bench.tasks.base import Task


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the message says where the last checkpoint is."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


# ---- building blocks of a run -----------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine (use auto or cpu)")
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
    # one dblocks step trains one block: B× the steps (a block-restricted run: one share per block it trains)
    factor = (len(cfg.train.blocks_to_train) or cfg.diffusion.num_blocks) if (cfg.is_dblocks and cfg.train.compute_match) else 1
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


def backward_step(cfg: RunConfig, model, optimizer: BlockOptimizer, loss: torch.Tensor, scaler=None,
                  sync=None, clip_groups=None) -> torch.Tensor:
    """Backward, `sync()` (the gradient averaging across ranks: GradSync), clip the gradient norm
    (of all parameters, or of each of `clip_groups` apart), AdamW step, advance the schedule;
    returns the norm (the largest of the groups')."""
    optimizer.zero_grad()
    (scaler.scale(loss) if scaler else loss).backward()
    if sync is not None:
        sync()
    if scaler:
        optimizer.unscale(scaler)
    norms = [torch.nn.utils.clip_grad_norm_(g, cfg.train.grad_clip) for g in (clip_groups or [model.parameters()])]
    optimizer.step(scaler) if scaler else optimizer.step()   # any object with zero_grad/step will do
    return max(norms)


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


# ---- one step -----------------------------------------------------------------------------------
@dataclass
class Step:
    loss: torch.Tensor
    extra: dict
    layers: range
    block: int | None
    grad_norm: torch.Tensor


def train_step(run: "Run", step: int) -> Step:
    """Batch, block, forward, finiteness, backward and the EMA, with the memory meter on the
    block's first step after two warm-up steps (once per block)."""
    cfg, task, state = run.cfg, run.task, run.state
    task.step = step
    # the global batch, then this rank's rows (augmentation applied before the slice)
    batch = run.env.shard.take(task.batch(run.batches.indices(step), seed=seeding.stream_seed(
        run.streams, "augment", step), device=run.device))
    block = run.block_sampler.sample() if cfg.is_dblocks else None
    meter_key = "all" if block is None else f"block{block}"
    measure = step >= min(2, run.budget.total_steps // 2) and meter_key not in state["memory"]
    run.optimizer.activate(block)  # offload: only this block's weights on the device
    meter = MemoryMeter(run.model, run.optimizer.resident_optimizers(), run.device) if measure \
        else contextlib.nullcontext()
    t0 = time.perf_counter()
    with meter:
        loss, extra, layers = forward_loss(cfg, task, run.model, batch, block, run.noise_gen)
        if not distributed.all_finite(run.sync.finite_env(step), loss):   # every rank stops together
            raise NonFiniteLoss(
                f"{cfg.suite}/{cfg.arm}: loss is {loss.item()} at step {step}"
                + (f" (block {block})" if block is not None else "")
                + f", lr {run.optimizer.lr:.3g}; stopped. " + remedy(run))
        grad_norm = backward_step(cfg, run.model, run.optimizer, loss, scaler=run.scaler,
                                  sync=lambda: run.sync(run.model, step), clip_groups=run.sync.clip_groups(run.model))
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    if measure:
        report = meter.report()
        report.host_parked_bytes = run.optimizer.parked_bytes()
        state["memory"][meter_key] = report.to_dict()
    else:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        state["step_times"].append(time.perf_counter() - t0)
    state["train_time"] += time.perf_counter() - t0
    state["layer_evals"] += int(extra.get("layer_evals", len(layers)))  # a recurrence may unroll more
    return Step(loss, extra, layers, block, grad_norm)


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class Run:
    cfg: RunConfig
    task: Task
    model: torch.nn.Module
    optimizer: BlockOptimizer
    block_sampler: BlockSampler
    noise_gen: torch.Generator
    batches: EpochBatches
    budget: Budget
    device: torch.device
    env: distributed.DistEnv
    sync: GradSync
    streams: int                     # the root seed of the data, block, noise and augment streams
    ckpt_path: Path
    state: dict
    ema: object = None
    scaler: object = None
    saved_step: int | None = None    # the step of the last checkpoint written (for the NaN message)


def train(cfg: RunConfig, params_path: str | Path | None = None, resume: bool | str = False,
          progress: bool = True, log=print, on_eval=None, parent_run_id: str | None = None, overrides=(),
          tags: dict | None = None, allow_change=()) -> dict:
    """Train one arm.  resume: False (start afresh), True (continue from ckpt.pt; refuse if it was
    made with other params) or "auto" (continue if it was made with the same params, otherwise
    move it aside to ckpt.stale.pt and start afresh: what a pipeline rerun after a params edit needs).
    on_eval(step, metrics) is called at every learning-curve point (a sweep prunes from it);
    parent_run_id puts the MLflow run under that run instead of the suite's parent run; overrides
    (the command line's --set) give the run a parent run of its own; tags are set on its MLflow run
    (a sweep's trial number).
    Under torchrun: data-parallel (bench.distributed), or block-parallel with
    train.block_parallel (bench.parallel: this rank's group trains its block, rank 0 assembles)."""
    with checkpoint.run_lock(Path(cfg.out_dir), enabled=int(os.environ.get("RANK", "0")) == 0, log=log):
        return _train(cfg, params_path, resume, progress, log, on_eval, parent_run_id, overrides, tags, allow_change)


def _train(cfg, params_path, resume, progress, log, on_eval, parent_run_id, overrides, tags, allow_change) -> dict:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    env = distributed.init(cfg.train.device)   # one process without a launcher (torchrun sets WORLD_SIZE)
    device = distributed.device_for(env, resolve_device(cfg.train.device))
    arm_cfg, world, group = cfg, env, None
    if cfg.train.block_parallel:
        group = parallel.block_group(env, cfg.diffusion.num_blocks, device)
        cfg = parallel.group_config(cfg, group.block)
        env = group.env
    if cfg.train.batch_size % env.world_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} (the global batch) does not split over "
                         f"{env.world_size} ranks")
    task = make_task(cfg)
    task.check()
    out = Path(cfg.out_dir)
    task.shard = env.shard
    parallelize.enable_cuda_speedups(device)
    task.load()
    budget = make_budget(cfg, task.num_train)
    seed = cfg.train.seed   # every stream below is its own child of SeedSequence(seed): bench/seeding.py
    restricted = bool(cfg.train.blocks_to_train)
    streams = seeding.stream_seed(seed, "blocks", *cfg.train.blocks_to_train) if restricted else seed

    torch.manual_seed(seeding.stream_seed(seed, "init"))
    model = build_model(cfg, task).to(device)
    if world.active:   # dropout masks: distinct per rank (one process keeps the stream it always had)
        torch.manual_seed(seeding.stream_seed(seed, "dropout", world.rank))
    ema = parallelize.make_ema(model, cfg)       # before compiling: the EMA copy stays eager
    parallelize.parallelize(model, cfg)
    freeze_step = (round(cfg.train.shared_warmup_epochs * budget.steps_per_epoch)
                   if restricted and cfg.train.shared == "frozen" else None)
    run = Run(cfg, task, model, make_optimizer(cfg, task, model, device, budget),
              BlockSampler(cfg.diffusion.num_blocks, seeding.stream_seed(streams, "block"), cfg.train.blocks_to_train),
              seeding.generator(streams, "noise"), EpochBatches(task.num_train, cfg.train.batch_size, streams),
              budget, device, env, GradSync(env, world, restricted, freeze_step), streams, out / "ckpt.pt",
              {"step": 0, "layer_evals": 0, "train_time": 0.0, "history": [], "log": [], "step_times": [],
               "memory": {}, "mlflow_run_id": None, "loss_window": {}, "threads": torch.get_num_threads()},
              ema, parallelize.make_scaler(cfg, device))
    ckpt = checkpoint.open_for_resume(run.ckpt_path, cfg, resume, device, log, budget.total_steps, allow_change)
    if ckpt is not None:
        run.state = checkpoint.restore(ckpt, model, run.optimizer, run.block_sampler, run.noise_gen, device, ema,
                                       run.scaler)
        if allow_change:   # a changed lr / weight decay takes effect from the resumed step
            run.optimizer.rebase(cfg.train.lr, cfg.train.weight_decay)
        run.saved_step = run.state["step"]
        log(f"resumed {cfg.suite}/{cfg.arm} from {run.ckpt_path} at step {run.state['step']}/{budget.total_steps}")
        if run.state.setdefault("threads", torch.get_num_threads()) != torch.get_num_threads():
            log(f"note: the run trained with {run.state['threads']} CPU threads and resumes with "
                f"{torch.get_num_threads()}: float reductions differ, so the result is not bit-exact (set train.threads)")
    if group is not None and run.sync.sharing(run.state["step"]) and \
            not distributed.all_equal(world, run.state["step"]):
        raise ValueError("block-parallel: the blocks' checkpoints are at different steps while the shared modules "
                         "are still trained together; start afresh (or use train.shared: frozen)")
    state = run.state

    prov = {**track.provenance(device), "world_size": world.world_size}
    if env.is_main:   # rank 0 (of the group) alone writes files and MLflow; the others train and wait at barriers
        atomic.write_text(out / "params.yaml", yaml.safe_dump({**cfg.to_dict(), "provenance": prov,
                                                              "budget": budget.__dict__}, sort_keys=False))
    tracker = track.Tracker(cfg.suite, cfg.arm, params_path, run_id=state["mlflow_run_id"], parent_run_id=parent_run_id,
                            main_process=env.is_main, overrides=overrides)
    state["mlflow_run_id"] = tracker.run_id
    if state["step"] == 0:
        tracker.log_params({**cfg.to_dict(), "budget": budget.__dict__})
        tracker.set_tags({"bench.arm": cfg.arm, "bench.mode": cfg.mode, "bench.seed": cfg.train.seed,
                          **{f"bench.{k}": v for k, v in prov.items()}, **(tags or {})})

    # a block-restricted run cannot be scored alone: block-parallel scores the assembled model at the end
    evals_at = set() if restricted else curve_steps(budget, cfg.train.curve_points)
    steplog = StepLog(tracker, cfg.train.log_every, budget.total_steps, state.setdefault("loss_window", {}))
    model.train()
    bar = tqdm(total=budget.total_steps, initial=state["step"], disable=not (progress and env.is_main),
               desc=f"{cfg.suite}/{cfg.arm}", unit="step", dynamic_ncols=True)
    try:
        while state["step"] < budget.total_steps:
            if freeze_step is not None and state["step"] >= freeze_step:
                parallel.freeze_shared(model)
            done = train_step(run, state["step"])
            state["step"] = step = state["step"] + 1
            row = steplog.add(step, state["layer_evals"], done, run.optimizer.lr)
            if row:
                state["log"].append(row)
                bar.set_postfix(loss=f"{row['train/loss']:.3g}")
            if step in evals_at:
                if env.is_main:
                    point = evaluate_point(run, step)
                    tracker.log_metrics({f"eval/{k}": v for k, v in point.items() if k not in ("step",)}, step=step)
                    shown = task.metric if task.metric in point else task.selection_metric
                    bar.write(f"{cfg.suite}/{cfg.arm} step {step}/{budget.total_steps}: {shown} {point[shown]:.4f}")
                    if on_eval is not None:
                        on_eval(step, point)
                distributed.barrier(env)   # rank 0 evaluates
            if step % cfg.train.ckpt_every == 0 or step == budget.total_steps:
                bad = []
                if env.is_main:   # every rank holds the same state (bench.distributed), so one file resumes them all
                    bad = checkpoint.save(run.ckpt_path, cfg, state, model, run.optimizer, run.block_sampler,
                                          run.noise_gen, device, ema, run.scaler)
                if bad:   # finite loss, non-finite weights: the last good checkpoint stays
                    raise NonFiniteLoss(f"{cfg.suite}/{cfg.arm}: {len(bad)} weight or optimizer tensors are non-finite "
                                        f"at step {step} (e.g. {bad[0]}); stopped. " + remedy(run))
                run.saved_step = step
                distributed.barrier(env)
            bar.update(1)
    except BaseException as e:
        bar.close()
        steplog.flush()
        tracker.end("FAILED" if isinstance(e, NonFiniteLoss) else "KILLED")
        if type(e) is KeyboardInterrupt:
            raise Interrupted(f"interrupted at step {state['step']}; last checkpoint: "
                              + (f"{run.ckpt_path} (step {run.saved_step}); continue with --resume"
                                 if run.saved_step is not None else "none yet")) from None
        raise
    bar.close()

    summary = {}
    if env.is_main:
        summary = results.run_summary(cfg, task, state, prov,
                                      state["layer_evals"] / (budget.steps_per_epoch * task.layout.depth))
        if tracker.run_id:
            summary["mlflow_run_id"] = tracker.run_id   # `bench evaluate`, sweeps and tuning link to this run
        with run.optimizer.materialize():
            results.write_outputs(out, cfg, summary, state, model.state_dict(), tracker,
                                  ema.module.state_dict() if ema is not None else None)
    tracker.end()
    if group is None:
        distributed.barrier(env)
        return summary
    distributed.barrier(world)   # every block done: rank 0 assembles and scores the whole model
    summary = parallel.finish(arm_cfg, world, prov, log) if world.is_main else {}
    distributed.barrier(world)
    return summary


def remedy(run: Run) -> str:
    """What to do after a divergence, as a command that works."""
    cfg = run.cfg
    seed = f" --seed {cfg.train.seed}" if Path(cfg.out_dir).name.startswith("seed") else ""
    if run.saved_step is None:
        return ("No checkpoint was written yet: lower train.lr (or raise train.warmup_epochs, lower train.grad_clip) "
                "in the params file and start afresh.")
    return (f"Last good checkpoint: {run.ckpt_path} (step {run.saved_step}). Lower train.lr (or raise "
            f"train.warmup_epochs, lower train.grad_clip) in the params file, then continue with: bench train "
            f"PARAMS --arm {cfg.arm}{seed} --resume --allow-change train.lr (the change is recorded in the run); "
            f"or start afresh without --resume")


def evaluate_point(run: Run, step: int) -> dict:
    """A learning-curve point (validation, and test unless sealed), appended to the history."""
    with run.optimizer.materialize():
        metrics = curve_metrics(run.task, run.model, run.device)
    point = {"step": step, "layer_evals": run.state["layer_evals"],
             "epochs_equiv": run.state["layer_evals"] / (run.budget.steps_per_epoch * run.task.layout.depth),
             "train_time_s": run.state["train_time"], **metrics}
    run.state["history"].append(point)
    return point
