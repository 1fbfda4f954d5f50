"""Block layout, block sampling, and the locality of a DiffusionBlocks training step."""

import pytest
import torch

from bench.blocks import BlockSampler, make_layout
from bench.diffusion import weighted_loss
from bench.models.vit import ViT, ViTConfig


def test_layouts():
    assert make_layout(12, 3).layers_per_block == (4, 4, 4)
    assert make_layout(12, 3, [2, 4, 6]).layers_of(2) == range(6, 12)
    assert make_layout(7, 3).layers_per_block == (3, 2, 2)  # remainder to the first blocks, never dropped
    with pytest.raises(ValueError, match="larger than the number of layers"):
        make_layout(6, 7)
    with pytest.raises(ValueError, match="sums to 11"):
        make_layout(12, 3, [2, 4, 5])
    with pytest.raises(ValueError, match="3 entries"):
        make_layout(12, 2, [4, 4, 4])


def test_block_sampler_is_uniform_and_resumable():
    s = BlockSampler(3, seed=0)
    draws = [s.sample() for _ in range(3000)]
    counts = [draws.count(b) for b in range(3)]
    assert all(900 < c < 1100 for c in counts)
    state = s.state_dict()
    ahead = [s.sample() for _ in range(20)]
    s2 = BlockSampler(3, seed=99)
    s2.load_state_dict(state)
    assert [s2.sample() for _ in range(20)] == ahead


def tiny_vit(conditioned=True, depth=6):
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=28, patch_size=7, hidden=32, depth=depth, heads=2, mlp_dim=64), conditioned)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_dblocks_step_touches_only_its_block_and_the_shared_modules(block, tiny_task):
    task = tiny_task("dblocks")
    torch.manual_seed(0)
    model = task.build_model()
    # make every layer non-trivial (adaLN-Zero starts at zero, which would hide a leak)
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    layout, partition = task.layout, task.partition
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(10, (16,))
    sigma = partition.sample_training_sigma(block, 16, g)
    loss, _ = task.loss(model, (x, y), sigma=sigma, layers=layout.layers_of(block), generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mine = {f"layers.{i}." for i in layout.layers_of(block)}
    for name, p in model.named_parameters():
        if name.startswith("layers.") and not any(name.startswith(m) for m in mine):
            assert p.grad is None, f"{name} of another block received a gradient"
    opt.step()
    for name, p in model.named_parameters():
        in_layers = name.startswith("layers.")
        if in_layers and not any(name.startswith(m) for m in mine):
            assert torch.equal(p, before[name]), f"{name} of another block changed"
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith(f"layers.{layout.layers_of(block).start}.") for n in changed)
    assert any(n.startswith("label_embed") for n in changed) and any(n.startswith("patch_embed") for n in changed)


def test_other_blocks_do_not_affect_this_blocks_output(tiny_task):
    task = tiny_task("dblocks")
    model = task.build_model().eval()
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    layout = task.layout
    x, z, s = torch.randn(4, 1, 28, 28), torch.randn(4, 32), torch.full((4,), 0.3)
    out = task.logits(model, x, z, s, layout.layers_of(0))
    with torch.no_grad():
        for p in model.layers[4].parameters():
            p.add_(1.0)
    assert torch.equal(task.logits(model, x, z, s, layout.layers_of(0)), out)
    assert not torch.equal(task.logits(model, x, z, s, layout.layers_of(2)), task.logits(model, x, z, s, layout.layers_of(0)))


def test_weightings():
    ce = torch.tensor([1.0, 2.0, 3.0])
    sigma = torch.tensor([0.01, 0.5, 10.0])
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert weighted_loss(ce, sigma, 0.5, "lambda") == pytest.approx(float((lam * ce).mean()))
    # the official code's (N,)·(N,1) broadcast: the mean of the outer product is mean(CE)·mean(λ)
    assert weighted_loss(ce, sigma, 0.5, "official") == pytest.approx(float((ce * lam[:, None]).mean()))
    assert weighted_loss(ce, sigma, 0.5, "uniform") == pytest.approx(2.0)


def test_e2e_and_dblocks_build_the_plain_and_the_conditioned_model(tiny_task):
    assert not tiny_task("e2e").build_model().conditioned
    assert tiny_task("dblocks").build_model().conditioned
    assert tiny_task("dblocks", "diffusion.num_blocks=2").layout.layers_per_block == (3, 3)


def test_plain_and_conditioned_vit_shapes():
    x = torch.randn(3, 1, 28, 28)
    assert tiny_vit(conditioned=False)(x).shape == (3, 10)
    model = tiny_vit()
    F, cond = model.denoiser_output(x, torch.randn(3, 32), torch.zeros(3), range(0, 2))
    assert F.shape == (3, 32) and cond.shape == (3, 32)
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(image_size=28, patch_size=5)
