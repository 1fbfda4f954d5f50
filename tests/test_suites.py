"""Every suite is valid data: its params load for every arm, and every param its DVC pipeline
names exists in its params file (DVC refuses to run a stage whose param is missing, and reads a
dot in an arm name as a nested key)."""

from pathlib import Path

import pytest
import yaml

from bench.config import arm_names, load_config
from bench.protocol import load_protocol

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


def _expansions(stage: dict, params: dict, key: str) -> list[str]:
    """Every form of a param key under the stage's foreach (${key}, ${item}) or matrix (${item.x})."""
    if "matrix" in stage:
        import itertools
        axes = {}
        for name, values in stage["matrix"].items():
            if isinstance(values, str) and values.startswith("${"):
                values = _lookup(params, values[2:-1])   # e.g. ${protocol.seeds}
            axes[name] = values
        out = []
        for combo in itertools.product(*axes.values()):
            k = key
            for name, value in zip(axes, combo):
                k = k.replace("${item.%s}" % name, str(value))
            out.append(k)
        return out
    if "${key}" in key:
        return [key.replace("${key}", item) for item in params.get("arms", {})]
    if "${item}" in key:
        return [key.replace("${item}", item) for item in stage["foreach"]]
    return [key]


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
            for k in _expansions(stage, params, key):
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
            load_config(params, arm, tuning=True)   # raises ConfigError on any unknown or invalid key
        if "protocol" in yaml.safe_load(params.read_text()):
            load_protocol(params)


def test_pair_arms_have_matched_parameter_counts():
    """Every protocol pair is within 5% in parameters (the reviewer's bar), by building both models."""
    from bench.flops import param_counts
    from bench.tasks import make_task
    from bench.train import build_model
    for params in sorted(Path(__file__).resolve().parents[1].glob("suites/*/params.yaml")):
        raw = yaml.safe_load(params.read_text())
        if "protocol" not in raw:
            continue
        # a vocabulary read from prepared data: a fixed one instead (the same for both arms), so the
        # test needs no text data
        fixed = ["model.vocab_size=256"] if (raw.get("model") or {}).get("vocab_size") == 0 else []
        for name, (e2e, db) in load_protocol(params).pairs.items():
            counts = [param_counts(build_model(c, make_task(c)))["total"]
                      for c in (load_config(params, a, fixed, tuning=True) for a in (e2e, db))]
            assert abs(counts[1] / counts[0] - 1) <= 0.05, f"{params.parent.name} {name}: {counts}"


@pytest.mark.parametrize("params", sorted(p for p in Path(__file__).resolve().parents[1].glob("suites/*/*.yaml")
                                          if p.name != "dvc.yaml"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_default_is_written_so_dvc_exp_run_can_set_it(params):
    """`dvc exp run -S file:section.key=v` refuses a key the file lacks (it would need `+`)."""
    import dataclasses

    from bench.config import SECTIONS, section_class
    from bench.data.imagefolder import IMAGEFOLDER, FolderFields
    raw = yaml.safe_load(params.read_text())
    if "arms" not in raw:
        return
    task, arch = raw.get("task", "classification"), (raw.get("model") or {}).get("arch", "vit")
    # data.path/name/resize only mean something under data.dataset: imagefolder, and a suite that uses it
    # writes them; writing them into every image suite would change the `data` param of its DVC stages
    folder_only = set() if (raw.get("data") or {}).get("dataset") == IMAGEFOLDER else \
        {f"data.{f.name}" for f in dataclasses.fields(FolderFields)}
    missing = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(section_class(s, task, arch))
               if f.name not in (raw.get(s) or {}) and f.name != "arch" and f"{s}.{f.name}" not in folder_only]
    assert not missing, f"{params.name} lacks {missing[:5]}: write their defaults (see bench/config.py)"
