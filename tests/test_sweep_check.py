"""bench sweep (resumable, no duplicates, bad input) and bench check (catches a partition bug)."""

import json

import optuna
import pytest

import bench.train
from bench.check import run_checks
from bench.config import ConfigError
from bench.splits import test_sealed
from bench.sweep import run_sweep

SUITE = """
suite: {suite}
runs_dir: runs
data: {{dataset: fashion_mnist, root: {root}, train_subset: 256, val_subset: 200, test_subset: 200}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 16, depth: 4, heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2, gamma: 0.0}}
train: {{epochs: 0.5, batch_size: 64, lr: 2.0e-3, curve_points: 2, ckpt_every: 100, threads: 2}}
eval: {{batch_size: 200, final_variants: []}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
sweep:
  arm: dblocks
  trials: 3
  objectives: [val_acc]
  space: {space}
check:
  arms: [dblocks]
  overrides: {{train.epochs: 0.5}}
"""
SPACE = "{diffusion.num_blocks: [1, 2, 4], diffusion.weighting: [lambda, uniform]}"


@pytest.fixture
def suite(tmp_path, fashion_root, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def make(space=SPACE, name="tiny"):
        p = tmp_path / f"{name}.yaml"
        p.write_text(SUITE.format(suite=name, root=fashion_root, space=space))
        return p
    return make


def trials_of(name="tiny"):
    study = optuna.load_study(study_name=name, storage="sqlite:///runs/tiny/sweep/optuna.db")
    return study.get_trials()


def test_killed_sweep_resumes_to_the_asked_count_without_duplicates(suite, monkeypatch):
    p = suite()
    real_train, calls = bench.train.train, []

    def train_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second trial
        return real_train(*args, **kwargs)

    monkeypatch.setattr(bench.train, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(p, log=lambda *_: None)
    states = [t.state.name for t in trials_of()]
    assert states.count("COMPLETE") == 1 and states.count("RUNNING") == 1
    monkeypatch.setattr(bench.train, "train", real_train)
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(p, log=lambda *_: None)
    csv = run_sweep(p, resume=True, log=lambda *_: None)
    finished = [t for t in trials_of() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 3
    assert csv.exists() and (csv.parent / "sweep_front.png").exists() and (csv.parent / "best_params.yaml").exists()
    best = (csv.parent / "best_params.yaml").read_text()
    assert "dvc exp run -S" in best and "diffusion:" in best


@pytest.mark.parametrize("space, message", [
    ("{diffusion.num_blockz: [1, 2]}", "not searchable"),
    ("{train.lr: {low: 1.0e-3, high: 1.0e-2}}", "not searchable"),
    ("{diffusion.gamma: {low: 0.2, high: 0.1}}", "low (0.2) is larger than high (0.1)"),
])
def test_bad_search_spaces_are_refused(suite, space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_sweep(suite(space), log=lambda *_: None)


def test_a_study_with_another_space_is_refused_with_a_new_name(suite, monkeypatch):
    seals = []

    def fake_train(cfg, **kw):
        seals.append(test_sealed())
        return {"val_acc": 0.5, "metric": "test_acc"}

    monkeypatch.setattr(bench.train, "train", fake_train)
    run_sweep(suite(), trials=1, log=lambda *_: None)
    assert seals == ["sweep tiny"]   # every trial trains with the test split sealed
    with pytest.raises(ConfigError, match="different search space.*--study tiny-2"):
        run_sweep(suite("{diffusion.num_blocks: [1, 2]}"), resume=True, log=lambda *_: None)


def test_check_passes_on_its_baseline_and_catches_a_partition_bug(suite, monkeypatch, capsys):
    p = suite()
    assert run_checks([p], update=True, log=lambda *_: None) == 0
    assert run_checks([p], log=lambda *_: None) == 0
    import bench.diffusion.partition as part
    real = part.partition_edges

    def off_by_a_bit(noise, num_blocks, strategy, explicit=None):  # a plausible slip: the wrong quantile
        edges = list(real(noise, num_blocks, strategy, explicit))
        if strategy == "equiprobable" and num_blocks > 1:
            edges[1:-1] = [e * 1.1 for e in edges[1:-1]]
        return tuple(edges)

    monkeypatch.setattr(part, "partition_edges", off_by_a_bit)
    lines = []
    assert run_checks([p], log=lines.append) == 1
    assert "MOVED" in "\n".join(lines)


def test_check_without_baseline_names_the_command(suite):
    with pytest.raises(FileNotFoundError, match="bench check --update"):
        run_checks([suite(name="nobase")], log=lambda *_: None)
