"""`bench scaling`: the saturating power-law fit, the margin crossing, and a tiny real run that
reuses the protocol's runs at budget 1 and never reruns a finished budget."""

import json

import numpy as np
import pandas as pd
import pytest

from bench.config import ConfigError
from bench.scaling import point_config, run_scaling, scaling_spec
from bench.scaling_fit import bootstrap_fits, fit_power_law, margin_crossing, saturating_power_law

from test_protocol import TUNE_PARAMS


def test_fit_recovers_a_known_power_law():
    C = np.repeat(np.geomspace(1e9, 1.6e10, 5), 3)
    y = saturating_power_law(C, 0.12, 0.3, 0.6, 1e9) + np.random.default_rng(0).normal(0, 1e-4, C.size)
    f = fit_power_law(C, y)
    assert f["floor"] == pytest.approx(0.12, abs=0.01)
    assert f["b"] == pytest.approx(0.6, rel=0.1)
    assert not f["flat"]


def test_fit_needs_three_budgets():
    with pytest.raises(ValueError, match="3 budgets"):
        fit_power_law([1e9, 1e9, 2e9, 2e9], [0.3, 0.31, 0.2, 0.21])


def test_fit_keeps_its_constraints():
    C = np.geomspace(1e9, 1e10, 6)
    rising = fit_power_law(C, 0.1 + 0.01 * np.log(C / 1e9))   # worse with compute: no decay term
    assert rising["flat"] and rising["a"] == 0.0
    steep = fit_power_law(C, 0.5 * (C / 1e9) ** -1.0)          # floor 0 exactly: never negative
    assert steep["floor"] >= 0.0


def test_margin_crossing_finds_where_the_gap_closes():
    e2e = {"floor": 0.10, "a": 0.2, "b": 0.5, "C0": 1.0}
    closing = {"floor": 0.10, "a": 0.4, "b": 0.5, "C0": 1.0}     # gap 0.2·C^-0.5: inside 0.01 from C = 400
    c = margin_crossing(e2e, closing, 0.01, False, 1.0, 1000.0)
    assert 350 < c < 450
    lasting = {"floor": 0.15, "a": 0.2, "b": 0.5, "C0": 1.0}     # the floors differ by 5 points
    assert margin_crossing(e2e, lasting, 0.01, False, 1.0, 1000.0) is None


def test_bootstrap_intervals_contain_the_fit():
    rng = np.random.default_rng(1)
    seeds = np.tile([0, 1, 2], 4)
    C = np.repeat(np.geomspace(1e9, 8e9, 4), 3)
    pts = {role: (seeds, C, saturating_power_law(C, floor, 0.3, 0.7, 1e9) + rng.normal(0, 0.005, C.size))
           for role, floor in (("e2e", 0.10), ("db", 0.13))}
    fit = bootstrap_fits(pts, [0, 1, 2], 0.01, False, True, resamples=200)
    for role in ("e2e", "db"):
        lo, hi = fit[role]["floor_ci"]
        assert lo <= fit[role]["floor"] <= hi
    assert fit["crossing"] is None   # a 3-point floor gap never enters a 1-point margin


@pytest.fixture
def tiny_suite(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    return p


def test_bad_arguments_fail_before_compute(tiny_suite):
    with pytest.raises(ConfigError, match="--budgets"):
        scaling_spec(tiny_suite, [1.0])
    with pytest.raises(ConfigError, match="unknown pair 'nope'"):
        scaling_spec(tiny_suite, [0.5, 1.0], ["nope"])


def test_scaling_reuses_budget_one_and_runs_only_new_budgets(tiny_suite, tmp_path, one_thread):
    logs = []
    run_scaling(tiny_suite, [0.5, 1.0], ["paper"], [0, 1], log=logs.append)
    assert any("8 point(s) to run" in line for line in logs)
    spec = scaling_spec(tiny_suite, [0.5, 1.0], ["paper"], [0, 1])
    one, half = (point_config(tiny_suite, spec, "dblocks", 0, b) for b in (1.0, 0.5))
    assert one.out_dir == str(tmp_path / "runs" / "tiny" / "dblocks" / "seed0")   # the protocol's own run
    assert half.train.epochs == pytest.approx(0.25) and "scaling/x0.5" in half.out_dir
    table = pd.read_csv(tmp_path / "results" / "scaling" / "tiny.csv")
    assert len(table) == 8 and set(table["budget"]) == {0.5, 1.0}
    ev = json.loads((tmp_path / "runs" / "tiny" / "e2e" / "seed1" / "eval.json").read_text())
    row = table[(table["arm"] == "e2e") & (table["seed"] == 1) & (table["budget"] == 1.0)].iloc[0]
    assert row["val"] == ev["val_acc"] and row["test"] == ev["test_acc"]
    half = table[(table["arm"] == "e2e") & (table["budget"] == 0.5)].iloc[0]
    assert 0 < half["optimizer_steps"] < row["optimizer_steps"]   # round(epochs · steps per epoch) of each budget
    assert half["train_flops"] / row["train_flops"] == pytest.approx(half["optimizer_steps"] / row["optimizer_steps"])
    fit = json.loads((tmp_path / "results" / "scaling" / "tiny_fit.json").read_text())
    assert fit["pairs"][0]["pair"] == "paper" and len(fit["pairs"][0]["per_budget"]) == 2
    assert "fit" not in fit["pairs"][0]   # two budgets do not determine a 3-parameter law
    assert (tmp_path / "results" / "scaling" / "tiny.png").stat().st_size > 0
    assert "## tiny" in (tmp_path / "results" / "scaling" / "README.md").read_text()

    logs.clear()
    run_scaling(tiny_suite, [0.25, 0.5, 1.0], ["paper"], [0, 1], log=logs.append)
    assert any("4 point(s) to run" in line for line in logs)   # only budget 0.25
    fit = json.loads((tmp_path / "results" / "scaling" / "tiny_fit.json").read_text())
    assert "fit" in fit["pairs"][0] and fit["pairs"][0]["fit"]["e2e"]["points"] == 6


def test_the_margin_is_written_in_the_metrics_units():
    """A relative margin (BPC, FID) reads as a percentage of E2E; an accuracy margin as points."""
    import json
    from pathlib import Path

    from bench.report_scaling import suite_section
    root = Path(__file__).resolve().parents[1] / "results" / "scaling"
    bpc = "\n".join(suite_section(json.loads((root / "mdm_shakespeare_fit.json").read_text())))
    acc = "\n".join(suite_section(json.loads((root / "vit_fashion_fit.json").read_text())))
    assert "±3% of E2E" in bpc and "±0.03" not in bpc
    assert "±1 points" in acc
