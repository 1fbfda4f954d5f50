"""The NoProp-DT CNN (bench/models/noprop.py) under the harness's model protocol: shapes, every
module the identity at init, a DiffusionBlocks step touching only its block (weights and batch-norm
statistics), the memory meter, the config checks, a few-step training run on real Fashion-MNIST
through the trainer, and the paper-scale suite stopping at once without CIFAR-100."""

from pathlib import Path

import pytest
import torch

from bench.cli import main as bench_main
from bench.config import ConfigError, load_config
from bench.models import ARCHS
from bench.models.noprop import NoProp, NoPropConfig
from bench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(image_size=28, in_channels=1, num_classes=10, hidden=16, depth=3, conv_channels=[4, 8], image_dim=16,
            label_dim=16, time_freq_dim=8, time_dim=8, fuse_dims=[16, 8])

PARAMS = """
suite: tinynoprop
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 200, test_subset: 60, val_subset: 40, val_fraction: 0.1}}
model: {{arch: noprop, image_size: 28, in_channels: 1, num_classes: 10, hidden: 16, depth: 3, conv_channels: [4, 8],
         image_dim: 16, label_dim: 16, time_freq_dim: 8, time_dim: 8, fuse_dims: [16, 8]}}
diffusion: {{num_blocks: 3, gamma: 0.1, inference_steps: {steps}}}
train: {{epochs: 1.0, batch_size: 32, lr: 2.0e-3, ckpt_every: 100, curve_points: 1, threads: 1}}
eval: {{batch_size: 100, final_variants: []}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


def params(tmp_path, root, steps=10) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=root, steps=steps))
    return p


def model(conditioned=True, **kw):
    torch.manual_seed(0)
    return NoProp(NoPropConfig(**{**TINY, **kw}), conditioned)


def perturbed(m):
    """Every weight moved off its initial value (zero-initialised output layers would hide a leak)."""
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("size, channels, convs", [(28, 1, [4, 8]), (32, 3, [4, 8, 8])])
def test_shapes_of_both_uses(size, channels, convs):
    x = torch.randn(5, channels, size, size)
    kw = dict(image_size=size, in_channels=channels, conv_channels=convs)
    assert model(False, **kw)(x).shape == (5, 10)
    F, cond = model(**kw).denoiser_output(x, torch.randn(5, 16), torch.zeros(5), range(0, 2))
    assert F.shape == (5, 16) and cond.shape == (5, 8)
    assert ARCHS["noprop"] == (NoPropConfig, NoProp)


def test_no_batch_norm_of_the_plain_arm_sees_a_batch_constant_input():
    """h₀ is one learned vector for every sample: a batch norm over it has zero variance, its running
    variance decays to 0 and evaluation divides by √eps (the E2E arm then scored 10% on Fashion-MNIST)."""
    m, seen = model(False).train(), {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].var(0).max().item()))
    m(torch.randn(8, 1, 28, 28))
    assert seen and min(seen.values()) > 0, {k: v for k, v in seen.items() if v == 0}


def test_every_module_starts_as_the_identity_and_the_head_at_zero():
    m = model().train()
    x, z, c = torch.randn(6, 1, 28, 28), torch.randn(6, 16), torch.linspace(-1.5, 1.1, 6)
    F, cond = m.denoiser_output(x, z, c, range(0, 3))
    assert torch.equal(F, z) and torch.equal(m.head(F, cond), torch.zeros(6, 10))
    F, _ = model(zero_init=False).denoiser_output(x, z, c, range(0, 3))
    assert not torch.allclose(F, z)


def test_sigma_enters_each_module_through_its_time_path():
    m = perturbed(model()).eval()
    x, z = torch.randn(4, 1, 28, 28), torch.randn(4, 16)
    low, _ = m.denoiser_output(x, z, torch.full((4,), -1.0), range(0, 1))
    high, _ = m.denoiser_output(x, z, torch.full((4,), 1.0), range(0, 1))
    assert not torch.allclose(low, high)
    assert model(False).layers[0].time is None and m.layers[0].time is not None


@pytest.fixture
def task(tmp_path):
    return make_task(load_config(params(tmp_path, tmp_path / "data"), "dblocks"))


@pytest.mark.parametrize("block", [0, 1, 2])
def test_a_dblocks_step_trains_only_its_own_module_and_the_shared_ones(task, block):
    torch.manual_seed(0)
    m = perturbed(task.build_model()).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stats = {n: b.clone() for n, b in m.named_buffers()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(10, (16,))
    loss, _ = task.loss(m, (x, y), sigma=task.partition.sample_training_sigma(block, 16, g),
                        layers=task.layout.layers_of(block), generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    mine = f"layers.{task.layout.layers_of(block).start}."
    for name, p in m.named_parameters():
        if name.startswith("layers.") and not name.startswith(mine):
            assert p.grad is None, f"{name} of another block received a gradient"
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert not {n for n in changed if n.startswith("layers.") and not n.startswith(mine)}
    assert any(n.startswith(mine) for n in changed) and {"label_embed.weight", "classifier.weight"} <= changed
    moved = {n for n, b in m.named_buffers() if not torch.equal(b, stats[n])}   # batch-norm statistics too
    assert moved and all(n.startswith(mine) for n in moved)


def test_other_blocks_do_not_affect_this_blocks_output(task):
    m = perturbed(task.build_model()).eval()
    x, z, s = torch.randn(4, 1, 28, 28), torch.randn(4, 16), torch.full((4,), 0.3)
    out = task.logits(m, x, z, s, task.layout.layers_of(0))
    with torch.no_grad():
        for p in m.layers[2].parameters():
            p.add_(1.0)
    assert torch.equal(task.logits(m, x, z, s, task.layout.layers_of(0)), out)


def test_the_memory_meter_measures_both_arms(tmp_path):
    from bench.benchmark import measure, variant
    base = load_config(params(tmp_path, tmp_path / "data"), "dblocks")
    e2e = measure(variant(base, "e2e", 1, 32, "resident"), torch.device("cpu"), time_steps=0)
    offload = measure(variant(base, "dblocks", 3, 32, "offload"), torch.device("cpu"), time_steps=0)
    resident = measure(variant(base, "dblocks", 3, 32, "resident"), torch.device("cpu"), time_steps=0)
    assert offload["parameters"] < resident["parameters"] and offload["host_parked_bytes"] > 0
    assert offload["peak_bytes"] < e2e["peak_bytes"]


@pytest.mark.parametrize("override, says", [
    ("model.conv_channels=[]", "conv_channels must be a non-empty list"),
    ("model.norm=group", "unknown norm 'group'"),
    ("model.image_size=3", "too small for 2 2×2 poolings"),
    ("model.time_freq_dim=7", "must be even"),
    ("model.depth=2", "larger than the number of layers"),
])
def test_bad_model_settings_are_one_line_before_anything_runs(tmp_path, override, says):
    with pytest.raises(ConfigError) as e:
        load_config(params(tmp_path, tmp_path / "data"), "dblocks", [override])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_few_steps_through_the_trainer_on_fashion_mnist(tmp_path, fashion_root):
    from bench.train import train
    p = params(tmp_path, fashion_root, steps=1000)   # the suite's 1000 Euler steps at inference
    for arm, steps in (("e2e", 200 // 32), ("dblocks", 3 * (200 // 32))):   # train_subset 200
        cfg = load_config(p, arm)
        summary = train(cfg, progress=False, log=lambda *_: None)
        assert summary["optimizer_steps"] == steps and 0.0 <= summary["test_acc"] <= 1.0
        assert (Path(cfg.out_dir) / "final.pt").is_file()


def test_the_paper_suite_stops_at_once_without_cifar100(capsys):
    rc = bench_main(["prepare", str(ROOT / "suites/noprop_cifar100/params.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "CIFAR-100 not found" in err and "data/cifar100" in err
