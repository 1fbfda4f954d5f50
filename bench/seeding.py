"""A run's random streams, each from its own child of `numpy.random.SeedSequence(train.seed)`.

Streams of different seeds never overlap (the old `seed*7919 + step` scheme let seed 1's step 0
equal seed 0's step 7919).  One row per stream:

  stream       used for                                           per step?
  init         torch's global RNG: weight initialisation, dropout  no
  data_order   the shuffled order of each epoch (EpochBatches)     per epoch
  block        which block trains next (BlockSampler)              no (one generator)
  noise        σ and ε draws of the loss (a CPU torch.Generator)   no (one generator)
  augment      augmentation / window offsets of each batch         per step
  dropout      torch's global RNG after init, per rank (W > 1 only) per rank
  blocks       a block-restricted run's root for data_order, block,
               noise and augment (train.blocks_to_train: its own
               streams per block, the same in block-parallel)       no

Evaluation noise is fixed by `eval.seed` and shared by every arm and seed, so two arms are
scored on the same draws.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = ("init", "data_order", "block", "noise", "augment", "dropout", "blocks", "sweep")   # append only: an index is a seed


def stream_seed(seed: int, stream: str, *key: int) -> int:
    """A 63-bit seed for `stream` of run seed `seed`, optionally for one epoch or step (`key`)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(STREAMS.index(stream), *map(int, key)))
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, stream))
