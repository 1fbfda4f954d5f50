"""Speed switches (bench.parallelize): bf16 autocast agrees with fp32 on CPU, fp16 steps with a
GradScaler, the EMA is saved and scored beside the raw weights, per-layer compile is wired."""

import math

import pytest
import torch

from bench import seeding
from bench.config import ConfigError, load_config
from bench.evaluate import evaluate_arm
from bench.tasks import make_task
from bench.train import build_model, forward_loss, train

PARAMS = """
suite: tiny
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 256, test_subset: 200}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 4, heads: 2, mlp_dim: 64, dropout: 0.0}}
diffusion: {{num_blocks: 2, gamma: 0.05}}
train: {{epochs: 1.0, batch_size: 32, lr: 2.0e-3, ckpt_every: 1000, curve_points: 1, threads: 1}}
eval: {{batch_size: 200}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture
def params(tmp_path, fashion_root):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=fashion_root))
    return p


@pytest.mark.parametrize("arm", ["e2e", "dblocks"])
def test_bf16_autocast_loss_is_finite_and_close_to_fp32(params, arm):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(params, arm, [f"train.precision={precision}"])
        task = make_task(cfg)
        task.load()
        torch.manual_seed(0)
        model = build_model(cfg, task)
        with torch.no_grad():   # adaLN-Zero starts at F = 0, where every precision gives the same loss
            for w in model.parameters():
                w.add_(0.05 * torch.randn_like(w))
        batch = task.batch(torch.arange(32), seed=0, device=torch.device("cpu"))
        loss, _, _ = forward_loss(cfg, task, model, batch, 0 if cfg.is_dblocks else None, seeding.generator(0, "noise"))
        loss.backward()
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
        losses[precision] = loss.item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    assert losses["bf16"] != losses["fp32"]   # autocast really ran in bf16


def test_fp16_with_grad_scaler_trains_finite(params):
    s = train(load_config(params, "dblocks", ["train.precision=fp16", "train.epochs=0.25"]), progress=False,
              log=lambda *_: None)
    assert s["optimizer_steps"] == 4 and math.isfinite(s["val_acc"])


def test_ema_is_saved_and_evaluated_beside_the_raw_weights(params):
    cfg = load_config(params, "e2e", ["train.ema=0.9"])
    train(cfg, progress=False, log=lambda *_: None)
    final = torch.load(f"{cfg.out_dir}/final.pt", weights_only=False)
    assert set(final["ema"]) == set(final["model"])
    assert any(not torch.equal(final["ema"][k], w) for k, w in final["model"].items())
    ev = evaluate_arm(cfg, log=lambda *_: None)
    assert {"val_acc", "val_acc@ema", "test_acc", "test_acc@ema"} <= set(ev)


def test_bad_precision_and_ema_fail_before_compute(params):
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(params, "e2e", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.ema"):
        load_config(params, "e2e", ["train.ema=1.5"])


def test_compile_compiles_each_layer_in_place(params):
    from bench.parallelize import parallelize
    cfg = load_config(params, "dblocks", ["train.compile=true"])
    task = make_task(cfg)
    model = parallelize(build_model(cfg, task), cfg)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.layers)
