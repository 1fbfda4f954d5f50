"""The verdict protocol: test is sealed during every selection; validation is carved from train;
seed streams are independent; verdicts follow from the interval and the margin."""

import shutil

import numpy as np
import pytest
import yaml

from bench.config import ConfigError, load_config
from bench.data.images import FASHION_MNIST_FILES
from bench.seeding import stream_seed
from bench.splits import TestSealed, carve_validation, open_test, selection, test_sealed
from bench.tasks import make_task
from bench.tune import run_tuning
from bench.verdict import bootstrap_interval, compare_pair, verdict

TUNE_PARAMS = """
suite: tiny
runs_dir: {runs}
results_dir: {results}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 640, val_subset: 300, test_subset: 300, verify: false}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 3, heads: 2, mlp_dim: 64}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{epochs: 0.5, batch_size: 64, threads: 1, curve_points: 1}}
eval: {{batch_size: 300, final_variants: []}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
  tuned_e2e: {{mode: e2e, tuned: true}}
  tuned_dblocks: {{mode: dblocks, tuned: true}}
protocol:
  seeds: [0, 1]
  pairs: {{paper: [e2e, dblocks], tuned: [tuned_e2e, tuned_dblocks]}}
  margin: 0.01
  tune:
    trials: 2
    seed: 0
    overrides: {{}}
    shared_space: {{train.lr: {{low: 1.0e-4, high: 3.0e-3, log: true}}}}
    method_space: {{diffusion.P_mean: {{low: -1.2, high: 1.2}}}}
"""


def scrambled_copy(fashion_root, dest):
    """Fashion-MNIST with the test labels permuted (same bytes otherwise, same sizes)."""
    out = dest / "fashion_mnist"
    shutil.copytree(fashion_root / "fashion_mnist", out)
    labels = out / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[8:] = bytes(np.random.default_rng(0).permutation(np.frombuffer(bytes(raw[8:]), dtype=np.uint8)))
    labels.write_bytes(bytes(raw))
    assert labels.stat().st_size == FASHION_MNIST_FILES["t10k-labels-idx1-ubyte"][1]
    return dest


def tune_in(tmp, root):
    p = tmp / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp / "runs", results=tmp / "results", root=root))
    run_tuning(p, log=lambda *_: None)
    return p, yaml.safe_load((tmp / "results/tiny/tuned.yaml").read_text())


def test_scrambled_test_labels_change_no_selection(tmp_path, fashion_root):
    """The proof the issue asks for: the tuning study's chosen settings and every validation figure
    are the same whether the test labels are real or scrambled, while a final evaluation does
    see the scramble."""
    real_dir, scrambled_dir = tmp_path / "real", tmp_path / "scrambled"
    real_dir.mkdir(), scrambled_dir.mkdir()
    p_real, real = tune_in(real_dir, fashion_root)
    p_scr, scrambled = tune_in(scrambled_dir, scrambled_copy(fashion_root, tmp_path / "data_scrambled"))
    for arm in ("tuned_e2e", "tuned_dblocks"):
        assert real["arms"][arm]["overrides"] == scrambled["arms"][arm]["overrides"]
        assert real["arms"][arm]["best_value"] == scrambled["arms"][arm]["best_value"]
        assert real["arms"][arm]["trials"] == scrambled["arms"][arm]["trials"] == 2
    assert (real_dir / "results/tiny/tuning.csv").read_text() == (scrambled_dir / "results/tiny/tuning.csv").read_text()
    # the scramble is real: outside a selection the test labels differ
    t_real = make_task(load_config(p_real, "e2e"))
    t_scr = make_task(load_config(p_scr, "e2e"))
    assert not np.array_equal(t_real.test_data().labels.numpy(), t_scr.test_data().labels.numpy())


def test_test_split_is_sealed_inside_a_selection(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    task = make_task(load_config(p, "e2e"))
    task.load()
    with selection("a test"):
        assert test_sealed() == "a test"
        with pytest.raises(TestSealed, match="sealed during a test"):
            task.test_data()
        with pytest.raises(TestSealed):
            open_test("anything", lambda: 1)
    assert not test_sealed()
    assert len(task.test_data()) == 300
    with selection("a later test"), pytest.raises(TestSealed):   # loaded once, still sealed later
        task.test_data()


def test_validation_is_carved_from_train_and_fixed(fashion_root):
    train_idx, val_idx = carve_validation(60_000, 0.1, seed=0)
    assert len(val_idx) == 6000 and len(train_idx) == 54_000
    assert not set(train_idx) & set(val_idx)
    again, _ = carve_validation(60_000, 0.1, seed=0)
    assert np.array_equal(train_idx, again)            # the same for every arm and run seed
    other, _ = carve_validation(60_000, 0.1, seed=1)
    assert not np.array_equal(train_idx, other)
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation(100, 1.0, 0)


def test_seed_streams_do_not_overlap():
    """The old scheme (seed·7919 + step) gave seed 1 step 0 the stream of seed 0 step 7919."""
    seen = {stream_seed(s, "augment", step) for s in range(5) for step in range(20_000)}
    assert len(seen) == 5 * 20_000
    assert stream_seed(0, "block") != stream_seed(0, "noise") != stream_seed(1, "block")


def test_tuned_arm_needs_its_tuning(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    with pytest.raises(ConfigError, match="bench tune"):
        load_config(p, "tuned_dblocks")
    assert load_config(p, "tuned_dblocks", tuning=True).diffusion.P_mean == -1.2


def test_tuned_from_reuses_the_donor_suites_tuning_and_tunes_nothing(tmp_path, fashion_root):
    """protocol.tuned_from: the tuned arms take the donor suite's tuned.yaml as it is (a transfer
    test), `bench tune` refuses the receiving suite, and tuned_from beside a tune section is refused."""
    donor_params = tmp_path / "donor" / "params.yaml"
    donor_params.parent.mkdir()
    _, tuned = tune_in(donor_params.parent, fashion_root)   # writes <donor>/results/tiny/tuned.yaml
    raw = yaml.safe_load(donor_params.read_text())
    raw["suite"], raw["results_dir"] = "austenlike", str(donor_params.parent / "results")
    del raw["protocol"]["tune"]
    raw["protocol"]["tuned_from"] = "tiny"
    p = tmp_path / "receiver" / "params.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(raw))
    cfg = load_config(p, "tuned_dblocks")
    chosen = tuned["arms"]["tuned_dblocks"]["overrides"]
    assert (cfg.train.lr, cfg.diffusion.P_mean) == (chosen["train.lr"], chosen["diffusion.P_mean"])
    assert cfg.suite == "austenlike" and "austenlike" in cfg.out_dir
    with pytest.raises(ConfigError, match="tuned_from reuses tiny"):
        run_tuning(p, log=lambda *_: None)
    raw["protocol"]["tuned_from"] = "nowhere"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="nowhere/tuned.yaml does not exist"):
        load_config(p, "tuned_dblocks")
    raw["protocol"]["tune"] = {"trials": 1}
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="protocol.tuned_from"):
        run_tuning(p, log=lambda *_: None)


def test_a_tuning_study_resumes_only_at_unchanged_base_settings(tmp_path, fashion_root):
    """The study's name fingerprints the arm's base settings: a changed batch size would otherwise
    resume the old study and mix trials of two set-ups; where the data lives does not count."""
    from bench.protocol import load_protocol
    from bench.tune import _space, _study_name
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    spec = load_protocol(p).tune

    def name(*overrides):
        base = load_config(p, "tuned_dblocks", list(overrides), tuning=True)
        return _study_name(base, _space(load_protocol(p), base), spec)
    assert name() == name() == name(f"data.root={tmp_path / 'elsewhere'}")
    assert name("train.batch_size=32") != name() != name("model.depth=6")
    assert name().startswith("tiny-tuned_dblocks-")


def test_verdict_follows_interval_and_margin():
    assert verdict(-0.004, 0.006, margin=0.01, n_seeds=5) == "matches"
    assert verdict(0.002, 0.03, margin=0.01, n_seeds=5) == "better"
    assert verdict(-0.03, -0.02, margin=0.01, n_seeds=5) == "worse"
    assert verdict(-0.02, 0.02, margin=0.01, n_seeds=5) == "inconclusive"
    assert verdict(0.0, 0.0, margin=0.01, n_seeds=1) == "inconclusive"   # one seed is an anecdote
    lo, hi = bootstrap_interval(np.array([0.01, 0.02, 0.03, 0.02, 0.01]))
    assert 0.01 <= lo < 0.018 < hi <= 0.03
    # lower is better (BPC): DB 3.1 vs E2E 3.4 on every seed → DB better, sign positive
    r = compare_pair([3.4, 3.41, 3.39], [3.1, 3.12, 3.09], higher_is_better=False, margin=0.03, relative=True)
    assert r["mean_diff"] > 0 and r["verdict"] == "better" and r["p_db_ge_e2e"] == 1.0


def test_tuned_variant_takes_its_donors_settings_and_its_one_change(tmp_path, fashion_root):
    """`tuned: tuned_dblocks` = that arm's settings and tuned overrides, plus the variant's change;
    a change to a key the tuning chose would be overwritten, so it is refused."""
    p, _ = tune_in(tmp_path, fashion_root)
    raw = yaml.safe_load(p.read_text())
    raw["arms"]["tuned_dblocks"]["diffusion.gamma"] = 0.02
    raw["arms"]["variant"] = {"tuned": "tuned_dblocks", "diffusion.partition": "log-uniform"}
    raw["arms"]["clash"] = {"tuned": "tuned_dblocks", "train.lr": 1.0e-3}
    raw["arms"]["no_donor"] = {"tuned": "dblocks", "diffusion.partition": "linear"}
    p.write_text(yaml.safe_dump(raw))
    base, variant = load_config(p, "tuned_dblocks"), load_config(p, "variant")
    assert variant.mode == "dblocks" and variant.diffusion.partition == "log-uniform"
    assert (variant.train.lr, variant.diffusion.P_mean, variant.diffusion.gamma) == \
        (base.train.lr, base.diffusion.P_mean, 0.02)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p, "clash")
    with pytest.raises(ConfigError, match="tuned: true"):
        load_config(p, "no_donor")


def test_design_claim_rows_are_signed_for_the_papers_choice(tmp_path, fashion_root):
    """Claims (b, c): positive = the paper's choice is better; the verdict follows the interval."""
    import json

    import pandas as pd

    from bench.protocol import load_protocol
    from bench.report_verdict import claim_rows

    p = tmp_path / "params.yaml"
    raw = yaml.safe_load(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    raw["arms"]["dblocks_linear"] = {"mode": "dblocks", "diffusion.partition": "linear"}
    raw["protocol"]["claims"] = {"b": {"linear": ["dblocks", "dblocks_linear"]}}
    raw["protocol"]["claim_seeds"] = [0, 1, 2]
    p.write_text(yaml.safe_dump(raw))
    for arm, acc in (("dblocks", 0.80), ("dblocks_linear", 0.70)):
        for seed in (0, 1, 2):
            out = tmp_path / "runs/tiny" / arm / f"seed{seed}"
            out.mkdir(parents=True)
            (out / "eval.json").write_text(json.dumps({"metric": "test_acc", "test_acc": acc + 0.01 * seed,
                                                       "val_acc": acc - 0.01 * seed}))
            pd.DataFrame([{"optimizer_steps": 3, "layer_evals": 3, "train_time_s": 1.0, "peak_mem_bytes": 1,
                           "git_sha": "0" * 40, "device": "cpu"}]).to_csv(out / "summary.csv", index=False)
    (row,) = claim_rows(p, load_protocol(p), higher_is_better=True, log=lambda *_: None)
    assert row["claim"] == "b" and row["db_arm"] == "dblocks" and row["seeds"] == 3
    assert row["mean_diff"] == pytest.approx(0.10) and row["verdict"] == "better"


def test_recurrent_claim_rows_measure_the_saving_against_ten():
    """Claim (f): the counted FLOP saving E2E / DB is judged against the paper's ≈10×, and the
    quality row restates the pair's paired difference at that saving."""
    import pandas as pd

    from bench.report_verdict import recurrent_rows

    pair = {"claim": "a", "pair": "paper", "e2e_arm": "e2e", "db_arm": "dblocks", "metric": "mauve@rnn",
            "seeds": 5, "mean_diff": -0.02, "ci_low": -0.04, "ci_high": 0.01, "margin": 0.05,
            "verdict": "matches", "flop_ratio_db_e2e": 0.4, "compute": "not matched", "statement": "x"}
    seeds = pd.DataFrame({"arm": ["e2e", "dblocks"], "layer_evals": [5500, 1000]})
    compute, quality = recurrent_rows([pair], seeds)
    assert compute["claim"] == quality["claim"] == "f"
    assert compute["mean_diff"] == pytest.approx(2.5 / 10 - 1) and compute["verdict"] == "worse"
    assert "2.50×" in compute["note"] and "5.50×" in compute["note"]
    assert (quality["mean_diff"], quality["verdict"], quality["seeds"]) == (-0.02, "matches", 5)
    assert "2.5× less" in quality["statement"]
    pair["flop_ratio_db_e2e"] = 0.1   # a 10× saving matches the claim
    assert recurrent_rows([pair], seeds)[0]["verdict"] == "matches"
    assert recurrent_rows([{**pair, "verdict": "not tested"}], seeds) == []


def test_verdict_before_any_seed_is_one_line_and_writes_nothing(tmp_path, fashion_root):
    from bench.report_verdict import write_verdict
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    with pytest.raises(ConfigError, match="no arm of protocol.pairs has an evaluated seed"):
        write_verdict(p)
    assert not (tmp_path / "results").exists()


def test_sampling_claim_row_judges_the_timed_ratio_against_B(tmp_path):
    """Claim (e): E2E / DB time per image over B, one timed measurement; the counted layer ratio
    is only a note.  2.2× at B = 3 is worse than ~3×; 2.9× matches within 10%."""
    import pandas as pd

    from bench.protocol import Protocol
    from bench.verdict_measured import sampling_rows
    proto = Protocol(suite="s", seeds=[0], pairs={"paper": ("e2e", "dblocks")}, margin=0.1, margin_relative=True, tune=None)
    assert sampling_rows(tmp_path, proto, B=3) == []            # no timing: no row (the claim stays untested)
    for db_ms, verdict in ((10 / 2.2, "worse"), (10 / 2.9, "matches"), (10 / 3.5, "better")):
        pd.DataFrame([{"arm": "e2e", "steps": 25, "ms_per_image": 10.0, "layer_evals_per_image": 300},
                      {"arm": "dblocks", "steps": 25, "ms_per_image": db_ms, "layer_evals_per_image": 100}]
                     ).to_csv(tmp_path / "sampling_cost.csv", index=False)
        (row,) = sampling_rows(tmp_path, proto, B=3)
        assert row["claim"] == "e" and row["verdict"] == verdict and "3.00×" in row["note"]


def test_measured_only_rejudges_memory_and_keeps_the_seed_rows(tmp_path, fashion_root, monkeypatch):
    """`bench verdict --measured-only`: (d) rows come from results/memory/<suite>.csv; the seed-judged
    (a) rows and the rest of comparison.md stay byte for byte; without a verdict.csv, one clear line."""
    import pandas as pd

    from bench.verdict_measured import rejudge_measured
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(TUNE_PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    with pytest.raises(ConfigError, match="--measured-only: no .*verdict.csv"):
        rejudge_measured(p)
    out = tmp_path / "results/tiny"
    out.mkdir(parents=True)
    seed_row = {"suite": "tiny", "claim": "a", "pair": "paper", "metric": "test_acc", "seeds": 2, "mean_diff": -0.02,
                "ci_low": -0.03, "ci_high": -0.01, "margin": 0.01, "verdict": "worse"}
    pd.DataFrame([seed_row, {"suite": "tiny", "claim": "d", "verdict": "not tested", "note": "no memory file"}]
                 ).to_csv(out / "verdict.csv", index=False)
    from bench.report_verdict import COMPUTE_HEADING, VERDICTS_HEAD
    head, tail = "# tiny\n\n" + VERDICTS_HEAD, "\n" + COMPUTE_HEADING + "\nkept\n"
    (out / "comparison.md").write_text(head + "\nold table\n" + tail)
    (tmp_path / "results/memory").mkdir()
    mem = [("e2e", "-", 1, 300.0), ("e2e+accum", "-", 3, 150.0), ("e2e+ckpt", "-", 1, 90.0), ("dblocks", "offload", 3, 100.0)]
    pd.DataFrame([{"mode": m, "residency": r, "B": b, "batch_size": 64, "peak_bytes": peak} for m, r, b, peak in mem]
                 ).to_csv(tmp_path / "results/memory/tiny.csv", index=False)
    rejudge_measured(p)
    v = pd.read_csv(out / "verdict.csv")
    assert v[v["claim"] == "a"].iloc[0][["mean_diff", "verdict"]].tolist() == [-0.02, "worse"]
    d = v[v["claim"] == "d"].set_index("pair")
    assert d.loc["e2e vs dblocks offload", "verdict"] == "matches"           # 300 / 100 = 3.0 = B
    assert d.loc["e2e+accum vs dblocks offload", "mean_diff"] == pytest.approx(1.5 / 3 - 1)
    assert d.loc["e2e+ckpt vs dblocks offload", "verdict"] == "worse"        # 0.9× < B
    text = (out / "comparison.md").read_text()
    assert text.startswith(head) and text.endswith(tail) and "old table" not in text and "against e2e+accum" in text
    assert set(v["claim"]) == set("abcdef")
