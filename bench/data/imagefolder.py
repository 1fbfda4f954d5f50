"""A user's ImageFolder (`data.dataset: imagefolder`) → memory-mappable uint8 arrays for the image tasks.

Source: <path>/train/<class>/…, and <path>/test/<class>/… or, without test/, <path>/val/<class>/…
(then val/ is the test split; meta.json says so).  Any image Pillow opens, any size, at any depth in
its class folder; hidden files and extensions Pillow does not open are skipped.  Classes: the sorted
folder names, the same in every split.  Validation is carved from train by the tasks
(`bench.splits.carve_validation`), as for the built-in datasets, never taken from val/.
Tiny-ImageNet's two published forms (the tiny-imagenet-200/ folder, Hugging Face parquet files) are
read too: data.source_format, bench/data/tinyimagenet.py.

Preparation (`bench data images --source DIR --name NAME [--image-size N] [--channels C]
[--resize resize|center_crop] [--source-format F] [--root data]`, or `prepare_folder`) converts
every image to `channels` (1: Pillow "L", 3: "RGB") and to image_size × image_size by
  resize       resize the short side to image_size, then crop the centre
  center_crop  crop the centre square (side: the short side), then resize
(bilinear, antialiased: torchvision's Resize; both modes keep the central square and differ only in
the order of the resampling and the crop), and writes <root>/images/<name>/:
  train_images.npy, test_images.npy   uint8 (N, C, S, S)   (np.load(…, mmap_mode="r"))
  train_labels.npy, test_labels.npy   int64 (N,)
  meta.json   classes, per-split and per-class counts, size, channels, resize mode, the per-channel
              mean and std of the TRAIN split only (the classification task normalises with them),
              the source path, the sha256 of each split's arrays and one over all of them
It is built in a temporary directory beside it and renamed into place: a killed preparation leaves
the previous directory (or none), never a half-written one.

A run never prepares (preparing a large folder is a job of its own): a run whose data.path has no
prepared directory stops with the one `bench data images …` command that prepares it, and a
prepared directory whose source, size, channels or resize differ from the params is refused, not
reused.  The size and channels a run asks for are its model's (model.image_size, model.in_channels);
with data.path "" the run takes data.name as prepared, and the task checks its model against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.config import ConfigError, model_config
from bench.data import tinyimagenet
from bench.data.images import CLASS_NAMES, SHAPES, DatasetMissing, ImageSplit, check_dataset, load_dataset

IMAGEFOLDER = "imagefolder"
FORMAT = 1
RESIZE_MODES = ("resize", "center_crop")
PIL_MODES = {1: "L", 3: "RGB"}
SPLITS = ("train", "test")
RECIPE = ("source", "image_size", "channels", "resize")   # what decides the arrays (compared with params)
LAYOUT = tinyimagenet.FOLDERS
NORMALISATIONS = {"train": None, "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@dataclass
class FolderFields:
    """The data keys of `data.dataset: imagefolder`, part of both image tasks' data configs."""
    path: str = ""            # imagefolder: the source folder; "" to use the prepared data.name as it is
    name: str = ""            # imagefolder: the prepared <root>/images/<name>/ (default: the source folder's name)
    resize: str = "resize"    # imagefolder: resize (short side, then centre crop) | center_crop (square, then resize)
    source_format: str = "auto"   # imagefolder: auto | imagefolder | tiny_imagenet (bench/data/tinyimagenet.py)
    normalisation: str = "train"  # imagefolder, classification: train (the recorded train mean/std) | imagenet


# ---- the source folder ------------------------------------------------------------------------
def _extensions() -> set[str]:
    from PIL import Image
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _images_in(folder: Path, extensions: set[str]) -> list[Path]:
    found = [p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def scan(source: str | Path, source_format: str = "auto") -> tuple[list[str], dict[str, list], str, str]:
    """(classes, {split: [(image, label)]}, where the test split comes from, the layout): the layout
    checked before any image is decoded; each fault is one line naming the folder."""
    src = Path(source)
    layout = tinyimagenet.detect(src, source_format)
    if layout == "tiny-imagenet-200":
        extensions = _extensions()
        return (*tinyimagenet.scan_tiny_imagenet(src, lambda f: _images_in(f, extensions)), "val", layout)
    if layout == "parquet":
        return (*tinyimagenet.scan_parquet(src), layout)
    return (*_scan_folders(src), layout)


def _scan_folders(src: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    if not (src / "train").is_dir():
        raise DatasetMissing(f"{src} has no train/ folder (expected {LAYOUT})")
    test_from = next((s for s in ("test", "val") if (src / s).is_dir()), None)
    if test_from is None:
        raise DatasetMissing(f"{src} has neither test/ nor val/ beside train/: the test split needs one of them")
    folders, extensions, files = {"train": src / "train", "test": src / test_from}, _extensions(), {}
    for split, folder in folders.items():
        classes = sorted(c.name for c in folder.iterdir() if c.is_dir() and not c.name.startswith("."))
        files[split] = {c: _images_in(folder / c, extensions) for c in classes}
        if not any(files[split].values()):
            raise DatasetMissing(f"the {split} split ({folder}) has no images (expected {folder}/<class>/<image>)")
    if list(files["train"]) != list(files["test"]):
        first = sorted(set(files["train"]) ^ set(files["test"]))[0]
        has, lacks = ("train", test_from) if first in files["train"] else (test_from, "train")
        raise ConfigError(f"{src}: class {first!r} is in {has}/ but not in {lacks}/; every split needs the same "
                          f"class folders")
    for split, folder in folders.items():
        empty = [c for c, fs in files[split].items() if not fs]
        if empty:
            raise ConfigError(f"class folder {folder / empty[0]} holds no images (none with an extension Pillow "
                              f"opens); add images or remove the folder from every split")
    classes = list(files["train"])
    return classes, {s: [(p, k) for k, c in enumerate(classes) for p in files[s][c]] for s in SPLITS}, test_from


def _fit(image_size: int, resize: str):
    import torchvision.transforms as T
    if resize == "resize":
        return T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])
    return T.Compose([lambda im: T.functional.center_crop(im, min(im.size)), T.Resize((image_size, image_size))])


def read_image(path, channels: int, fit) -> np.ndarray:
    """One image (a file, or a tinyimagenet.Blob) as uint8 (C, S, S); DatasetMissing naming it if
    Pillow cannot decode it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            a = np.asarray(fit(im.convert(PIL_MODES[channels])), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetMissing(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                             f"(corrupt or not an image); remove or replace the file") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ---- preparation ------------------------------------------------------------------------------
def prepared_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "images" / name


def default_name(d) -> str:
    """data.name, or the source folder's name made safe for a directory."""
    return d.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(d.path).resolve().name).strip("_.-") or "images"


def check_recipe(image_size: int, channels: int, resize: str, name: str) -> None:
    if channels not in PIL_MODES:
        raise ConfigError(f"channels must be 1 (Pillow \"L\") or 3 (\"RGB\"), got {channels}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(f"image size must be an integer >= 1, got {image_size!r}")
    if resize not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {resize!r}; choose {' or '.join(RESIZE_MODES)}")
    check_name(name)


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"dataset name {name!r} must be letters, digits, '_', '.' or '-' (a directory under images/)")


@contextlib.contextmanager
def _replacing(out: Path):
    """A temporary directory beside `out` to build in; renamed onto `out` on success, removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)   # the previous directory back
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def digest(images: np.ndarray, labels: np.ndarray, *more, chunk: int = 2048) -> str:
    """sha256 over a split's images then labels (raw C-order bytes); `more` hashers get the same bytes."""
    hashers = (hashlib.sha256(), *more)
    for part in [images[i:i + chunk] for i in range(0, len(images), chunk)] + [labels]:
        data = memoryview(np.ascontiguousarray(part)).cast("B")
        for h in hashers:
            h.update(data)
    return hashers[0].hexdigest()


def channel_stats(images: np.ndarray, chunk: int = 2048) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images scaled to [0, 1],
    from exact integer sums."""
    c = images.shape[1]
    total, squares = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], dtype=np.int64).transpose(1, 0, 2, 3).reshape(c, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
    n = images.size // c
    mean = total / (255.0 * n)
    return mean.tolist(), np.sqrt(np.maximum(squares / (255.0 ** 2 * n) - mean ** 2, 0.0)).tolist()


def prepare_folder(source: str | Path, name: str = "", root: str | Path = "data", image_size: int = 32,
                   channels: int = 3, resize: str = "resize", progress: bool = True,
                   source_format: str = "auto") -> Path:
    """Decode and convert an ImageFolder into <root>/images/<name>/ (see the module docstring)."""
    from tqdm import tqdm
    name = name or default_name(FolderFields(path=str(source)))
    check_recipe(image_size, channels, resize, name)
    classes, items, test_from, layout = scan(source, source_format)
    out, fit, overall = prepared_dir(root, name), _fit(image_size, resize), hashlib.sha256()
    meta = {"format": FORMAT, "name": name, "source": str(Path(source).resolve()), "image_size": image_size,
            "channels": channels, "pil_mode": PIL_MODES[channels], "resize": resize,
            "resample": "bilinear, antialiased (torchvision Resize)", "classes": classes, "test_from": test_from,
            "layout": layout, "splits": {},
            "test_note": tinyimagenet.TEST_NOTES[layout].format(split=test_from) if layout != "imagefolder" else
                         "the source has no test/: val/ is the test split" if test_from == "val" else
                         "test/ is the test split (a val/, if any, is not read)"}
    with _replacing(out) as tmp:
        for split in SPLITS:
            pairs = items[split]
            images = np.lib.format.open_memmap(tmp / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(pairs), channels, image_size, image_size))
            for i, (path, _) in enumerate(tqdm(pairs, desc=f"{name} {split}", unit="img", disable=not progress)):
                images[i] = read_image(path, channels, fit)
            images.flush()
            labels = np.array([k for _, k in pairs], dtype=np.int64)
            np.save(tmp / f"{split}_labels.npy", labels)
            meta["splits"][split] = {"count": len(pairs), "sha256": digest(images, labels, overall),
                                     "per_class": {c: int((labels == k).sum()) for k, c in enumerate(classes)}}
            if split == "train":
                meta["mean"], meta["std"] = channel_stats(images)
                meta["stats_from"] = "train"
            del images
        meta["content_sha256"] = overall.hexdigest()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return out


# ---- a run's prepared data --------------------------------------------------------------------
def validate(d) -> None:
    """The imagefolder keys of a data section, checked with the params (no files read)."""
    if d.resize not in RESIZE_MODES:
        raise ConfigError(f"unknown data.resize {d.resize!r}; choose {' or '.join(RESIZE_MODES)}")
    tinyimagenet.check_format(d.source_format)
    if d.normalisation not in NORMALISATIONS:
        raise ConfigError(f"unknown data.normalisation {d.normalisation!r}; choose {' or '.join(NORMALISATIONS)}")
    if d.dataset != IMAGEFOLDER:
        if d.path or d.name:
            raise ConfigError(f"data.path and data.name belong to data.dataset: {IMAGEFOLDER}, not {d.dataset}")
        if d.source_format != "auto" or d.normalisation != "train":
            raise ConfigError(f"data.source_format and data.normalisation belong to data.dataset: {IMAGEFOLDER}, not "
                              f"{d.dataset} (leave them at auto and train)")
        return
    if not (d.path or d.name):
        raise ConfigError(f"data.dataset: {IMAGEFOLDER} needs data.path (the source folder) or data.name (a dataset "
                          f"prepared with `bench data images`)")
    check_name(default_name(d))


def prepare_command(d, m) -> str:
    cmd = ["bench", "data", "images", "--source", d.path or "DIR", "--name", default_name(d), "--image-size",
           str(m.image_size), "--channels", str(m.in_channels), "--resize", d.resize]
    cmd += ["--source-format", d.source_format] if d.source_format != "auto" else []
    return " ".join(shlex.quote(c) for c in cmd + (["--root", d.root] if d.root != "data" else []))


def _describe(r: dict) -> str:
    return f"{r['source']} at {r['image_size']}×{r['image_size']}, {r['channels']} channel(s), {r['resize']}"


def open_prepared(cfg) -> tuple[Path, dict]:
    """The run's prepared directory and its meta.json; one-line DatasetMissing if it is absent,
    unreadable, or (data.path set) was prepared from another source or at another size."""
    d, m = cfg.data, model_config(cfg.model)
    out, how = prepared_dir(d.root, default_name(d)), prepare_command(d, m)
    if not (out / "meta.json").is_file():
        if not d.path:
            raise DatasetMissing(f"prepared images not found in {out} (data.name {default_name(d)!r}, no data.path): "
                                 f"prepare them with `{how}`, or set data.path")
        tinyimagenet.detect(d.path, d.source_format, "data.path")   # the source's layout, one line if it is not there
        raise DatasetMissing(f"prepared images not found in {out}: prepare them with `{how}`")
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DatasetMissing(f"{out / 'meta.json'} is unreadable ({e}): prepare the data again") from None
    if meta.get("format") != FORMAT:
        raise DatasetMissing(f"{out} is in another format ({meta.get('format')!r}, not {FORMAT}): prepare it again")
    want = {"source": str(Path(d.path).resolve()), "image_size": m.image_size, "channels": m.in_channels,
            "resize": d.resize}
    layout = meta.get("layout", "imagefolder")
    if d.path and d.source_format != "auto" and tinyimagenet.LAYOUTS[layout] != d.source_format:
        raise DatasetMissing(f"{out} was prepared from a {layout} source, but data.source_format is "
                             f"{d.source_format}: replace it with `{how}`, or set another data.name")
    if d.path and any(meta.get(k) != want[k] for k in RECIPE):
        raise DatasetMissing(f"{out} was prepared from {_describe(meta)}, but the params ask for {_describe(want)}: "
                             f"replace it with `{how}`, or set another data.name")
    return out, meta


def load_prepared(cfg, split: str) -> ImageSplit:
    """A prepared split, checked: the arrays' shapes against meta.json, their sha256 (data.verify)
    and labels within the classes."""
    out, meta = open_prepared(cfg)
    n, c, s = meta["splits"][split]["count"], meta["channels"], meta["image_size"]
    try:
        images = np.load(out / f"{split}_images.npy", mmap_mode="r")
        labels = np.load(out / f"{split}_labels.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DatasetMissing(f"{out}: the {split} arrays are unreadable ({e}): prepare the data again") from None
    if images.shape != (n, c, s, s) or images.dtype != np.uint8 or labels.shape != (n,) or labels.dtype != np.int64:
        raise DatasetMissing(f"{out}: the {split} arrays are {images.shape} {images.dtype} / {labels.shape} "
                             f"{labels.dtype}, not the ({n}, {c}, {s}, {s}) uint8 / ({n},) int64 meta.json records: "
                             f"prepare the data again")
    if cfg.data.verify and digest(images, labels) != meta["splits"][split]["sha256"]:
        raise DatasetMissing(f"{out}: the {split} arrays do not match their sha256 in meta.json (corrupt or modified): "
                             f"prepare the data again, or set data.verify: false for a deliberately modified copy")
    if n and not 0 <= int(labels.min()) <= int(labels.max()) < len(meta["classes"]):
        raise DatasetMissing(f"{out}: {split} labels outside 0..{len(meta['classes']) - 1}: prepare the data again")
    return ImageSplit(torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)))


# ---- what the image tasks call, for every image dataset ---------------------------------------
def check_images(cfg) -> tuple[int, int, int]:
    """(channels, side, classes) of the run's dataset, after checking the data is there."""
    d = cfg.data
    if d.dataset != IMAGEFOLDER:
        check_dataset(d.dataset, d.root)
        return SHAPES[d.dataset]
    _, meta = open_prepared(cfg)
    if d.normalisation == "imagenet" and meta["channels"] != 3:
        raise ConfigError(f"data.normalisation: imagenet has 3 channels' statistics, but {default_name(d)} has "
                          f"{meta['channels']} channel(s); use data.normalisation: train")
    return meta["channels"], meta["image_size"], len(meta["classes"])


def load_images(cfg, split: str) -> ImageSplit:
    """One split ("train" or "test"; the tasks read "test" only through bench.splits.open_test)."""
    d = cfg.data
    if d.dataset != IMAGEFOLDER:
        return load_dataset(d.dataset, d.root, splits=(split,), verify=d.verify)[split]
    return load_prepared(cfg, split)


def dataset_label(cfg) -> str:
    """The dataset as messages and cache names call it (a prepared folder: its name and content hash)."""
    if cfg.data.dataset != IMAGEFOLDER:
        return cfg.data.dataset
    return f"{IMAGEFOLDER}-{default_name(cfg.data)}-{open_prepared(cfg)[1]['content_sha256'][:12]}"


def normalisation(cfg) -> tuple | None:
    """A prepared folder's (mean, std): its recorded train statistics, or with data.normalisation:
    imagenet ImageNet's fixed ones; None for the built-in datasets (their table)."""
    if cfg.data.dataset == IMAGEFOLDER and cfg.data.normalisation != "train":
        return NORMALISATIONS[cfg.data.normalisation]
    meta = open_prepared(cfg)[1] if cfg.data.dataset == IMAGEFOLDER else None
    return meta and (tuple(meta["mean"]), tuple(meta["std"]))


def class_names(cfg) -> tuple[str, ...]:
    if cfg.data.dataset != IMAGEFOLDER:
        return CLASS_NAMES.get(cfg.data.dataset, ())
    return tuple(open_prepared(cfg)[1]["classes"])


def cli_data(source: str | None, name: str | None, root: str = "data", image_size: int | None = None,
             channels: int | None = None, resize: str | None = None, log=print,
             source_format: str | None = None) -> Path:
    """`bench data images --source DIR --name NAME …`: prepare, then say where and what."""
    if not source:
        raise ConfigError(f"`bench data images` needs --source DIR ({tinyimagenet.expected(source_format or 'auto')})")
    out = prepare_folder(source, name or "", root, 32 if image_size is None else image_size,
                         3 if channels is None else channels, resize or "resize", source_format=source_format or "auto")
    meta = json.loads((out / "meta.json").read_text())
    classes, s = meta["classes"], meta["image_size"]
    counts = ", ".join(f"{k} {v['count']:,}" for k, v in meta["splits"].items())
    shown = ", ".join(classes[:12]) + (f", … ({len(classes) - 12} more)" if len(classes) > 12 else "")
    log(f"{meta['name']}: wrote {out} ({s}×{s}, {meta['channels']} channel(s), {meta['resize']}); images {counts} "
        f"(test from {meta['test_from']}/); {len(classes)} classes: {shown}")
    log(f"train mean {[round(v, 4) for v in meta['mean']]}, std {[round(v, 4) for v in meta['std']]}; "
        f"params: data.dataset: {IMAGEFOLDER}, data.name: {meta['name']}")
    return out
