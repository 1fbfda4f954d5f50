"""ImageNet as Stable-Diffusion VAE latents (DiT's and the paper's ImageNet-256 setting), in a
memory-mapped store written incrementally.

The user provides two paths in params: `data.image_dir`, an ImageFolder root with train/ and val/
(one sub-folder per class, val used as the test split), and `data.vae`, a directory holding the
`stabilityai/sd-vae-ft-ema` weights in diffusers format (config.json + weights).  `bench latents`
encodes every image once (centre crop to data.image_size, as DiT's ADM-style preprocessing) and
its horizontal flip, batch by batch, into the store at `data.latents` (default
<image_dir>/latents-<size>/):

  <split>.npy          float16 (N, 2, 4, s, s): each image's latent and its flip's (numpy memmap)
  <split>.labels.npy   int64 (N,)
  <split>.done.json    rows written so far: a killed `bench latents` continues from there
  meta.json            scale, image size, VAE path, classes; written last (the store is complete)

Memory stays bounded by one batch however large the dataset; training reads rows through the
memmap.  A flip is an augmentation drawn per step (data.hflip: which of the two latents a row
uses), not an extra example, so an epoch is one pass over the images.  The encoder's mean is used
(no sampling), scaled by 0.18215, the SD VAE's factor.  Needs diffusers (the `vae` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench import atomic
from bench.config import ConfigError
from bench.data.images import DatasetMissing

SCALE = 0.18215
SPLITS = ("train", "val")
_VAE = {}


def latents_path(d) -> Path:
    return Path(d.latents) if d.latents else Path(d.image_dir or ".") / f"latents-{d.image_size}"


def store_meta(d) -> dict | None:
    """The complete store's meta.json, or None while it is missing or unfinished."""
    meta = latents_path(d) / "meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def check_sources(d, need_latents: bool = True) -> None:
    """One line naming every missing user path, before any compute."""
    if need_latents and store_meta(d) is not None:
        return
    missing = []
    if not d.image_dir or not (Path(d.image_dir) / "train").is_dir():
        missing.append(f"ImageNet ImageFolder data.image_dir={d.image_dir or '(unset)'} (needs train/ and val/)")
    if not d.vae or not (Path(d.vae) / "config.json").is_file():
        missing.append(f"VAE weights data.vae={d.vae or '(unset)'} (stabilityai/sd-vae-ft-ema in diffusers format)")
    if missing:
        raise DatasetMissing("missing " + " and ".join(missing) + "; set both paths in the suite's params.yaml"
                             + (f", then run `bench latents` (no complete store at {latents_path(d)})" if need_latents else ""))


def load_vae(d, device="cpu"):
    key = (d.vae, str(device))
    if key not in _VAE:
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise ConfigError("the VAE needs diffusers: pip install -e '.[vae]'") from None
        _VAE[key] = AutoencoderKL.from_pretrained(d.vae).to(device).eval().requires_grad_(False)
    return _VAE[key]


def _folder(d, split: str, size: int):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    root = Path(d.image_dir) / ("train" if split == "train" else "val")
    tf = T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])   # ImageFolder's loader gives RGB
    return ImageFolder(str(root), transform=tf)


class FolderImages:
    """uint8 (n, 3, S, S) centre crops of some images of a split, read in batches: an iterable
    with a length, so FID features stream through bounded memory (bench.metrics.fid.features)."""

    def __init__(self, d, split: str, indices, batch_size: int = 100):
        self.ds, self.indices, self.batch_size = _folder(d, split, d.image_size), list(map(int, indices)), batch_size

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield torch.stack([self.ds[j][0] for j in self.indices[i:i + self.batch_size]])


def real_images(d, split: str, n: int = 0) -> FolderImages:
    """The first n images of a split (0: all), streamed in batches, for FID."""
    return FolderImages(d, split, range(n or len(_folder(d, split, d.image_size))))


def _open(path: Path, shape, dtype):
    if path.exists():
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != tuple(shape) or arr.dtype != dtype:
            raise ValueError(f"{path} holds {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{tuple(shape)}; "
                             "remove the store to encode afresh")
        return arr
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


@torch.no_grad()
def encode(d, device="cpu", batch_size: int = 64, log=print, progress: bool = True, vae=None,
           num_workers: int = 4) -> Path:
    """Encode train and val into the store, resumably (see the module docstring)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm
    check_sources(d, need_latents=False)
    out = latents_path(d)
    if store_meta(d) is not None:
        log(f"latents: {out} already complete")
        return out
    vae = vae if vae is not None else load_vae(d, device)
    classes = None
    for split in SPLITS:
        ds = _folder(d, split, d.image_size)
        classes = classes or len(ds.classes)
        n, side = len(ds), d.image_size // 8
        lat = _open(out / f"{split}.npy", (n, 2, 4, side, side), np.float16)
        lab = _open(out / f"{split}.labels.npy", (n,), np.int64)
        done_file = out / f"{split}.done.json"
        done = json.loads(done_file.read_text())["rows"] if done_file.exists() else 0
        loader = DataLoader(Subset(ds, range(done, n)), batch_size=batch_size, num_workers=num_workers,
                            pin_memory=torch.device(device).type == "cuda")
        bar = tqdm(total=n, initial=done, desc=f"latents {split}", unit="img", disable=not progress)
        for x, y in loader:
            x = x.to(device).float() / 127.5 - 1
            z = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean * SCALE
            z = torch.stack(z.chunk(2), 1)                       # (b, 2, 4, s, s): image, flip
            lat[done:done + len(x)] = z.half().cpu().numpy()
            lab[done:done + len(x)] = y.numpy()
            done += len(x)
            lat.flush(), lab.flush()
            atomic.write_json(done_file, {"rows": done, "n": n})   # after the rows are on disk
            bar.update(len(x))
        bar.close()
        del lat, lab
    atomic.write_json(out / "meta.json", {"scale": SCALE, "image_size": d.image_size, "vae": str(d.vae),
                                          "num_classes": classes, "splits": list(SPLITS)})
    log(f"latents: {out} complete")
    return out


def load_latents(d, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(latents (N, 2, 4, s, s) memmap, labels (N,)) of a split; nothing is read until indexed."""
    if store_meta(d) is None:
        check_sources(d)
    key = "train" if split == "train" else "val"
    root = latents_path(d)
    return np.load(root / f"{key}.npy", mmap_mode="r"), np.load(root / f"{key}.labels.npy", mmap_mode="r")


def latent_rows(latents: np.ndarray, rows: np.ndarray, flip: np.ndarray | None) -> torch.Tensor:
    """float32 latents of these rows, each the image's (0) or its flip's (1)."""
    pick = np.zeros(len(rows), dtype=np.int64) if flip is None else flip.astype(np.int64)
    order = np.argsort(rows, kind="stable")                # sorted reads from the memmap, then put back
    out = np.empty((len(rows), *latents.shape[2:]), dtype=np.float16)
    out[order] = latents[rows[order], pick[order]]
    return torch.from_numpy(out.astype(np.float32))


@torch.no_grad()
def decode(d, z: torch.Tensor) -> torch.Tensor:
    """Latents → images in [−1, 1]."""
    vae = load_vae(d, z.device)
    return vae.decode(z / SCALE).sample
