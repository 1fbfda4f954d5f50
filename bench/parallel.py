"""Block-parallel DiffusionBlocks: torchrun ranks on a 2-D DeviceMesh (`block`, `dp`), each group
training only its own block, with no activation or gradient traffic between the groups' blocks.

    bench train suites/vit_fashion/params.yaml --arm dblocks --block-parallel --nproc 2
    torchrun --standalone --nproc_per_node 2 -m bench train … --arm dblocks --set train.block_parallel=true

World size W = B × dp.  Rank r sits at mesh coordinate (r // dp, r % dp): block group r // dp,
data-parallel rank r % dp inside it.  A group's run is the single-process run with
`train.blocks_to_train: [b]` (same init, same per-block data/noise streams, e2e_steps steps of its
block), data-parallel over its dp ranks (bench.distributed, inside the group).

The shared stem, conditioning and head (every parameter outside `model.layers`) follow
`train.shared`:
  allreduce  their gradients are averaged over the whole world at every step, so one shared copy
             stays identical on every rank (the only traffic between groups: shared gradients).
  frozen     as allreduce for the first train.shared_warmup_epochs (e2e epochs), then frozen:
             after it the groups exchange nothing.  With 0, the shared modules keep their init.
Each group's dp-rank 0 writes runs/…/<arm>/block<b>/ (its checkpoint, log, final.pt).  When every
group is done, rank 0 assembles final.pt: each block's layers from its own file, the shared
modules from block 0's (checked identical in every block's file), and a manifest.json with every
file's SHA-256.  `bench evaluate` then scores it unchanged.  A restarted job resumes each block
from its own checkpoint; a block whose final.pt exists is not trained again.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench import atomic, distributed
from bench.distributed import DistEnv

SHARED_POLICIES = ("allreduce", "frozen")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BlockParallelDims:
    """Named degrees of the mesh, validated like torchtitan's ParallelDims."""
    block: int
    dp: int
    world_size: int

    def __post_init__(self):
        if self.block * self.dp != self.world_size:
            raise ValueError(f"block-parallel needs the world size ({self.world_size}) to be B × dp; B = "
                             f"{self.block} (diffusion.num_blocks): launch {self.block}·k ranks")

    def coordinate(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.dp)


@dataclass
class BlockGroup:
    """This rank's place in the block-parallel run."""
    dims: BlockParallelDims
    block: int
    env: DistEnv          # the data-parallel group of this block (its Shard, barriers, writer)
    world: DistEnv        # every rank (shared-gradient averaging, the final barrier)


def block_group(env: DistEnv, num_blocks: int, device: torch.device) -> BlockGroup:
    """Build the (block, dp) mesh and return this rank's group."""
    dims = BlockParallelDims(num_blocks, env.world_size // num_blocks if env.world_size >= num_blocks else 0,
                             env.world_size)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (dims.block, dims.dp), mesh_dim_names=("block", "dp"))
    block, dp_rank = dims.coordinate(env.rank)
    return BlockGroup(dims, block, DistEnv(dp_rank, env.local_rank, dims.dp, group=mesh.get_group("dp")), env)


def group_config(cfg, block: int):
    """The config of one block group's run: train.blocks_to_train [block], in <out_dir>/block<b>."""
    group = copy.deepcopy(cfg)
    group.train.blocks_to_train = [block]
    group.out_dir = str(block_dir(cfg.out_dir, block))
    return group


def shared_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter outside the residual layers (stem, conditioning, head)."""
    in_layers = {id(p) for layer in model.layers for p in layer.parameters()}
    return [p for p in model.parameters() if id(p) not in in_layers]


def freeze_shared(model: torch.nn.Module) -> None:
    for p in shared_parameters(model):
        p.requires_grad_(False)
        p.grad = None


def block_dir(out_dir: str | Path, block: int) -> Path:
    return Path(out_dir) / f"block{block}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def assemble(out_dir: str | Path, layout, model: torch.nn.Module) -> dict:
    """final.pt of the whole model from every block's final.pt, with a manifest; returns the state."""
    out = Path(out_dir)
    files = [block_dir(out, b) / "final.pt" for b in range(layout.num_blocks)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"block-parallel assembly: missing {', '.join(missing)}")
    saved = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    layer_keys = {b: {k for k in saved[b]["model"] if any(k.startswith(f"layers.{i}.") for i in layout.layers_of(b))}
                  for b in range(layout.num_blocks)}
    shared_keys = set(saved[0]["model"]) - set().union(*layer_keys.values()) - {
        k for k in saved[0]["model"] if k.startswith("layers.")}
    for b in range(1, layout.num_blocks):
        differs = [k for k in shared_keys if not torch.equal(saved[b]["model"][k], saved[0]["model"][k])]
        if differs:
            raise ValueError(f"block-parallel assembly: block {b}'s shared weights differ from block 0's "
                             f"({differs[0]}, …): the groups did not share one copy")
    state = dict(saved[0]["model"])
    for b, keys in layer_keys.items():
        state.update({k: saved[b]["model"][k] for k in keys})
    model.load_state_dict(state)   # every key present and shaped right
    manifest = {"blocks": {str(b): {"file": str(f.relative_to(out)), "sha256": _sha256(f),
                                    "layers": list(layout.layers_of(b)),
                                    "optimizer_steps": int(saved[b]["summary"]["optimizer_steps"])}
                           for b, f in enumerate(files)},
                "shared_from": "block0 (identical in every block's file)"}
    atomic.write_json(out / MANIFEST, manifest)
    return state


def finish(cfg, world: DistEnv, prov: dict, log=print) -> dict:
    """Rank 0, after every group is done: assemble final.pt, score it on validation (and test
    unless sealed) as the run's one curve point, and write the arm's summary from the blocks'."""
    import pandas as pd

    from bench import results
    from bench.tasks import make_task
    from bench.train import build_model, curve_metrics, resolve_device
    out = Path(cfg.out_dir)
    task = make_task(cfg)
    task.load()
    device = resolve_device(cfg.train.device)
    model = build_model(cfg, task).to(device)
    state = assemble(out, task.layout, model)
    blocks = [pd.read_csv(block_dir(out, b) / "summary.csv").iloc[0] for b in range(task.layout.num_blocks)]
    metrics = curve_metrics(task, model.eval(), device)
    layer_evals = int(sum(b["layer_evals"] for b in blocks))
    steps_per_epoch = task.num_train // cfg.train.batch_size
    point = {"step": int(sum(b["optimizer_steps"] for b in blocks)), "layer_evals": layer_evals,
             "epochs_equiv": layer_evals / (steps_per_epoch * task.layout.depth),
             "train_time_s": max(float(b["train_time_s"]) for b in blocks), **metrics}
    memory = {f"block{i}": json.loads((block_dir(out, i) / "metrics.json").read_text())["memory_by_block"].get(
        f"block{i}", {}) for i in range(len(blocks))}
    run_state = {"step": point["step"], "layer_evals": layer_evals, "train_time": point["train_time_s"],
                 "history": [point], "log": [], "memory": {k: v for k, v in memory.items() if v},
                 "step_times": [float(b["median_step_s"]) for b in blocks]}
    summary = {**results.run_summary(cfg, task, run_state, prov, point["epochs_equiv"]),
               "block_parallel": f"{world.world_size} ranks: B = {len(blocks)} groups × "
                                 f"{world.world_size // len(blocks)} data-parallel; shared {cfg.train.shared}"}
    atomic.write_text(out / "params.yaml", yaml.safe_dump({**cfg.to_dict(), "provenance": prov}, sort_keys=False))
    # the blocks' MLflow runs hold the training; the arm's figures are in its files
    results.write_outputs(out, cfg, summary, run_state, state, tracker=None)
    log(f"{cfg.suite}/{cfg.arm}: assembled {len(blocks)} blocks into {out / 'final.pt'} ({MANIFEST}); "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return summary


def check_manifest(out_dir: str | Path) -> None:
    """Refuse an assembled model whose block files changed after assembly."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    for b, entry in manifest["blocks"].items():
        if _sha256(out / entry["file"]) != entry["sha256"]:
            raise ValueError(f"{out / entry['file']} changed since {out / MANIFEST} was written (block {b})")


class GradSync:
    """Gradient averaging across ranks and the shared-module policy (bench.distributed,
    bench.parallel).  Plain runs: every gradient over env.  Block-restricted runs: the block's
    over its data-parallel group; the shared modules' over every rank (`world`) until they
    freeze (train.shared: frozen, after train.shared_warmup_epochs); blocks and shared modules are
    clipped apart, so the shared copy stays identical on every rank."""

    def __init__(self, env, world=None, restricted: bool = False, freeze_step: int | None = None):
        self.env, self.world, self.restricted, self.freeze_step = env, world or env, restricted, freeze_step

    def sharing(self, step: int) -> bool:
        return self.freeze_step is None or step < self.freeze_step

    def finite_env(self, step: int):
        return self.world if self.restricted and self.sharing(step) else self.env

    def clip_groups(self, model):
        if not self.restricted:
            return None
        shared = shared_parameters(model)
        ids = {id(p) for p in shared}
        return [[p for p in model.parameters() if id(p) not in ids], shared]

    def __call__(self, model, step: int) -> None:
        if not self.restricted:
            distributed.average_gradients(self.env, model.parameters())
            return
        block_params, shared = self.clip_groups(model)
        distributed.average_gradients(self.env, block_params)
        distributed.average_gradients(self.world if self.sharing(step) else self.env, shared)
