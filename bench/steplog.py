"""Per-step training losses: window averages every train.log_every steps (the rows of log.csv)
and the points sent to MLflow in batches."""

from __future__ import annotations


class StepLog:
    """Per-step losses: window averages every log_every steps (log.csv rows) and the MLflow batch."""

    def __init__(self, tracker, every: int, last: int, window: dict | None = None):
        self.tracker, self.every, self.last = tracker, every, last
        self.pending: list[tuple[str, float, int]] = []
        # the open window lives in the run's state, so a checkpoint carries it across a resume
        self.window: dict[str, list[float]] = {} if window is None else window

    def add(self, step: int, layer_evals: int, done, lr: float) -> dict | None:
        values = {"train/loss": done.loss.item(), "train/ce": float(done.extra["ce"]),
                  "train/grad_norm": float(done.grad_norm), "train/lr": lr}
        if done.block is not None:
            values[f"train/loss_block{done.block}"] = values["train/loss"]
            values[f"train/ce_block{done.block}"] = values["train/ce"]
        self.pending += [(k, v, step) for k, v in values.items()]
        for k, v in values.items():
            self.window.setdefault(k, []).append(v)
        if step % self.every and step != self.last:
            return None
        row = {"step": step, "layer_evals": layer_evals, **{k: sum(v) / len(v) for k, v in self.window.items()}}
        self.flush()
        self.window.clear()
        return row

    def flush(self) -> None:
        self.tracker.log_metric_batch(self.pending)
        self.pending = []
