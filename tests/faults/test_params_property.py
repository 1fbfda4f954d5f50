"""Property: any params file either validates and runs a tiny smoke training, or fails with one
of the documented one-line errors before writing anything — never a traceback."""

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import main

BASE = {
    "suite": "prop",
    "data": {"dataset": "fashion_mnist", "train_subset": 64, "val_subset": 50, "test_subset": 50},
    "model": {"arch": "vit", "image_size": 28, "patch_size": 7, "hidden": 16, "depth": 2, "heads": 2, "mlp_dim": 16},
    "diffusion": {"num_blocks": 2},
    "train": {"epochs": 0.5, "batch_size": 32, "threads": 1, "curve_points": 1},
    "eval": {"batch_size": 50, "final_variants": []},
    "arms": {"e2e": {"mode": "e2e"}, "dblocks": {"mode": "dblocks"}},
}
ODD = st.sampled_from([math.nan, math.inf, -math.inf, "abc", [1, 2], None, True, {"a": 1}, -1, 0])
NUMBER = st.one_of(st.floats(-2, 2, allow_nan=False), st.integers(-3, 5), ODD, st.just(1e9))
# sizes stay small when valid (0 would mean "all 54,000 images"): every run that validates is a smoke run
SUBSET = st.one_of(st.integers(-10, 100).filter(bool), st.sampled_from([math.nan, "abc", [1], None, True, 2.5]))
FIELDS = {
    "train.lr": NUMBER, "train.epochs": st.one_of(st.floats(-1, 1.5), ODD), "train.batch_size": st.one_of(
        st.integers(-2, 40), st.just(2.5), ODD), "train.grad_clip": NUMBER, "train.min_lr": NUMBER,
    "train.warmup_epochs": NUMBER, "train.threads": st.integers(-2, 2), "train.weight_decay": NUMBER,
    "train.device": st.sampled_from(["auto", "cpu", "cuda", "tpu", "", 3]),
    "diffusion.num_blocks": st.one_of(st.integers(-1, 4), ODD), "diffusion.gamma": NUMBER,
    "diffusion.P_std": NUMBER, "diffusion.sigma_min": NUMBER, "diffusion.sigma_max": NUMBER,
    "diffusion.weighting": st.sampled_from(["lambda", "official", "uniform", "cubic", 1]),
    "diffusion.partition": st.sampled_from(["equiprobable", "log-uniform", "linear", "quadratic"]),
    "data.train_subset": SUBSET, "data.val_fraction": NUMBER,
    "model.depth": st.integers(-1, 4), "model.hidden": st.sampled_from([0, 8, 16, 17, -4]),
    "model.heads": st.integers(0, 4), "model.patch_size": st.sampled_from([7, 5, 0, 28]),
    "eval.batch_size": st.one_of(st.integers(-1, 60), ODD),
}


@st.composite
def params_files(draw):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        section, name = key.split(".")
        raw[section][name] = draw(FIELDS[key])
    text = yaml.safe_dump(raw, sort_keys=False)
    damage = draw(st.sampled_from(["none", "none", "none", "duplicate", "tab", "truncate"]))
    if damage == "duplicate":
        text = text.replace("train:\n", "train:\n  lr: 0.001\n  lr: 0.002\n", 1)
    elif damage == "tab":
        text = text.replace("\n  ", "\n\t", 1)
    elif damage == "truncate":
        text = text[: draw(st.integers(1, len(text) - 1))]
    return text, draw(st.sampled_from(["e2e", "dblocks"]))


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=params_files())
def test_a_params_file_runs_or_fails_in_one_line(tmp_path_factory, fashion_root, capsys, case):
    text, arm = case
    tmp = tmp_path_factory.mktemp("prop")
    p = tmp / "params.yaml"
    p.write_text(text.replace("dataset: fashion_mnist", f"dataset: fashion_mnist\n  root: {fashion_root}", 1)
                 + f"\nruns_dir: {tmp / 'runs'}\n")
    capsys.readouterr()
    code = main(["train", str(p), "--arm", arm, "--no-progress"])   # an exception here is the traceback case
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:
        assert (tmp / "runs/prop" / arm / "final.pt").exists()
    else:
        assert code == 2 and len(err) == 1 and err[0].startswith("bench: error:"), err
        assert not (tmp / "runs").exists() or not any((tmp / "runs").rglob("params.yaml")), "output before the error"
