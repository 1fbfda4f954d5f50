"""The ImageNet-latent path at small size — a wiring test, not a result: a small ImageFolder of real
images (Fashion-MNIST written out as PNGs) and a small randomly initialised AutoencoderKL standing
in for the sd-vae-ft-ema weights.  `bench latents` writes a memory-mapped store batch by batch and
resumes after a kill; training reads rows through the memmap, flips drawn per step; the FID
references stream from the ImageFolder in batches."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from bench.config import load_config                                   # noqa: E402
from bench.data.images import load_dataset                             # noqa: E402
from bench.data.latents import FolderImages, encode, latent_rows, load_latents, store_meta   # noqa: E402
from bench.metrics.fid import DEFAULT_WEIGHTS, prepare_weights         # noqa: E402
from bench.tasks import make_task                                      # noqa: E402
from bench.train import train                                          # noqa: E402

from conftest import ROOT                                              # noqa: E402

PARAMS = """
suite: tinylatent
task: generation
runs_dir: {runs}
data: {{dataset: imagenet_latents, image_dir: {images}, vae: {vae}, image_size: 32, hflip: true, val_fraction: 0.2}}
model: {{arch: dit, size: "", image_size: 4, patch_size: 2, in_channels: 4, num_classes: 10, depth: 4, hidden: 32, heads: 2}}
diffusion: {{num_blocks: 2, gamma: 0.05}}
train: {{epochs: 1, batch_size: 8, lr: 1.0e-3, curve_points: 1, threads: 1, ckpt_every: 100}}
eval: {{batch_size: 8, steps: 4, fid_n: 8, curve_fid_n: 8, fid_ref_n: 8, fid_splits: [test], fid_cache: {cache},
        fid_weights: {weights}, kid_subset_size: 4, kid_subsets: 2, grid_columns: 2}}
arms:
  e2e: {{mode: e2e}}
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory, fashion_root):
    """Fashion-MNIST as an ImageFolder (6 train, 2 val images per class) and a random tiny VAE."""
    from PIL import Image
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("latent_sources")
    data = load_dataset("fashion_mnist", fashion_root, splits=("train", "test"))
    for split, src, per_class in (("train", data["train"], 6), ("val", data["test"], 2)):
        for c in range(10):
            (root / "images" / split / f"c{c}").mkdir(parents=True)
            idx = torch.nonzero(src.labels == c).flatten()[:per_class]
            for i in idx.tolist():
                Image.fromarray(src.images[i, 0].numpy()).save(root / "images" / split / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    vae.save_pretrained(root / "vae")
    return root


def params_file(tmp_path, sources):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", images=sources / "images", vae=sources / "vae",
                               cache=tmp_path / "fidcache", weights=ROOT / DEFAULT_WEIGHTS))
    return p


class KilledAfter:
    """The VAE, killed after `n` batches (a SIGKILL stand-in at a batch boundary)."""

    def __init__(self, vae, n):
        self.vae, self.n = vae, n

    def encode(self, x):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.vae.encode(x)


def test_store_is_written_incrementally_and_resumes_to_the_same_latents(tmp_path, sources):
    from bench.data.latents import load_vae
    cfg = load_config(params_file(tmp_path, sources), "e2e")
    d = cfg.data
    vae = load_vae(d)
    with pytest.raises(KeyboardInterrupt):
        encode(d, batch_size=16, log=lambda *_: None, progress=False, vae=KilledAfter(vae, 2), num_workers=0)
    root = sources / "images" / "latents-32"
    assert json.loads((root / "train.done.json").read_text())["rows"] == 32 and store_meta(d) is None
    encode(d, batch_size=16, log=lambda *_: None, progress=False, vae=vae, num_workers=0)
    resumed = np.array(np.load(root / "train.npy"))
    assert store_meta(d) == {"scale": 0.18215, "image_size": 32, "vae": str(sources / "vae"), "num_classes": 10,
                             "splits": ["train", "val"]}
    # an uninterrupted encode of the same images, elsewhere, gives the same latents
    d2 = load_config(params_file(tmp_path, sources), "e2e", [f"data.latents={tmp_path / 'straight'}"]).data
    encode(d2, batch_size=16, log=lambda *_: None, progress=False, vae=vae, num_workers=0)
    np.testing.assert_array_equal(resumed, np.load(tmp_path / "straight" / "train.npy"))
    z, y = load_latents(d, "train")
    assert isinstance(z, np.memmap) and z.shape == (60, 2, 4, 4, 4) and sorted(set(y.tolist())) == list(range(10))
    # the flip is a choice of row, not another example; the stored flip is the flipped image's latent
    flip = np.array([0, 1, 1, 0])
    x = latent_rows(z, np.array([5, 3, 5, 3]), flip)
    assert torch.equal(x[0], torch.from_numpy(z[5, 0].astype(np.float32)))
    assert torch.equal(x[2], torch.from_numpy(z[5, 1].astype(np.float32))) and not torch.equal(x[0], x[2])


def test_training_and_fid_run_on_the_store(tmp_path, sources):
    p = params_file(tmp_path, sources)
    prepare_weights(ROOT / DEFAULT_WEIGHTS, log=lambda *_: None)
    cfg = load_config(p, "e2e")
    encode(cfg.data, batch_size=16, log=lambda *_: None, progress=False, num_workers=0)
    task = make_task(cfg)
    task.check()
    task.load()
    assert task.num_train == 48   # images (60 minus the 20% validation carve), not images × flips
    ref = task.val_data.read()
    assert isinstance(ref, FolderImages) and len(ref) == 8
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 32, 32) for b in ref)
    s = train(cfg, progress=False, log=lambda *_: None)
    assert s["optimizer_steps"] == 6 and np.isfinite(s["val_fid"])
