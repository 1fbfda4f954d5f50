"""`bench lm-report`: the language-model suites' report: `bench compare`'s comparison.md headed by the
scorers, the language-model figures per arm under the shared decoding, their variants, the metric
definitions, the checks and the samples; plus quality_vs_compute.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench import atomic
from bench.tasks.autoregressive import METRIC_DEFINITIONS, LMEvalConfig, ranking_metric
from bench.tasks.lm_generation import feature_tags, scorer_tags


# the test-split figures of the final variants (the val_ ones are for selections, not the table)
TEST_VARIANT = re.compile(r"(?P<figure>(?:gen_ppl|distinct4|mauve|test_ppl|test_bpc|denoise_ppl|denoise_bpc)"
                          r"(?:@[a-z]+)?)[@,](?P<variant>\d+steps|K\d+|greedy|top_p|paper)")
PPL_KEYS = ("test_ppl", "test_bpc", "denoise_ppl", "denoise_bpc")
COMPUTE_KEYS = ("train_layer_evals", "train_backward_layer_evals", "train_token_layer_evals",
                "infer_layer_evals@per_token", "inference_recurrence")


def lm_columns(metric: str, e: LMEvalConfig) -> list[str]:
    """The main table: the ranking metric, each scorer's MAUVE and gen_ppl of samples and of the real text,
    distinct-4, the arms' own perplexities and the compute counts."""
    tags = scorer_tags(e)
    cols = [metric, *(f"mauve@{t}" for t in feature_tags(e)), *(f"gen_ppl@{t}" for t in tags),
            *(f"gen_ppl@data,{t}" for t in tags), "distinct4@gen", "distinct4@data", *PPL_KEYS, *COMPUTE_KEYS]
    return list(dict.fromkeys(cols))


def variant_rows(rows: list[dict]) -> list[dict]:
    """One row per (arm, variant) holding the figures of the arm's variant keys (`mauve@rnn,greedy` →
    variant greedy, column mauve@rnn)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        for k, v in r.items():
            m = TEST_VARIANT.fullmatch(k)
            if m:
                out.setdefault((r["arm"], m["variant"]), {})[m["figure"]] = v
    return [{"arm": arm, "variant": variant, **figs} for (arm, variant), figs in out.items()]


def report(params_path, log=print) -> Path:
    """`bench lm-report`: `bench compare`'s comparison.md (every metric as a column) headed by the scorers,
    the language-model figures per arm under the shared decoding, their variants, the metric definitions,
    the checks and the samples; plus quality_vs_compute.png (the curve metrics against the *counted*
    training layer evaluations, which for the recurrent e2e arm include every unrolled iteration)."""
    import pandas as pd

    from bench.config import arm_names, load_config, read_params
    from bench.report import _markdown_table, compare

    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(raw.get("results_dir") or "results") / suite
    rows, curves = [], {}
    for arm in arm_names(params_path):
        cfg = load_config(params_path, arm)
        ev_path = Path(cfg.out_dir) / "eval.json"
        if not ev_path.exists():
            raise FileNotFoundError(f"{ev_path} not found: run `bench evaluate {params_path} --arm {arm}` first")
        ev = json.loads(ev_path.read_text())
        curves[arm] = pd.read_csv(Path(cfg.out_dir) / "history.csv")
        rows.append({"arm": arm, "mode": cfg.mode, **ev, "_cfg": cfg})
    first = rows[0]["_cfg"]
    e = first.eval
    metric = rows[0].get("metric") or ranking_metric(e, first.is_dblocks)
    table = pd.DataFrame([{"arm": r["arm"], "mode": r["mode"], **{c: r.get(c, float("nan"))
                                                                  for c in lm_columns(metric, e)}}
                          for r in rows]).dropna(axis=1, how="all")
    variants = pd.DataFrame(variant_rows(rows))
    notes = [f"**Scale.** {first.data.dataset}, {first.data.tokenizer} tokens, context {first.data.seq_len}; "
             f"these are numbers of this corpus and model size only (not LM1B/OWT numbers).  {e.prompts} test prompts "
             f"× {e.continuations} continuations of {e.gen_len} tokens after {e.prompt_len}-token prompts (MAUVE: "
             f"{rows[0].get('mauve_n_real', '–')} real vs {rows[0].get('mauve_n_gen', '–')} generated texts, "
             f"{rows[0].get('mauve_buckets', '–')} buckets, scaling {e.mauve_scaling}).\n",
             f"**Ranking.** `{metric}` ({'higher' if metric.startswith('mauve') else 'lower'} is better), with both "
             f"arms decoded the same way (`eval.decoding`: {e.decoding}"
             f"{f', p = {e.top_p}' if e.decoding == 'top_p' else ''}).\n",
             "**Scorers.**\n", *_scorer_lines(rows[0], e), "",
             "## Language-model figures\n", "Test split (validation figures, `val_*`, are in each eval.json).\n",
             _markdown_table(table), ""]
    if len(variants):
        notes += ["## Variants\n", "The same figures under the other decodings (`greedy`, `top_p`; `paper`: the "
                  "paper's arm-specific decoding, e2e top-p vs DiffusionBlocks greedy) and inference settings "
                  "(`Nsteps`, `KN`).\n",
                  _markdown_table(variants), ""]
    notes += ["## Metric definitions\n", METRIC_DEFINITIONS]
    e2e = [r for r in rows if r["mode"].startswith("e2e")]
    db = [r for r in rows if r["mode"].startswith("dblocks")]
    if e2e and db:
        lines = ["## Checks\n"]
        for b in db:
            lines += _checks(e2e[0], b, metric, scorer_tags(e))
        notes += lines + [""]
    notes += ["## Samples\n", *[f"- `{r['arm']}`: [samples_{r['arm']}.md](samples_{r['arm']}.md)" for r in rows
                                 if r.get("samples_file")], "",
              "Quality against counted training compute: ![quality vs compute](quality_vs_compute.png)\n",
              "The table below and `learning_curve.png` come from `bench compare`; its `layer_evals` and "
              "`epochs_equiv` count forward layer passes (for the recurrent e2e arm every unrolled iteration, as "
              "`train_layer_evals` above).\n"]
    md = compare(params_path, notes="\n".join(notes))
    keys = [metric, *(f"gen_ppl@{t}" for t in scorer_tags(e)), "test_ppl", "denoise_ppl"]
    _plot_quality(curves, out / "quality_vs_compute.png", suite, list(dict.fromkeys(keys)))
    log(f"{suite}: wrote {out / 'quality_vs_compute.png'}")
    return md


def _scorer_lines(row: dict, e: LMEvalConfig) -> list[str]:
    """One line per scorer: what it is (as the evaluation recorded it)."""
    lines = []
    for tag in scorer_tags(e):
        name = row.get(f"scorer_{tag}", {"ngram": f"Kneser–Ney {e.ngram_order}-gram", "rnn": e.rnn_reference,
                                         "ref": e.reference}[tag])
        if tag == "ref":
            ref_eval = Path(e.reference).parent / "eval.json"
            if ref_eval.is_file():
                r = json.loads(ref_eval.read_text())
                name += f"; its own exact test perplexity {r['test_ppl']:.4g}, {r['test_bpc']:.4g} bits per character"
            name += "; the e2e arm's family: shown for continuity, not ranked"
        lines.append(f"- `{tag}`: {name}")
    return lines


def _checks(a: dict, b: dict, metric: str, tags: list[str]) -> list[str]:
    """The ranking metric, each scorer's gen-ppl ratio (target: within 15%) and MAUVE, and the compute
    ratios of arm b against e2e arm a."""
    nan = float("nan")
    lines = []
    if metric in a and metric in b:
        lines.append(f"- `{metric}` {b['arm']} {b[metric]:.4g} vs {a['arm']} {a[metric]:.4g}, the same decoding: "
                     f"{a['arm']} {a.get('decoding') or _decoding(a['_cfg'])}; {b['arm']} "
                     f"{b.get('decoding') or _decoding(b['_cfg'])}.")
    for t in tags:
        k = f"gen_ppl@{t}"
        if k in a and k in b:
            ratio = b[k] / a[k]
            lines.append(f"- {k} {b['arm']} / {a['arm']} = {b[k]:.4g} / {a[k]:.4g} = {ratio:.3f} "
                         f"({'within' if abs(ratio - 1) <= 0.15 else 'NOT within'} 15%); real continuations: "
                         f"{a.get(f'gen_ppl@data,{t}', nan):.4g}"
                         + (f"; mauve@{t} {b.get(f'mauve@{t}', nan):.3g} vs {a.get(f'mauve@{t}', nan):.3g}"
                            if f"mauve@{t}" in a else "") + ".")
    if "distinct4@gen" in a and "distinct4@gen" in b:
        lines.append(f"- distinct-4 {b['arm']} {b['distinct4@gen']:.3g} vs {a['arm']} {a['distinct4@gen']:.3g} "
                     f"(real continuations {a.get('distinct4@data', nan):.3g}).")
    lines.append(f"- training layer evaluations {a['arm']} / {b['arm']} = {a['train_layer_evals']:,} / "
                 f"{b['train_layer_evals']:,} = {a['train_layer_evals'] / b['train_layer_evals']:.2f}× "
                 f"(token-layer evaluations: {a['train_token_layer_evals'] / b['train_token_layer_evals']:.2f}×"
                 + (f"; back-propagated layer evaluations: "
                    f"{a['train_backward_layer_evals'] / b['train_backward_layer_evals']:.2f}×"
                    if "train_backward_layer_evals" in a else "") + ").")
    lines.append(f"- inference layer evaluations per token: {a['arm']} {a['infer_layer_evals@per_token']}, "
                 f"{b['arm']} {b['infer_layer_evals@per_token']}.")
    return lines


def _decoding(cfg) -> str:
    from bench.tasks import make_task
    return make_task(cfg).decoding_note()


def _plot_quality(curves: dict, path: Path, suite: str, candidates: list[str]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in candidates if any(k in df for df in curves.values())]
    if not keys:   # no test points on the curve (trained while the test split was sealed)
        return path
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    colour = {arm: f"C{i}" for i, arm in enumerate(curves)}   # one colour per arm in every panel
    for ax, key in zip(axes[0], keys):
        for arm, df in curves.items():
            if key in df and "train_layer_evals" in df:
                ax.plot(df["train_layer_evals"], df[key], marker="o", label=arm, color=colour[arm])
        ax.set_xlabel("training layer evaluations (counted, all unrolled iterations)")
        ax.set_ylabel(key + (", higher is better" if key.startswith("mauve") or key.startswith("distinct")
                             else ", lower is better"))
        ax.set_yscale("linear" if key.startswith("mauve") else "log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{suite}: quality vs training compute", fontsize=10)
    fig.tight_layout()
    atomic.save_figure(path, fig, dpi=110)
    return path
