"""The memory meter, offload residency, and the shape of the memory-vs-B curve."""

import pandas as pd
import pytest
import torch

from bench.benchmark import measure, variant
from bench.config import load_config
from bench.memory import MemoryMeter

MiB = 2**20


def test_meter_on_known_allocations():
    empty = torch.nn.Module()
    with MemoryMeter(empty, None, "cpu") as m:
        a = torch.empty(3 * MiB, dtype=torch.uint8)
        assert m.current == 3 * MiB
        view = a[10:]          # a view shares the storage: nothing new
        assert m.current == 3 * MiB
        del a
        assert m.current == 3 * MiB  # still alive through the view
        del view
        assert m.current == 0
        b = torch.zeros(MiB // 4, dtype=torch.float32)  # 1 MiB
        b.add_(1)              # in place: nothing new
        assert m.current == MiB
        c = b * 2              # a new tensor
        assert m.current == 2 * MiB
        del b, c
    assert m.peak == 3 * MiB and m.current == 0


def test_attribution_of_parameters_gradients_and_adam_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(32, 256)
    model(x).square().mean().backward()
    opt.step()  # creates the Adam moments
    opt.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    with MemoryMeter(model, opt, "cpu") as m:
        model(x).square().mean().backward()
        spike = torch.empty(8 * MiB, dtype=torch.uint8)  # the peak comes after backward: gradients exist
        del spike
    r = m.report()
    assert r.parameters == param_bytes
    assert r.gradients == param_bytes
    # exp_avg and exp_avg_sq per parameter, plus AdamW's 4-byte step counter per parameter tensor
    assert r.optimizer_state == 2 * param_bytes + 4 * len(list(model.parameters()))
    assert r.activations >= 8 * MiB
    assert r.peak_bytes == r.parameters + r.gradients + r.optimizer_state + r.activations


def tiny_config(tmp_path, **extra):
    p = tmp_path / "p.yaml"
    p.write_text(f"""
suite: tiny
runs_dir: {tmp_path / 'runs'}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 6, heads: 2, mlp_dim: 256, cond_dim: 8}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{batch_size: 32, lr: 1.0e-3}}
arms:
  dblocks: {{mode: dblocks}}
""")
    return load_config(p, "dblocks")


def test_offload_keeps_inactive_blocks_off_the_device_and_trains_identically(tmp_path, monkeypatch):
    from bench.tasks import make_task
    from bench.train import Budget, backward_step, build_model, forward_loss, make_optimizer
    base = tiny_config(tmp_path)
    weights = {}
    for residency in ("resident", "offload"):
        cfg = variant(base, "dblocks", 3, 32, residency)
        task = make_task(cfg)
        torch.manual_seed(0)
        model = build_model(cfg, task)
        opt = make_optimizer(cfg, task, model, torch.device("cpu"), Budget(1, 100, 100, 0))
        batch, gen = task.example_batch(32, "cpu"), torch.Generator().manual_seed(0)
        seen = []
        real_loss = type(task).loss

        def spy(self, model, *args, **kwargs):  # during the step: which layers hold data?
            seen.append([sum(p.numel() for p in layer.parameters()) > 0 for layer in model.layers])
            return real_loss(self, model, *args, **kwargs)

        monkeypatch.setattr(type(task), "loss", spy)
        for block in [0, 2, 1, 2, 0, 1]:
            opt.activate(block)
            loss, _, _ = forward_loss(cfg, task, model, batch, block, gen)
            backward_step(cfg, model, opt, loss)
            if residency == "offload":
                on_device = seen[-1]
                assert on_device == [i in task.layout.layers_of(block) for i in range(6)], on_device
        monkeypatch.undo()
        with opt.materialize():
            weights[residency] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, w in weights["resident"].items():
        assert torch.allclose(w, weights["offload"][k], rtol=0, atol=1e-7), k


def test_peak_dblocks_memory_does_not_grow_with_B(tmp_path):
    base = tiny_config(tmp_path)
    for residency in ("offload", "resident"):
        peaks = [measure(variant(base, "dblocks", B, 32, residency), torch.device("cpu"), time_steps=0)["peak_bytes"]
                 for B in (1, 2, 3, 6)]
        assert all(b <= a for a, b in zip(peaks, peaks[1:])), (residency, peaks)
    offload = measure(variant(base, "dblocks", 3, 32, "offload"), torch.device("cpu"), 0)
    resident = measure(variant(base, "dblocks", 3, 32, "resident"), torch.device("cpu"), 0)
    assert offload["parameters"] < resident["parameters"] and offload["host_parked_bytes"] > 0


def test_killed_benchmark_resumes_and_depth_search_stops_at_its_cap(tmp_path, monkeypatch):
    from bench import benchmark
    monkeypatch.setenv("BENCH_MLFLOW", "0")
    tiny_config(tmp_path)
    params, out = tmp_path / "p.yaml", tmp_path / "mem"
    calls = []
    real = benchmark.measure

    def counting(cfg, device, time_steps=3, first_block_only=False):
        calls.append(cfg.mode)
        if len(calls) == 3:
            raise KeyboardInterrupt   # killed during the third row
        return real(cfg, device, time_steps, first_block_only)

    monkeypatch.setattr(benchmark, "measure", counting)
    args = dict(blocks=[1, 2], batch_sizes=[8], modes=["e2e", "dblocks"], residencies=["offload"], out_dir=out,
                time_steps=0, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        benchmark.memory_benchmark(params, **args)
    assert len(pd.read_csv(out / "tiny.csv")) == 2          # the rows measured before the kill are on disk
    calls.clear()
    monkeypatch.setattr(benchmark, "measure", real)
    lines = []
    benchmark.memory_benchmark(params, resume=True, budget=1 << 40, max_depth=4, **{**args, "log": lines.append})
    df = pd.read_csv(out / "tiny.csv")
    assert len(df) == 3 and sum("kept from the earlier run" in line for line in lines) == 2
    md = (out / "tiny.md").read_text()
    assert "| >= 4 |" in md            # e2e fits any depth within 1 TiB: reported as at least the cap
