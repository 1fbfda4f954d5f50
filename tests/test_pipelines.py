"""`dvc repro suites/<name>`, typed literally, runs that whole suite: DVC reads the target as a
stage of the root dvc.yaml (there is no dvc.yaml in the name), and each suite has one there,
named by its path, that depends on its pipeline's final outputs.  This leans on DVC accepting a
'/' in a stage name it loads, which is undocumented: a DVC upgrade that breaks it fails here."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted(p.parent.name for p in ROOT.glob("suites/*/dvc.yaml"))
DVC = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")


def test_every_suite_has_a_root_stage_named_by_its_path():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(n.removeprefix("suites/") for n in stages if n.startswith("suites/")) == SUITES
    for name in SUITES:
        assert stages[f"suites/{name}"]["cmd"] == f"bench summary suites/{name}/params.yaml"


@pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is not installed")
def test_literal_dvc_repro_of_a_suite_runs_every_stage_of_its_pipeline():
    """A forced dry run of all suites at once (one DVC start): every stage of every suite's
    dvc.yaml, and its root stage, is in the plan."""
    out = subprocess.run([DVC, "repro", "--dry", "-f", *(f"suites/{n}" for n in SUITES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    planned = set(re.findall(r"Running stage '([^']+)'", out.stdout))
    listed = subprocess.run([DVC, "stage", "list", "--name-only", "-R", "suites"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for name in SUITES:
        expected = {s for s in listed.stdout.split() if s.startswith(f"suites/{name}/dvc.yaml:")}
        assert expected, f"no stage listed for suites/{name}"
        expected.add(f"suites/{name}")
        assert expected <= planned, f"`dvc repro suites/{name}` leaves out {sorted(expected - planned)[:3]}"
