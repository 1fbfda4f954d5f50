"""Which source files each pipeline command reads, as files DVC can depend on.

A stage that depended on the whole `bench/` package reran every training whenever any file
changed (a report's wording, a help string).  Instead the root pipeline's `code` stage runs
`bench code-deps`, which writes code/<command>-<task>.sha256: one `sha256  path` line per file of
the command's import closure (every `import bench…` in those files, including imports inside
functions, followed transitively), for that task's module.  Each suite stage depends on the
files of the commands it runs, so it reruns exactly when code it can execute changed; a changed
file outside the closure leaves it alone.

The command line itself (bench/cli.py: argument parsing and dispatch) is not in the closures:
what a command computes lives in its entry modules below.  tests/test_code_deps.py runs the
commands and checks that every bench module they imported is in their closure.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from bench import atomic
from bench.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("code")

# command → the modules its work starts from (the task's module is added per task)
ENTRIES = {
    "prepare": ["bench.train", "bench.track"],
    "train": ["bench.train"],
    "evaluate": ["bench.evaluate"],
    "tune": ["bench.tune"],
    "verdict": ["bench.report_verdict"],
    "scaling": ["bench.scaling"],
    "memory": ["bench.benchmark"],
    "compare": ["bench.report", "bench.report_relabel"],
    "lm-report": ["bench.tasks.lm_report"],
    "gen-report": ["bench.report_generation"],
    "fid": ["bench.metrics.fid", "bench.cli_generation"],
    "latents": ["bench.data.latents"],
    "data": ["bench.data.text", "bench.data.images", "bench.data.imagefolder"],
    "rnn-reference": ["bench.models.rnn_lm"],
    "report": ["bench.report"],
}
TASK_FREE = {"data", "latents", "fid", "rnn-reference", "report"}   # commands that run no task


def module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every bench module an `import` in the file names (at any depth: lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bench"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)   # `from bench import x`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bench"))
    return found


def closure(entries: list[str]) -> list[Path]:
    """The files of the entry modules, their packages' __init__ files and everything they import."""
    seen, todo, files = set(), list(entries), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(module)
        if path is None:   # `from bench.x import some_function`: not a module
            continue
        files.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(imported_modules(path))
    return sorted(files)


def task_module(task: str) -> str:
    return TASKS[task].split(":")[0]


def fingerprints() -> dict[str, list[Path]]:
    """code/<name>.sha256 → its files, for every command (and every task where it runs one)."""
    out = {}
    for command, entries in ENTRIES.items():
        if command in TASK_FREE:
            out[command] = closure(entries)
        else:
            for task in TASKS:
                out[f"{command}-{task}"] = closure([*entries, task_module(task)])
    return out


def write(out_dir: Path = OUT) -> list[Path]:
    written = []
    for name, files in fingerprints().items():
        lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(ROOT).as_posix()}" for f in files]
        written.append(atomic.write_text(out_dir / f"{name}.sha256", "\n".join(lines) + "\n"))
    return written


COMMAND_OF = [   # a stage command → its fingerprint (without the task)
    (r"\bbench (prepare)\b", "prepare"), (r"\bbench (train)\b", "train"), (r"\bbench (evaluate)\b", "evaluate"),
    (r"\bbench (tune)\b", "tune"), (r"\bbench (verdict)\b", "verdict"), (r"\bbench (memory)\b", "memory"),
    (r"\bbench (scaling)\b", "scaling"),
    (r"\bbench (compare)\b", "compare"), (r"\bbench (lm-report)\b", "lm-report"),
    (r"\bbench (gen-report)\b", "gen-report"), (r"\bbench (fid-weights|fid-stats)\b", "fid"),
    (r"\bbench (latents)\b", "latents"), (r"\bbench (data)\b", "data"),
    (r"-m bench\.models\.rnn_lm\b", "rnn-reference"), (r"\bbench (report)\b", "report"),
]


def required_code(dvc_yaml: Path, name: str, stage: dict) -> list[str]:
    """The code/*.sha256 files a stage must depend on: one per harness command it runs, for the
    task of the params file that command reads."""
    import re

    from bench.config import read_params
    body = stage.get("do", stage)
    cmds = body.get("cmd")
    need = []
    for cmd in cmds if isinstance(cmds, list) else [cmds]:
        for pattern, command in COMMAND_OF:
            if not re.search(pattern, str(cmd)):
                continue
            if command in TASK_FREE:
                need.append(f"code/{command}.sha256")
                continue
            params = re.search(r"(suites/\S+\.yaml)", str(cmd))
            task = read_params(ROOT / params.group(1)).get("task", "classification") if params else "classification"
            need.append(f"code/{command}-{task}.sha256")
    return list(dict.fromkeys(need))
