"""Autoregressive LM: the Block-Diffusion mask, RoPE, gradient locality, metric definitions, the shared
decoding, the scorers (RNN reference, n-gram, e2e reference), compute, bad input."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config import ConfigError, load_config
from bench.data.text import TextSpec, prepare_text
from bench.metrics import text as M
from bench.models.llama import Llama, LlamaConfig, apply_rope, block_diffusion_mask, rope_tables
from bench.tasks import make_task
from bench.tasks.autoregressive import AutoregressiveTask
from bench.tasks.lm_generation import generation_generators, top_p_sample

ROOT = Path(__file__).resolve().parents[1]
V = 11


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def _activate(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in the zero-initialised adaLN and head, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("out") or name.startswith("final_adaLN"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _llama(conditioned: bool, depth: int = 4) -> Llama:
    torch.manual_seed(0)
    return _activate(Llama(LlamaConfig(vocab_size=V, seq_len=32, hidden=16, depth=depth, heads=2, cond_dim=8),
                           conditioned=conditioned))


# ---- the mask ------------------------------------------------------------------------------------------
def test_block_diffusion_mask_is_the_papers():
    m = block_diffusion_mask(3, torch.tensor([1, 2, 3])).int()
    assert m.tolist() == [
        # clean 0 1 2 | noisy@1 @2 @3
        [1, 0, 0, 0, 0, 0],     # clean 0: causal
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],     # noisy token at position 1: clean < 1 and itself
        [1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    assert block_diffusion_mask(2, torch.tensor([0])).int().tolist()[2] == [0, 0, 1]   # no context at position 0


def test_no_leakage_through_the_denoiser():
    """Changing a noisy token, or a clean token at or after position p, leaves the noisy output at p
    unchanged; clean outputs are causal."""
    model = _llama(True)
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(V, (2, 6), generator=g)
    pos = torch.arange(1, 7)
    z = torch.randn(2, 6, 16, generator=g)
    cn = torch.randn(2, generator=g)

    def out(c, zz):
        with torch.no_grad():
            return model.denoiser_output(c, zz, pos, cn, range(4))[0]

    base = out(clean, z)
    z2 = z.clone()
    z2[:, 3] += 5.0                                  # the noisy token at position 4
    changed = (out(clean, z2) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False, False, False, True, False, False]
    c2 = clean.clone()
    c2[:, 2] = (c2[:, 2] + 1) % V                    # the clean token at position 2
    changed = (out(c2, z) - base).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False, False, True, True, True, True]   # noisy positions 1, 2 do not see it
    # per-token conditioning: the same property
    cn_tok = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        a = model.denoiser_output(clean, z, pos, cn_tok, range(4))[0]
        b = model.denoiser_output(clean, z2, pos, cn_tok, range(4))[0]
    assert ((b - a).abs().amax(dim=(0, 2)) > 1e-6).tolist() == [False, False, False, True, False, False]


def test_plain_model_is_causal():
    model = _llama(False)
    x = torch.randint(V, (2, 8), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % V
    with torch.no_grad():
        d = (model(x) - model(y)).abs().amax(dim=(0, 2))
    assert (d[:5] == 0).all() and (d[5:] > 0).all()


# ---- RoPE ------------------------------------------------------------------------------------------------
def test_rope_is_a_rotation_that_sees_only_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(m, n):
        cq, sq = rope_tables(torch.tensor([m]), 8, 10000.0)
        ck, sk = rope_tables(torch.tensor([n]), 8, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(17, 13), abs=1e-5) == pytest.approx(score(4, 0), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    c, s = rope_tables(torch.arange(5), 8, 10000.0)
    x = torch.randn(1, 1, 5, 8, generator=g)
    assert torch.allclose(apply_rope(x, c, s).norm(dim=-1), x.norm(dim=-1), atol=1e-5)   # a rotation
    assert torch.allclose(apply_rope(x, c, s)[..., 0, :], x[..., 0, :])                  # position 0: identity
    # pair (0, 1) of position 1 is turned by exactly 1 radian (θ^0)
    e = torch.zeros(1, 1, 2, 8)
    e[..., 0] = 1
    r = apply_rope(e, *rope_tables(torch.arange(2), 8, 10000.0))[0, 0, 1]
    assert r[0] == pytest.approx(math.cos(1.0), abs=1e-6) and r[1] == pytest.approx(math.sin(1.0), abs=1e-6)


# ---- metric definitions on cases we can compute -----------------------------------------------------------
def test_metric_definitions():
    assert M.perplexity(4 * math.log(3), 4) == pytest.approx(3)
    assert M.bits_per_char(4 * math.log(4), 4, chars_per_token=2.0) == pytest.approx(1.0)   # 2 bits/token, 2 chars
    probs = torch.tensor([[[[0.5, 0.5]]], [[[1.0, 0.0]]]])                        # 2 draws, 1 token, V = 2
    assert float(M.mixture_nll(probs, torch.tensor([[1]]))) == pytest.approx(math.log(4))   # mean prob 0.25
    assert M.distinct_ngrams([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(2 / 5)
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    assert all(int(top_p_sample(logits, 0.5, g)) == 1 for _ in range(20))        # the nucleus is the argmax
    draws = [int(top_p_sample(logits, 0.95, g)) for _ in range(300)]
    assert set(draws) == {1, 2}                                                   # 0 and 3 fall outside 0.95


def test_mauve_counts_and_scores():
    with pytest.raises(ConfigError, match=r"needs at least 20 texts per side .* got 12 real and 24 generated"):
        M.check_mauve_counts(12, 24)
    with pytest.raises(ConfigError, match="at least 50 texts per side"):
        M.check_mauve_counts(100, 100, buckets=5) or M.check_mauve_counts(40, 100, buckets=5)
    g = np.random.default_rng(0)
    p = g.normal(size=(40, 8))
    same = M.mauve_score(p, p.copy())
    far = M.mauve_score(p, g.normal(size=(40, 8)) + 5.0)
    assert same["mauve"] == pytest.approx(1.0, abs=1e-6) and far["mauve"] < 0.1
    assert (same["mauve_n_real"], same["mauve_n_gen"], same["mauve_buckets"]) == (40, 40, 4)


# ---- the task on real Shakespeare ----------------------------------------------------------------------
PARAMS = """
suite: tiny_ar{name}
task: autoregressive
runs_dir: {tmp}/runs
data: {{dataset: shakespeare, root: {root}, seq_len: 24, train_subset: 384, val_subset: 16, test_subset: 16}}
model: {{arch: llama, seq_len: 48, hidden: 32, depth: 4, heads: 2, cond_dim: 16}}
diffusion: {{num_blocks: 4, gamma: 0.1}}
train: {{batch_size: 16, epochs: 1, lr: 3.0e-3, warmup_epochs: 0.1, curve_points: 2, ckpt_every: 100, threads: 1}}
eval: {{batch_size: 32, curve_ppl_sequences: 8, ppl_sequences: 16, prompt_len: 16, gen_len: 12, prompts: 20,
        continuations: 1, curve_prompts: 20, reference: "{reference}", rnn_reference: "{rnn}", ngram_order: {ngram},
        ngram_train_tokens: 100000, samples_dir: {tmp}/results}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture(scope="module")
def shakespeare_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ardata")
    (ROOT / "data" / "downloads").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT / "data" / "downloads", root / "downloads")
    prepare_text(TextSpec("shakespeare"), root, log=lambda *_: None)
    return root


def _params(tmp_path, root, reference="", name="", rnn="", ngram=0):
    p = tmp_path / f"params{name}.yaml"
    p.write_text(PARAMS.format(tmp=tmp_path, root=root, reference=reference, name=name, rnn=rnn, ngram=ngram))
    return p


def _train_rnn_reference(params: Path, out: Path, steps: int = 20) -> Path:
    """A tiny RNN reference through its command line (the suites' `rnn_reference` stage)."""
    from bench.models.rnn_lm import main
    main([str(params), "--out", str(out), "--steps", str(steps), "--hidden", "32", "--batch-size", "8",
          "--seq-len", "32", "--warmup-steps", "2", "--val-windows", "8", "--log-every", "0"])
    return out


def test_untrained_denoiser_has_uniform_denoising_perplexity_and_gradients_stay_in_the_block(tmp_path, shakespeare_root):
    task = make_task(load_config(_params(tmp_path, shakespeare_root), "dblocks"))
    task.check()
    task.load()
    torch.manual_seed(0)
    model = task.build_model()
    # zero-initialised head: every chained prediction is uniform, so the denoising perplexity is V
    r = task.evaluate(model, torch.device("cpu"), split="val")
    assert r["val_denoise_ppl"] == pytest.approx(84, rel=1e-4)
    assert r["val_denoise_bpc"] == pytest.approx(math.log2(84), rel=1e-4)
    assert task.evaluate(model, torch.device("cpu"), split="test")["denoise_ppl"] == pytest.approx(84, rel=1e-4)
    # gradient locality: a step of block 2 touches block 2's layers and the shared stem/head only
    _activate(model).train()
    g = torch.Generator().manual_seed(0)
    batch = task.batch(torch.arange(16), seed=5, device=torch.device("cpu"))
    loss, _ = task.loss(model, batch, sigma=task.partition.sample_training_sigma(2, 16, g),
                        layers=task.layout.layers_of(2), generator=g)
    loss.backward()
    for i, layer in enumerate(model.layers):
        grads = [p.grad for p in layer.parameters()]
        if i == 2:
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
        else:
            assert all(gr is None for gr in grads)
    assert model.tok_embed.weight.grad.abs().sum() > 0 and model.out.weight.grad.abs().sum() > 0


def test_weighted_loss_is_lambda_times_token_cross_entropy(tmp_path, shakespeare_root):
    from bench.diffusion import loss_weight
    task = make_task(load_config(_params(tmp_path, shakespeare_root), "dblocks"))
    task.check()
    task.load()
    torch.manual_seed(0)
    model = _activate(task.build_model())
    batch = task.batch(torch.arange(4), seed=3, device=torch.device("cpu"))
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    loss, extra = task.loss(model, batch, sigma=sigma, layers=task.layout.layers_of(0),
                            generator=torch.Generator().manual_seed(7))
    # the same by hand: z = y + σε with the same ε, logits at the noisy slots, CE to the token itself
    eps = torch.randn((4, 24, 32), generator=torch.Generator().manual_seed(7))
    y = model.clean_embed(batch[:, 1:])
    s = sigma.float()
    logits = task.denoise_logits(model, batch[:, :-1], y + s[:, None, None] * eps, torch.arange(1, 25), s,
                                 task.layout.layers_of(0))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    assert float(loss) == pytest.approx(float((loss_weight(s, 0.5)[:, None] * ce).mean()), rel=1e-5)
    assert float(extra["ce"]) == pytest.approx(float(ce.mean()), rel=1e-5)
    # per-token σ: one draw per noisy token, weighted token by token
    tok = make_task(load_config(_params(tmp_path, shakespeare_root), "dblocks", ["model.sigma_per=token"]))
    tok.load()
    loss_t, _ = tok.loss(model, batch, sigma=sigma, layers=tok.layout.layers_of(0), generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(loss_t) and float(loss_t) != pytest.approx(float(loss))


def test_training_evaluation_compute_and_report(tmp_path, shakespeare_root, monkeypatch):
    """Three scorers (RNN reference, n-gram, e2e reference), both arms, their final evaluation (samples,
    gen-ppl and MAUVE per scorer, decoding and step variants) and lm-report, on real text."""
    import pandas as pd

    from bench.evaluate import evaluate_arm
    from bench.tasks.lm_report import report
    from bench.train import train
    quiet = dict(progress=False, log=lambda *_: None)
    ref = train(load_config(_params(tmp_path, shakespeare_root, name="_ref"), "e2e"), **quiet)
    ref_pt = tmp_path / "runs" / "tiny_ar_ref" / "e2e" / "final.pt"
    assert ref["metric"] == "test_ppl" and ref_pt.exists()               # no scorer: its own perplexity
    rnn_pt = _train_rnn_reference(_params(tmp_path, shakespeare_root, name="_rnn"), tmp_path / "rnn" / "final.pt")
    params = _params(tmp_path, shakespeare_root, reference=ref_pt, rnn=rnn_pt, ngram=3)
    evs = {}
    for arm in ("e2e", "dblocks"):
        cfg = load_config(params, arm)
        s = train(cfg, **quiet)
        evs[arm] = ev = evaluate_arm(cfg, log=lambda *_: None)
        # the ranking metric: MAUVE under the RNN reference, on every curve point too (sweeps prune on it)
        assert ev["metric"] == s["metric"] == "mauve@rnn" and ev["selection_metric"] == "val_mauve@rnn"
        assert {"mauve@rnn", "val_mauve@rnn", "gen_ppl@ngram", "gen_ppl@ref"} <= set(pd.read_csv(
            tmp_path / "runs" / "tiny_ar" / arm / "history.csv").columns)
        # compute accounting: the task's replay of the trainer's count is exact
        assert ev["train_layer_evals@total"] == s["layer_evals"] == 24 * 4
        assert ev["gen_samples"] == 20 and ev["mauve_n_real"] == 20
        for tag in ("rnn", "ngram", "ref"):                              # every figure names its scorer
            assert ev[f"gen_ppl@{tag}"] > 1 and ev[f"gen_ppl@data,{tag}"] > 1 and ev[f"val_gen_ppl@{tag}"] > 1
        assert 0 <= ev["mauve@rnn"] <= 1 and 0 <= ev["mauve@ref"] <= 1 and "mauve@ngram" not in ev
        assert "Kneser–Ney 3-gram" in ev["scorer_ngram"] and "GRU" in ev["scorer_rnn"]
        # validation: its own prompts, so its own real-text score, under val_ names
        assert ev["val_gen_samples"] == 20 and 0 <= ev["val_mauve@rnn"] <= 1
        assert ev["val_gen_ppl@data,ngram"] != ev["gen_ppl@data,ngram"]
        # the other decodings beside the ranking figures; `paper` is each arm's own
        # (on test only: they are reported, never chosen among)
        assert {"mauve@rnn,greedy", "gen_ppl@ngram,greedy", "distinct4@gen,greedy", "mauve@ref,paper"} <= set(ev)
        assert not any(k.startswith("val_") and "," in k.split("@")[-1] and "data," not in k for k in ev)
        own = "" if arm == "e2e" else ",greedy"                          # e2e: top-p; dblocks: greedy
        assert all(ev[f"{k},paper"] == ev[f"{k}{own}"] for k in ("mauve@rnn", "gen_ppl@rnn", "gen_ppl@ngram"))
        md = (tmp_path / "results" / "tiny_ar" / f"samples_{arm}.md").read_text()
        assert md.count("## Sample") == 6 and "top-p 0.95 decoding" in md and "`ngram` interpolated Kneser–Ney" in md
        assert "from the val split" in Path(ev["val_samples_file"]).read_text()
    assert evs["e2e"]["mauve@rnn,greedy"] != evs["e2e"]["mauve@rnn"] or \
        evs["e2e"]["gen_ppl@rnn,greedy"] != evs["e2e"]["gen_ppl@rnn"]   # greedy is another decoding
    assert evs["dblocks"]["train_token_layer_evals@total"] == 2 * evs["e2e"]["train_token_layer_evals@total"]
    assert evs["e2e"]["infer_layer_evals@per_token"] == evs["dblocks"]["infer_layer_evals@per_token"] == 4
    assert "test_ppl@exact" in evs["e2e"] and "denoise_ppl@4draws" in evs["dblocks"]
    assert "val_ppl@exact" in evs["e2e"] and "val_denoise_ppl@4draws" in evs["dblocks"]
    assert {"gen_ppl@rnn,8steps", "gen_ppl@ngram,8steps", "distinct4@gen,16steps", "mauve@rnn,16steps"} \
        <= set(evs["dblocks"])                                            # 2B and 4B calls
    assert not ({"val_gen_ppl@ngram,8steps", "val_distinct4@gen,16steps"} & set(evs["dblocks"]))   # variants: test only
    assert not any(k.endswith("steps") for k in evs["e2e"])
    monkeypatch.chdir(tmp_path)
    md = report(params, log=lambda *_: None).read_text()
    assert "not a likelihood bound" in md and "gen_ppl@ngram dblocks / e2e" in md and "quality_vs_compute.png" in md
    assert "**Ranking.** `mauve@rnn` (higher is better)" in md and "## Variants" in md and "| 16steps |" in md
    assert "never ranked" in md and "- `rnn`:" in md


def test_bad_input_is_one_line_before_compute(tmp_path, shakespeare_root):
    params = _params(tmp_path, shakespeare_root)
    with pytest.raises(ConfigError, match="eval.prompt_len 48 must be shorter than the context model.seq_len 48"):
        load_config(params, "e2e", ["eval.prompt_len=48"])
    with pytest.raises(ConfigError, match=r"eval.prompt_len 16 \+ eval.gen_len 40 exceeds the context"):
        load_config(params, "e2e", ["eval.gen_len=40"])
    with pytest.raises(ConfigError, match="MAUVE with 2 k-means buckets needs at least 20 texts per side"):
        load_config(params, "e2e", ["eval.reference=x.pt", "eval.prompts=10", "eval.continuations=3"])
    with pytest.raises(ConfigError, match="model.sigma_per must be one of sequence, token"):
        load_config(params, "dblocks", ["model.sigma_per=block"])
    missing = tmp_path / "nope" / "final.pt"
    with pytest.raises(ConfigError, match=f"eval.reference {missing} not found"):
        make_task(load_config(params, "e2e", [f"eval.reference={missing}"])).check()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a bench final.pt nor a Hugging Face model directory"):
        make_task(load_config(params, "e2e", [f"eval.reference={garbage}"])).check()
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ConfigError, match="no Hugging Face model there"):
        make_task(load_config(params, "e2e", [f"eval.reference={hf}"])).check()
    # a checkpoint of a model that is not a causal LM (a DiffusionBlocks denoiser)
    not_lm = tmp_path / "db.pt"
    torch.save({"config": load_config(params, "dblocks").to_dict(), "model": {}}, not_lm)
    with pytest.raises(ConfigError, match="is not a causal LM: it is a autoregressive/dblocks run"):
        make_task(load_config(params, "e2e", [f"eval.reference={not_lm}"])).check()
    # the shared decoding and the scorers
    with pytest.raises(ConfigError, match="eval.decoding must be one of top_p, greedy .the same for both arms"):
        load_config(params, "e2e", ["eval.decoding=beam"])
    with pytest.raises(ConfigError, match="eval.decoding_variants must be among top_p, greedy, paper"):
        load_config(params, "e2e", ["eval.decoding_variants=[nucleus]"])
    with pytest.raises(ConfigError, match="the learning curve ranks by MAUVE: eval.curve_prompts 4 is too few"):
        load_config(params, "e2e", ["eval.rnn_reference=x.pt", "eval.curve_prompts=4"])
    with pytest.raises(ConfigError, match="eval.ngram_order and eval.ngram_train_tokens must be >= 0"):
        load_config(params, "e2e", ["eval.ngram_order=-1"])
    with pytest.raises(ConfigError, match=f"eval.rnn_reference {missing} not found: train it first"):
        make_task(load_config(params, "e2e", [f"eval.rnn_reference={missing}"])).check()
    with pytest.raises(ConfigError, match="is not an RNN reference"):
        make_task(load_config(params, "e2e", [f"eval.rnn_reference={not_lm}"])).check()
    from bench.models.rnn_lm import RNNLM, RNNLMConfig, RNNTrainConfig, reference_checkpoint
    other = load_config(params, "e2e").to_dict()["data"] | {"chunk_chars": 999}
    elsewhere = tmp_path / "rnn_other.pt"
    torch.save(reference_checkpoint(RNNLM(RNNLMConfig(vocab_size=84, hidden=8, depth=1)), RNNTrainConfig(), other, {}),
               elsewhere)
    with pytest.raises(ConfigError, match=r"eval.rnn_reference .* was trained on other data \(chunk_chars differ\)"):
        make_task(load_config(params, "e2e", [f"eval.rnn_reference={elsewhere}"])).check()
    with pytest.raises(ConfigError, match="eval.ngram_order: n-gram order 10 over 84 tokens overflows"):
        make_task(load_config(params, "e2e", ["eval.ngram_order=10"])).check()


def test_the_ranking_metric_is_mauve_under_another_family(tmp_path, shakespeare_root):
    params = _params(tmp_path, shakespeare_root)

    def task(arm, *overrides):
        return make_task(load_config(params, arm, list(overrides)))
    all_three = ["eval.rnn_reference=r.pt", "eval.reference=l.pt", "eval.ngram_order=5"]
    for arm in ("e2e", "dblocks"):                                  # the same number ranks both arms
        t = task(arm, *all_three)
        assert (t.metric, t.higher_is_better, t.selection_metric) == ("mauve@rnn", True, "val_mauve@rnn")
    # the class attributes are what sweeps and tuning read: the suites' configuration
    assert (AutoregressiveTask.metric, AutoregressiveTask.higher_is_better) == ("mauve@rnn", True)
    assert task("dblocks", "eval.reference=l.pt").metric == "mauve@ref"
    t = task("dblocks", "eval.ngram_order=5", "eval.rnn_reference=r.pt", "eval.mauve=false")
    assert (t.metric, t.higher_is_better) == ("gen_ppl@rnn", False)
    assert task("e2e", "eval.ngram_order=5").metric == "gen_ppl@ngram"
    assert (task("e2e").metric, task("dblocks").metric) == ("test_ppl", "denoise_ppl")   # no scorer at all


def test_both_arms_decode_alike_for_the_ranking_metric(tmp_path, shakespeare_root):
    """Identical logits and seed → identical tokens for e2e and DiffusionBlocks, even when the
    denoiser consumes noise between the tokens; the paper's arm-specific decoding differs."""
    params = _params(tmp_path, shakespeare_root)
    e2e, db = make_task(load_config(params, "e2e")), make_task(load_config(params, "dblocks"))
    logits = torch.randn(64, 84, generator=torch.Generator().manual_seed(0))

    def tokens(task, decoding=None):
        return task.decode(logits, torch.Generator().manual_seed(3), decoding)
    assert torch.equal(tokens(e2e), tokens(db))                                  # top-p 0.95, both
    assert not torch.equal(tokens(e2e), logits.argmax(-1))                        # sampled, not argmax
    assert torch.equal(tokens(e2e, "greedy"), tokens(db, "greedy")) and torch.equal(tokens(db, "greedy"),
                                                                                      logits.argmax(-1))
    greedy = make_task(load_config(params, "dblocks", ["eval.decoding=greedy"]))
    assert torch.equal(tokens(greedy), logits.argmax(-1))
    assert torch.equal(tokens(db, "paper"), logits.argmax(-1)) and torch.equal(tokens(e2e, "paper"), tokens(e2e))

    # through `generate`: the logits depend on the sequence only; the dblocks "model" draws noise first
    table = torch.randn(84, 84, generator=torch.Generator().manual_seed(1))

    def fake(consumes_noise):
        def next_token_logits(model, seq, generator):
            if consumes_noise:
                torch.randn(5, generator=generator)
            return table[seq[:, -1]]
        return next_token_logits
    e2e.next_token_logits, db.next_token_logits = fake(False), fake(True)
    prompts = torch.randint(84, (16, 4), generator=torch.Generator().manual_seed(2))
    def sample(task):   # as generation_metrics does: model noise and decoding draws on separate streams
        noise, sampler = generation_generators(1234)
        return task.generate(None, prompts, 12, noise, None, sampler)
    assert torch.equal(sample(e2e), sample(db))
    # one stream for both noise and decoding would not: the noise draws shift the decoding draws
    one_stream = [t.generate(None, prompts, 12, torch.Generator().manual_seed(1234)) for t in (e2e, db)]
    assert not torch.equal(*one_stream)


def test_rnn_reference_trains_on_real_shakespeare(tmp_path):
    """A few hundred steps of the GRU reference on data/text/shakespeare_char: the loss falls far below
    uniform (ln 84 = 4.43), it scores held-out text well, and it serves as the `rnn` scorer."""
    from bench.data.text import PreparedText
    from bench.models.rnn_lm import RNNLMConfig, RNNTrainConfig, heldout_perplexity, reference_checkpoint, train_rnn_lm
    root = ROOT / "data" / "text" / "shakespeare_char"
    if not (root / "meta.json").is_file():
        pytest.skip(f"{root} is not prepared (bench data shakespeare)")
    data = PreparedText(root)
    tc = RNNTrainConfig(steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, log_every=0)
    model, losses = train_rnn_lm(data.tokens("train"), RNNLMConfig(vocab_size=84, hidden=64, depth=1), tc,
                                 torch.device("cpu"))
    first, last = np.mean(losses[:10]), np.mean(losses[-50:])
    assert first > 4.0 and last < first - 1.5 and last < 2.8
    val_ppl = heldout_perplexity(model, data.tokens("val"), 64, 50, torch.device("cpu"))
    assert val_ppl < 16                                                   # uniform: 84
    pt = tmp_path / "final.pt"
    torch.save(reference_checkpoint(model, tc, {"root": "data"}, {"val_ppl": val_ppl}), pt)
    ref = M.RNNReferenceLM(pt, torch.device("cpu"))
    val = data.tokens("val")
    prompts, conts = [val[:32].tolist(), val[100:132].tolist()], [val[32:96].tolist(), val[132:150].tolist()]
    nll, n = ref.score(prompts, conts)
    assert n.tolist() == [64, 18] and np.exp(nll.sum() / n.sum()) < 30
    assert ref.features(prompts, conts).shape == (2, 64) and "1-layer GRU LM" in ref.name


def test_hf_reference_is_checked_and_scores_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="is not a causal LM"):
        M.check_hf_causal_lm(tmp_path / "bert")
    # a tiny local GPT-2 with its own byte-level BPE: accepted, and it scores and featurises decoded text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(tmp_path / "gpt2")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=fast.vocab_size, n_embd=16, n_layer=1, n_head=2)
                                 ).save_pretrained(tmp_path / "gpt2")
    M.check_hf_causal_lm(tmp_path / "gpt2")
    chars = "abcdefghijklmnopqrstuvwxyz ,"
    ref = M.HFReferenceLM(tmp_path / "gpt2", lambda ids: "".join(chars[i] for i in ids), torch.device("cpu"))
    prompts, conts = [[19, 14, 26, 1, 4]], [[26, 14, 17, 26, 13, 14, 19]]          # "to be" + " or not"
    nll, n = ref.score(prompts, conts)
    ids_c = fast.encode(" or not", add_special_tokens=False)
    assert n.tolist() == [len(ids_c)] and nll[0] > 0
    assert ref.features(prompts, conts).shape == (1, 16)
