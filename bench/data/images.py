"""Image datasets: where they come from, how they are checked, and how batches are drawn.

Fashion-MNIST (the CPU-scale stand-in) is obtained offline, in this order of preference:
  1. a directory the user gives (`bench data fashion-mnist --source DIR`, or $BENCH_FASHION_MNIST_DIR)
     holding the four IDX files, gzipped or not;
  2. Debian's `dataset-fashion-mnist` package, if installed (/usr/share/datasets/fashion-mnist);
  3. the same package fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no root);
  4. torchvision's download, where a network exists.
The four files are stored *uncompressed* in data/fashion_mnist/ and checked against the SHA-256
of their content, so every source yields the same bytes and `data.dvc` the same hash.

CIFAR-10/100 are read in torchvision's on-disk format from a user path (they cannot be
downloaded on the machines this harness is developed on); a missing dataset stops the run with a
message naming the path that was searched and how to provide it.

A user's own ImageFolder (`data.dataset: imagefolder`) is prepared into arrays by
bench/data/imagefolder.py, which also holds the calls the image tasks make for every dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import atomic
from bench.seeding import stream_seed

FASHION_MNIST_FILES = {  # uncompressed content: sha256, bytes
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47040016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7840016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10008),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"

# per-channel mean and std of the training images (CIFAR-100: the official code's values)
NORMALISATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
SHAPES = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}  # channels, size, classes
CLASS_NAMES = {   # for labelled sample grids
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
DATASETS = tuple(SHAPES)


class DatasetMissing(RuntimeError):
    """A dataset is not where the run looked for it; the message says how to provide it."""


# ---- obtaining Fashion-MNIST ------------------------------------------------------------------
def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in a directory (plain or .gz, possibly under FashionMNIST/raw)."""
    for d in (directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"):
        found = {}
        for name in FASHION_MNIST_FILES:
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    return None


def _install_verified(found: dict[str, Path], out: Path, origin: str) -> Path:
    """Decompress into a temporary directory beside `out`, verify, then move into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion_mnist.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        for name, src in found.items():
            opener = gzip.open if src.suffix == ".gz" else open
            with opener(src, "rb") as fin, open(tmp / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            digest, size = FASHION_MNIST_FILES[name]
            if (tmp / name).stat().st_size != size or atomic.file_digest(tmp / name) != digest:
                raise DatasetMissing(f"{src} (from {origin}) is not the Fashion-MNIST file {name}: "
                                     f"its content hash differs from the published one")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def fashion_mnist_ready(out: Path) -> bool:
    return all((out / n).is_file() and (out / n).stat().st_size == s for n, (_, s) in FASHION_MNIST_FILES.items())


def fetch_fashion_mnist(out: str | Path = "data/fashion_mnist", source: str | Path | None = None,
                        log=print) -> Path:
    """Obtain Fashion-MNIST into `out` (see the module docstring for the order of sources)."""
    out = Path(out)
    source = source or os.environ.get("BENCH_FASHION_MNIST_DIR")
    tried = []
    if source:
        found = _find_idx_files(Path(source))
        if not found:
            raise DatasetMissing(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], …) in {source}")
        log(f"Fashion-MNIST: using {source}")
        return _install_verified(found, out, f"user directory {source}")
    if fashion_mnist_ready(out):
        log(f"Fashion-MNIST: already in {out}")
        return out
    found = _find_idx_files(DEBIAN_DIR)
    if found:
        log(f"Fashion-MNIST: using the installed Debian package ({DEBIAN_DIR})")
        return _install_verified(found, out, f"Debian package {DEBIAN_PACKAGE} ({DEBIAN_DIR})")
    tried.append(f"{DEBIAN_DIR} (not installed)")
    if shutil.which("apt-get") and shutil.which("dpkg-deb"):
        with tempfile.TemporaryDirectory() as tmp:
            log(f"Fashion-MNIST: apt-get download {DEBIAN_PACKAGE}")
            r = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0 and "Unable to locate" in r.stderr and os.geteuid() == 0:
                log("Fashion-MNIST: package lists are empty; running apt-get update")
                subprocess.run(["apt-get", "update"], capture_output=True)
                r = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
            if r.returncode == 0 and debs:
                subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
                found = _find_idx_files(Path(tmp) / "x" / DEBIAN_DIR.relative_to("/"))
                if found:
                    return _install_verified(found, out, f"Debian package {debs[0].name} (apt-get download)")
            tried.append(f"apt-get download {DEBIAN_PACKAGE} ({(r.stderr or 'no .deb').strip().splitlines()[-1]})")
    else:
        tried.append("apt-get download (apt-get/dpkg-deb not available)")
    try:
        import torchvision
        with tempfile.TemporaryDirectory() as tmp:
            log("Fashion-MNIST: trying torchvision's download")
            torchvision.datasets.FashionMNIST(tmp, train=True, download=True)
            torchvision.datasets.FashionMNIST(tmp, train=False, download=True)
            found = _find_idx_files(Path(tmp))
            if found:
                return _install_verified(found, out, "torchvision download")
    except Exception as e:  # no network is the usual reason
        tried.append(f"torchvision download ({type(e).__name__})")
    raise DatasetMissing("could not obtain Fashion-MNIST; tried: " + "; ".join(tried)
                         + ". Provide the four IDX files with `bench data fashion-mnist --source DIR`")


# ---- loading ----------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "ImageSplit":
        return ImageSplit(self.images[:n], self.labels[:n]) if n else self


def dataset_dir(dataset: str, root: str | Path) -> Path:
    return Path(root) / dataset if dataset == "fashion_mnist" else Path(root)


def check_dataset(dataset: str, root: str | Path) -> None:
    """Raise DatasetMissing (one line: where we looked, how to provide it) unless the data is there."""
    if dataset not in DATASETS:
        raise DatasetMissing(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    where = dataset_dir(dataset, root)
    if dataset == "fashion_mnist":
        wrong = [(n, (where / n).stat().st_size, size) for n, (_, size) in FASHION_MNIST_FILES.items()
                 if (where / n).is_file() and (where / n).stat().st_size != size]
        if wrong:
            name, got, size = wrong[0]
            raise DatasetMissing(f"{where / name} has {got:,} bytes where Fashion-MNIST's has {size:,}: truncated or "
                                 f"another file; fetch it again with `bench data fashion-mnist`")
        if not fashion_mnist_ready(where):
            raise DatasetMissing(f"Fashion-MNIST not found in {where}: run `bench data fashion-mnist` "
                                 f"(offline, from Debian's {DEBIAN_PACKAGE}) or `bench data fashion-mnist --source DIR`")
        return
    name, sub, archive = {"cifar10": ("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
                          "cifar100": ("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz")}[dataset]
    if not (where / sub).is_dir():
        raise DatasetMissing(f"{name} not found: looked for {where / sub} (torchvision's on-disk format); "
                             f"extract {archive} into {where} or set data.root in params.yaml")


def _verified_idx(path: Path, verify: bool) -> np.ndarray:
    if verify:
        digest, _ = FASHION_MNIST_FILES[path.name]
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DatasetMissing(f"{path} does not match its published SHA-256 (corrupt or modified): fetch it again "
                                 f"with `bench data fashion-mnist`, or set data.verify: false for a deliberately "
                                 f"modified copy")
    try:
        return _read_idx(path)
    except (ValueError, IndexError) as e:
        raise DatasetMissing(f"{path} is not a readable IDX file ({e})") from None


def load_dataset(dataset: str, root: str | Path, splits: tuple[str, ...] = ("train", "test"),
                 verify: bool = True) -> dict[str, ImageSplit]:
    """The requested splits of a dataset, checked: published checksums (Fashion-MNIST, unless
    verify is off) and labels within the classes.  Tasks never ask for "test" here directly: they
    go through `bench.splits.open_test`, which refuses during a selection."""
    check_dataset(dataset, root)
    where = dataset_dir(dataset, root)
    split = {}
    if dataset == "fashion_mnist":
        for name, prefix in (("train", "train"), ("test", "t10k")):
            if name not in splits:
                continue
            x = _verified_idx(where / f"{prefix}-images-idx3-ubyte", verify)
            y = _verified_idx(where / f"{prefix}-labels-idx1-ubyte", verify)
            split[name] = ImageSplit(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    else:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        for name in splits:
            ds = cls(str(where), train=name == "train", download=False)
            split[name] = ImageSplit(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                                     torch.tensor(ds.targets, dtype=torch.int64))
    classes = SHAPES[dataset][2]
    for name, s in split.items():
        if len(s.labels) != len(s.images) or (len(s.labels) and not 0 <= int(s.labels.min()) <= int(s.labels.max()) < classes):
            raise DatasetMissing(f"{dataset} {name} split in {where}: labels outside 0..{classes - 1} or not one per "
                                 f"image: the files are corrupt")
    return split


# ---- batches ----------------------------------------------------------------------------------
class EpochBatches:
    """Batch `step` of a shuffled, drop-last pass over n examples.  The order depends only on
    (seed, step) — each epoch's permutation from its own SeedSequence child — so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, "data_order", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


AUGMENTATIONS = ("none", "crop_flip", "randaugment", "resized_crop_flip")   # data.augment


def resized_crop_box(h: int, w: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, ...]:
    """(top, left, height, width) of a RandomResizedCrop, torchvision's rule drawn from `g`: an area
    fraction in `scale` and a log-uniform aspect ratio in `ratio`, 10 tries, then the centre crop."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(torch.rand((), generator=g)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            return top, int(torch.randint(0, w - cw + 1, (), generator=g)), ch, cw
    if w / h < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif w / h > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment(images: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Random augmentation of a uint8 batch, deterministic in `seed`."""
    if kind == "none":
        return images
    g = torch.Generator().manual_seed(seed)
    if kind == "resized_crop_flip":  # RandomResizedCrop(size) + RandomHorizontalFlip (official Tiny-ImageNet)
        from torchvision.transforms.v2 import functional as TF
        n, _, h, w = images.shape
        out = torch.stack([TF.resized_crop(images[i], *resized_crop_box(h, w, g), size=[h, w], antialias=True)
                           for i in range(n)])
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
        return out
    if kind == "crop_flip":  # RandomCrop(size, padding=4) + RandomHorizontalFlip, per sample
        n, _, h, w = images.shape
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
        return out
    if kind == "randaugment":
        from torchvision.transforms import v2
        ra = v2.RandAugment()
        out = augment(images, "crop_flip", seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([ra(x) for x in out])
    raise ValueError(f"unknown augmentation {kind!r}")


def normalise(images: torch.Tensor, dataset: str, stats: tuple | None = None) -> torch.Tensor:
    """(x/255 − mean) / std per channel: `stats` (mean, std) if given (a prepared ImageFolder's train
    statistics), else the dataset's entry in NORMALISATION."""
    mean, std = stats or NORMALISATION[dataset]
    x = images.float() / 255.0
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
