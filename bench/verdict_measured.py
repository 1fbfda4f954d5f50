"""The claims judged from measurements rather than from trained seeds: (d) training memory, from
`bench memory`'s results/memory/<suite>.csv, and (e) sampling cost, from `bench gen-report`'s
results/<suite>/sampling_cost.csv.  Bytes and counted layer evaluations are deterministic and a
timing is one measurement, so these rows carry no interval.

`bench verdict PARAMS --measured-only` re-judges (d) and (e) into an existing verdict.csv and
comparison.md without the runs (a memory measurement added after the seeds were judged); the
seed-based rows are left exactly as the full `bench verdict` wrote them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from bench import atomic
from bench.config import ConfigError, load_config, read_params
from bench.protocol import CLAIMS, Protocol, load_protocol
from bench.report import display_scale

MEASURED = ("d", "e")


def _judged(d: float, margin: float) -> str:
    return "matches" if abs(d) < margin else "better" if d > 0 else "worse"


def memory_rows(suite: str, B: int, margin: float = 0.1) -> list[dict]:
    """Claim (d), from `bench memory`: DB's measured peak (offload, this B) against each baseline
    a user would pick instead.  Bytes are measured, not sampled: one measurement, no interval.
    Signed difference: ratio/B − 1; matches within ±margin (10% of B), better/worse beyond."""
    path = Path("results/memory") / f"{suite}.csv"
    if B == 1:   # e.g. the recurrent suites: one denoiser over the whole range, whose claim is compute (f)
        return [{"claim": "d", "statement": CLAIMS["d"], "verdict": "not tested",
                 "note": "does not apply at B = 1 (one block over the whole σ range: no B-fold saving is claimed)"}]
    if not path.exists():
        return [{"claim": "d", "statement": CLAIMS["d"], "verdict": "not tested", "note": f"no {path}"}]
    m = pd.read_csv(path)
    m = m[m["batch_size"] == m["batch_size"].max()]
    db = m[(m["mode"] == "dblocks") & (m["residency"] == "offload") & (m["B"] == B)]
    if db.empty:
        return [{"claim": "d", "statement": CLAIMS["d"], "verdict": "not tested", "note": f"no B = {B} row in {path}"}]
    peak = float(db["peak_bytes"].iloc[0])
    rows = []
    for base in ("e2e", "e2e+accum", "e2e+ckpt"):
        ref = m[(m["mode"] == base) & ((m["B"] == B) if base == "e2e+accum" else (m["B"] == 1))]
        if ref.empty:
            continue
        ratio = float(ref["peak_bytes"].iloc[0]) / peak
        d = ratio / B - 1
        rows.append({"claim": "d", "statement": f"{CLAIMS['d']} (against {base})", "pair": f"{base} vs dblocks offload",
                     "metric": "peak_mem_ratio / B", "seeds": 1, "mean_diff": d, "ci_low": d, "ci_high": d,
                     "margin": margin, "verdict": _judged(d, margin),
                     "note": f"{base} peak / DB peak = {ratio:.2f} at B = {B} (measured bytes, deterministic: one measurement)"})
    return rows


def sampling_rows(out: Path, proto: Protocol, B: int, margin: float = 0.1) -> list[dict]:
    """Claim (e), from `bench gen-report`'s sampling_cost.csv (both arms of a pair timed in
    alternation, same steps and batch, seed 0's weights): E2E / DB time per image against B.
    One timing, no interval; the layer-evaluation ratio beside it is counted, not timed."""
    path = out / "sampling_cost.csv"
    if not path.exists():
        return []
    cost = pd.read_csv(path).set_index("arm")
    rows = []
    for name, (e2e, db) in proto.pairs.items():
        if e2e not in cost.index or db not in cost.index:
            continue
        ratio = float(cost.at[e2e, "ms_per_image"] / cost.at[db, "ms_per_image"])
        layers = float(cost.at[e2e, "layer_evals_per_image"] / cost.at[db, "layer_evals_per_image"])
        d = ratio / B - 1
        rows.append({"claim": "e", "statement": CLAIMS["e"], "pair": name, "e2e_arm": e2e, "db_arm": db,
                     "metric": "sampling time ratio / B", "seeds": 1, "mean_diff": d, "ci_low": d, "ci_high": d,
                     "margin": margin, "verdict": _judged(d, margin),
                     "note": f"E2E / DB time per image = {ratio:.2f} at B = {B}, {int(cost.at[db, 'steps'])} steps each "
                             f"(timed in alternation, one measurement); layer evaluations per image {layers:.2f}× (counted)"})
    return rows


def measured_rows(params_path, proto: Protocol, task: str, out: Path) -> list[dict]:
    B = int((read_params(params_path).get("diffusion") or {}).get("num_blocks", 3))
    return memory_rows(proto.suite, B) + (sampling_rows(out, proto, B) if task == "generation" else [])


def rejudge_measured(params_path) -> Path:
    """Replace the (d, e) rows of results/<suite>/verdict.csv and comparison.md's verdict table with
    fresh ones from the measurement files; every other row is kept as it was."""
    from bench.report_verdict import COMPUTE_HEADING, VERDICTS_HEAD, untested_rows, verdict_markdown_table
    from bench.tasks import task_class
    raw = read_params(params_path)
    proto = load_protocol(params_path)
    out = Path(raw.get("results_dir") or "results") / proto.suite
    verdict_csv, comparison = out / "verdict.csv", out / "comparison.md"
    for p in (verdict_csv, comparison):
        if not p.exists():
            raise ConfigError(f"bench verdict {params_path} --measured-only: no {p} (run `bench verdict {params_path}` first)")
    task = load_config(params_path, proto.arms[0], seed=proto.seeds[0]).task
    old = pd.read_csv(verdict_csv)
    kept = old[~old["claim"].isin(MEASURED)]
    judged, untested = kept[kept["verdict"] != "not tested"], kept[kept["verdict"] == "not tested"]
    fresh = pd.DataFrame(measured_rows(params_path, proto, task, out))
    fresh = pd.concat([fresh, pd.DataFrame(untested_rows(set(kept["claim"]) | set(fresh.get("claim", [])), task))])
    fresh.insert(0, "suite", proto.suite)
    verdicts = pd.concat([judged, fresh[fresh["verdict"] != "not tested"], untested,
                          fresh[fresh["verdict"] == "not tested"]], ignore_index=True)
    verdicts = verdicts[[c for c in old.columns] + [c for c in verdicts.columns if c not in old.columns]]
    atomic.write_csv(verdict_csv, verdicts)

    text = comparison.read_text()
    head_end = text.index(VERDICTS_HEAD) + len(VERDICTS_HEAD)
    tail_start = text.index("\n" + COMPUTE_HEADING, head_end)
    scale = display_scale(task_class(task).metric)
    claims = "d and e" if task == "generation" else "d"
    read = [Path("results/memory") / f"{proto.suite}.csv"] + ([out / "sampling_cost.csv"] if task == "generation" else [])
    sources = " and ".join(str(p) for p in read if p.exists())
    note = (f"Claim {claims} re-judged by `bench verdict {params_path} --measured-only` on "
            f"{dt.date.today().isoformat()} {f'from {sources}' if sources else '(no measurement file read)'}; "
            "every other row is the seed runs' above.\n")
    body = "\n" + verdict_markdown_table(verdicts, scale) + "\n" + note
    return atomic.write_text(comparison, text[:head_end] + body + text[tail_start:])
