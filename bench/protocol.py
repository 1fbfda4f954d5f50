"""The verdict protocol of a suite: its seeds, its arm pairs, its margin and its tuning budget.

A suite declares it in params.yaml, *before* any run, so the margin cannot be chosen after the
results are seen:

    protocol:
      seeds: [0, 1, 2, 3, 4]           # every arm of every pair runs once per seed
      pairs:                           # claim (a): [end-to-end arm, DiffusionBlocks arm]
        paper: [e2e, dblocks]          #   the settings that produced the paper's numbers
        tuned: [tuned_e2e, tuned_dblocks]   #   each arm at the best of an equal tuning budget
      margin: 0.01                     # |DB − E2E| inside ±margin (metric units) counts as a match
      margin_relative: false           # true: margin is a fraction of the E2E mean (BPC, FID)
      tune:                            # `bench tune`: the same budget for every tuned arm
        trials: 8                      #   Optuna trials per arm, on validation
        seed: 0                        #   the sampler's seed
        overrides: {train.epochs: 0.5} #   the proxy budget of one trial (the same for every arm)
        shared_space: {train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}}   # every arm
        method_space: {diffusion.P_mean: {low: -1.2, high: 1.2}}           # DiffusionBlocks arms only
      # or, instead of tune:  tuned_from: mdm_shakespeare   # reuse that suite's tuned.yaml unchanged

An arm with `tuned: true` takes the settings `bench tune` wrote for it into
results/<suite>/tuned.yaml (see bench.config.tuned_overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.config import ConfigError, read_params

KNOWN = {"seeds", "pairs", "margin", "margin_relative", "tune", "tuned_from", "claims", "claim_seeds", "ablations",
         "ablation_seeds"}
# the paper's claims, one verdict row (or more) each per suite
CLAIMS = {
    "a": "DB ≈ E2E at matched compute",
    "b": "equiprobable beats uniform / log-uniform partitioning",
    "c": "B = 2–4 beats B = 1 and B = 6",
    "d": "training memory falls ~B×",
    "e": "DB sampling is ~B× cheaper",
    "f": "recurrent DB needs ~10× less training compute",
}
DESIGN_CLAIMS = ("b", "c")   # the paper's design claims a suite may test with one-change variants
TUNE_KNOWN = {"trials", "seed", "overrides", "shared_space", "method_space"}


@dataclass
class TuneSpec:
    trials: int
    seed: int
    overrides: dict
    shared_space: dict
    method_space: dict


@dataclass
class Protocol:
    suite: str
    seeds: list[int]
    pairs: dict[str, tuple[str, str]]   # name → (e2e arm, dblocks arm)
    margin: float
    margin_relative: bool
    tune: TuneSpec | None
    tuned_from: str | None = None   # the suite whose tuned.yaml the tuned arms reuse (no tuning here)
    claims: dict = field(default_factory=dict)   # claim (b, c) → {name: (the paper's choice, the alternative)}
    claim_seeds: list[int] = field(default_factory=list)
    ablations: dict = field(default_factory=dict)   # name → (reference arm, changed arm): not claims
    ablation_seeds: list[int] = field(default_factory=list)

    @property
    def arms(self) -> list[str]:
        return list(dict.fromkeys(a for pair in self.pairs.values() for a in pair))


def load_protocol(params_path: str | Path) -> Protocol:
    raw = read_params(params_path)
    spec = raw.get("protocol")
    where = f"{params_path}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} has no `protocol:` section (seeds, pairs, margin); see bench/protocol.py")
    unknown = set(spec) - KNOWN
    if unknown:
        raise ConfigError(f"unknown key 'protocol.{sorted(unknown)[0]}' in {where}; known: {', '.join(sorted(KNOWN))}")
    arms = raw.get("arms") or {}
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"protocol.seeds in {where} must be a list of distinct integers, got {seeds!r}")
    pairs = {}
    for name, pair in (spec.get("pairs") or {}).items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ConfigError(f"protocol.pairs.{name} in {where} must be [e2e arm, dblocks arm], got {pair!r}")
        for arm in pair:
            if arm not in arms:
                raise ConfigError(f"protocol.pairs.{name}: unknown arm {arm!r} in {where}; arms: {', '.join(arms)}")
        pairs[name] = tuple(pair)
    if not pairs:
        raise ConfigError(f"protocol.pairs in {where} is empty")
    def arm_pairs(key: str, entries) -> dict:
        if not isinstance(entries, dict):
            raise ConfigError(f"protocol.{key} in {where} must be a mapping of name: [reference arm, changed arm]")
        for name, pair in entries.items():
            if not (isinstance(pair, list) and len(pair) == 2) or any(arm not in arms for arm in pair):
                raise ConfigError(f"protocol.{key}.{name} in {where} must be [reference arm, changed arm] of `arms`, got {pair!r}")
        return {name: tuple(pair) for name, pair in entries.items()}

    ablations = arm_pairs("ablations", spec.get("ablations") or {})
    claims = {}
    for letter, entries in (spec.get("claims") or {}).items():
        if letter not in DESIGN_CLAIMS:
            raise ConfigError(f"protocol.claims.{letter} in {where}: the design claims are {', '.join(DESIGN_CLAIMS)}")
        claims[letter] = arm_pairs(f"claims.{letter}", entries)
    seed_lists = {}
    for key in ("ablation_seeds", "claim_seeds"):
        seed_lists[key] = spec.get(key, seeds)
        if not isinstance(seed_lists[key], list) or not all(isinstance(s, int) for s in seed_lists[key]):
            raise ConfigError(f"protocol.{key} in {where} must be a list of integers, got {seed_lists[key]!r}")
    margin = spec.get("margin")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin > 0:
        raise ConfigError(f"protocol.margin in {where} must be a positive number fixed before the runs, got {margin!r}")
    tune = None
    if spec.get("tune") is not None:
        t = spec["tune"]
        unknown = set(t) - TUNE_KNOWN
        if unknown:
            raise ConfigError(f"unknown key 'protocol.tune.{sorted(unknown)[0]}' in {where}; known: {', '.join(sorted(TUNE_KNOWN))}")
        if not isinstance(t.get("trials"), int) or t["trials"] < 1:
            raise ConfigError(f"protocol.tune.trials in {where} must be a positive integer, got {t.get('trials')!r}")
        tune = TuneSpec(t["trials"], int(t.get("seed", 0)), dict(t.get("overrides") or {}),
                        dict(t.get("shared_space") or {}), dict(t.get("method_space") or {}))
    donor = spec.get("tuned_from")
    if donor is not None and (not isinstance(donor, str) or not donor or tune is not None):
        raise ConfigError(f"protocol.tuned_from in {where} must name another suite (a string), and excludes "
                          f"protocol.tune; got {donor!r}{' beside a tune section' if tune is not None else ''}")
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    return Protocol(suite, seeds, pairs, float(margin), bool(spec.get("margin_relative", False)), tune, donor,
                    claims, list(seed_lists["claim_seeds"]), ablations, list(seed_lists["ablation_seeds"]))
