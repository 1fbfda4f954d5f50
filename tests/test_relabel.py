"""`bench compare --relabel`: the "matched compute" wording follows the counted FLOPs."""
import pandas as pd
import yaml

from bench import report_relabel
from bench.report import flop_note


def test_flop_note_says_matched_only_within_ten_percent():
    table = pd.DataFrame({"arm": ["e2e", "dblocks"], "flop_ratio_to_e2e": [1.0, 1.09]})
    assert flop_note(table).startswith("matched training compute")
    table["flop_ratio_to_e2e"] = [1.0, 2.33]
    assert flop_note(table) == "training compute NOT matched: FLOP ratio to e2e dblocks 2.33"
    table["flop_ratio_to_e2e"] = [1.0, float("nan")]
    assert "not shown to be matched" in flop_note(table)


def test_relabel_replaces_the_claim_and_its_own_banner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"suite": "toy", "results_dir": str(tmp_path / "results")}))
    out = tmp_path / "results" / "toy"
    out.mkdir(parents=True)
    pd.DataFrame({"arm": ["e2e", "dblocks"], "mode": ["e2e", "dblocks"], "optimizer_steps": [10, 30],
                  "layer_evals": [60, 60]}).to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text("# toy\n\n## Final figures (matched training compute)\n\n| a |\n")
    (out / "generation.md").write_text("## FID (final weights, matched training compute; resize)\n")

    def fake_counts(params_path, table):   # FLOP counting itself is tested in test_flops.py
        return table.assign(train_flops=[1e12, 2.33e12], flop_ratio_to_e2e=[1.0, 2.33])
    monkeypatch.setattr(report_relabel, "counted_flops", fake_counts)
    report_relabel.relabel(params)
    report_relabel.relabel(params)   # idempotent: one banner, not two
    md = (out / "comparison.md").read_text()
    assert "matched training compute" not in md and md.count(report_relabel.BANNER[0]) == 1
    assert "## Final figures (training compute NOT matched: FLOP ratio to e2e dblocks 2.33)" in md
    assert "NOT matched" in (out / "generation.md").read_text()
    assert list(pd.read_csv(out / "comparison.csv")["flop_ratio_to_e2e"]) == [1.0, 2.33]
