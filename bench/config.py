"""Run configuration as plain data: a suite's params.yaml → one `RunConfig` per arm.

params.yaml holds the shared settings in sections (data, model, diffusion, train, eval) and an
`arms` mapping; each arm is a set of dotted overrides on top of the shared settings, e.g.

    arms:
      e2e:     {mode: e2e}
      dblocks: {mode: dblocks}
      dblocks_uniform: {mode: dblocks, diffusion.weighting: uniform}

Every key is checked against the dataclasses below before anything runs: an unknown key, an
unknown mode or partition, B larger than the depth, γ < 0, σ_min ≥ σ_max … each stop the run
with a one-line `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("e2e", "dblocks", "e2e+ckpt", "dblocks+ckpt")
RESIDENCY = ("resident", "offload")


PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """Bad user input, reported in one line before any compute."""


@dataclass
class DataConfig:
    """Fields every task has; a task extends it (Task.data_config) with its own."""
    dataset: str = "fashion_mnist"   # which dataset (the task lists the ones it knows)
    root: str = "data"               # where datasets live (see `bench data --help`)
    train_subset: int = 0            # use only the first N training examples (0: all); for tests
    test_subset: int = 0             # evaluate on the first N test examples (0: all)
    val_subset: int = 0              # score on the first N validation examples (0: all)
    verify: bool = True              # check data files against their published SHA-256 at load (false: a
                                     # deliberately modified copy, e.g. the scrambled-test proof)


@dataclass
class DiffusionConfig:
    num_blocks: int = 3
    partition: str = "equiprobable"   # equiprobable | log-uniform | linear | explicit
    sigma_edges: list = field(default_factory=list)   # for partition: explicit
    gamma: float = 0.05
    layer_distribution: list = field(default_factory=list)  # e.g. [2, 4, 6]; empty: equal
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    weighting: str = "lambda"          # lambda (per-sample λ(σ)) | official (mean CE · mean λ) | uniform
    inference_steps: int = 0           # σ points at inference; 0 → B (one call per block)
    sample_sigma_max: float = 0.0      # where inference starts; 0 → sigma_max (the paper)


@dataclass
class TrainConfig:
    batch_size: int = 128
    epochs: float = 3.0                # end-to-end epochs; dblocks runs B× as many steps if compute_match
    compute_match: bool = True
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 0.0         # multiplied by B with compute_match, as the official README
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    residency: str = "resident"        # resident (official) | offload (inactive blocks off the device)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    threads: int = 0                   # torch CPU threads; 0: torch's default
    log_every: int = 50                # steps between logged losses
    ckpt_every: int = 500              # steps between checkpoints
    curve_points: int = 8              # test evaluations along training (learning curve)
    precision: str = "fp32"            # fp32 | bf16 | fp16: autocast of the forward (fp16 with a GradScaler)
    compile: bool = False              # torch.compile each residual layer (one block's layers run without recompiling)
    ema: float = 0.0                   # EMA decay of the weights (0: off); saved and evaluated beside the raw ones
    blocks_to_train: list = field(default_factory=list)   # dblocks: train only these blocks ([]: all)
    block_parallel: bool = False       # dblocks under torchrun: B × dp ranks, each group trains its block (bench/parallel.py)
    shared: str = "allreduce"          # block-restricted runs: the shared modules' policy, allreduce | frozen
    shared_warmup_epochs: float = 0.0  # shared: frozen: e2e epochs before the shared modules freeze

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown train.precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"train.ema is a decay in [0, 1) (0: off), got {self.ema}")
        if self.shared not in ("allreduce", "frozen"):
            raise ConfigError(f"unknown train.shared {self.shared!r}; choose allreduce or frozen")
        if self.shared_warmup_epochs < 0:
            raise ConfigError(f"train.shared_warmup_epochs must be >= 0, got {self.shared_warmup_epochs}")
        if self.block_parallel and self.blocks_to_train:
            raise ConfigError("train.block_parallel assigns each rank group its block: leave train.blocks_to_train empty")
        if self.ema and self.residency == "offload":
            raise ConfigError("train.ema with train.residency offload is not supported: the EMA copy would keep "
                              "every block on the device, which is what offload avoids")


@dataclass
class EvalConfig:
    """Fields every task has; a task extends it (Task.eval_config) with its own."""
    batch_size: int = 500
    seed: int = 1234                   # fixes the inference noise, so evaluation is deterministic


DEFAULT_TASK = "classification"   # the task of a params file without `task:`


@dataclass
class RunConfig:
    suite: str
    arm: str
    mode: str
    task: str                          # classification | … (bench.tasks.TASKS)
    data: DataConfig
    model: dict                        # {"arch": name, ...fields of that architecture's config}
    diffusion: DiffusionConfig
    train: TrainConfig
    eval: EvalConfig
    out_dir: str

    @property
    def is_dblocks(self) -> bool:
        return self.mode.startswith("dblocks")

    @property
    def checkpointing(self) -> bool:
        return self.mode.endswith("+ckpt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": None, "diffusion": DiffusionConfig,
            "train": TrainConfig, "eval": EvalConfig}
# sweep (bench.sweep), check (bench.check) and paper (bench.report) are read by their own modules
# protocol (seeds, pairs, margin, tuning) is read by bench.protocol
TOP_KEYS = {"suite", "task", "arms", "runs_dir", "results_dir", "sweep", "check", "paper", "protocol", *SECTIONS}
TUNED_KEY = "tuned"   # an arm with `tuned: true` takes the overrides `bench tune` chose for it;
# `tuned: <tuned arm>` makes a variant: that arm's settings and tuned overrides, plus its own change


def parse_settings(text: str, keys: tuple[str, ...]) -> dict[str, str]:
    """One entry of eval.final_variants, "key=value,key=value" with keys from `keys` → {key: value}
    (values as written; the task converts them)."""
    out = {}
    for item in str(text).split(","):
        key, _, value = item.strip().partition("=")
        if key not in keys or not value.strip():
            raise ConfigError(f"eval.final_variants: cannot read {text!r}; use key=value with keys {', '.join(keys)}")
        out[key] = value.strip()
    return out


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Give `value` the type of the field's default; reject what cannot be converted."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            number = float(value) if isinstance(value, str) else value
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                raise TypeError
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        if isinstance(default, int):
            if float(number) != int(number):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            return int(number)
        return float(number)
    if isinstance(default, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return list(value)
    return str(value)


def section_class(section: str, task: str, arch: str = "vit"):
    """The dataclass a section is checked against: `model` by the architecture, `data` and
    `eval` by the task, the others fixed."""
    if section == "model":
        return model_config_class(arch)
    if section in ("data", "eval"):
        from bench.tasks import task_class
        return getattr(task_class(task), f"{section}_config")
    return SECTIONS[section]


def _apply(target: dict, section: str, values: dict, source: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' in {source} must be a mapping")
    if section == "model":
        arch = str(values.get("arch", target["model"].get("arch", "vit")))
        target["model"]["arch"] = arch
        values = {k: v for k, v in values.items() if k != "arch"}
    cls = section_class(section, target["task"], target["model"].get("arch", "vit"))
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown params key '{section}.{key}' in {source}; "
                              f"known keys in '{section}': {', '.join(sorted(names))}")
        default = names[key].default if names[key].default is not dataclasses.MISSING else names[key].default_factory()
        target[section][key] = _coerce(section, key, value, default)


def model_config_class(arch: str):
    from bench.models import ARCHS
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch {arch!r}; available: {', '.join(ARCHS)}")
    return ARCHS[arch][0]


def model_config(model: dict):
    """The architecture's own config dataclass, built from the `model` section."""
    return model_config_class(model["arch"])(**{k: v for k, v in model.items() if k != "arch"})


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def _apply_dotted(target: dict, overrides: dict, source: str) -> None:
    for dotted, value in overrides.items():
        if dotted == "mode":
            target["mode"] = str(value)
            continue
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"unknown params key '{dotted}' in {source}; use section.key with a section "
                              f"among {', '.join(SECTIONS)} (or 'mode')")
        _apply(target, section, {key: value}, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a repeated key is an error (plain YAML lets the last one win, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path):
    """A YAML file, or one ConfigError line naming the file (and the line of a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown params key '{sorted(unknown)[0]}' in {path}; "
                          f"top-level keys are: {', '.join(sorted(TOP_KEYS))}")
    return raw


def arm_names(params_path: str | Path) -> list[str]:
    return list((read_params(params_path).get("arms") or {}).keys())


def tuned_from(raw: dict) -> str | None:
    """protocol.tuned_from: the suite whose tuning this suite's tuned arms reuse unchanged (a transfer
    test: no trial saw this suite's data), or None when the suite tunes its own arms."""
    donor = (raw.get("protocol") or {}).get("tuned_from") if isinstance(raw.get("protocol"), dict) else None
    return str(donor) if donor else None


def tuned_path(raw: dict, params_path: str | Path) -> Path:
    """results/<suite>/tuned.yaml: the settings `bench tune` chose, one mapping per tuned arm (the
    donor suite's file when protocol.tuned_from names one)."""
    suite = tuned_from(raw) or str(raw.get("suite") or Path(params_path).parent.name)
    return Path(raw.get("results_dir") or "results") / suite / "tuned.yaml"


def tuned_overrides(raw: dict, params_path: str | Path, arm: str) -> dict:
    path = tuned_path(raw, params_path)
    donor = tuned_from(raw)
    tune_cmd = f"bench tune {Path(params_path).parent.parent / donor / 'params.yaml' if donor else params_path}"
    if not path.is_file():
        raise ConfigError(f"arm {arm!r} is a tuned arm but {path} does not exist: run `{tune_cmd}` first")
    chosen = (yaml.safe_load(path.read_text()) or {}).get("arms", {})
    if arm not in chosen:
        raise ConfigError(f"{path} has no settings for arm {arm!r}: rerun `{tune_cmd}`"
                          + (f" (protocol.tuned_from: {donor} must have an arm of that name)" if donor else ""))
    return chosen[arm]["overrides"]


def load_config(params_path: str | Path, arm: str, overrides: list[str] | None = None,
                seed: int | None = None, tuning: bool = False) -> RunConfig:
    """The validated configuration of one arm of a suite.  seed: the run's train.seed, with its
    own run directory (runs/<suite>/<arm>/seed<N>).  tuning: leave a tuned arm at its base
    settings (what `bench tune` searches from) instead of applying the chosen ones."""
    raw = read_params(params_path)
    source = str(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    arms = raw.get("arms") or {}
    if arm not in arms:
        raise ConfigError(f"unknown arm {arm!r} in {source}; arms: {', '.join(arms) or '(none defined)'}")
    target: dict[str, Any] = {s: {} for s in SECTIONS}
    target["mode"], target["task"] = arm, str(raw.get("task", DEFAULT_TASK))
    for section in SECTIONS:
        if section in raw:
            _apply(target, section, raw[section], source)
    spec = dict(arms[arm] or {})
    if not isinstance(arms[arm] or {}, dict):
        raise ConfigError(f"arm {arm!r} in {source} must be a mapping of section.key: value")
    tuned = spec.pop(TUNED_KEY, False)
    own = dict(spec)
    if tuned and tuned is not True:   # a variant: the donor arm's settings, then its own change(s)
        donor = str(tuned)
        if donor not in arms or (arms[donor] or {}).get(TUNED_KEY) is not True:
            raise ConfigError(f"arm {arm!r} in {source}: `tuned: {donor}` must name an arm with `tuned: true`")
        spec = {k: v for k, v in (arms[donor] or {}).items() if k != TUNED_KEY} | own
    _apply_dotted(target, spec, f"{source} (arm {arm})")
    if tuned and not tuning:
        donor = arm if tuned is True else str(tuned)
        chosen = tuned_overrides(raw, params_path, donor)
        clash = sorted(set(chosen) & set(own)) if donor != arm else []
        if clash:   # the tuned value would silently replace the variant's change
            raise ConfigError(f"arm {arm!r} in {source} sets {clash[0]!r}, which `bench tune` chose for {donor!r}: "
                              f"a variant of a tuned arm may change only keys the tuning did not choose")
        _apply_dotted(target, chosen, f"{tuned_path(raw, params_path)} (arm {donor})")
    _apply_dotted(target, dict(split_override(o) for o in overrides or []), "command-line overrides")
    if seed is not None:
        _apply(target, "train", {"seed": seed}, "--seed")
    runs_dir = raw.get("runs_dir", "runs")
    model = {"arch": "vit", **target["model"]}
    cfg = RunConfig(
        suite=suite, arm=arm, mode=target["mode"], task=target["task"], model=model,
        **{s: section_class(s, target["task"])(**copy.deepcopy(target[s])) for s in SECTIONS if s != "model"},
        out_dir=str(Path(runs_dir) / suite / arm / (f"seed{seed}" if seed is not None else "")),
    )
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every check that needs no data and no model: fail before any compute."""
    from bench.blocks import make_layout
    from bench.diffusion import STRATEGIES, make_partition
    from bench.diffusion.noise import LogNormalNoise
    from bench.diffusion import WEIGHTINGS
    from bench.tasks import task_class

    from bench import bounds
    d, t = cfg.diffusion, cfg.train
    bounds.check(cfg)   # types, finiteness and documented ranges (bench/bounds.py)
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r} for arm {cfg.arm!r}; modes: {', '.join(MODES)}")
    if d.partition not in STRATEGIES:
        raise ConfigError(f"unknown partition {d.partition!r}; choose one of {', '.join(STRATEGIES)}")
    if d.weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {d.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if d.sample_sigma_max and not d.sigma_min < d.sample_sigma_max <= d.sigma_max:
        raise ConfigError(f"diffusion.sample_sigma_max must lie in (sigma_min, sigma_max], got {d.sample_sigma_max}")
    if t.residency not in RESIDENCY:
        raise ConfigError(f"unknown train.residency {t.residency!r}; choose one of {', '.join(RESIDENCY)}")
    if (t.blocks_to_train or t.block_parallel) and not cfg.is_dblocks:
        raise ConfigError(f"train.blocks_to_train / train.block_parallel need a dblocks arm; {cfg.arm!r} is {cfg.mode}")
    bad = [b for b in t.blocks_to_train if not (isinstance(b, int) and 0 <= b < d.num_blocks)]
    if bad or len(set(t.blocks_to_train)) < len(t.blocks_to_train):
        raise ConfigError(f"train.blocks_to_train must list distinct blocks in 0..{d.num_blocks - 1}, got {t.blocks_to_train}")
    try:
        noise = LogNormalNoise(d.P_mean, d.P_std, d.sigma_min, d.sigma_max, d.sigma_data)
        make_partition(d.num_blocks, d.partition, d.gamma, noise, d.sigma_edges or None)
        arch_cfg = model_config(cfg.model)
        make_layout(arch_cfg.depth, d.num_blocks, d.layer_distribution or None)
        task_class(cfg.task).validate_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
