"""Atomic file writes: a result or checkpoint is either the old file or the complete new one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


TMP_TAG = ".tmp-"   # `.<name>.tmp-XXXX`: a write in progress (or one a kill interrupted)
_UMASK = os.umask(0)
os.umask(_UMASK)


def remove_orphans(directory) -> list[Path]:
    """Temp files a killed write left behind (call while holding the directory's run lock)."""
    orphans = [p for p in Path(directory).glob(f".*{TMP_TAG}*") if p.is_file()]
    for p in orphans:
        p.unlink()
    return orphans


def _replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp's 0600 → what the umask gives any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return _replace(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def torch_save(path, obj) -> Path:
    return _replace(path, lambda f: torch.save(obj, f))


def write_csv(path, frame) -> Path:
    """A pandas DataFrame as CSV."""
    return write_text(path, frame.to_csv(index=False))


def save_figure(path, fig, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG; the figure is closed."""
    import matplotlib.pyplot as plt
    try:
        return _replace(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
