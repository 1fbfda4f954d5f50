"""Measured FLOPs of a training step and of a run (bench.flops), on a tiny ViT."""

import pytest
import torch
import torch.nn.functional as F

from bench.flops import flop_counter, param_counts, run_flops, step_flops
from bench.train import Budget, build_model, make_optimizer

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def measured(tiny_task, arm="dblocks", *overrides):
    task = tiny_task(arm, *overrides)
    torch.manual_seed(0)
    model = build_model(task.cfg, task)
    return task, model, step_flops(task.cfg, task, model, CPU)


def test_cpu_attention_is_counted():
    """torch's counter has no formula for the CPU attention kernel; bench.flops adds it."""
    b, h, s, d = 2, 4, 64, 16
    q = torch.randn(b, h, s, d, requires_grad=True)
    with flop_counter() as forward:
        y = F.scaled_dot_product_attention(q, q, q)
    with flop_counter() as backward:
        y.sum().backward()
    assert forward.get_total_flops() == 2 * (2 * b * h * s * s * d)   # QKᵀ and PV
    # torch's formula for the fused kernels: the scores are recomputed (5 products, 2 forward)
    assert backward.get_total_flops() == 2.5 * forward.get_total_flops()


def test_every_block_step_costs_less_than_the_e2e_step(tiny_task):
    _, _, e2e = measured(tiny_task, "e2e")
    _, _, db = measured(tiny_task, "dblocks")
    assert e2e["per_block"] is None and len(e2e["per_step"]) == 1
    assert len(db["per_block"]) == 3
    assert all(f < e2e["step"] for f in db["per_block"])
    # B blocks cover the e2e layers once, plus B× the shared stem/head and the adaLN conditioning
    ratio = sum(db["per_block"]) / e2e["step"]
    print(f"tiny ViT (depth 6, B 3, batch {e2e['batch_size']}): Σ block steps / e2e step = {ratio:.3f}; "
          f"e2e {e2e['step']:.4g} FLOPs, block {db['per_block'][0]:.4g}")
    assert 1.0 < ratio < 1.5
    for f in (e2e, db):   # backward ≈ 2× forward (input and weight gradients)
        for fwd, bwd in zip(f["forward"], f["backward"]):
            assert 1.7 < bwd / fwd < 2.3


def test_flops_scale_linearly_with_batch_size(tiny_task):
    for arm in ("e2e", "dblocks"):
        small = measured(tiny_task, arm, "train.batch_size=8")[2]
        large = measured(tiny_task, arm, "train.batch_size=32")[2]
        assert large["step"] / small["step"] == pytest.approx(4.0, rel=0.01), arm


def test_a_deeper_block_costs_more(tiny_task):
    _, _, f = measured(tiny_task, "dblocks", "diffusion.layer_distribution=[1,2,3]")
    one, two, three = f["per_block"]
    assert one < two < three and f["layer_evals"] == [1, 2, 3]
    assert three - two == pytest.approx(two - one, rel=1e-6)   # every layer costs the same
    assert one > two - one    # a 1-layer step also pays the stem, head and conditioning


def test_checkpointing_recomputes_the_forward_in_backward(tiny_task):
    _, _, plain = measured(tiny_task, "e2e")
    _, _, ckpt = measured(tiny_task, "e2e", "mode=e2e+ckpt")
    assert ckpt["forward"] == plain["forward"]
    # most of the forward again: torch's non-reentrant checkpoint stops recomputing a layer once the
    # tensors backward needs are back (a layer's last product, fc2, is not redone)
    extra = (ckpt["backward"][0] - plain["backward"][0]) / plain["forward"][0]
    assert 0.6 < extra <= 1.0, extra


def test_step_flops_leaves_the_model_and_rng_untouched(tiny_task):
    task = tiny_task("dblocks", "model.dropout=0.1")
    model = build_model(task.cfg, task).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    step_flops(task.cfg, task, model, CPU)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and torch.equal(torch.get_rng_state(), rng)


def test_offload_measures_every_block_and_parks_them_again(tiny_task):
    task = tiny_task("dblocks", "train.residency=offload")
    torch.manual_seed(0)
    model = build_model(task.cfg, task)
    resident = step_flops(task.cfg, task, model, CPU)
    opt = make_optimizer(task.cfg, task, model, CPU, Budget(1, 10, 30, 0))
    assert step_flops(task.cfg, task, model, CPU, optimizer=opt)["per_block"] == resident["per_block"]
    assert opt.parked_bytes() > 0


def test_run_flops(tiny_task):
    e2e_task, _, e2e = measured(tiny_task, "e2e")
    db_task, _, db = measured(tiny_task, "dblocks", "diffusion.layer_distribution=[1,2,3]")
    assert run_flops(e2e_task.cfg, e2e, Budget(10, 10, 10, 0)) == 10 * e2e["step"]
    budget = Budget(10, 10, 30, 0)     # compute-matched: B× the steps of e2e
    assert run_flops(db_task.cfg, db, budget) == pytest.approx(10 * sum(db["per_block"]))
    assert run_flops(db_task.cfg, db, budget, [30, 0, 0]) == 30 * db["per_block"][0]
    with pytest.raises(ValueError, match="2 block counts for 3 blocks"):
        run_flops(db_task.cfg, db, budget, [15, 15])


def test_param_counts(tiny_task):
    e2e_task, e2e_model, _ = measured(tiny_task, "e2e")
    db_task, db_model, _ = measured(tiny_task, "dblocks")
    e2e, db = param_counts(e2e_model), param_counts(db_model, db_task.layout)
    assert e2e["total"] == sum(p.numel() for p in e2e_model.parameters()) == e2e["layers"] + e2e["shared"]
    assert db["total"] > e2e["total"]   # adaLN per layer, σ embedding, label table
    assert sum(db["per_block"]) == db["layers"] and len(set(db["per_block"])) == 1
