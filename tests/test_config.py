"""Bad input fails with one clear line before any compute, and nothing is written."""

import pytest

from bench.cli import main
from bench.config import load_config

BASE = """
suite: tiny
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 6, heads: 2, mlp_dim: 64}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{epochs: 0.01, batch_size: 32}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture
def params(tmp_path, fashion_root):
    def make(extra: str = "", root=None, arms=None):
        text = BASE.format(runs=tmp_path / "runs", root=root or fashion_root)
        if arms:
            text = text.replace("arms:\n  e2e: {mode: e2e}\n  dblocks: {mode: dblocks}\n", arms)
        path = tmp_path / "params.yaml"
        path.write_text(text + extra)
        return path
    return make


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_valid_params_load(params):
    cfg = load_config(params(), "dblocks", ["train.lr=5e-4", "diffusion.layer_distribution=[1,2,3]"])
    assert cfg.is_dblocks and cfg.train.lr == 5e-4 and cfg.diffusion.layer_distribution == [1, 2, 3]
    assert cfg.model["depth"] == 6


@pytest.mark.parametrize("override, message", [
    ("diffusion.num_blocks=7", "larger than the number of layers (6)"),
    ("diffusion.layer_distribution=[1,2,2]", "sums to 5, not to the depth 6"),
    ("diffusion.gamma=-0.1", "diffusion.gamma (overlap"),
    ("diffusion.gamma=1", "must lie in [0, 1), got 1"),
    ("diffusion.partition=quadratic", "unknown partition 'quadratic'"),
    ("diffusion.sigma_min=90", "must be below diffusion.sigma_max"),
    ("train.grad_clip=-1", "train.grad_clip (gradient-norm clip) must lie in (0, inf)"),
    ("data.train_subset=-5", "data.train_subset"),
    ("train.warmup_epochs=-1", "train.warmup_epochs"),
    ("train.min_lr=1", "train.min_lr (1.0) must not exceed train.lr"),
    ("train.threads=-1", "train.threads"),
    ("train.device=tpu", "train.device must be auto, cpu, mps, cuda or cuda:N"),
    ("train.batch_size=2.5", "train.batch_size must be an integer"),
    ("train.lrr=1e-3", "unknown params key 'train.lrr'"),
    ("model.depthh=3", "unknown params key 'model.depthh'"),
    ("diffusion.weighting=cubic", "unknown weighting 'cubic'"),
])
def test_bad_input_one_line_error_before_any_work(params, capsys, tmp_path, override, message):
    for cmd in ("prepare", "train"):
        argv = [cmd, str(params())] + (["--arm", "dblocks"] if cmd == "train" else []) + ["--set", override]
        code, err = run_cli(capsys, *argv)
        assert code == 2
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_params_file(params, capsys):
    code, err = run_cli(capsys, "prepare", str(params("optimiser: {lr: 1}\n")))
    assert code == 2 and "unknown params key 'optimiser'" in err


def test_unknown_arm_and_mode(params, capsys):
    code, err = run_cli(capsys, "train", str(params()), "--arm", "nope")
    assert code == 2 and "unknown arm 'nope'" in err and "e2e, dblocks" in err
    code, err = run_cli(capsys, "prepare", str(params(arms="arms:\n  x: {mode: backprop}\n")))
    assert code == 2 and "unknown mode 'backprop'" in err


def test_missing_dataset_names_the_path_and_the_fix(params, capsys, tmp_path):
    empty = tmp_path / "nowhere"
    code, err = run_cli(capsys, "train", str(params(root=empty)), "--arm", "e2e")
    assert code == 2 and str(empty / "fashion_mnist") in err and "bench data fashion-mnist" in err
    assert not (tmp_path / "runs").exists()


def test_missing_cifar_names_the_path(params, capsys, tmp_path):
    p = params(root=tmp_path / "cifar")
    p.write_text(p.read_text().replace("dataset: fashion_mnist", "dataset: cifar100"))
    code, err = run_cli(capsys, "prepare", str(p))
    assert code == 2 and str(tmp_path / "cifar" / "cifar-100-python") in err and "data.root" in err


def test_partition_command_prints_the_paper_boundaries(capsys):
    assert main(["partition", "-B", "3", "--strategy", "equiprobable", "--gamma", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "0.0020, 0.1796, 0.5050, 80.0000" in out
    assert "[0.392, 80]" in out and "0.333" in out
    assert main(["partition", "-B", "13"]) == 2


def test_every_command_line_option_has_help_text():
    import argparse

    from bench.cli import build_parser
    missing = []
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        missing += [f"bench {name} {a.option_strings or a.dest}" for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
