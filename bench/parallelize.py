"""Speed switches applied to a model from outside (torchtitan's order: compile per layer, then the
data-parallel gradient averaging of bench.distributed), so the model files know nothing of them.

  train.precision  fp32 | bf16 | fp16   autocast of the forward and the loss; fp16 adds a GradScaler.
                   σ and the EDM scalings stay fp32 (they are computed from σ outside the matmuls,
                   and autocast leaves elementwise ops in their inputs' dtype), the loss is fp32.
  train.compile    torch.compile of each residual layer in place: running one block's layers does
                   not recompile, and the model's Python-level routing (which layers run) stays eager.
  train.ema        an EMA of the weights (torch.optim.swa_utils.AveragedModel with the EMA
                   multi-average), updated after every optimizer step, saved as "ema" in ckpt.pt
                   and final.pt, and scored by `bench evaluate` under keys ending in `@ema`.
  CUDA only        TF32 matmuls and convolutions; fused AdamW (resident weights).

On the CPU every switch is off by default, and fp32 eager is what runs.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def enable_cuda_speedups(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def parallelize(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Compile each residual layer (train.compile); returns the same model."""
    if cfg.train.compile:
        for layer in getattr(model, "layers", []):
            layer.compile()
    return model


def autocast(cfg, device: torch.device):
    """The forward's precision context (a no-op for fp32)."""
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[cfg.train.precision])


def make_scaler(cfg, device: torch.device):
    """A GradScaler for fp16 (bf16 and fp32 need none); None otherwise."""
    return torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None


def adamw_kwargs(cfg, device: torch.device) -> dict:
    """Fused AdamW on CUDA when every parameter stays on the device (resident); else the default."""
    if device.type == "cuda" and not (cfg.is_dblocks and cfg.train.residency == "offload"):
        return {"fused": True}
    return {}


def make_ema(model: torch.nn.Module, cfg):
    if not cfg.train.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
