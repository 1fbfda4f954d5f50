"""Every figure the harness writes renders to a readable PNG: non-empty, of sane size, with the
axis saying which way is better.  The committed figures are checked the same way."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def sane(path: Path, min_side: int = 300, max_side: int = 5000) -> tuple[int, int]:
    assert path.exists() and path.stat().st_size > 5_000, f"{path} is missing or nearly empty"
    with Image.open(path) as im:
        w, h = im.size
        assert im.getextrema() != ((255, 255),) * len(im.getbands())   # not blank
    assert min_side <= min(w, h) and max(w, h) <= max_side, f"{path}: {w}×{h} px"
    return w, h


def test_memory_plot_has_a_legend_per_panel(tmp_path):
    from bench.benchmark import plot_memory
    rows = []
    for mode, res, B in [("e2e", "-", 1), ("e2e+ckpt", "-", 1), ("e2e+accum", "-", 3), ("dblocks", "offload", 1),
                         ("dblocks", "offload", 3), ("dblocks+ckpt", "offload", 3)]:
        rows.append({"mode": mode, "residency": res, "B": B, "batch_size": 64, "peak_bytes": 2**24 / B,
                     "parameters": 2**22, "gradients": 2**20, "optimizer_state": 2**21, "activations": 2**23 / B})
    png = plot_memory(pd.DataFrame(rows), tmp_path / "memory.png", "tiny")
    sane(png)


def test_learning_curve_and_quality_plots(tmp_path):
    from bench.report import better, plot_curves
    from bench.tasks.lm_report import _plot_quality
    curves = {arm: pd.DataFrame({"epochs_equiv": [0.5, 1.0], "test_fid": [90.0, 60.0], "train_layer_evals": [10, 20],
                                 "mauve@rnn": [0.2, 0.4], "gen_ppl@rnn": [40.0, 20.0]}) for arm in ("e2e", "dblocks")}
    sane(plot_curves(curves, "test_fid", tmp_path / "curve.png", "tiny", " at 200 samples"))
    sane(_plot_quality(curves, tmp_path / "quality.png", "tiny", ["mauve@rnn", "gen_ppl@rnn"]))
    assert better("test_fid") == better("test_bpc") == better("gen_ppl@rnn") == "lower is better"
    assert better("test_acc") == better("mauve@rnn") == "higher is better"


def test_sweep_plots_from_a_study(tmp_path):
    import optuna

    from bench.sweep import _plot_front, _plot_importance
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("diffusion.gamma", 0, 0.1) - abs(t.suggest_float("diffusion.P_mean", -1, 1)),
                   n_trials=12)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    _plot_front(study, complete, ["val_acc"], ["maximize"], tmp_path / "front.png")
    _plot_importance(study, ["val_acc"], tmp_path / "importance.png")
    sane(tmp_path / "front.png")
    sane(tmp_path / "importance.png")
    shown = pd.read_csv(tmp_path / "importance.csv").set_index("param")["fanova_importance"]   # read off the bars
    independent = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    assert set(shown.index) == set(independent)
    for name, value in independent.items():
        assert shown[name] == pytest.approx(value, abs=0.01)


@pytest.mark.parametrize("png", sorted(ROOT.glob("results/**/*.png")), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_figures_are_readable(png):
    sane(png, min_side=200)
