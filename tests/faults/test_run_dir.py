"""Faults injected for real on a run directory: a second writer, a stale lock, a killed write's
temp file, corrupt and truncated checkpoints, Ctrl-C, a read-only and a full disk.  Each ends in
one clear line (or a correct run) and loses nothing."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cli import main

PARAMS = """
suite: faults
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 128, test_subset: 100, val_subset: 100}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 16, depth: 2, heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2}}
train: {{epochs: 1.0, batch_size: 32, threads: 1, curve_points: 1, ckpt_every: 2}}
eval: {{batch_size: 100, final_variants: []}}
arms: {{dblocks: {{mode: dblocks}}}}
"""


@pytest.fixture
def suite(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=fashion_root))
    return p, tmp_path / "runs/faults/dblocks"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench:") and "Traceback" not in err[0], err
    return err[0]


def test_a_second_writer_fails_at_once_naming_the_holder(suite, capsys):
    p, out = suite
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from bench.checkpoint import run_lock\n"
                               f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "BENCH_MLFLOW": "0"})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 2
        assert f"PID {holder.pid}" in one_line_error(capsys)
        assert not (out / "params.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 0   # the lock died with its holder


def test_stale_lock_and_orphaned_temp_files_are_cleaned_up(suite, capsys):
    p, out = suite
    out.mkdir(parents=True)
    (out / ".lock.pid").write_text("999999\n")            # a holder that is gone
    orphan = out / ".ckpt.pt.tmp-k1ll3d"                    # a write a kill interrupted
    orphan.write_bytes(b"partial")
    old_umask = os.umask(0o022)
    try:
        assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 0
    finally:
        os.umask(old_umask)
    printed = capsys.readouterr().out
    assert "taking over the lock of PID 999999" in printed and "removed 1 temp file" in printed
    assert not orphan.exists() and not (out / ".lock.pid").exists()
    assert (out / "final.pt").stat().st_mode & 0o777 == 0o644   # outputs respect the umask


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong kind"])
def test_a_damaged_checkpoint_is_one_line_with_resume_and_set_aside_by_dvc_form(suite, capsys, damage):
    p, out = suite
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 0
    ckpt = out / "ckpt.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": good[: len(good) // 3], "garbage": os.urandom(4096)}.get(damage, b""))
    if damage == "wrong kind":
        torch.save({"model": {}}, ckpt)
    (out / "final.pt").unlink()
    capsys.readouterr()
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress", "--resume"]) == 2
    assert "not a readable checkpoint" in one_line_error(capsys)
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress", "--resume-if-compatible"]) == 0
    assert (out / "ckpt.corrupt.pt").exists() and (out / "final.pt").exists()


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(suite, capsys, monkeypatch):
    import bench.train as trainer
    p, out = suite
    real, calls = trainer.train_step, []

    def step_then_interrupt(run, step):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(run, step)

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 130
    line = one_line_error(capsys)
    assert "interrupted at step 4" in line and "ckpt.pt (step 4)" in line and "--resume" in line


@pytest.mark.parametrize("fault", ["read-only", "disk full"])
def test_an_unwritable_or_full_disk_is_one_line_and_keeps_the_checkpoint(suite, capsys, monkeypatch, fault):
    import bench.atomic as atomic
    p, out = suite
    assert main(["train", str(p), "--arm", "dblocks", "--no-progress"]) == 0
    before = (out / "ckpt.pt").read_bytes()
    real = atomic._replace

    def failing(path, write):
        raise OSError(errno.ENOSPC if fault == "disk full" else errno.EROFS,
                      os.strerror(errno.ENOSPC if fault == "disk full" else errno.EROFS), str(path))

    monkeypatch.setattr(atomic, "_replace", failing)
    capsys.readouterr()
    assert main(["evaluate", str(p), "--arm", "dblocks"]) == 2
    assert ("No space left" if fault == "disk full" else "Read-only") in one_line_error(capsys)
    monkeypatch.setattr(atomic, "_replace", real)
    assert (out / "ckpt.pt").read_bytes() == before and torch.load(out / "ckpt.pt", weights_only=False)["state"]
