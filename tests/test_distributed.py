"""Data-parallel training (bench.distributed): two gloo ranks × batch b end at the weights of one
process × batch 2b, for both arms; `bench train --nproc` is torchrun underneath."""

import os
import subprocess
import sys

import pytest
import torch

from bench.cli import torchrun_argv
from bench.config import load_config
from bench.distributed import Shard
from conftest import TINY_RANKS
from bench.train import train

PARAMS = TINY_RANKS.replace("{ckpt_every}", "1000")


def test_shard_draws_do_not_depend_on_the_number_of_ranks():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = Shard(0, 1).draw(torch.randn, (8, 3), g1)
    halves = [Shard(r, 2).draw(torch.randn, (4, 3), g) for r, g in
              ((0, torch.Generator().manual_seed(5)), (1, g2))]
    assert torch.equal(torch.cat(halves), whole)
    batch = (torch.arange(8), torch.arange(8) * 10)
    assert [t.tolist() for t in Shard(1, 2).take(batch)] == [[4, 5, 6, 7], [40, 50, 60, 70]]
    with pytest.raises(ValueError, match="does not split"):
        Shard(0, 3).rows(8)


def test_torchrun_argv_drops_nproc():
    argv = torchrun_argv(2, ["train", "p.yaml", "--arm", "e2e", "--nproc", "2", "--no-progress"])
    assert argv[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert argv[-6:] == ["bench", "train", "p.yaml", "--arm", "e2e", "--no-progress"]
    assert "--nproc" not in argv and "--nproc_per_node=2" in argv


@pytest.mark.parametrize("arm", ["e2e", "dblocks"])
def test_two_gloo_ranks_match_one_process(tmp_path, fashion_root, arm):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(PARAMS.format(runs=tmp_path / "runs1", root=fashion_root))
    two.write_text(PARAMS.format(runs=tmp_path / "runs2", root=fashion_root))
    train(load_config(one, arm), progress=False, log=lambda *_: None)
    env = {**os.environ, "BENCH_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "bench", "train", str(two), "--arm", arm, "--nproc", "2", "--no-progress"],
                   check=True, env=env, capture_output=True, timeout=600)
    a = torch.load(tmp_path / f"runs1/tiny/{arm}/final.pt", weights_only=False)
    b = torch.load(tmp_path / f"runs2/tiny/{arm}/final.pt", weights_only=False)
    assert a["summary"]["optimizer_steps"] == b["summary"]["optimizer_steps"] == (8 if arm == "e2e" else 16)
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=1e-4, atol=1e-5, msg=f"{arm}: {name} differs")
    # each rank really held half the batch (an unsharded run would match too): half the activations
    assert b["summary"]["peak_mem_activations"] < 0.7 * a["summary"]["peak_mem_activations"]
    # and the ranks really were two (the provenance of the run)
    params = (tmp_path / f"runs2/tiny/{arm}/params.yaml").read_text()
    assert "world_size: 2" in params
