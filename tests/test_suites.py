"""Every suite is valid data: its params load for every arm, and every param its DVC pipeline
names exists in its params file (DVC refuses to run a stage whose param is missing, and reads a
dot in an arm name as a nested key)."""

from pathlib import Path

import pytest
import yaml

from bench.config import arm_names, load_config

SUITES = sorted(Path(__file__).resolve().parents[1].glob("suites/*/dvc.yaml"))


def _named_params(stage: dict) -> list[tuple[str, str]]:
    """(params file, dotted key) for each param a stage lists; a bare file means all of it."""
    out = []
    for entry in stage.get("params") or []:
        if isinstance(entry, dict):
            for file, keys in entry.items():
                out += [(file, k) for k in (keys or [])]
        else:
            out.append(("params.yaml", entry))
    return out


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@pytest.mark.parametrize("dvc_yaml", SUITES, ids=lambda p: p.parent.name)
def test_every_dvc_param_exists(dvc_yaml):
    root = dvc_yaml.parents[2]
    pipeline = yaml.safe_load(dvc_yaml.read_text())
    missing = []
    for name, stage in pipeline["stages"].items():
        body = stage.get("do", stage)
        wdir = (dvc_yaml.parent / stage.get("wdir", body.get("wdir", "."))).resolve()
        for file, key in _named_params(body):
            params = yaml.safe_load((wdir / file).read_text())
            # foreach over the arms (${key}) or over a list (${item}): check every expansion
            items = (list(params.get("arms", {})) if "${key}" in key else
                     stage["foreach"] if "${item}" in key else [None])
            for item in items:
                k = key.replace("${key}", item).replace("${item}", item) if item else key
                try:
                    _lookup(params, k)
                except KeyError:
                    missing.append(f"{name}: {file}:{k}")
    assert not missing, f"{dvc_yaml.relative_to(root)} names params its params file lacks: {missing}"


@pytest.mark.parametrize("dvc_yaml", SUITES, ids=lambda p: p.parent.name)
def test_every_arm_loads(dvc_yaml):
    for params in sorted(dvc_yaml.parent.glob("*.yaml")):
        if params.name == "dvc.yaml" or "arms" not in (yaml.safe_load(params.read_text()) or {}):
            continue
        for arm in arm_names(params):
            load_config(params, arm)   # raises ConfigError on any unknown or invalid key
