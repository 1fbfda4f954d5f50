"""The interface between the trainer and a task (what is denoised, and how it is scored).

The trainer knows arms, budgets, blocks and checkpoints; a task knows its data, its model, its
loss and its metric.  A task never chooses a block or samples σ: the trainer passes it the
layers to run and the noise levels of the batch.

Splits: `load` reads train and validation (carved from train, or the text layer's recorded val
split); the test split is read only through `bench.splits.open_test` (see `test_data`), which
refuses while a selection (tuning, sweep) runs.  `evaluate(..., split=)` scores either split and
names its keys after it: `val_acc` / `test_acc`, `val_bpc` / `test_bpc`.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.blocks import BlockLayout, make_layout
from bench.config import DataConfig, EvalConfig, RunConfig, model_config
from bench.diffusion import LogNormalNoise, Partition, make_partition
from bench.distributed import Shard
from bench.splits import metric_on, open_test

SPLITS = ("val", "test")


class Task:
    name = "task"
    metric = "metric"            # the key of `evaluate`'s result that the comparison ranks by
    higher_is_better = True
    # True: the e2e arm trains the σ-conditioned model over the whole noise range (DiT, MDM);
    # False: the e2e arm is a plain model with its own loss (the ViT classifier).
    e2e_denoiser = False
    data_config = DataConfig     # the dataclasses the params' `data` and `eval` sections are
    eval_config = EvalConfig     # checked against; a task subclasses them to add its own fields

    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        """Checks of the task's own params that need no data (raise ValueError/ConfigError)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0  # set by the trainer before each training step
        # this rank's rows of the global batch (bench.distributed): training draws go through
        # self.shard.draw, so they do not depend on the number of ranks
        self.shard = Shard()
        d = cfg.diffusion
        self.noise = LogNormalNoise(d.P_mean, d.P_std, d.sigma_min, d.sigma_max, d.sigma_data)
        self.partition = self.make_partition(d.num_blocks, d.gamma)
        self.full_range = self.make_partition(1, 0.0)
        self.layout: BlockLayout = make_layout(model_config(cfg.model).depth, d.num_blocks,
                                               d.layer_distribution or None)

    @property
    def selection_metric(self) -> str:
        """The metric every choice is made by: `metric` on the validation split."""
        return metric_on(self.metric, "val")

    def test_data(self):
        """The test split, loaded once, through the seal (the one place a task opens test)."""
        # the seal is checked on every call, not only at the first load
        cached = getattr(self, "_test_data", None)
        data = open_test(f"{self.cfg.suite}/{self.cfg.arm}", lambda: self.load_test() if cached is None else cached)
        self._test_data = data
        return data

    def split_data(self, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; evaluate on one of {', '.join(SPLITS)}")
        return self.val_data if split == "val" else self.test_data()

    def make_partition(self, num_blocks: int, gamma: float) -> Partition:
        d = self.cfg.diffusion
        edges = d.sigma_edges if (d.sigma_edges and num_blocks == d.num_blocks) else None
        strategy = d.partition if num_blocks == d.num_blocks else "equiprobable"
        return make_partition(num_blocks, strategy, gamma, self.noise, edges)

    @property
    def conditioned(self) -> bool:
        """Whether this run's model is the σ-conditioned denoiser."""
        return self.cfg.is_dblocks or self.e2e_denoiser

    # ---- to implement -----------------------------------------------------------------------
    def check(self) -> None:
        """Raise a one-line error if the data is missing or does not fit the model (no compute)."""
        raise NotImplementedError

    def load(self) -> None:
        """Load the train and validation data; set `self.num_train` and `self.val_data`."""
        raise NotImplementedError

    def load_test(self) -> Any:
        """Read the test split (called only by `test_data`, through the seal)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, indices: torch.Tensor, seed: int, device: torch.device) -> Any:
        """The training batch of these example indices (augmentation deterministic in seed)."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, device: torch.device) -> Any:
        """A random batch of the right shapes (memory and speed benchmarks need no dataset)."""
        raise NotImplementedError(f"task {self.name!r} has no example batch; `bench memory` cannot run it")

    def loss(self, model, batch, *, sigma: torch.Tensor | None, layers: range,
             generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Loss of one batch; sigma None only for a plain (non-denoiser) e2e model.  The dict may
        carry "layer_evals": the layer evaluations this step really made, when that is not
        len(layers) (a recurrence unrolled r times); the trainer counts compute with it.
        `self.step` holds the trainer's current step."""
        raise NotImplementedError

    def evaluate(self, model, device: torch.device, final: bool = False, split: str = "val") -> dict:
        """Metrics on `split` (val or test), keyed `metric_on(key, split)`.  final=True: the full
        evaluation (more inference variants); otherwise the cheaper one used for the learning curve."""
        raise NotImplementedError
