"""Tiny-ImageNet as `data.dataset: imagefolder` (bench/data/tinyimagenet.py): the tiny-imagenet-200/
layout and the Hugging Face parquet files, each built from real Fashion-MNIST pixels and read back
exactly; each fault one line; RandomResizedCrop + flip and ImageNet normalisation; a tiny run through
the trainer; and the paper-scale suite stopping at once without its data."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main as bench_main
from bench.config import ConfigError, load_config
from bench.data.images import DatasetMissing, augment, load_dataset, resized_crop_box
from bench.data.imagefolder import prepare_folder
from bench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL = 4, 2            # images per class from Fashion-MNIST's train and test splits
WNIDS = ["n04399382", "n01443537", "n02124075", "n09246464", "n01629819", "n03444034", "n02085620", "n07753592",
         "n01945685", "n02480495"]   # class k of Fashion-MNIST is WNIDS[k]; wnids.txt lists them unsorted
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def fashion_pixels(fashion_root):
    """{split: [(class k, its j-th image, 28×28 uint8)]}: the first images of each class."""
    real = load_dataset("fashion_mnist", fashion_root, splits=("train", "test"))
    out = {}
    for split, per_class in (("train", TRAIN), ("test", VAL)):
        labels = real[split].labels
        out[split] = [(k, j, real[split].images[i, 0].numpy()) for k in range(10)
                      for j, i in enumerate((labels == k).nonzero()[:, 0][:per_class].tolist())]
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB PNG of a grey image (lossless: every channel is the grey value)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pixels(fashion_root):
    return fashion_pixels(fashion_root)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, pixels) -> Path:
    """tiny-imagenet-200/ as distributed (lossless PNG bytes in the .JPEG files, so pixels compare
    exactly): wnids.txt, words.txt, train/<wnid>/images/ + <wnid>_boxes.txt, val/images/ with
    val_annotations.txt, and an unlabelled test/images/."""
    src = tmp_path_factory.mktemp("ti") / "tiny-imagenet-200"
    (src / "val/images").mkdir(parents=True)
    (src / "test/images").mkdir(parents=True)
    (src / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (src / "words.txt").write_text("".join(f"{w}\tclass {w}\n" for w in WNIDS))
    for k, j, img in pixels["train"]:
        folder = src / "train" / WNIDS[k]
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images" / f"{WNIDS[k]}_{j}.JPEG").write_bytes(png_bytes(img))
        (folder / f"{WNIDS[k]}_boxes.txt").write_text(f"{WNIDS[k]}_{j}.JPEG\t0\t0\t27\t27\n")
    lines = []
    for n, (k, _, img) in enumerate(pixels["test"]):
        (src / "val/images" / f"val_{n}.JPEG").write_bytes(png_bytes(img))
        lines.append(f"val_{n}.JPEG\t{WNIDS[k]}\t0\t0\t27\t27")
    (src / "val/val_annotations.txt").write_text("\n".join(lines) + "\n")
    (src / "test/images/test_0.JPEG").write_bytes(png_bytes(pixels["test"][0][2]))
    return src


def write_parquet(src: Path, pixels, names=True) -> Path:
    """zh-plus/tiny-imagenet's files: data/{train,valid}-00000-of-00001.parquet, columns image
    {bytes, path} and label, rows in an interleaved class order, ClassLabel names in the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (src / "data").mkdir(parents=True)
    for split, file in (("train", "train"), ("test", "valid")):
        rows = sorted(pixels[split], key=lambda r: (r[1], r[0]))   # j-th image of every class, then the next
        image = pa.array([{"bytes": png_bytes(img), "path": f"{k}_{j}.JPEG"} for k, j, img in rows],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": pa.array([k for k, _, _ in rows], pa.int64())})
        if names:
            features = {"image": {"_type": "Image"}, "label": {"names": WNIDS, "_type": "ClassLabel"}}
            table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        pq.write_table(table, src / "data" / f"{file}-00000-of-00001.parquet")
    return src


def prepare(src, root, **kw):
    return prepare_folder(src, kw.pop("name", "ti"), root, **{"image_size": 28, "channels": 3, "progress": False, **kw})


def arrays(out: Path, split: str):
    return np.load(out / f"{split}_images.npy"), np.load(out / f"{split}_labels.npy")


def expect(pixels, split, label_of, order):
    """The images a split should hold, in the order preparation gives them."""
    rows = sorted(pixels[split], key=order)
    return np.stack([np.repeat(img[None], 3, 0) for _, _, img in rows]), np.array([label_of(k) for k, _, _ in rows])


@pytest.mark.parametrize("source_format", ["auto", "tiny_imagenet"])
def test_tiny_imagenet_folder_is_read_exactly(tiny_folder, pixels, tmp_path, source_format):
    out = prepare(tiny_folder, tmp_path / "data", source_format=source_format)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == sorted(WNIDS) and meta["layout"] == "tiny-imagenet-200" and meta["test_from"] == "val"
    assert "val_annotations.txt" in meta["test_note"] and "test/ (unlabelled) is not read" in meta["test_note"]
    assert {s: meta["splits"][s]["count"] for s in ("train", "test")} == {"train": 10 * TRAIN, "test": 10 * VAL}
    label = sorted(WNIDS).index
    images, labels = arrays(out, "train")       # by sorted wnid, then by file name
    want = expect(pixels, "train", lambda k: label(WNIDS[k]), lambda r: (label(WNIDS[r[0]]), r[1]))
    assert np.array_equal(images, want[0]) and np.array_equal(labels, want[1])
    images, labels = arrays(out, "test")        # val/images/val_<n>.JPEG, labelled by val_annotations.txt
    n_of = {(k, j): n for n, (k, j, _) in enumerate(pixels["test"])}
    want = expect(pixels, "test", lambda k: label(WNIDS[k]), lambda r: (label(WNIDS[r[0]]), f"val_{n_of[r[:2]]}.JPEG"))
    assert np.array_equal(images, want[0]) and np.array_equal(labels, want[1])


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed (`pip install pyarrow` reads parquet sources)")
@pytest.mark.parametrize("names", [True, False])
def test_hugging_face_parquet_files_are_read_exactly(pixels, tmp_path, names):
    src = write_parquet(tmp_path / "zh-plus-tiny-imagenet", pixels, names)
    out = prepare(src, tmp_path / "data", source_format="tiny_imagenet")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == (WNIDS if names else [str(k) for k in range(10)])   # label k is class k
    assert meta["layout"] == "parquet" and meta["test_from"] == "valid" and "valid parquet split" in meta["test_note"]
    for split in ("train", "test"):                                  # grouped by label, file order kept
        images, labels = arrays(out, split)
        want = expect(pixels, split, lambda k: k, lambda r: (r[0], r[1]))
        assert np.array_equal(images, want[0]) and np.array_equal(labels, want[1])
    assert json.loads((prepare(src, tmp_path / "data2") / "meta.json").read_text())["layout"] == "parquet"   # auto


def test_without_pyarrow_parquet_fails_in_one_line_saying_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "src/data").mkdir(parents=True)
    (tmp_path / "src/data/train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetMissing) as e:
        prepare(tmp_path / "src", tmp_path / "data")
    assert "`pip install pyarrow`" in str(e.value) and "\n" not in str(e.value)


def _drop_annotated(src):
    (src / "val/images/val_3.JPEG").unlink()


def _unknown_wnid(src):
    with open(src / "val/val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")


def _extra_class(src):
    (src / "train/n11111111/images").mkdir(parents=True)


FAULTS = {
    "listed file missing": (_drop_annotated, "{src}/val/images/val_3.JPEG is listed in val/val_annotations.txt"),
    "unknown wnid": (_unknown_wnid, "val_annotations.txt line 21: expected 'file<TAB>wnid<TAB>…' with a wnid"),
    "train folder not in wnids.txt": (_extra_class, "class 'n11111111' is in train/ but not in wnids.txt"),
    "no annotations": (lambda src: (src / "val/val_annotations.txt").unlink(), "{src} has no val/val_annotations.txt"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_layout_fault_is_one_line(tiny_folder, tmp_path, fault):
    import shutil
    src = Path(shutil.copytree(tiny_folder, tmp_path / "tiny-imagenet-200"))
    damage, says = FAULTS[fault]
    damage(src)
    with pytest.raises((DatasetMissing, ConfigError)) as e:
        prepare(src, tmp_path / "data", source_format="tiny_imagenet")
    assert says.format(src=src) in str(e.value) and "\n" not in str(e.value)


def test_missing_tiny_imagenet_names_both_layouts_and_the_path(tmp_path):
    for where, says in ((tmp_path / "nowhere", f"Tiny-ImageNet not found: no folder {tmp_path / 'nowhere'}"),
                        (tmp_path, f"Tiny-ImageNet not found in {tmp_path}")):
        with pytest.raises(DatasetMissing) as e:
            prepare(where, tmp_path / "data", source_format="tiny_imagenet")
        message = str(e.value)
        assert says in message and "\n" not in message
        assert "tiny-imagenet-200/" in message and "val_annotations.txt" in message
        assert "zh-plus/tiny-imagenet" in message and "data/valid-*.parquet" in message


def test_resized_crop_flip_is_seeded_and_keeps_size_and_dtype():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    a, b = augment(x, "resized_crop_flip", 7), augment(x, "resized_crop_flip", 7)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
    assert not torch.equal(a, augment(x, "resized_crop_flip", 8)) and not torch.equal(a, x)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):   # torchvision's bounds: inside the image, area ≥ 8 %, aspect within [3/4, 4/3]
        top, left, h, w = resized_crop_box(12, 20, g)
        assert 0 <= top <= 12 - h and 0 <= left <= 20 - w and h * w >= 0.08 * 240 * 0.8
    flat = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(200, 1, 1, 1)
    whole = augment(flat, "resized_crop_flip", 0)   # crops of a horizontal ramp: about half come back mirrored
    mirrored = (whole[:, 0, :, 0].float().mean(1) > whole[:, 0, :, -1].float().mean(1)).float().mean()
    assert 0.35 < float(mirrored) < 0.65


PARAMS = """
suite: tinyti
runs_dir: {runs}
data: {{dataset: imagefolder, root: {root}, path: '{path}', name: ti, resize: resize, source_format: tiny_imagenet,
        normalisation: imagenet, augment: resized_crop_flip, val_fraction: 0.1}}
model: {{arch: vit, image_size: 28, patch_size: 7, in_channels: 3, num_classes: 10, hidden: 16, depth: 2,
         heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2, gamma: 0.05}}
train: {{epochs: 1.0, batch_size: 12, lr: 2.0e-3, ckpt_every: 100, curve_points: 1, threads: 1}}
eval: {{batch_size: 100, final_variants: []}}
arms:
  e2e: {{mode: e2e}}
  dblocks: {{mode: dblocks}}
"""


def test_a_tiny_run_with_imagenet_statistics_and_resized_crops(tiny_folder, tmp_path, one_thread):
    from bench.train import train
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=tmp_path / "data", path=tiny_folder))
    with pytest.raises(DatasetMissing, match="--source-format tiny_imagenet"):   # not prepared yet: how to
        make_task(load_config(p, "dblocks")).check()
    prepare(tiny_folder, tmp_path / "data", source_format="tiny_imagenet")
    task = make_task(load_config(p, "dblocks"))
    task.check()
    task.load()
    x, _ = task._images(task.val_data, torch.arange(3), torch.device("cpu"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (task.val_data.images[:3].float() / 255 - mean) / std)   # fixed ImageNet statistics
    for arm in ("e2e", "dblocks"):
        summary = train(load_config(p, arm), progress=False, log=lambda *_: None)
        assert 0.0 <= summary["test_acc"] <= 1.0 and summary["optimizer_steps"] == (1 if arm == "e2e" else 2) * 3
    prepare(tiny_folder, tmp_path / "data", name="grey", channels=1)
    with pytest.raises(ConfigError, match="imagenet has 3 channels' statistics"):
        make_task(load_config(p, "dblocks", ["data.name=grey", "model.in_channels=1"])).check()


def test_the_paper_suite_stops_at_once_without_its_data(capsys):
    rc = bench_main(["prepare", str(ROOT / "suites/vit_tinyimagenet/params.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "data/tiny-imagenet-200" in err and "tiny-imagenet-200/ (wnids.txt" in err and "zh-plus/tiny-imagenet" in err
