"""The memory meter, offload residency, the shape of the memory-vs-B curve, and the
gradient-accumulation baseline."""

import pandas as pd
import pytest
import torch

from bench.benchmark import ACCUM, accumulation_step, measure, micro_batch_sizes, split_batch, variant
from bench.config import load_config
from bench.memory import MemoryMeter

MiB = 2**20
pytestmark = pytest.mark.usefixtures("one_thread")   # a shared 2-core machine


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

    def counting(cfg, device, time_steps=3, first_block_only=False, accum_steps=1):
        calls.append(cfg.mode)
        if len(calls) == 3:
            raise KeyboardInterrupt   # killed during the third row
        return real(cfg, device, time_steps, first_block_only, accum_steps)

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


def test_micro_batches_cover_the_batch():
    assert micro_batch_sizes(32, 3) == [11, 11, 10] and micro_batch_sizes(8, 1) == [8]
    with pytest.raises(ValueError, match="into 9 micro-batches"):
        micro_batch_sizes(8, 9)


def test_accumulated_gradient_is_the_full_batch_gradient(tmp_path):
    """B micro-batches, loss weighted by their share: the gradient the optimizer steps on (after the
    trainer's clipping) is the full batch's."""
    from bench.tasks import make_task
    from bench.train import backward_step, build_model, forward_loss
    cfg = variant(tiny_config(tmp_path), ACCUM, 1, 30, "resident")
    assert cfg.mode == "e2e" and cfg.arm == ACCUM
    task = make_task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, task)
    batch, gen = task.example_batch(30, "cpu"), torch.Generator().manual_seed(0)

    class Recorder:  # an optimizer that records the gradient it would step on
        def zero_grad(self):
            model.zero_grad(set_to_none=True)

        def step(self):
            self.grads = [p.grad.clone() for p in model.parameters()]

    full, accumulated = Recorder(), Recorder()
    loss, _, _ = forward_loss(cfg, task, model, batch, None, gen)
    backward_step(cfg, model, full, loss)
    accumulation_step(cfg, task, model, accumulated, split_batch(cfg, batch, 4), gen)  # 8, 8, 7, 7
    for a, b in zip(full.grads, accumulated.grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_accumulation_arm_activations_fall_with_B(tmp_path):
    base = tiny_config(tmp_path)
    rows = {B: measure(variant(base, ACCUM, 1, 32, "resident"), torch.device("cpu"), 0, accum_steps=B)
            for B in (1, 2, 4, 8)}
    acts = [rows[B]["activations"] for B in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(acts, acts[1:])), acts
    assert acts[-1] < 0.35 * acts[0], acts   # a micro-batch of 4 keeps ~1/8 of the batch's activations
    assert rows[8]["peak_bytes"] < rows[1]["peak_bytes"]
    assert len({rows[B]["parameters"] for B in rows}) == 1 and len({rows[B]["optimizer_state"] for B in rows}) == 1
    with pytest.raises(ValueError, match="e2e baseline"):
        measure(variant(base, "dblocks", 2, 32, "resident"), torch.device("cpu"), 0, accum_steps=2)


def test_benchmark_compares_dblocks_with_accumulation_and_checkpointing(tmp_path, monkeypatch):
    from bench import benchmark
    monkeypatch.setenv("BENCH_MLFLOW", "0")
    tiny_config(tmp_path)
    out = tmp_path / "mem"
    benchmark.memory_benchmark(tmp_path / "p.yaml", blocks=[1, 2], batch_sizes=[8], residencies=["offload"],
                               out_dir=out, time_steps=1, log=lambda *_: None)   # default arms
    df = pd.read_csv(out / "tiny.csv")
    accum = df[df["mode"] == ACCUM].set_index("B")
    assert list(accum.index) == [1, 2] and list(accum["micro_batch"]) == [8, 4]
    db = df[df["mode"] == "dblocks"].set_index("B")
    ckpt = df[df["mode"] == "e2e+ckpt"].iloc[0]
    for B in (1, 2):
        assert db.loc[B, "mem_ratio_vs_accum"] == pytest.approx(accum.loc[B, "peak_bytes"] / db.loc[B, "peak_bytes"])
        assert db.loc[B, "mem_ratio_vs_ckpt"] == pytest.approx(ckpt["peak_bytes"] / db.loc[B, "peak_bytes"])
    assert accum["mem_ratio_vs_accum"].isna().all()
    md = (out / "tiny.md").read_text()
    assert "against the baselines a user would pick instead" in md and "| ×e2e+accum |" in md
    assert "`mem_ratio_vs_accum` (dblocks rows) against e2e+accum with the same B" in md
