"""A run's checkpoint: the full training state in ckpt.pt, written atomically, and the rules for
resuming from it.

ckpt.pt holds the config, the model, every optimizer and schedule (per block under offload), the
EMA and GradScaler when on, the block sampler, every RNG (σ/ε generator, torch, CUDA) and the
run's state (step, layer evaluations, curve points, log rows and the open loss window, step
times, memory, thread count, MLflow run id, params changed on resume).
A resume refuses a checkpoint made with other params, except the keys in RESUME_IGNORED and the
evaluation settings, which do not change what is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch

from bench import atomic, track
from bench.config import RunConfig

# settings that do not change what is trained: a checkpoint made under other values still resumes
RESUME_IGNORED = {"train.log_every", "train.ckpt_every", "train.device", "train.threads", "out_dir", "arm"}


def resume_ignored(key: str) -> bool:
    """Evaluation settings never change the weights: a run resumes across them (curve points
    before and after the change were measured with the settings of their time)."""
    return key in RESUME_IGNORED or key.startswith("eval.")


def default_of(cfg: RunConfig, dotted: str):
    """The default of a params key (a key newer than a checkpoint had this value implicitly)."""
    from bench.config import DEFAULT_TASK, section_class
    section, _, name = dotted.partition(".")
    if not name:  # a top-level key
        return DEFAULT_TASK if section == "task" else dataclasses.MISSING
    try:
        f = {f.name: f for f in dataclasses.fields(section_class(section, cfg.task, cfg.model["arch"]))}[name]
    except (KeyError, TypeError):
        return dataclasses.MISSING
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_diff(old: dict, cfg: RunConfig) -> list[str]:
    """Params that differ between a checkpoint's config and this run's."""
    fa, fb = track.flatten(old), track.flatten(cfg.to_dict())
    diff = []
    for k in set(fa) | set(fb):
        if resume_ignored(k) or fa.get(k) == fb.get(k):
            continue
        if k not in fa and fb[k] == default_of(cfg, k):  # added to bench after the checkpoint
            continue
        diff.append(k)
    return sorted(diff)


def open_for_resume(path: Path, cfg: RunConfig, resume: bool | str, device, log,
                    total_steps: int | None = None, allow_change=()) -> dict | None:
    """The checkpoint to continue from, or None to start afresh.  resume: False, True (refuse a
    checkpoint made with other params) or "auto" (move it aside to ckpt.stale.pt instead).
    "auto" also starts afresh from a *finished* checkpoint whose final.pt is gone: DVC removes a
    stage's outputs before it reruns it (`dvc repro -f`, or its code changed), so that is a retrain."""
    if not resume or not path.exists():
        if resume is True:
            log(f"--resume: no checkpoint at {path}; starting afresh")
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        if not (isinstance(ckpt, dict) and {"config", "state", "model", "optimizer"} <= set(ckpt)):
            raise ValueError("not a bench training checkpoint (no config/state/model/optimizer)")
    except Exception as e:   # truncated, corrupt or another kind of file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if resume == "auto":
            log(f"{path} is unreadable ({reason}); moved to ckpt.corrupt.pt, starting afresh")
            path.replace(path.with_name("ckpt.corrupt.pt"))
            return None
        raise ValueError(f"{path} is not a readable checkpoint ({reason}); move it away and start afresh "
                         f"without --resume") from None
    if (resume == "auto" and total_steps is not None and ckpt["state"]["step"] >= total_steps
            and not (path.parent / "final.pt").exists()):
        log(f"{path} is a finished run whose final.pt is gone (dvc repro -f, or changed deps): moved to "
            f"ckpt.finished.pt, training afresh")
        path.replace(path.with_name("ckpt.finished.pt"))
        return None
    diff = config_diff(ckpt["config"], cfg)
    allowed = [k for k in diff if k in set(allow_change)]   # --allow-change: recorded in the run's state
    if allowed:
        old, new = track.flatten(ckpt["config"]), track.flatten(cfg.to_dict())
        ckpt["state"].setdefault("changes", []).extend(
            {"step": ckpt["state"]["step"], "key": k, "from": old.get(k), "to": new.get(k)} for k in allowed)
        log(f"{path}: resuming with " + ", ".join(f"{k} {old.get(k)} → {new.get(k)}" for k in allowed)
            + " (--allow-change; recorded in the run)")
        diff = [k for k in diff if k not in allowed]
    if diff and resume == "auto":
        log(f"{path} was made with different params ({', '.join(diff)}); moved to ckpt.stale.pt, starting afresh")
        path.replace(path.with_name("ckpt.stale.pt"))
        return None
    if diff:
        raise ValueError(f"{path} was made with different params ({', '.join(diff)}); "
                         f"start afresh without --resume or restore the params")
    return ckpt


def restore(ckpt: dict, model, optimizer, block_sampler, noise_gen, device, ema=None, scaler=None) -> dict:
    """Load every piece of the training state; returns the run's state dict."""
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
    return ckpt["state"]


def non_finite(tree) -> list[str]:
    """The names of tensors in a (nested) state dict with a NaN or an infinity."""
    bad = []

    def walk(node, name):
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() and not bool(torch.isfinite(node).all()):
                bad.append(name)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}")
    walk(tree, "")
    return bad


def save(path: Path, cfg: RunConfig, state: dict, model, optimizer, block_sampler, noise_gen, device,
         ema=None, scaler=None) -> list[str]:
    """Write the checkpoint, unless a weight or an optimizer moment is non-finite: then the last
    good checkpoint stays, and the names of the bad tensors are returned (the caller stops)."""
    with optimizer.materialize():
        bad = non_finite({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if bad:
            return bad
        atomic.torch_save(path, {
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "block_sampler": block_sampler.state_dict(),
            "noise_rng": noise_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "state": state})
    return []


class RunDirBusy(RuntimeError):
    """Another live process writes this run directory."""


@contextlib.contextmanager
def run_lock(out: Path, enabled: bool = True, log=print):
    """One writer per run directory (filelock: the OS drops the lock when its holder dies).  A
    second writer fails at once, naming the holder's PID; a lock left by a dead holder is taken
    over with a note; temp files that holder's interrupted writes left are removed."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout
    created = [d for d in (out, *out.parents) if not d.exists()]   # removed again if nothing gets written
    out.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(out / ".lock"), out / ".lock.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = holder.read_text().strip() if holder.exists() else "unknown"
        raise RunDirBusy(f"{out} is being written by another bench process (PID {pid}); wait for it to finish "
                         f"or stop it, then rerun") from None
    try:
        if holder.exists():
            log(f"{out}: taking over the lock of PID {holder.read_text().strip()}, which is no longer running")
        orphans = atomic.remove_orphans(out)
        if orphans:
            log(f"{out}: removed {len(orphans)} temp file(s) left by an interrupted write")
        holder.write_text(f"{os.getpid()}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
        if created and {p.name for p in out.iterdir()} <= {".lock"}:   # a run that failed before writing anything
            (out / ".lock").unlink(missing_ok=True)
            for d in created:
                if any(d.iterdir()):
                    break
                d.rmdir()
