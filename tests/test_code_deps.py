"""DVC stages depend on exactly the code they run: code/*.sha256 lists each command's import
closure, the committed lists are current, every harness stage names its commands' lists (and no
broader `bench/` path), and a real run imports nothing outside its closure."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from bench.code_deps import ROOT, fingerprints, required_code

PIPELINES = sorted(ROOT.glob("suites/*/dvc.yaml")) + [ROOT / "dvc.yaml"]


def test_committed_code_lists_are_current():
    """`bench code-deps` (the root `code` stage) was run after the last code change."""
    import hashlib
    expected = fingerprints()
    committed = {p.stem: p.read_text() for p in (ROOT / "code").glob("*.sha256")}
    assert set(committed) == set(expected)
    for name, files in expected.items():
        lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(ROOT).as_posix()}" for f in files]
        assert committed[name] == "\n".join(lines) + "\n", f"code/{name}.sha256 is stale: run `bench code-deps`"


def test_every_harness_stage_depends_on_exactly_its_commands_code():
    for dvc_yaml in PIPELINES:
        for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
            if name == "code":
                continue
            deps = [str(d) for d in (stage.get("do", stage).get("deps") or [])]
            where = f"{dvc_yaml.relative_to(ROOT)}:{name}"
            assert not [d for d in deps if d == "bench" or d.startswith("bench/")], f"{where} depends on bench/ directly"
            assert sorted(d for d in deps if d.startswith("code/")) == sorted(required_code(dvc_yaml, name, stage)), where


PROBE = """
import json, sys
from bench.config import load_config
{body}
print(json.dumps(sorted(m for m in sys.modules if m == "bench" or m.startswith("bench."))))
"""


def imported_by(body: str) -> set[Path]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={"BENCH_MLFLOW": "0", "PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    from bench.code_deps import module_file
    return {module_file(m) for m in json.loads(out.stdout.strip().splitlines()[-1])}


def test_a_training_and_its_evaluation_import_only_their_closures(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(f"""
suite: tiny
runs_dir: {tmp_path / 'runs'}
data: {{dataset: fashion_mnist, root: {fashion_root}, train_subset: 128, test_subset: 100, val_subset: 100}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 16, depth: 2, heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2}}
train: {{epochs: 0.5, batch_size: 64, threads: 1, curve_points: 1}}
eval: {{batch_size: 100, final_variants: []}}
arms: {{dblocks: {{mode: dblocks}}}}
""")
    cfg = f"cfg = load_config({str(p)!r}, 'dblocks')\n"
    lists = fingerprints()
    trained = imported_by(cfg + "from bench.train import train\ntrain(cfg, progress=False, log=lambda *a: None)")
    assert trained <= set(lists["train-classification"]), sorted(trained - set(lists["train-classification"]))
    evaluated = imported_by(cfg + "from bench.evaluate import evaluate_arm\nevaluate_arm(cfg, log=lambda *a: None)")
    assert evaluated <= set(lists["evaluate-classification"]), sorted(evaluated - set(lists["evaluate-classification"]))
