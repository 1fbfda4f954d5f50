"""Tiny-ImageNet's two published forms as sources of `data.dataset: imagefolder` (data.source_format).

  auto           (default) what the folder holds: parquet files, else the tiny-imagenet-200 layout,
                 else class folders (bench/data/imagefolder.py)
  imagefolder    class folders only: train/<class>/… and test/<class>/… (or val/<class>/…)
  tiny_imagenet  Tiny-ImageNet in either of its two published forms, nothing else:
    (a) the original tiny-imagenet-200/ (the cs231n zip): wnids.txt, train/<wnid>/images/*.JPEG and
        val/images/*.JPEG labelled by val/val_annotations.txt (tab-separated: file, wnid, bbox…);
        test/ has no labels and is not read.  Classes: the sorted wnids (= the train folders).
    (b) Hugging Face zh-plus/tiny-imagenet: data/train-*.parquet and data/valid-*.parquet (or the
        parquet files directly in the folder), columns `image` {bytes, path} and `label` int.
        Classes: the ClassLabel names in the files' Hugging Face metadata, else "0".."N-1";
        label k is class k.  Read with pyarrow; the encoded images are held in memory while they
        are decoded (Tiny-ImageNet's: about 0.2 GB).
  Either way val/ or the valid split is the test split; validation for every selection is carved
  from train by the tasks, as for every dataset.

Parquet sources outside Tiny-ImageNet are read the same way under `auto` (a test-*.parquet split
is preferred to valid-*/validation-*, as test/ is to val/ for class folders).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from bench.config import ConfigError
from bench.data.images import DatasetMissing

SOURCE_FORMATS = ("auto", "imagefolder", "tiny_imagenet")
LAYOUTS = {"imagefolder": "imagefolder", "tiny-imagenet-200": "tiny_imagenet", "parquet": "tiny_imagenet"}
FOLDERS = "train/<class>/… and test/<class>/… (or val/<class>/…)"
TINY_FOLDER = ("the original tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with "
               "val/val_annotations.txt)")
TINY_PARQUET = ("the Hugging Face zh-plus/tiny-imagenet parquet files (data/train-*.parquet, data/valid-*.parquet; "
                "pyarrow)")
TEST_SPLITS = ("test", "valid", "validation")   # parquet: the first present is the test split
TEST_NOTES = {"tiny-imagenet-200": "val/ (labels from val/val_annotations.txt) is the test split; test/ (unlabelled) "
                                   "is not read",
              "parquet": "the {split} parquet split is the test split"}


def expected(source_format: str) -> str:
    """What a source of this format looks like, in words (for the one-line messages)."""
    if source_format == "tiny_imagenet":
        return f"either {TINY_FOLDER} or {TINY_PARQUET}"
    if source_format == "imagefolder":
        return FOLDERS
    return f"{FOLDERS}; or Tiny-ImageNet as {TINY_FOLDER} or {TINY_PARQUET}"


def check_format(source_format: str) -> None:
    if source_format not in SOURCE_FORMATS:
        raise ConfigError(f"unknown data.source_format {source_format!r}; choose {', '.join(SOURCE_FORMATS)}")


def _parquet_files(src: Path, split: str) -> list[Path]:
    for folder in (src / "data", src):
        found = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}.parquet"))
        if found:
            return found
    return []


def detect(source: str | Path, source_format: str = "auto", key: str = "--source") -> str:
    """The layout of a source folder: imagefolder | tiny-imagenet-200 | parquet.  Reads no image;
    one-line DatasetMissing naming the folder and the accepted layouts where none fits."""
    check_format(source_format)
    src = Path(source)
    if not src.is_dir():
        if source_format == "tiny_imagenet":
            raise DatasetMissing(f"Tiny-ImageNet not found: no folder {src} ({key}); put there "
                                 f"{expected(source_format)}")
        raise DatasetMissing(f"image folder not found: {src} ({key}; expected {expected(source_format)})")
    if source_format != "imagefolder":
        if _parquet_files(src, "train"):
            return "parquet"
        if (src / "wnids.txt").is_file() or (src / "val" / "val_annotations.txt").is_file():
            return "tiny-imagenet-200"
    if source_format == "tiny_imagenet":
        raise DatasetMissing(f"Tiny-ImageNet not found in {src} ({key}): expected {expected(source_format)}")
    return "imagefolder"


# ---- (a) tiny-imagenet-200/ -------------------------------------------------------------------
def scan_tiny_imagenet(src: Path, images_in) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(classes, {split: [(file, label)]}) of a tiny-imagenet-200/ folder; `images_in(folder)` lists
    the images under a folder (imagefolder's rule)."""
    for need in ("wnids.txt", "train", "val/images", "val/val_annotations.txt"):
        if not (src / need).exists():
            raise DatasetMissing(f"{src} has no {need}: not the tiny-imagenet-200 layout ({TINY_FOLDER})")
    wnids = sorted({w.strip() for w in (src / "wnids.txt").read_text().split() if w.strip()})
    folders = sorted(c.name for c in (src / "train").iterdir() if c.is_dir() and not c.name.startswith("."))
    if wnids != folders:
        first = sorted(set(wnids) ^ set(folders))[0]
        where = "wnids.txt but has no train/ folder" if first in wnids else "train/ but not in wnids.txt"
        raise ConfigError(f"{src}: class {first!r} is in {where}; wnids.txt and train/<wnid>/ must name the same "
                          f"classes")
    index = {w: k for k, w in enumerate(wnids)}
    train = []
    for w in wnids:
        files = images_in(src / "train" / w)
        if not files:
            raise ConfigError(f"class folder {src / 'train' / w} holds no images (none with an extension Pillow opens)")
        train += [(p, index[w]) for p in files]
    test = []
    for n, line in enumerate((src / "val" / "val_annotations.txt").read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DatasetMissing(f"{src / 'val/val_annotations.txt'} line {n}: expected 'file<TAB>wnid<TAB>…' with a "
                                 f"wnid from wnids.txt, got {line[:80]!r}")
        path = src / "val" / "images" / fields[0].strip()
        if not path.is_file():
            raise DatasetMissing(f"{path} is listed in val/val_annotations.txt (line {n}) but missing")
        test.append((path, index[fields[1].strip()]))
    if not test:
        raise DatasetMissing(f"the test split ({src / 'val/val_annotations.txt'}) lists no images")
    test.sort(key=lambda item: (item[1], item[0].name))   # grouped by class, as the class folders are
    return wnids, {"train": train, "test": test}


# ---- (b) Hugging Face parquet files -----------------------------------------------------------
class Blob(io.BytesIO):
    """One encoded image from a parquet file (Pillow opens it as a file); named file#row in messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetMissing("reading Hugging Face parquet files needs pyarrow: `pip install pyarrow` (or use "
                             "the tiny-imagenet-200/ folder)") from None
    return pq


def _read_parquet(pq, files: list[Path]) -> tuple[list[Blob], list[int], list[str] | None]:
    blobs, labels, names = [], [], None
    for f in files:
        try:
            table = pq.read_table(f, columns=["image", "label"])
        except Exception as e:   # not parquet, or the columns are missing
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetMissing(f"cannot read {f} as parquet with columns image {{bytes}} and label "
                                 f"({reason})") from None
        meta = (table.schema.metadata or {}).get(b"huggingface")
        if meta and names is None:
            try:
                names = json.loads(meta)["info"]["features"]["label"]["names"]
            except (ValueError, KeyError, TypeError):
                names = None
        image = table.column("image").combine_chunks()
        data = image.field("bytes").to_pylist() if hasattr(image, "field") else image.to_pylist()
        for row, (b, k) in enumerate(zip(data, table.column("label").to_pylist())):
            if b is None or k is None:
                raise DatasetMissing(f"{f} row {row}: no image bytes or no label")
            blobs.append(Blob(b, f"{f}#row{row}"))
            labels.append(int(k))
    return blobs, labels, names


def scan_parquet(src: Path) -> tuple[list[str], dict[str, list[tuple[Blob, int]]], str]:
    """(classes, {split: [(image, label)]}, the split the test split comes from)."""
    pq = _pyarrow()
    test_from = next((s for s in TEST_SPLITS if _parquet_files(src, s)), None)
    if test_from is None:
        raise DatasetMissing(f"{src} has train-*.parquet but no {'-*, '.join(TEST_SPLITS)}-*.parquet beside it: "
                             f"the test split needs one of them")
    read = {split: _read_parquet(pq, _parquet_files(src, s)) for split, s in (("train", "train"), ("test", test_from))}
    names = read["train"][2] or read["test"][2]
    n = len(names) if names else max(max(read[s][1], default=-1) for s in read) + 1
    classes = [str(c) for c in names] if names else [str(k) for k in range(n)]
    items = {}
    for split, (blobs, labels, _) in read.items():
        if not blobs:
            raise DatasetMissing(f"the {split} split of {src} has no rows")
        bad = next((k for k in labels if not 0 <= k < n), None)
        if bad is not None:
            raise DatasetMissing(f"the {split} split of {src} has label {bad}, outside 0..{n - 1} (an unlabelled "
                                 f"split?)")
        items[split] = sorted(zip(blobs, labels), key=lambda item: item[1])   # stable: grouped by class
    missing = sorted(set(range(n)) - {k for _, k in items["train"]})
    if missing:
        raise ConfigError(f"class {classes[missing[0]]!r} (label {missing[0]}) has no image in the train split of "
                          f"{src}; every class needs training images")
    return classes, items, test_from
