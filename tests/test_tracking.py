"""MLflow, as a user browses it: one parent run per suite run with one child per arm, a --set
smoke run under a parent of its own, system metrics, memory in MiB; and two arms started at once
on a fresh sqlite store both succeed."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bench.cli import main

PARAMS = """
suite: tracked
runs_dir: {runs}
results_dir: {results}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 256, test_subset: 200}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 3, heads: 2, mlp_dim: 64}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{epochs: 1.0, batch_size: 64, threads: 1, curve_points: 1}}
eval: {{batch_size: 200}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not start")
            time.sleep(1)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_one_parent_per_suite_run_one_child_per_arm(tmp_path, fashion_root, mlflow_server, monkeypatch):
    from mlflow import MlflowClient
    monkeypatch.setenv("BENCH_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")   # runs last ~1 s; a sample is logged only after a full interval
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    assert main(["prepare", str(p)]) == 0
    for arm in ("e2e", "dblocks"):
        assert main(["train", str(p), "--arm", arm, "--no-progress"]) == 0
        assert main(["evaluate", str(p), "--arm", arm]) == 0
    assert main(["train", str(p), "--arm", "e2e", "--no-progress", "--set", "train.lr=1e-4"]) == 0

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 3   # the suite run, and the --set smoke run's own
    suite_parent = next(r for r in parents if "--set" not in r.info.run_name)
    assert suite_parent.info.run_name.startswith("tracked ") and suite_parent.data.params["model.hidden"] == "32"
    assert suite_parent.data.tags["mlflow.source.git.commit"]
    import json
    plan = json.loads((tmp_path / "runs/tracked/plan.json").read_text())
    assert plan["mlflow"]["suite_key"] == suite_parent.data.tags["bench.suite_key"]
    mine = [r for r in children if r.data.tags["mlflow.parentRunId"] == suite_parent.info.run_id]
    assert sorted(r.data.tags["bench.arm"] for r in mine) == ["dblocks", "e2e"]
    smoke = next(r for r in parents if "--set" in r.info.run_name)
    assert [r.data.tags["bench.arm"] for r in children if r.data.tags["mlflow.parentRunId"] == smoke.info.run_id] == ["e2e"]
    for r in mine:
        m = r.data.metrics
        assert "final/test_acc" in m and "peak_mem_MiB" in m and "peak_mem_bytes" not in m
        assert "seed" not in m and "num_blocks" not in m and r.data.params["train.seed"] == "0"
        assert any(k.startswith("system/") for k in m), sorted(m)
    smoke_dirs = list((tmp_path / "runs/tracked/e2e").glob("set-*"))   # the smoke run left the arm's own run alone
    assert len(smoke_dirs) == 1 and (smoke_dirs[0] / "final.pt").exists()


def test_two_arms_started_at_once_on_a_fresh_store(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", results=tmp_path / "results", root=fashion_root))
    env = {**os.environ, "BENCH_MLFLOW": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)   # the default: sqlite:///mlflow.db in the working directory
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "train", str(p), "--arm", arm, "--no-progress",
                               "--set", "train.epochs=0.25"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arm in ("e2e", "dblocks")]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(o[-1500:] for o in outs)
    assert (tmp_path / "mlflow.db").exists()


def test_the_recorded_sha_is_that_of_the_imported_code_from_any_directory(tmp_path):
    """Run from inside another git checkout, provenance still names this package's commit."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "other"], check=True)
    out = subprocess.run([sys.executable, "-c", "from bench.track import git_sha; print(git_sha())"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split("-dirty")[0] == head


def test_the_recorded_sha_is_read_when_the_code_is_imported(tmp_path):
    """A process that outlives a commit (a scaling worker) keeps recording the commit it imported."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    shutil.copytree(root / "bench", repo / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "bench"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    first = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    script = ("import subprocess, sys; from bench.track import git_sha; before = git_sha(); "
              f"subprocess.run({[*git, 'commit', '-q', '--allow-empty', '-m', 'second']!r}, check=True); "
              "print(before, git_sha())")
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert out == [first, first]
