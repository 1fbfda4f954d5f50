"""Which layers belong to which block, and which block trains next.

This is the only place that maps a block index to layer indices, and the only place where a
block is chosen for a training step (`BlockSampler.sample`).  Block 0 is the first
`layers_per_block[0]` layers; with the partition convention it owns the highest noise.
"""

from __future__ import annotations

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
    """

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> int:
        return int(torch.randint(self.num_blocks, (1,), generator=self.generator))

    def state_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_blocks"] != self.num_blocks:
            raise ValueError(f"checkpoint has B={state['num_blocks']}, this run has B={self.num_blocks}")
        self.generator.set_state(state["rng"])
