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


def trials_of(name=None):
    """The trials of study `name`, or of the only study in the suite's database."""
    storage = "sqlite:///runs/tiny/sweep/optuna.db"
    if name is None:
        (summary,) = optuna.get_all_study_summaries(storage)
        name = summary.study_name
    return optuna.load_study(study_name=name, storage=storage).get_trials()


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


def test_a_changed_space_is_a_study_of_its_own(suite, monkeypatch):
    """The study is named by a fingerprint of the space, budget and base settings: a changed
    space (or `-S train.lr=…`) opens a new study; an explicitly named study refuses to mix."""
    seals = []

    def fake_train(cfg, **kw):
        seals.append(test_sealed())
        return {"val_acc": 0.5, "metric": "test_acc"}

    monkeypatch.setattr(bench.train, "train", fake_train)
    run_sweep(suite(), trials=1, log=lambda *_: None)
    assert len(seals) == 1 and seals[0].startswith("sweep tiny-")   # every trial trains with the test split sealed
    run_sweep(suite("{diffusion.num_blocks: [1, 2]}"), trials=1, log=lambda *_: None)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries("sqlite:///runs/tiny/sweep/optuna.db"))
    assert len(names) == 2 and all(n.startswith("tiny-") for n in names)
    run_sweep(suite(), trials=1, study_name="mine", log=lambda *_: None)
    with pytest.raises(ConfigError, match="different search space.*--study mine-2"):
        run_sweep(suite("{diffusion.num_blocks: [1, 2]}"), study_name="mine", resume=True, log=lambda *_: None)


def test_a_resumed_sweep_proposes_what_an_uninterrupted_one_does(suite, monkeypatch):
    """The sampler is seeded from the study's history, not from the process: kill a sweep in
    its third trial, resume it, and the finished trials' params are the uninterrupted sweep's."""
    space = "{diffusion.gamma: {low: 0.0, high: 0.1}, diffusion.P_mean: {low: -1.2, high: 1.2}}"
    calls = []

    def fake_train(cfg, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {"val_acc": 1 - (cfg.diffusion.gamma - 0.03) ** 2 - 0.1 * cfg.diffusion.P_mean ** 2, "metric": "test_acc"}

    monkeypatch.setattr(bench.train, "train", fake_train)
    calls.extend([1] * 10)   # the uninterrupted sweep: no kill
    run_sweep(suite(space), trials=5, study_name="straight", log=lambda *_: None)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(suite(space), trials=5, study_name="killed", log=lambda *_: None)
    run_sweep(suite(space), trials=5, study_name="killed", resume=True, log=lambda *_: None)

    def finished(name):
        return [t.params for t in trials_of(name) if t.state.name == "COMPLETE"]
    assert len(finished("straight")) == 5 and finished("killed") == finished("straight")


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
