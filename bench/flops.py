"""FLOPs of a training step and of a run, and parameter counts.

A step is measured, not modelled: `torch.utils.flop_counter.FlopCounterMode` counts the matrix
products torch dispatches (linear, convolution, attention) in the trainer's own forward
(`bench.train.forward_loss`) and backward (`bench.train.backward_step`), so a block's share of the
stem and head, the adaLN conditioning and the recomputation of `+ckpt` are all included.  Not
counted: elementwise ops, norms and softmax (a few per element, negligible beside the products),
and the AdamW update — O(parameters) per step, against ≈ 6·parameters·tokens for forward+backward,
so the optimizer step is skipped rather than measured.

  e2e       one full step
  dblocks   one step of each block: a step trains the sampled block's layers plus the shared
            stem and head, so blocks of uneven depth cost unevenly

`run_flops` turns these into a run's total: steps × step FLOPs for e2e, Σ_b (steps that trained
block b) × block b's step FLOPs for dblocks.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.config import RunConfig
from bench.tasks.base import Task
from bench.train import Budget, backward_step, forward_loss

aten = torch.ops.aten


# torch's counter knows the CUDA attention kernels but not the CPU one (it would count 0 there)
def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


class _NoStep:
    """The optimizer as `backward_step` sees it here: gradients are cleared, weights never move."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        pass


@contextlib.contextmanager
def _untouched(model: torch.nn.Module, optimizer=None):
    """The model as it was afterwards: gradients, buffers, train/eval mode and the global RNG
    (dropout draws from it) restored.  `optimizer` (a BlockOptimizer): every block on the device
    while measuring (offload parks inactive blocks)."""
    with optimizer.materialize() if optimizer is not None else contextlib.nullcontext():
        grads = {p: p.grad for p in model.parameters()}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        was_training = model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            model.train()   # what the trainer runs (dropout, checkpointing are training-only)
            yield
        finally:
            for p, g in grads.items():
                p.grad = g
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def count_step(cfg: RunConfig, task: Task, model, batch, block: int | None,
               generator: torch.Generator) -> dict:
    """FLOPs of one trainer step of `block` (None: e2e), forward and backward apart."""
    with flop_counter() as forward:
        loss, extra, layers = forward_loss(cfg, task, model, batch, block, generator)
    with flop_counter() as backward:  # autograd's ops run under the mode active at backward time
        backward_step(cfg, model, _NoStep(model), loss)
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
            "layer_evals": int(extra.get("layer_evals", len(layers)))}


def step_flops(cfg: RunConfig, task: Task, model, device, optimizer=None) -> dict:
    """FLOPs of one training step at cfg.train.batch_size on `task.example_batch`.

    Returns lists with one entry per measured step (e2e: one; dblocks: one per block):
      forward, backward, per_step (their sum), layer_evals
    and per_block (= per_step for dblocks, None for e2e) and step (the e2e step; for dblocks the
    mean over blocks, i.e. a step's expected FLOPs under uniform block sampling).
    Pass the trainer's BlockOptimizer when residency is offload (or call before making it).
    A task whose compute varies between steps (a recurrence's random unroll) is measured at one draw."""
    batch = task.example_batch(cfg.train.batch_size, device)
    blocks = list(range(task.layout.num_blocks)) if cfg.is_dblocks else [None]
    generator = torch.Generator().manual_seed(0)   # σ and ε draws; FLOPs do not depend on them
    with _untouched(model, optimizer):
        steps = [count_step(cfg, task, model, batch, b, generator) for b in blocks]
    per_step = [s["forward"] + s["backward"] for s in steps]
    return {"mode": cfg.mode, "batch_size": cfg.train.batch_size,
            "forward": [s["forward"] for s in steps], "backward": [s["backward"] for s in steps],
            "per_step": per_step, "layer_evals": [s["layer_evals"] for s in steps],
            "per_block": per_step if cfg.is_dblocks else None, "step": statistics.fmean(per_step)}


def run_flops(cfg: RunConfig, per_step: dict, budget: Budget, block_counts: list[int] | None = None) -> float:
    """Training FLOPs of a run.  e2e: total_steps × step.  dblocks: Σ_b block_counts[b] × block b's
    step, with block_counts the trainer's sampled blocks (None: the expectation total_steps / B)."""
    if not cfg.is_dblocks:
        return float(budget.total_steps * per_step["step"])
    per_block = per_step["per_block"]
    counts = block_counts if block_counts is not None else [budget.total_steps / len(per_block)] * len(per_block)
    if len(counts) != len(per_block):
        raise ValueError(f"{len(counts)} block counts for {len(per_block)} blocks")
    return float(sum(c * f for c, f in zip(counts, per_block)))


def param_counts(model: torch.nn.Module, layout=None) -> dict:
    """Parameters: total, in the residual layers, and shared (stem, head, conditioning: the rest);
    with a BlockLayout also per_block (its layers only; a dblocks step trains shared + that).
    Count a materialized model: offload's parked parameters are empty on the device."""
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in getattr(model, "layers", [])]
    total = sum(p.numel() for p in model.parameters())
    counts = {"total": total, "layers": sum(per_layer), "shared": total - sum(per_layer)}
    if layout is not None:
        counts["per_block"] = [sum(per_layer[i] for i in layout.layers_of(b)) for b in range(layout.num_blocks)]
    return counts
