"""Which layers belong to which block, and which block trains next.

This is the only place that maps a block index to layer indices, and the only place where a
block is chosen for a training step (`BlockSampler.sample`).  Block 0 is the first
`layers_per_block[0]` layers; with the partition convention it owns the highest noise.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Contiguous groups of a model's residual layers, e.g. (4, 4, 4) for 12 layers and B = 3."""

    layers_per_block: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def depth(self) -> int:
        return sum(self.layers_per_block)

    def layers_of(self, block: int) -> range:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range for B={self.num_blocks}")
        start = sum(self.layers_per_block[:block])
        return range(start, start + self.layers_per_block[block])

    def all_layers(self) -> range:
        return range(self.depth)


def make_layout(depth: int, num_blocks: int, distribution: Sequence[int] | None = None) -> BlockLayout:
    """Split `depth` layers into `num_blocks` blocks: equally (remainder to the first blocks) or
    by an explicit distribution such as [2, 4, 6] (first block first)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if num_blocks > depth:
        raise ValueError(f"num_blocks={num_blocks} is larger than the number of layers ({depth})")
    if distribution is None or len(distribution) == 0:
        base, extra = divmod(depth, num_blocks)
        return BlockLayout(tuple(base + (b < extra) for b in range(num_blocks)))
    counts = tuple(int(c) for c in distribution)
    if len(counts) != num_blocks:
        raise ValueError(f"layer distribution {list(counts)} has {len(counts)} entries but num_blocks={num_blocks}")
    if any(c < 1 for c in counts):
        raise ValueError(f"every block needs at least one layer, got layer distribution {list(counts)}")
    if sum(counts) != depth:
        raise ValueError(f"layer distribution {list(counts)} sums to {sum(counts)}, not to the depth {depth}")
    return BlockLayout(counts)


class BlockSampler:
    """Uniform choice of the block to train at each step (paper App. E; official code).

    Has its own generator so that a resumed run draws the same blocks as an uninterrupted one.
    `allowed` restricts the choice (train.blocks_to_train; one block: always that block).
    """

    def __init__(self, num_blocks: int, seed: int, allowed: Sequence[int] = ()):
        self.num_blocks = num_blocks
        self.allowed = list(allowed)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> int:
        if self.allowed:
            return self.allowed[int(torch.randint(len(self.allowed), (1,), generator=self.generator))]
        return int(torch.randint(self.num_blocks, (1,), generator=self.generator))

    def state_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_blocks"] != self.num_blocks:
            raise ValueError(f"checkpoint has B={state['num_blocks']}, this run has B={self.num_blocks}")
        self.generator.set_state(state["rng"])


class BlockOptimizer:
    """AdamW with a warm-up/cosine schedule, and where each block's weights live.

    resident  one AdamW over all parameters, everything on the compute device (the official
              code).  A block that is not trained this step has no gradient, so AdamW skips it,
              but its parameters and Adam moments stay on the device.
    offload   one AdamW per block plus one for the shared parameters (stem, head).  Before a
              step, the chosen block's parameters and Adam moments are moved onto the compute
              device and every other block's are parked on the host (CPU memory), so the device
              holds only the active block and the shared modules.  Updates are those of
              `resident`: AdamW's per-parameter state and bias correction are unchanged.

    On a CPU-only machine the host and the device are the same memory: parked tensors are
    copies kept out of the model and the optimizers, so `bench.memory` counts what an
    accelerator would hold, and reports the parked bytes separately.
    """

    HOST = torch.device("cpu")

    def __init__(self, model: torch.nn.Module, layout: BlockLayout, residency: str, device: torch.device,
                 make_optimizer, lr_lambda):
        self.model, self.layout, self.residency, self.device = model, layout, residency, torch.device(device)
        if residency == "resident":
            groups = [list(model.parameters())]
            self.block_params: list[list[torch.nn.Parameter]] = []
        elif residency == "offload":
            self.block_params = [[p for i in layout.layers_of(b) for p in model.layers[i].parameters()]
                                 for b in range(layout.num_blocks)]
            in_blocks = {id(p) for ps in self.block_params for p in ps}
            groups = self.block_params + [[p for p in model.parameters() if id(p) not in in_blocks]]
        else:
            raise ValueError(f"unknown residency {residency!r}; choose resident or offload")
        self.optimizers = [make_optimizer(g) for g in groups]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in self.optimizers]
        self._parked: dict[int, torch.Tensor] = {}   # id(param) → host copy of its data
        self.active: int | None = None
        if residency == "offload":
            for b in range(layout.num_blocks):
                self._park(b)

    # ---- where the weights live -------------------------------------------------------------
    def _park(self, block: int) -> None:
        opt = self.optimizers[block]
        for p in self.block_params[block]:
            p.grad = None
            self._parked[id(p)] = p.data.to(self.HOST, copy=True)
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    opt.state[p][k] = v.to(self.HOST, copy=True)

    def _unpark(self, block: int) -> None:
        opt = self.optimizers[block]
        for p in self.block_params[block]:
            p.data = self._parked.pop(id(p)).to(self.device, copy=True)
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    opt.state[p][k] = v.to(self.device, copy=True)

    def activate(self, block: int | None) -> None:
        """Make `block` the one on the device (offload); a no-op when resident."""
        if self.residency != "offload" or block == self.active:
            return
        if self.active is not None:
            self._park(self.active)
        self._unpark(block)
        self.active = block

    @contextlib.contextmanager
    def materialize(self):
        """Context: every block on the device (evaluation, checkpoints), parked again after."""
        if self.residency != "offload":
            yield
            return
        parked = [b for b in range(self.layout.num_blocks) if b != self.active]
        for b in parked:
            self._unpark(b)
        try:
            yield
        finally:
            for b in parked:
                self._park(b)

    def parked_bytes(self) -> int:
        return sum(t.nbytes for t in self._parked.values()) + sum(
            v.nbytes for b in range(len(self.block_params)) if b != self.active
            for s in self.optimizers[b].state.values() for v in s.values() if isinstance(v, torch.Tensor))

    def resident_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose state is on the compute device now."""
        if self.residency == "resident":
            return self.optimizers
        return [self.optimizers[self.active], self.optimizers[-1]] if self.active is not None else [self.optimizers[-1]]

    # ---- stepping ---------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def unscale(self, scaler) -> None:
        """fp16: undo the GradScaler's factor before clipping."""
        for o in self.resident_optimizers():
            scaler.unscale_(o)

    def step(self, scaler=None) -> None:
        for o in self.resident_optimizers():
            scaler.step(o) if scaler else o.step()
        if scaler:
            scaler.update()
        with warnings.catch_warnings():  # a block's optimizer that has not stepped yet still follows the schedule
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for s in self.schedulers:  # every schedule follows the global step
                s.step()

    @property
    def lr(self) -> float:
        return self.schedulers[-1].get_last_lr()[0]

    def rebase(self, lr: float, weight_decay: float) -> None:
        """After a resume that changed the peak lr or weight decay (`--allow-change`): the loaded
        schedules continue from their step with the new settings."""
        for o, sch in zip(self.optimizers, self.schedulers):
            sch.base_lrs = [lr] * len(o.param_groups)
            for g in o.param_groups:
                g["initial_lr"], g["weight_decay"] = lr, weight_decay
                g["lr"] = lr * sch.lr_lambdas[0](sch.last_epoch)
            sch._last_lr = [g["lr"] for g in o.param_groups]

    def state_dict(self) -> dict:
        return {"residency": self.residency, "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        if state["residency"] != self.residency:
            raise ValueError(f"checkpoint has residency {state['residency']}, this run {self.residency}")
        with self.materialize():
            for o, s in zip(self.optimizers, state["optimizers"]):
                o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
