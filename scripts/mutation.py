"""How strong are the gates?  Mutation testing of the method core with mutmut, written to
results/mutation.md: the score per file and every surviving mutant (its diff), so each can be
judged equivalent or answered with a test.

    pip install mutmut                                   # a development tool, not a dependency
    python scripts/mutation.py                           # bench/diffusion/ (σ and masking) and bench/blocks.py
    python scripts/mutation.py --only bench/verdict.py --tests tests/test_protocol.py

It runs in a scratch clone of HEAD (mutmut writes a `mutants/` copy of the tree), with the tests
that exercise the mutated files as the killer; mutmut runs, per mutant, only the tests that
cover the mutated function.  Not part of CI: a full run takes tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["bench/diffusion/*", "bench/blocks.py"]
# the unit tests of what is mutated: no test that trains a model or loads a dataset (with those, a
# mutant of a function every training step calls costs minutes, and mutmut's CPU limit times it out)
KILLERS = ["tests/test_diffusion.py", "tests/test_diffusion_bounds.py", "tests/test_masking_bounds.py",
           "tests/test_block_optimizer.py", "tests/test_blocks.py",
           *(f"tests/test_mdm.py::{t}" for t in (
               "test_schedule_weight_is_minus_dalpha_over_one_minus_alpha", "test_equal_mass_partition",
               "test_block_ownership_overlap_and_sampling", "test_masking_rate_follows_alpha", "test_md4_loss_weighting",
               "test_elbo_estimator_is_unbiased_on_a_computable_case", "test_sampler_reveals_every_token_and_follows_the_predictor",
               "test_model_starts_uniform_and_as_identity_layers", "test_gradient_locality_per_block"))]


def mutmut(args: list[str], cwd: Path) -> str:
    exe = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    return done.stdout + done.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=TARGETS, help="files (globs) to mutate")
    ap.add_argument("--tests", nargs="+", default=KILLERS, help="the tests that may kill a mutant")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run side by side")
    ap.add_argument("--out", default=str(ROOT / "results" / "mutation.md"), help="the report")
    a = ap.parse_args()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-mutation-") as tmp:
        work = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
        for sub in ("fashion_mnist", "text", "lm"):   # the tests' real data (Fashion-MNIST, text), not in git
            if (ROOT / "data" / sub).exists() and not (work / "data" / sub).exists():
                (work / "data").mkdir(exist_ok=True)
                (work / "data" / sub).symlink_to(ROOT / "data" / sub)
        config = "\n[tool.mutmut]\nsource_paths = [\"bench\"]\n" + \
            f"only_mutate = {list(a.only)!r}\npytest_add_cli_args_test_selection = {list(a.tests)!r}\n"
        with open(work / "pyproject.toml", "a") as f:
            f.write(config.replace("'", '"'))
        log = mutmut(["run", "--max-children", str(a.jobs)], work)
        listing = mutmut(["results", "--all", "true"], work)
        rows = re.findall(r"^\s*(\S+__mutmut_\d+): (\w[\w ]*)$", listing, flags=re.M)
        survivors = [name for name, state in rows if state == "survived"]
        diffs = {name: mutmut(["show", name], work) for name in survivors}
    if not rows:
        sys.exit(f"mutmut reported no mutants; its output ended:\n{log[-2000:]}")
    by_file: dict[str, Counter] = {}
    for name, state in rows:
        module = name.split(".x_")[0].split(".xǁ")[0]
        by_file.setdefault(module, Counter())[state] += 1
    states = ["killed", "survived"] + sorted({s for c in by_file.values() for s in c} - {"killed", "survived"})
    killed = sum(c["killed"] for c in by_file.values())
    timeouts = sum(c["timeout"] for c in by_file.values())
    total = sum(sum(c.values()) for c in by_file.values())
    md = [f"# Mutation testing: {', '.join(a.only)}\n",
          f"Written by `python scripts/mutation.py` on {dt.date.today().isoformat()} at code {sha[:12]}; killer: "
          f"pytest {' '.join(a.tests)} (mutmut runs the tests covering each mutated function).\n",
          f"**Score: {killed} of {total} mutants killed ({100 * killed / max(total, 1):.1f}%);** detected (killed or "
          f"timed out, a hang CI would also catch): {killed + timeouts} ({100 * (killed + timeouts) / max(total, 1):.1f}%). "
          "A survivor is either equivalent (no behaviour changes) or a gap in the tests; each is listed below.\n",
          "States are mutmut's: *no tests* = no killer test runs the mutated function (a gap as real as a "
          "survivor); *timeout* = the tests ran past mutmut's limit (not counted as killed).\n",
          "| module | " + " | ".join(states) + " |", "|---|" + "---|" * len(states)]
    for module, c in sorted(by_file.items()):
        md.append(f"| {module} | " + " | ".join(str(c[s]) for s in states) + " |")
    md.append("\n## Surviving mutants\n")
    for name in survivors:
        diff = "\n".join(line for line in diffs[name].splitlines() if line.startswith(("+", "-", "@")))
        md += [f"### {name}\n", "```diff", diff, "```\n"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    print(f"{killed}/{total} killed; wrote {out}")


if __name__ == "__main__":
    main()
