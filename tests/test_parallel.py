"""Block-parallel DiffusionBlocks (bench.parallel): two gloo ranks, one block each.  With the
shared modules frozen, each block ends at the weights of the single-process run that trains only
that block on the same per-block streams; with the shared gradients all-reduced, the groups keep
one shared copy.  Either way rank 0 assembles a final.pt that `bench evaluate` scores unchanged."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from bench import seeding
from bench.config import ConfigError, load_config
from bench.evaluate import evaluate_arm
from bench.parallel import BlockParallelDims, check_manifest
from bench.tasks import make_task
from conftest import TINY_RANKS
from bench.train import build_model, train

PARAMS = TINY_RANKS.replace("{ckpt_every}", "3")


def block_parallel(tmp_path, root, shared: str):
    p = tmp_path / f"bp_{shared}.yaml"
    raw = yaml.safe_load(PARAMS.format(runs=tmp_path / f"bp_{shared}", root=root))
    raw["train"]["shared"] = shared   # in the file: a --set run would live in its own set-<hash> directory
    p.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "BENCH_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench", "train", str(p), "--arm", "dblocks", "--block-parallel",
                           "--nproc", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return p, tmp_path / f"bp_{shared}/tiny/dblocks"


def layer_weights(state: dict, layers) -> dict:
    return {k: v for k, v in state.items() if any(k.startswith(f"layers.{i}.") for i in layers)}


def test_frozen_shared_blocks_equal_their_single_block_runs(tmp_path, fashion_root):
    p, out = block_parallel(tmp_path, fashion_root, "frozen")
    assembled = torch.load(out / "final.pt", weights_only=False)
    check_manifest(out)
    for block, layers in ((0, range(0, 2)), (1, range(2, 4))):
        cfg = load_config(p, "dblocks", [f"train.blocks_to_train=[{block}]", "train.shared=frozen"])
        cfg.out_dir = str(tmp_path / f"alone{block}")
        s = train(cfg, progress=False, log=lambda *_: None)
        assert s["optimizer_steps"] == 8   # e2e-equivalent steps: one block's share of sequential DB
        alone = torch.load(tmp_path / f"alone{block}/final.pt", weights_only=False)["model"]
        ours = layer_weights(assembled["model"], layers)
        assert ours and ours.keys() == layer_weights(alone, layers).keys()
        for k, w in ours.items():
            torch.testing.assert_close(w, alone[k], rtol=0, atol=0, msg=f"block {block}: {k}")
    # frozen from step 0: both runs' shared modules are the same (their common init)
    alone = torch.load(tmp_path / "alone1/final.pt", weights_only=False)["model"]
    shared = [k for k in alone if not k.startswith("layers.")]
    assert shared and all(torch.equal(assembled["model"][k], alone[k]) for k in shared)


def test_allreduce_shared_assembles_and_evaluates(tmp_path, fashion_root):
    p, out = block_parallel(tmp_path, fashion_root, "allreduce")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["blocks"]) == ["0", "1"]
    summary = (out / "summary.csv").read_text()
    assert "block_parallel" in summary and "val_acc" in summary
    ev = evaluate_arm(load_config(p, "dblocks", ["train.block_parallel=true", "train.shared=allreduce"]),
                      log=lambda *_: None)
    assert 0.0 <= ev["test_acc"] <= 1.0 and 0.0 <= ev["val_acc"] <= 1.0
    # one shared copy, trained by both groups: identical in both block files, moved from the init
    b0, b1 = (torch.load(out / f"block{b}/final.pt", weights_only=False)["model"] for b in (0, 1))
    shared = [k for k in b0 if not k.startswith("layers.")]
    assert all(torch.equal(b0[k], b1[k]) for k in shared)
    assert torch.load(out / "block0/ckpt.pt", weights_only=False)["state"]["step"] == 8
    cfg = load_config(p, "dblocks")
    torch.manual_seed(seeding.stream_seed(cfg.train.seed, "init"))
    init = build_model(cfg, make_task(cfg)).state_dict()
    assert any(not torch.equal(b0[k], init[k]) for k in shared)


def test_mesh_and_config_checks():
    with pytest.raises(ValueError, match="B × dp"):
        BlockParallelDims(3, 0, 2)
    assert BlockParallelDims(2, 2, 4).coordinate(3) == (1, 1)


def test_blocks_to_train_is_checked(tmp_path, fashion_root):
    p = tmp_path / "p.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=fashion_root))
    with pytest.raises(ConfigError, match="blocks_to_train"):
        load_config(p, "dblocks", ["train.blocks_to_train=[2]"])
    with pytest.raises(ConfigError, match="train.shared"):
        load_config(p, "dblocks", ["train.shared=copies"])
