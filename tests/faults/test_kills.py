"""SIGKILL for real: several kills at random moments of a run, and one in the middle of a
checkpoint write.  Every resumed run ends with the uninterrupted run's exact weights, and no kill
leaves a corrupt checkpoint or a temp file behind."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

PARAMS = """
suite: kills
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 256, test_subset: 100, val_subset: 100}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 16, depth: 2, heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2}}
train: {{epochs: 4.0, batch_size: 32, threads: 1, curve_points: 2, ckpt_every: 3, log_every: 5}}
eval: {{batch_size: 100, final_variants: []}}
arms: {{dblocks: {{mode: dblocks}}, straight: {{mode: dblocks}}}}
"""
ENV = {**os.environ, "BENCH_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
# a driver that dies (SIGKILL) half-way through writing its second checkpoint
DIE_IN_WRITE = """
import os, signal, sys
import bench.atomic as atomic
real, calls = atomic._replace, []
def dying(path, write):
    if path.name == "ckpt.pt":
        calls.append(1)
        if len(calls) == 2:
            def half(f):
                f.write(b"x" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return real(path, half)
    return real(path, write)
atomic._replace = dying
from bench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_cmd(p, arm):
    return [sys.executable, "-m", "bench", "train", str(p), "--arm", arm, "--no-progress", "--resume-if-compatible"]


def saved_step(out) -> int:
    """The step of the run's last checkpoint (-1 before the first); ckpt.pt is replaced atomically."""
    try:
        return int(torch.load(out / "ckpt.pt", weights_only=False)["state"]["step"])
    except FileNotFoundError:
        return -1


def weights(out):
    return torch.load(out / "final.pt", weights_only=False)["model"]


def test_random_kills_and_a_kill_inside_a_checkpoint_write_resume_exactly(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=fashion_root))
    subprocess.run(train_cmd(p, "straight"), env=ENV, check=True, capture_output=True)
    out = tmp_path / "runs/kills/dblocks"

    done = subprocess.run([sys.executable, "-c", DIE_IN_WRITE, *train_cmd(p, "dblocks")[3:]], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL
    assert list(out.glob(".ckpt.pt.tmp-*")), "the killed write left its temp file"
    assert torch.load(out / "ckpt.pt", weights_only=False)["state"]["step"] == 3   # the first checkpoint, intact

    rng, kills = np.random.default_rng(0), 0
    for _ in range(3):   # killed again at random moments (training, evaluating or writing)
        # paced by the run's own progress, not the clock (a fast machine finished before a timed kill):
        # wait for its next checkpoint, then kill at a random moment of the steps after it
        before = saved_step(out)
        proc = subprocess.Popen(train_cmd(p, "dblocks"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and saved_step(out) <= before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / "ckpt.pt").exists():
            torch.load(out / "ckpt.pt", weights_only=False)   # never corrupt
    subprocess.run(train_cmd(p, "dblocks"), env=ENV, check=True, capture_output=True)
    assert kills == 3
    straight, resumed = weights(tmp_path / "runs/kills/straight"), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not list(out.glob(".*.tmp-*"))   # the next run removed every orphan
