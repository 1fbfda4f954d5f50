"""Tasks: what is denoised and how it is scored.  TASKS maps params' `task` to its class."""

from importlib import import_module

TASKS = {
    "classification": "bench.tasks.classification:ClassificationTask",
    "masked_lm": "bench.tasks.masked_lm:MaskedLMTask",
    "generation": "bench.tasks.generation:GenerationTask",
    "autoregressive": "bench.tasks.autoregressive:AutoregressiveTask",
    "recurrent": "bench.tasks.recurrent:RecurrentTask",
}


def task_class(name: str):
    if name not in TASKS:
        from bench.config import ConfigError
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module), cls)


def make_task(cfg):
    """The task object of a run (builds its noise distribution, partition and block layout)."""
    return task_class(cfg.task)(cfg)
