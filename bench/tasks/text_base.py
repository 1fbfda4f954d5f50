"""What the two language-model tasks share: the scored held-out splits of a prepared corpus and
the train / validation / test loading around them (the test split only through the seal).

A subclass sets `self.spec` and says how many windows of a split are scored
(`scored_windows(n_tokens)`) and how long a training window is (`train_window`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench import atomic
from bench.config import ConfigError
from bench.data.text import PreparedText, num_windows, open_text
from bench.tasks.base import Task


@dataclass
class HeldOutText:
    """A scored split of a prepared corpus (validation or test) and what its metrics need."""
    split: str                     # "val" | "test"
    tokens: np.ndarray
    num_windows: int               # windows scored: all, or the first data.val_subset / data.test_subset
    chars_per_token: float
    unk_rate: float

    @classmethod
    def of(cls, data: PreparedText, split: str, subset: int, windows_in: Callable[[int], int]) -> "HeldOutText":
        n = windows_in(int(data.meta["splits"][split]["tokens"]))
        return cls(split, data.tokens(split), min(n, subset) if subset else n, data.chars_per_token(split),
                   data.unk_rate(split))


def check_split_sizes(data: PreparedText, window: int, random_offset: bool, what: str) -> None:
    """One line if a split holds no window of `window` tokens (the val split: every learning curve
    and every selection reads it, so it must not be empty)."""
    for split in ("train", "val", "test"):
        n = data.meta["splits"][split]["tokens"]
        if num_windows(n, window, offset_room=split == "train" and random_offset) < 1:
            hint = (f"; data.split {list(data.meta['recipe'].get('split', []))} gives it no text, and validation "
                    f"is what learning curves and selections score" if split == "val" and n == 0 else "")
            raise ConfigError(f"{what} is larger than the {split} split of {data.dir.name} ({n:,} tokens){hint}")


class TextTask(Task):
    """A task on a prepared text corpus: train tokens, the val split as validation, test via the seal."""

    train_window: int        # tokens in one training window (set by the subclass)

    def scored_windows(self, n_tokens: int) -> int:
        raise NotImplementedError

    def _num_train(self, data) -> int:
        n = num_windows(data.meta["splits"]["train"]["tokens"], self.train_window, self.cfg.data.random_offset)
        return min(n, self.cfg.data.train_subset) if self.cfg.data.train_subset else n

    def load(self) -> None:
        self.data = open_text(self.spec, self.cfg.data.root)
        self.train_tokens = self.data.tokens("train")
        self.num_train = self._num_train(self.data)
        self.val_data = self._held_out("val", self.cfg.data.val_subset)

    def load_test(self) -> HeldOutText:
        return self._held_out("test", self.cfg.data.test_subset)

    def publish_samples(self, text: str) -> Path:
        """A final evaluation's samples: the run's samples.md, and the published
        <eval.samples_dir>/<suite>/samples_<arm>.md only from the suite's own run of the arm
        (<runs>/<suite>/<arm>, or its seed0): not from another seed, a --set smoke run or a scaling
        point, whose samples stay in their run.  Returns the file to show."""
        run_file = atomic.write_text(Path(self.cfg.out_dir) / "samples.md", text)
        own = Path(self.cfg.out_dir)
        if own.name.startswith("seed"):
            if own.name != "seed0":
                return run_file
            own = own.parent
        if own.name != self.cfg.arm or own.parent.name != self.cfg.suite:
            return run_file
        return atomic.write_text(Path(self.cfg.eval.samples_dir) / self.cfg.suite / f"samples_{self.cfg.arm}.md", text)

    def _held_out(self, split: str, subset: int) -> HeldOutText:
        if not hasattr(self, "data"):
            self.data = open_text(self.spec, self.cfg.data.root)
        return HeldOutText.of(self.data, split, subset, self.scored_windows)
