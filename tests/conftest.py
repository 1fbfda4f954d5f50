import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENCH_MLFLOW", "0")  # tests never write to the user's MLflow store


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a test module: on a shared 2-core machine two threads oversubscribe and
    run several times slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The real Fashion-MNIST, obtained offline (Debian package) if it is not there yet."""
    from bench.data.images import fashion_mnist_ready, fetch_fashion_mnist
    root = ROOT / "data"
    if not fashion_mnist_ready(root / "fashion_mnist"):
        fetch_fashion_mnist(root / "fashion_mnist")
    return root


TINY_VIT = """
suite: tiny
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 6, heads: 2, mlp_dim: 64}}
diffusion: {{num_blocks: 3, gamma: 0.05}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


# a 4-layer ViT at B = 2 on 256 real training images: the multi-process tests (data- and block-parallel)
TINY_RANKS = """
suite: tiny
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 256, test_subset: 200, val_fraction: 0.1}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 32, depth: 4, heads: 2, mlp_dim: 64, dropout: 0.0}}
diffusion: {{num_blocks: 2, gamma: 0.05}}
train: {{epochs: 1.0, batch_size: 32, lr: 2.0e-3, warmup_epochs: 0.2, ckpt_every: {ckpt_every}, curve_points: 1, threads: 1}}
eval: {{batch_size: 200}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


@pytest.fixture
def tiny_task(tmp_path):
    """make(arm, *overrides) → the Task of a tiny ViT config (no data is loaded)."""
    from bench.config import load_config
    from bench.tasks import make_task
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_VIT.format(runs=tmp_path / "runs", root=tmp_path / "data"))

    def make(arm="dblocks", *overrides):
        return make_task(load_config(path, arm, list(overrides)))
    return make
