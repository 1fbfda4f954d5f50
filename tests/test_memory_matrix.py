"""`bench memory-matrix`: the host-optimizer row holds no optimizer state on the device, and the
crossover names the first model at which DB offload beats gradient accumulation."""

import pandas as pd

from bench.benchmark import measure, variant
from bench.config import load_config
from bench.memory_matrix import crossover, measure_host_optimizer

from conftest import TINY_VIT


def test_host_optimizer_row_keeps_adam_state_off_the_device(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_VIT.format(runs=tmp_path / "runs", root=tmp_path / "data"))
    cfg = variant(load_config(p, "e2e"), "e2e", 1, 8, "resident")
    host, e2e = measure_host_optimizer(cfg, cfg_device := __import__("torch").device("cpu")), measure(cfg, cfg_device, 0)
    assert host["optimizer_state"] == 0 and e2e["optimizer_state"] > 0
    assert host["host_bytes"] == e2e["optimizer_state"]   # the same Adam moments, parked on the host
    assert host["peak_bytes"] < e2e["peak_bytes"]


def test_crossover_names_the_smallest_model_where_db_wins():
    col = "peak_MiB@paper_batch (extrapolated)"
    rows = [("small", 10, "DB offload", 100), ("small", 10, "E2E+accum (3 × b/3)", 90),
            ("big", 500, "DB offload", 900), ("big", 500, "E2E+accum (3 × b/3)", 1200),
            ("mid", 50, "DB offload", 300), ("mid", 50, "E2E+accum (3 × b/3)", 310)]
    df = pd.DataFrame([{"model": m, "params_M": n, "row": r, col: v} for m, n, r, v in rows])
    text = crossover(df)
    assert text.startswith("DB offload first beats E2E+accum at **mid**")
    listing = text.split("\n\n", 1)[1]
    assert listing.index("small") < listing.index("mid") < listing.index("big")
