"""The documented range of every numeric setting, checked before any output is written.

Each entry is `section.key: (low, high, what)`, with `[` / `(` marking whether an end is
included; a key not listed only has to be a finite number of its field's type.  Relations
between keys (min_lr ≤ lr, σ_min < σ_max) follow the table.  A value outside its range stops the
run with one `ConfigError` line naming the key, the range and the value.
"""

from __future__ import annotations

import dataclasses
import math
import re

INF = math.inf
BOUNDS = {
    # key: (range, meaning)
    "data.train_subset": ("[0, inf)", "first N training examples (0: all)"),
    "data.test_subset": ("[0, inf)", "first N test examples (0: all)"),
    "data.val_subset": ("[0, inf)", "first N validation examples (0: all)"),
    "data.val_fraction": ("(0, 1)", "share of train held out as validation (every selection reads it)"),
    "diffusion.num_blocks": ("[1, inf)", "blocks B"),
    "diffusion.gamma": ("[0, 1)", "overlap of neighbouring blocks' σ ranges (a fraction of a block's mass)"),
    "diffusion.P_std": ("(0, inf)", "std of ln σ"),
    "diffusion.sigma_min": ("(0, inf)", "smallest σ"),
    "diffusion.sigma_max": ("(0, inf)", "largest σ"),
    "diffusion.sigma_data": ("(0, inf)", "σ_data"),
    "diffusion.inference_steps": ("[0, inf)", "σ points at inference (0: B)"),
    "diffusion.sample_sigma_max": ("[0, inf)", "where inference starts (0: sigma_max)"),
    "train.batch_size": ("[1, inf)", "examples per step"),
    "train.epochs": ("(0, inf)", "end-to-end epochs"),
    "train.lr": ("(0, inf)", "peak learning rate"),
    "train.min_lr": ("[0, inf)", "final learning rate (≤ lr)"),
    "train.warmup_epochs": ("[0, inf)", "linear warm-up"),
    "train.weight_decay": ("[0, inf)", "AdamW weight decay"),
    "train.grad_clip": ("(0, inf)", "gradient-norm clip"),
    "train.threads": ("[0, inf)", "CPU threads (0: torch's default)"),
    "train.log_every": ("[1, inf)", "steps between logged losses"),
    "train.ckpt_every": ("[1, inf)", "steps between checkpoints"),
    "train.curve_points": ("[0, inf)", "learning-curve evaluations"),
    "train.ema": ("[0, 1)", "EMA decay (0: off)"),
    "train.shared_warmup_epochs": ("[0, inf)", "epochs before the shared modules freeze"),
    "eval.batch_size": ("[1, inf)", "examples per evaluation batch"),
}
# model sizes: counts that must be positive, and those where 0 means "derived" (e.g. cond_dim 0 = hidden)
MODEL_POSITIVE = ("image_size", "patch_size", "in_channels", "num_classes", "hidden", "depth", "heads", "mlp_dim",
                  "seq_len", "core", "mean_recurrence", "bptt")
MODEL_NON_NEGATIVE = ("cond_dim", "mlp_hidden", "vocab_size", "prelude", "coda", "embed")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_range(text: str) -> tuple[float, float, bool, bool]:
    m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", text)
    low, high = (float(x) for x in (m.group(2), m.group(3)))
    return low, high, m.group(1) == "[", m.group(4) == "]"


def inside(value: float, text: str) -> bool:
    low, high, low_in, high_in = parse_range(text)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def check(cfg) -> None:
    """Types, finiteness and ranges of every section of a RunConfig, then the relations."""
    from bench.config import ConfigError, model_config, model_config_class
    defaults = {f.name: f.default for f in dataclasses.fields(model_config_class(cfg.model["arch"]))}
    for name, value in cfg.model.items():   # before the architecture's own checks divide by them
        # ≥ 1, unless the architecture's default 0 means "derived" (DiT's depth/hidden/heads from model.size)
        floor = (1 if defaults.get(name) != 0 else 0) if name in MODEL_POSITIVE else 0 if name in MODEL_NON_NEGATIVE else None
        if floor is not None and (isinstance(value, bool) or not isinstance(value, int) or value < floor):
            raise ConfigError(f"model.{name} must be an integer ≥ {floor}, got {value!r}")
    try:
        model = model_config(cfg.model)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"model: {e}") from None
    for name in MODEL_POSITIVE:   # after the architecture filled its derived sizes
        if isinstance(getattr(model, name, 1), int) and getattr(model, name, 1) < 1:
            raise ConfigError(f"model.{name} must be ≥ 1 (or derived from model.size), got {getattr(model, name)}")
    sections = {"data": cfg.data, "diffusion": cfg.diffusion, "train": cfg.train, "eval": cfg.eval, "model": model}
    for name, section in sections.items():
        for f in dataclasses.fields(section):
            value, key = getattr(section, f.name), f"{name}.{f.name}"
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool}.get(str(f.type))
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
            if kind in (int, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{key} must be a number, got {value!r}")
                if kind is int and not float(value).is_integer():
                    raise ConfigError(f"{key} must be an integer, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(f"{key} must be finite, got {value!r}")
                if key in BOUNDS and not inside(value, BOUNDS[key][0]):
                    raise ConfigError(f"{key} ({BOUNDS[key][1]}) must lie in {BOUNDS[key][0]}, got {value!r}")
    t, d = cfg.train, cfg.diffusion
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if not d.sigma_min < d.sigma_max:
        raise ConfigError(f"diffusion.sigma_min ({d.sigma_min}) must be below diffusion.sigma_max ({d.sigma_max})")
    if not DEVICE.match(str(t.device)):
        raise ConfigError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got {t.device!r}")
