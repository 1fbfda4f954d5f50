import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENCH_MLFLOW", "0")  # tests never write to the user's MLflow store


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The real Fashion-MNIST, obtained offline (Debian package) if it is not there yet."""
    from bench.data.images import fashion_mnist_ready, fetch_fashion_mnist
    root = ROOT / "data"
    if not fashion_mnist_ready(root / "fashion_mnist"):
        fetch_fashion_mnist(root / "fashion_mnist")
    return root


def write_params(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
