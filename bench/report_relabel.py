"""`bench compare PARAMS --relabel`: label a pre-protocol suite's committed results with the
training FLOPs its arms actually spent, without its runs.

The suites that have not been re-run under the verdict protocol keep one-seed tables written by
older code, under headers such as "matched training compute" that counted layer evaluations, not
FLOPs.  This reads results/<suite>/comparison.csv (its arms and their optimizer steps), counts
each arm's training FLOPs with FlopCounterMode on one step of each block (bench.flops; a DB
block's share of the steps is its expectation steps / B, the runs' block draws being gone), adds
`train_flops` and `flop_ratio_to_e2e` to comparison.csv, replaces every "matched training
compute" in the suite's markdown with what the counted FLOPs allow (bench.report.flop_note), and
puts a banner with the counts under the title.  The figures themselves are not touched.
Re-running it replaces its own banner.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import pandas as pd

from bench import atomic
from bench.config import load_config, read_params
from bench.report import _command, _markdown_table, flop_note

BANNER = ("<!-- relabel: written by `bench compare --relabel` -->", "<!-- /relabel -->")
CLAIM = "matched training compute"


def counted_flops(params_path, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with train_flops and flop_ratio_to_e2e (NaN where the task cannot be counted)."""
    from bench.report_verdict import arm_compute
    flops = []
    for row in table.itertuples(index=False):
        cfg = load_config(params_path, row.arm)
        try:
            flops.append(arm_compute(cfg, steps=int(row.optimizer_steps))["train_flops"])
        except NotImplementedError:   # a task without an example batch
            flops.append(math.nan)
    table = table.drop(columns=[c for c in ("train_flops", "flop_ratio_to_e2e") if c in table])
    table["train_flops"] = flops
    e2e = table[table["mode"].astype(str).str.startswith("e2e")]
    table["flop_ratio_to_e2e"] = table["train_flops"] / float(e2e.iloc[0]["train_flops"]) if len(e2e) else math.nan
    return table


def relabel(params_path) -> Path:
    raw = read_params(params_path)
    suite = str(raw.get("suite") or Path(params_path).parent.name)
    out = Path(raw.get("results_dir") or "results") / suite
    csv = out / "comparison.csv"
    if not csv.exists():
        raise FileNotFoundError(f"{csv} not found: nothing to relabel (run `bench compare {params_path}`)")
    table = counted_flops(params_path, pd.read_csv(csv))
    atomic.write_csv(csv, table)
    note = flop_note(table)
    banner = "\n".join([
        BANNER[0],
        f"**One seed, pre-protocol figures, not a verdict.** Relabelled by `{_command()}` on "
        f"{dt.date.today().isoformat()}: training FLOPs counted with FlopCounterMode (one step of each block × "
        "its steps; a DB block's share is steps / B). " + note[0].upper() + note[1:] + ".\n",
        _markdown_table(table[["arm", "mode", "optimizer_steps", "layer_evals", "train_flops", "flop_ratio_to_e2e"]]),
        BANNER[1]])
    for md_path in sorted(out.glob("*.md")):
        md = md_path.read_text()
        md = re.sub(re.escape(BANNER[0]) + ".*?" + re.escape(BANNER[1]) + "\n*", "", md, flags=re.S)
        if not note.startswith(CLAIM):
            md = md.replace(CLAIM, note)
        if md_path.name == "comparison.md":
            title, _, rest = md.partition("\n")
            md = f"{title}\n\n{banner}\n{rest}"
        atomic.write_text(md_path, md)
    return out / "comparison.md"
