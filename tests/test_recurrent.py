"""Recurrent-depth LM: recurrence sampling, truncated BPTT, causality, the K → σ mapping, compute, bad input."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import seeding
from bench.config import ConfigError, load_config
from bench.data.text import TextSpec, prepare_text
from bench.diffusion import LogNormalNoise, sigmas_equiprobable
from bench.models.recurrent import RecurrentConfig, RecurrentLM
from bench.splits import metric_on
from bench.tasks import make_task
from bench.tasks.recurrent import sample_recurrence

ROOT = Path(__file__).resolve().parents[1]
V = 13


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def _model(conditioned: bool) -> RecurrentLM:
    torch.manual_seed(0)
    m = RecurrentLM(RecurrentConfig(vocab_size=V, seq_len=32, hidden=16, heads=2, cond_dim=8), conditioned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # wake the zero-initialised adaLN and head so every path carries signal
        for name, p in m.named_parameters():
            if "adaLN" in name or name.startswith("out"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def test_recurrence_distribution_is_huginns_with_the_configured_mean():
    r = np.array([sample_recurrence(s, 32, 0.5) for s in range(4000)])
    assert r.min() >= 1 and abs(r.mean() - 32) < 1.0 and r.std() > 10       # heavy-tailed, mean 32
    assert sample_recurrence(7, 32, 0.5) == sample_recurrence(7, 32, 0.5)     # a function of the step's seed
    assert sample_recurrence(3, 1, 0.5) == 1


@pytest.mark.parametrize("r,k", [(6, 2), (3, 8)])
def test_truncated_bptt_backpropagates_through_the_last_k_iterations(r, k):
    model = _model(False)
    calls = []
    model.layers[model.cfg.prelude].register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    x = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(0))
    s0 = torch.randn(2, 5, 16, requires_grad=True)
    model(x, r, s0, bptt=k).sum().backward()
    assert len(calls) == r                                           # every iteration runs the core once
    assert calls == [False] * max(0, r - k) + [True] * min(r, k)     # only the last k are recorded
    assert (s0.grad is None) == (r > k)                              # the initial state is cut off when r > k
    assert model.layers[0].attn.qkv.weight.grad.abs().sum() > 0      # the prelude learns through e


@pytest.mark.parametrize("conditioned", [False, True])
def test_recurrent_model_is_causal(conditioned):
    model = _model(conditioned).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(V, (2, 6), generator=g)
    x2 = x.clone()
    x2[:, 3] = (x2[:, 3] + 1) % V
    with torch.no_grad():
        if conditioned:
            z = torch.randn(2, 6, 16, generator=g)
            z2 = z.clone()
            z2[:, 4] += 3.0
            cn = torch.randn(2, generator=g)
            out = lambda t, zz: model.denoiser_output(*model.context(t), zz, cn)[0]
            d_tok = (out(x, z) - out(x2, z)).abs().amax(dim=(0, 2))
            d_z = (out(x, z) - out(x, z2)).abs().amax(dim=(0, 2))
            assert (d_z[:4] == 0).all() and (d_z[4:] > 0).all()          # the noisy state at 4 reaches ≥ 4 only
        else:
            s0 = torch.randn(2, 6, 16, generator=g)
            d_tok = (model(x, 3, s0) - model(x2, 3, s0)).abs().amax(dim=(0, 2))
    assert (d_tok[:3] == 0).all() and (d_tok[3:] > 0).all()


def test_k_iterations_map_to_the_equal_probability_sigma_grid():
    noise = LogNormalNoise()
    s = sigmas_equiprobable(noise, 8)
    assert len(s) == 8 and float(s[0]) == noise.sigma_max and float(s[-1]) == noise.sigma_min
    assert (s[1:] < s[:-1]).all()
    q = (noise.cdf(s) - noise.q_min) / (noise.q_max - noise.q_min)           # equally likely steps
    assert torch.allclose(q, torch.linspace(1, 0, 8, dtype=torch.float64), atol=1e-9)


# ---- the task on real Shakespeare -------------------------------------------------------------------------------
PARAMS = """
suite: tiny_rec
task: recurrent
runs_dir: {tmp}/runs
data: {{dataset: shakespeare, root: {root}, seq_len: 16, train_subset: 256, val_subset: 8, test_subset: 8}}
model: {{arch: recurrent, seq_len: 40, hidden: 16, heads: 2, mean_recurrence: 6, bptt: 2}}
diffusion: {{num_blocks: 1, gamma: 0.0}}
train: {{batch_size: 16, epochs: 1, lr: 3.0e-3, warmup_epochs: 0.1, curve_points: 2, ckpt_every: 100, threads: 1}}
eval: {{batch_size: 32, curve_ppl_sequences: 4, ppl_sequences: 8, prompt_len: 8, gen_len: 8, recurrence: 4,
        recurrence_variants: [4], noise_draws: 2, mauve: false, samples_dir: {tmp}/results}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks, train.epochs: 3}}
"""


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recdata")
    (ROOT / "data" / "downloads").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT / "data" / "downloads", root / "downloads")
    prepare_text(TextSpec("shakespeare"), root, log=lambda *_: None)
    p = root / "params.yaml"
    p.write_text(PARAMS.format(tmp=root, root=root))
    return p


def test_compute_accounting_counts_every_unrolled_iteration(params):
    """Compute counts, and the sample figures under the scorers (RNN reference, n-gram) with the
    shared decoding, at the arm's K and as K variants."""
    from bench.evaluate import evaluate_arm
    from bench.models.rnn_lm import main as train_rnn_reference
    from bench.train import train
    quiet = dict(progress=False, log=lambda *_: None)
    rnn = params.parent / "rnn" / "final.pt"
    train_rnn_reference([str(params), "--out", str(rnn), "--steps", "10", "--hidden", "16", "--batch-size", "8",
                         "--seq-len", "16", "--warmup-steps", "2", "--val-windows", "4", "--log-every", "0"])
    scored = [f"eval.rnn_reference={rnn}", "eval.ngram_order=3", "eval.ngram_train_tokens=50000", "eval.mauve=true",
              "eval.prompts=20", "eval.continuations=1", "eval.curve_prompts=20"]
    e2e, db = load_config(params, "e2e", scored), load_config(params, "dblocks", scored)
    s_e2e, s_db = train(e2e, **quiet), train(db, **quiet)
    ev_e2e, ev_db = evaluate_arm(e2e, log=lambda *_: None), evaluate_arm(db, log=lambda *_: None)
    steps = s_e2e["optimizer_steps"]
    assert steps == 16 and s_db["optimizer_steps"] == 48
    rs = [sample_recurrence(seeding.stream_seed(0, "augment", k), 6, 0.5) for k in range(steps)]
    assert ev_e2e["train_layer_evals@total"] == sum(2 + 4 * r + 2 for r in rs)            # every iteration counted
    assert s_e2e["layer_evals"] == ev_e2e["train_layer_evals@total"]                      # by the trainer too
    assert s_db["layer_evals"] == 48 * 8
    assert ev_e2e["train_backward_layer_evals@total"] == sum(2 + 4 * min(r, 2) + 2 for r in rs)
    assert ev_db["train_layer_evals@total"] == ev_db["train_backward_layer_evals@total"] == 48 * 8
    # e2e infers at its training mean r̄ = 6 (eval.recurrence 4 is the denoiser's K), and at K = 4 as a variant
    assert ev_e2e["inference_recurrence"] == 6 and ev_e2e["infer_layer_evals@per_token"] == 2 + 4 * 6 + 2
    assert ev_db["infer_layer_evals@per_token"] == 2 + (4 + 2) * 4 and ev_db["inference_steps"] == 4
    assert ev_db["inference_recurrence"] == 4 and not any("@K" in k or ",K" in k for k in ev_db)   # its own K
    # the ranking figure: MAUVE under the RNN reference, both arms decoded alike; K variants name their scorer
    assert ev_e2e["metric"] == ev_db["metric"] == s_e2e["metric"] == "mauve@rnn"
    assert ev_e2e["decoding"] == "K = 6 core iterations, top-p 0.95 decoding"
    assert ev_db["decoding"].endswith("(K = 4 iterations), top-p 0.95 decoding of the final logits")
    for ev in (ev_e2e, ev_db):
        assert 0 <= ev["mauve@rnn"] <= 1 and ev["gen_ppl@ngram"] > 1 and ev["gen_ppl@data,rnn"] > 1
        assert {"mauve@rnn,greedy", "gen_ppl@ngram,paper", "distinct4@gen,greedy"} <= set(ev)
        assert "val_gen_ppl@ngram,paper" not in ev   # variants: test only (reported, never chosen among)
    assert ev_db["mauve@rnn,paper"] == ev_db["mauve@rnn,greedy"] and ev_e2e["mauve@rnn,paper"] == ev_e2e["mauve@rnn"]
    assert {"gen_ppl@ngram,K4", "mauve@rnn,K4", "distinct4@gen,K4"} <= set(ev_e2e) and "val_test_ppl@K4" not in ev_e2e
    for split in ("val", "test"):
        ppl = metric_on("test_ppl", split)
        assert 1 < ev_e2e[ppl] < 84 * 3 and 1 < ev_db[metric_on("denoise_ppl", split)]
    assert 1 < ev_e2e["test_ppl@K4"] and ev_e2e["test_ppl@K4"] != ev_e2e["test_ppl"]


def test_untrained_denoiser_is_uniform_and_its_chain_makes_k_calls(params):
    task = make_task(load_config(params, "dblocks"))
    task.check()
    task.load()
    torch.manual_seed(0)
    model = task.build_model()
    r = task.evaluate(model, torch.device("cpu"), split="val")
    assert r["val_denoise_ppl"] == pytest.approx(84, rel=1e-4)                   # zero-initialised head
    calls = []
    real = task.recurrent_logits
    task.recurrent_logits = lambda *a: calls.append(1) or real(*a)
    x = torch.from_numpy(task.val_data.tokens[:10].astype(np.int64))[None]
    task.next_token_logits(model, x, torch.Generator().manual_seed(0))
    assert len(calls) == task.K == 4


def test_e2e_infers_at_its_mean_recurrence_unless_told(params):
    assert make_task(load_config(params, "e2e")).K == 6                         # r̄, not eval.recurrence (4)
    assert make_task(load_config(params, "e2e", ["eval.e2e_recurrence=3"])).K == 3
    assert make_task(load_config(params, "dblocks", ["eval.recurrence=0"])).K == 6


def test_bad_input(params):
    with pytest.raises(ConfigError, match="diffusion.num_blocks must be 1, got 2"):
        load_config(params, "dblocks", ["diffusion.num_blocks=2"])
    with pytest.raises(ConfigError, match="eval.prompt_len 40 must be shorter than the context model.seq_len 40"):
        load_config(params, "e2e", ["eval.prompt_len=40"])
    with pytest.raises(ConfigError, match=r"model.bptt must be an integer ≥ 1"):
        load_config(params, "e2e", ["model.bptt=0"])
    with pytest.raises(ConfigError, match="eval.recurrence_variants must be iteration counts >= 1"):
        load_config(params, "e2e", ["eval.recurrence_variants=[0]"])
