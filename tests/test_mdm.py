"""Masked diffusion (MD4) with DiffusionBlocks: t-partition, loss weight, ELBO estimator, model, task."""

import math
import os
from pathlib import Path

import pytest
import torch

from bench.config import ConfigError, load_config
from bench.data.text import TextSpec, prepare_text
from bench.diffusion import MaskingSchedule, make_masking_partition, md4_nelbo, sample_t
from bench.diffusion.masking import (ancestral_step, mask_tokens, masked_ce_sum, masking_edges, mc_mean_stderr,
                                     sample_masked)
from bench.models.mdm import MDM, MDMConfig
from bench.splits import TestSealed, selection
from bench.tasks import make_task
from bench.train import train

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = [MaskingSchedule("linear"), MaskingSchedule("cosine"), MaskingSchedule("poly2")]


# ---- the schedule and the t partition ---------------------------------------------------------
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.kind)
def test_schedule_weight_is_minus_dalpha_over_one_minus_alpha(s):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(s.dalpha(t), numeric, atol=1e-6)
    assert torch.allclose(s.weight(t), -numeric / (1 - s.alpha(t)), rtol=1e-5)
    assert float(s.alpha(0.0)) == pytest.approx(1) and float(s.alpha(1.0)) == pytest.approx(0, abs=1e-12)
    assert torch.allclose(s.alpha_inv(s.alpha(t)), t, atol=1e-9)
    if s.kind == "linear":
        assert torch.allclose(s.weight(t), 1 / t)                       # MD4: w(t) = 1/t


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_equal_mass_partition(s, B):
    p = make_masking_partition(B, "equiprobable", 0.0, s)
    assert p.edges[0] == 0 and p.edges[-1] == 1
    assert [p.mass(b) for b in range(B)] == pytest.approx([1 / B] * B, abs=1e-12)   # equal demasking work
    if s.kind == "linear":
        assert p.edges == pytest.approx([k / B for k in range(B + 1)])              # t_b = b/B (paper App. D)


def test_block_ownership_overlap_and_sampling():
    p = make_masking_partition(3, "equiprobable", 0.05)
    # block 0 = first layers = highest noise (t near 1), as for σ
    assert p.interval(0) == pytest.approx((2 / 3, 1)) and p.interval(2) == pytest.approx((0, 1 / 3))
    # γ in t: each end moves out by γ·width, clipped to [0, 1]
    assert p.training_range(0) == pytest.approx((2 / 3 - 1 / 60, 1))
    assert p.training_range(1) == pytest.approx((1 / 3 - 1 / 60, 2 / 3 + 1 / 60))
    assert p.training_range(2) == pytest.approx((0, 1 / 3 + 1 / 60))
    assert p.training_mass(1) == pytest.approx(1 / 3 * 1.1)
    # a boundary belongs to the higher-noise block; the ends to the end blocks
    assert [p.block_of(t) for t in (0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9, 1.0)] == [2, 2, 1, 1, 0, 0, 0]
    assert p.blocks_of(torch.tensor([0.1, 0.5, 0.9])).tolist() == [2, 1, 0]
    g = torch.Generator().manual_seed(0)
    for b in range(3):
        lo, hi = p.training_range(b)
        t = p.sample_training_sigma(b, 1000, g)
        assert t.dtype == torch.float64 and lo <= t.min() and t.max() < hi
        # antithetic draws are stratified: exactly one in each of the n equal cells of the range
        cells = torch.floor((t - lo) / (hi - lo) * 1000).long()
        assert sorted(cells.tolist()) == list(range(1000))
    u = sample_t(10_000, generator=g, antithetic=False)
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert make_masking_partition(2, "linear", 0, MaskingSchedule("poly2")).edges == (0, 0.5, 1)
    assert make_masking_partition(3, "explicit", 0, edges=[0.2, 0.5]).edges == (0, 0.2, 0.5, 1)
    with pytest.raises(ValueError):
        masking_edges(MaskingSchedule(), 3, "explicit", [0.5, 0.2])
    with pytest.raises(ValueError, match="no partition 'log-uniform'"):
        masking_edges(MaskingSchedule(), 3, "log-uniform")


# ---- forward process, loss weighting, the ELBO estimator --------------------------------------
def test_masking_rate_follows_alpha():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 20_000, dtype=torch.long)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=torch.float64)
    z, masked = mask_tokens(x, t, MaskingSchedule(), mask_id=9, generator=g)
    assert (z[masked] == 9).all() and (z[~masked] == 0).all()
    assert masked.float().mean(1).tolist() == pytest.approx([0, 0.25, 0.7, 1], abs=0.01)


def test_md4_loss_weighting():
    s = MaskingSchedule()
    ce = torch.tensor([2.0, 3.0, 0.0])
    t = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)
    # w(t)·Σ CE; a sequence with nothing masked (even at t = 0, where w = ∞) contributes exactly 0
    assert md4_nelbo(ce, t, s).tolist() == pytest.approx([4.0, 12.0, 0.0])
    assert md4_nelbo(ce, t, MaskingSchedule("poly2")).tolist() == pytest.approx([2 * 2 / 0.5, 3 * 2 / 0.25, 0])


class Unigram(torch.nn.Module):
    """Predicts a fixed distribution q at every position, whatever it sees."""

    def __init__(self, q):
        super().__init__()
        self.logq = torch.log(torch.as_tensor(q, dtype=torch.float32))

    def forward(self, z, t, layers=None):
        return self.logq.expand(z.shape[0], z.shape[1], -1)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.kind)
def test_elbo_estimator_is_unbiased_on_a_computable_case(s):
    """For a predictor that ignores its input, w(t)·E[Σ_masked CE] = −α′(t)·Σ_i −log q(x_i), and
    ∫₀¹ −α′ = 1: the negative ELBO is exactly Σ_i −log q(x_i), for every schedule."""
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.5, 0.3, 0.2])
    x = torch.multinomial(q, 32 * 64, replacement=True, generator=g).view(32, 64)
    exact = (-torch.log(q)[x]).sum(1).double()
    K = 200
    draws = torch.zeros(32, K, dtype=torch.float64)
    model = Unigram(q)
    for k in range(K):
        t = torch.rand(32, dtype=torch.float64, generator=g)
        z, masked = mask_tokens(x, t, s, mask_id=3, generator=g)
        draws[:, k] = md4_nelbo(masked_ce_sum(model(z, t), x, masked), t, s).double()
    mean, se = mc_mean_stderr(draws)
    assert abs(mean - float(exact.mean())) < 4 * se and se < 0.03 * mean
    # the standard error given the items: per-item spread only, not the spread between items
    assert mc_mean_stderr(exact[:, None].expand(-1, 2))[1] == 0


def test_sampler_reveals_every_token_and_follows_the_predictor():
    p = make_masking_partition(3, "equiprobable", 0.05)
    seen = []

    def predict(z, t, block):
        seen.append((t, block))
        probs = torch.zeros(z.shape[0], z.shape[1], 5)
        probs[..., 3] = 1
        return probs

    z = sample_masked(predict, 2, 16, 6, p, mask_id=5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert (z == 3).all()
    assert [b for _, b in seen] == [0, 0, 1, 1, 2, 2] and seen[0][0] == 1.0
    z = torch.full((1, 1000), 5)
    probs = torch.zeros(1, 1000, 5)
    probs[..., 1] = 1
    out = ancestral_step(z, probs, 1.0, 0.75, MaskingSchedule(), 5, torch.Generator().manual_seed(0))
    assert abs(float((out == 1).float().mean()) - 0.25) < 0.05 and set(out.unique().tolist()) == {1, 5}


# ---- the model -------------------------------------------------------------------------------
def tiny_model(**kw):
    torch.manual_seed(0)
    return MDM(MDMConfig(**{"vocab_size": 11, "seq_len": 16, "hidden": 32, "depth": 6, "heads": 2, "cond_dim": 16, **kw}))


def test_model_starts_uniform_and_as_identity_layers():
    m = tiny_model()
    z = torch.randint(0, 12, (3, 16))
    logits = m(z, torch.rand(3))
    assert logits.shape == (3, 16, 11) and torch.all(logits == 0)      # zero-init head: uniform prediction
    x = m.stem(z)
    assert torch.equal(m.run_layers(x, range(6), m.condition(torch.rand(3))), x)   # adaLN-Zero


def randomise(m):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_gradient_locality_per_block():
    """A DiffusionBlocks step touches one block's layers plus the shared stem, t embedder and head."""
    m = tiny_model()
    randomise(m)
    z, t = torch.randint(0, 12, (2, 16)), torch.rand(2)
    for block, layers in enumerate((range(0, 2), range(2, 4), range(4, 6))):
        m.zero_grad(set_to_none=True)
        m(z, t, layers).sum().backward()
        for i, layer in enumerate(m.layers):
            grads = [p.grad for p in layer.parameters()]
            if i in layers:
                assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), (block, i)
            else:
                assert all(gr is None for gr in grads), (block, i)
        for shared in (m.tok_embed, m.time_embed, m.final_adaLN, m.out):
            assert all(p.grad is not None for p in shared.parameters())


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        m = tiny_model()
        randomise(m)
        m.grad_checkpointing = ckpt
        m(torch.arange(16).view(1, 16) % 12, torch.tensor([0.4]), range(1, 4)).square().sum().backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in m.parameters()])
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


# ---- the task on real Shakespeare -------------------------------------------------------------------------------
PARAMS = """
suite: tiny_mdm
task: masked_lm
runs_dir: {tmp}/runs
data: {{dataset: shakespeare, root: {root}, seq_len: 32, train_subset: 512, val_subset: 16, test_subset: 16}}
model: {{arch: mdm, seq_len: 32, hidden: 32, depth: 6, heads: 2, cond_dim: 16}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
train: {{batch_size: 32, epochs: 1, lr: 3.0e-3, warmup_epochs: 0.1, curve_points: 2, ckpt_every: 10, threads: 2}}
eval: {{batch_size: 16, curve_sequences: 8, final_t_draws: 3, samples: 2, sample_steps: 8, samples_dir: {tmp}/results}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture(scope="module")
def shakespeare_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mdmdata")
    (ROOT / "data" / "downloads").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT / "data" / "downloads", root / "downloads")
    prepare_text(TextSpec("shakespeare"), root, log=lambda *_: None)
    return root


@pytest.fixture
def params(tmp_path, shakespeare_root):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(tmp=tmp_path, root=shakespeare_root))
    return p


def test_untrained_model_has_the_uniform_bpc_and_both_routes_agree(params):
    """An untrained model predicts uniformly, so its ELBO is exactly log2(V) bits per character,
    on either split, each under its own names."""
    for arm in ("e2e", "dblocks"):
        task = make_task(load_config(params, arm))
        task.check()
        task.load()
        torch.manual_seed(0)
        model = task.build_model()
        for split, key in (("val", "val_bpc"), ("test", "test_bpc")):
            r = task.evaluate(model, torch.device("cpu"), split=split)
            assert set(r) == {key, f"{key}_se"}
            assert r[key] == pytest.approx(math.log2(84), abs=4 * r[f"{key}_se"]) and r[f"{key}_se"] > 0
    assert task.partition.num_blocks == 3 and task.partition.interval(0) == pytest.approx((2 / 3, 1))


@pytest.mark.parametrize("weighting", ["lambda", "uniform"])
def test_training_loss_is_eq8_per_token_or_the_mean_masked_ce(params, weighting):
    """The task's training loss on a real batch: the MD4 weight w(t)·Σ_masked CE per sequence,
    averaged over sequences and divided by the length (`lambda`), or the mean CE over masked
    tokens (`uniform`); the masks come from the caller's generator."""
    task = make_task(load_config(params, "dblocks", [f"diffusion.weighting={weighting}"]))
    task.check()
    task.load()
    torch.manual_seed(0)
    model = task.build_model()
    x = task.batch(torch.arange(4), seed=0, device=torch.device("cpu"))
    t = torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64)
    layers = task.layout.layers_of(1)
    loss, logs = task.loss(model, x, sigma=t, layers=layers, generator=torch.Generator().manual_seed(5))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z, masked = mask_tokens(x, t, task.schedule, task.mask_id, u=u)
    ce = masked_ce_sum(model(z, t, layers), x, masked)
    mean_ce = ce.sum() / masked.sum()
    expected = md4_nelbo(ce, t, task.schedule).mean() / x.shape[1] if weighting == "lambda" else mean_ce
    assert torch.allclose(loss, expected) and torch.allclose(logs["ce"], mean_ce)
    assert masked.sum() > 0 and loss.requires_grad and not logs["ce"].requires_grad


def test_a_sealed_test_split_leaves_validation_scoreable(params):
    """Inside a selection the task loads and scores validation, but never opens test."""
    task = make_task(load_config(params, "dblocks"))
    torch.manual_seed(0)
    model = task.build_model()
    with selection("test"):
        task.check()
        task.load()
        r = task.evaluate(model, torch.device("cpu"), split="val")
        assert r["val_bpc"] > 0 and not any(k.startswith("test") for k in r)
        with pytest.raises(TestSealed, match="sealed during test"):
            task.test_data()
        with pytest.raises(TestSealed):
            task.evaluate(model, torch.device("cpu"), split="test")
    # validation and test are different text: the same windows of each hold other tokens
    assert task.val_data.split == "val" and task.test_data().split == "test"
    assert (task.val_data.tokens[:256] != task.test_data().tokens[:256]).any()


def test_training_learns_resumes_exactly_and_writes_samples(params, tmp_path):
    cfg = load_config(params, "dblocks")
    s = train(cfg, progress=False, log=lambda *_: None)
    assert s["optimizer_steps"] == 3 * 16 and s["test_bpc"] < math.log2(84) - 0.5 and s["val_bpc"] < math.log2(84) - 0.5
    # killed after its step-20 checkpoint and resumed: the same weights as the uninterrupted run
    again = load_config(params, "dblocks")
    again.out_dir = str(tmp_path / "again")
    from bench.tasks.masked_lm import MaskedLMTask
    real, calls = MaskedLMTask.loss, []

    def loss_then_die(self, *a, **k):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    MaskedLMTask.loss = loss_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(again, progress=False, log=lambda *_: None)
    finally:
        MaskedLMTask.loss = real
    train(again, resume=True, progress=False, log=lambda *_: None)
    a = torch.load(Path(cfg.out_dir) / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "again" / "final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the final evaluation: standard error, per-range BPC summing to the total, samples on disk
    from bench.evaluate import evaluate_arm
    ev = evaluate_arm(cfg, log=lambda *_: None)
    for split in ("val", "test"):   # the final evaluation scores both, each under its own names
        parts = [v for k, v in ev.items() if k.startswith(f"{split}_bpc@t")]
        assert len(parts) == 3 and sum(parts) == pytest.approx(ev[f"{split}_bpc"])
        assert ev[f"{split}_bpc_se@3draws"] == ev[f"{split}_bpc_se"] > 0 and ev[f"{split}_sequences"] == 16
    assert ev["val_bpc"] != ev["test_bpc"] and ev["val_chars_per_token"] == ev["chars_per_token"] == 1
    samples = (tmp_path / "results" / "tiny_mdm" / "samples_dblocks.md").read_text()
    assert samples.count("## Passage") == 2 and "B = 3" in samples


def test_bad_input_is_one_line_before_compute(params, tmp_path):
    with pytest.raises(ConfigError, match=r"num_blocks=7 is larger than the number of layers \(6\)"):
        load_config(params, "dblocks", ["diffusion.num_blocks=7"])
    with pytest.raises(ConfigError, match="diffusion.P_mean does not apply"):
        load_config(params, "dblocks", ["diffusion.P_mean=0.5"])
    with pytest.raises(ConfigError, match="must be one of equiprobable, linear, explicit"):
        load_config(params, "dblocks", ["diffusion.partition=log-uniform"])
    with pytest.raises(ConfigError, match="data.seq_len 64 must be between 1 and model.seq_len 32"):
        load_config(params, "dblocks", ["data.seq_len=64"])
    task = make_task(load_config(params, "e2e", ["data.seq_len=300000", "model.seq_len=300000", "data.random_offset=false"]))
    with pytest.raises(ConfigError, match=r"data.seq_len 300000 is larger than the val split of shakespeare_char \(259,904 tokens\)"):
        task.check()
    with pytest.raises(ConfigError, match="model.vocab_size 50 differs from the prepared data's 84"):
        make_task(load_config(params, "e2e", ["model.vocab_size=50"])).check()
    from bench.data.images import DatasetMissing
    with pytest.raises(DatasetMissing, match=f"text8 not found at {tmp_path}/t8"):
        make_task(load_config(params, "e2e", ["data.dataset=text8", f"data.source={tmp_path}/t8",
                                              "data.split_by=standard"])).check()
