"""Process-group set-up for data-parallel training, kept out of the loop (EDM / nanoGPT style).

    torchrun --nproc_per_node 2 -m bench train suites/vit_fashion/params.yaml --arm dblocks
    bench train suites/vit_fashion/params.yaml --arm dblocks --nproc 2      # the same, via torchrun

`init()` reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) and falls back to one
process without a process group, so one code path serves 1 and N processes.  Backend: NCCL on
CUDA, gloo on CPU.  Tasks and models never import torch.distributed.

How a W-rank run repeats the 1-rank run (up to the order of floating-point reductions):

| stream (bench/seeding.py)      | across ranks | how                                                   |
|--------------------------------|--------------|-------------------------------------------------------|
| data order (EpochBatches)      | shared       | every rank builds the global batch, keeps its rows    |
| augmentation (per step)        | shared       | applied to the global batch before the slice          |
| block choice (BlockSampler)    | shared       | no rank offset: every rank trains the same block      |
| σ / t and ε draws (noise)      | shared       | drawn for the global batch, each rank keeps its rows  |
| init                           | shared       | the same seed: identical weights without a broadcast  |
| dropout (torch's global RNG)   | distinct     | reseeded per rank after init (W > 1 only), so a W-rank |
|                                |              | run with dropout is not the 1-rank run's masks         |

`train.batch_size` is the global batch: each rank takes batch_size / W rows (`Shard`), the loss
is each rank's mean, and the gradients that exist (all of them for e2e; the active block's and
the shared modules' for dblocks, whose other blocks get none) are averaged over the ranks in one
flat all-reduce before clipping and the AdamW step, so every rank applies the same update.  Rank 0
alone writes checkpoints, results and MLflow; the others wait at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a global batch: rows rank·n … (rank+1)·n − 1 of W·n."""
    rank: int = 0
    world: int = 1

    def rows(self, n_global: int) -> slice:
        if n_global % self.world:
            raise ValueError(f"a global batch of {n_global} does not split over {self.world} ranks")
        n = n_global // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def take(self, batch):
        """This rank's rows of a batch: a tensor, or a tuple/list of tensors with the batch first."""
        if self.world == 1:
            return batch
        if isinstance(batch, torch.Tensor):
            return batch[self.rows(batch.shape[0])]
        return type(batch)(self.take(b) for b in batch)

    def draw(self, fn, shape, generator, **kwargs) -> torch.Tensor:
        """fn (torch.randn / torch.rand) for the global batch of which `shape` is this rank's
        share, then this rank's rows: the draws do not depend on the number of ranks."""
        shape = tuple(shape)
        full = fn((shape[0] * self.world, *shape[1:]), generator=generator, **kwargs)
        return full[self.rows(full.shape[0])]


@dataclass(frozen=True)
class DistEnv:
    """A set of ranks that train together: the whole world, or one block's data-parallel group
    (bench.parallel), whose collectives run on `group` (None: the default, whole-world group)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init(device_name: str = "auto") -> DistEnv:
    """The process group of a torchrun launch, or one process (no group) without a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv()
    import torch.distributed as dist
    env = DistEnv(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(env.local_rank)
    return env


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """cuda → this rank's GPU (cuda:LOCAL_RANK); cpu stays cpu."""
    return torch.device("cuda", env.local_rank) if device.type == "cuda" and env.active else device


def barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist
        dist.barrier(group=env.group)


def average_gradients(env: DistEnv, params) -> None:
    """Average the gradients that exist over env's ranks, in one flat all-reduce.  Every rank has
    the same set (the same block trains everywhere; the shared modules in block-parallel), so the
    flat buffers line up."""
    if not env.active:
        return
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=env.group)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_finite(env: DistEnv, loss: torch.Tensor) -> bool:
    """True only if the loss is finite on every rank, so all ranks stop together."""
    ok = torch.tensor(float(torch.isfinite(loss.detach()).all()), device=loss.device)
    if env.active:
        import torch.distributed as dist
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=env.group)
    return bool(ok.item())


def all_equal(env: DistEnv, value: int) -> bool:
    """Whether every rank of env holds the same integer (e.g. the step it resumes from)."""
    if not env.active:
        return True
    import torch.distributed as dist
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.group)
    return int(t[0]) == value and int(t[1]) == -value


def shutdown(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
