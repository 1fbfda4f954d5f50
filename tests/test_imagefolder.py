"""`data.dataset: imagefolder`: preparing a user's ImageFolder (round trip against the real
Fashion-MNIST it was exported from, both resize modes, RGB and grey, val/ as test), each fault as
one line, a stale prepared directory refused, and a tiny classification run through the trainer."""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main as bench_main
from bench.config import ConfigError, load_config
from bench.data.images import CLASS_NAMES, DatasetMissing, load_dataset
from bench.data.imagefolder import prepare_folder
from bench.splits import TestSealed, selection
from bench.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
TRAIN, TEST = 20, 5     # images per class exported from Fashion-MNIST's train and test splits


@pytest.fixture(scope="module")
def source(tmp_path_factory, fashion_root) -> Path:
    """A real ImageFolder: 20 train and 5 test PNGs per class, written by scripts/export_fashion_pngs.py."""
    spec = importlib.util.spec_from_file_location("export_fashion_pngs", ROOT / "scripts/export_fashion_pngs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.export(tmp_path_factory.mktemp("src") / "fashion_png", TRAIN, TEST, fashion_root)


@pytest.fixture
def copy(source, tmp_path):
    """A copy of the source folder a test may damage."""
    return Path(shutil.copytree(source, tmp_path / "fashion_png"))


def prepare(src, root, **kw):
    return prepare_folder(src, kw.pop("name", "fpng"), root, **{"image_size": 28, "channels": 1, "progress": False, **kw})


def arrays(out: Path, split: str):
    return np.load(out / f"{split}_images.npy", mmap_mode="r"), np.load(out / f"{split}_labels.npy", mmap_mode="r")


def test_preparation_round_trip(source, tmp_path, fashion_root):
    out = prepare(source, tmp_path / "data")
    meta = json.loads((out / "meta.json").read_text())
    folders = [n.replace("/", "_") for n in CLASS_NAMES["fashion_mnist"]]
    assert out == tmp_path / "data/images/fpng"
    assert meta["classes"] == sorted(folders) and meta["test_from"] == "test"
    assert {s: meta["splits"][s]["count"] for s in ("train", "test")} == {"train": 10 * TRAIN, "test": 10 * TEST}
    assert (meta["image_size"], meta["channels"], meta["resize"], meta["source"]) == (28, 1, "resize", str(source))
    real = load_dataset("fashion_mnist", fashion_root, splits=("train", "test"))
    whole = hashlib.sha256()
    for split, per_class in (("train", TRAIN), ("test", TEST)):
        images, labels = arrays(out, split)
        assert images.shape == (10 * per_class, 1, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
        # 28×28 PNGs at image_size 28: the pixels are Fashion-MNIST's, class by sorted folder name
        for k, name in enumerate(meta["classes"]):
            fk = folders.index(name)
            rows = (real[split].labels == fk).nonzero()[:, 0][:per_class]
            assert np.array_equal(images[labels == k], real[split].images[rows].numpy())
        split_hash = hashlib.sha256(np.ascontiguousarray(images).tobytes() + labels.tobytes()).hexdigest()
        assert meta["splits"][split]["sha256"] == split_hash
        whole.update(np.ascontiguousarray(images).tobytes() + labels.tobytes())
    assert meta["content_sha256"] == whole.hexdigest()
    x = arrays(out, "train")[0] / 255.0   # the normalisation statistics are the train split's only
    assert meta["stats_from"] == "train"
    np.testing.assert_allclose(meta["mean"], x.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(meta["std"], x.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def write_image(path: Path, size, colour=None, mode="RGB", fmt=None):
    """A landscape or portrait image: the centre square in `colour` (default green), the ends red and blue."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = (255, 0, 0)
    s, (x0, y0) = min(w, h), ((w - min(w, h)) // 2, (h - min(w, h)) // 2)
    a[y0 + s:, :] = a[:, x0 + s:] = (0, 0, 255)
    a[y0:y0 + s, x0:x0 + s] = colour or (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert(mode).save(path, format=fmt)


def colour_folder(root: Path, colour=None, mode="RGB") -> Path:
    """Two classes, images of several sizes and formats in each split."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            write_image(root / split / c / "wide.png", (40, 20), colour, mode)
            write_image(root / split / c / "tall.bmp", (12, 30), colour, mode)
            write_image(root / split / c / "deep" / "square.jpg", (8, 8), colour, mode, "JPEG")
    return root


@pytest.mark.parametrize("resize", ["resize", "center_crop"])
def test_both_resize_modes_give_the_size_and_keep_the_centre(tmp_path, resize):
    out = prepare(colour_folder(tmp_path / "src"), tmp_path / "data", image_size=8, channels=3, resize=resize)
    images, labels = arrays(out, "train")
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    png = images[[1, 2, 4, 5]].astype(int)   # sorted: deep/square.jpg, tall.bmp, wide.png; the lossless ones
    assert (png[:, 1] > png[:, 0]).all() and (png[:, 1] > png[:, 2]).all()   # green (the centre) everywhere
    assert (png[:, :, 2:6, 2:6] == np.array([0, 255, 0])[None, :, None, None]).all()
    assert json.loads((out / "meta.json").read_text())["resize"] == resize


def test_rgb_and_grey_conversion(tmp_path):
    rgb = (200, 100, 50)
    grey = Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))
    src = colour_folder(tmp_path / "src", colour=rgb)
    to_grey = arrays(prepare(src, tmp_path / "data", image_size=8, channels=1, name="g"), "train")[0]
    assert to_grey.shape == (6, 1, 8, 8) and (to_grey[[1, 2, 4, 5], :, 2:6, 2:6] == grey).all()
    to_rgb = arrays(prepare(colour_folder(tmp_path / "src_l", rgb, mode="L"), tmp_path / "data", image_size=8,
                            channels=3, name="c"), "train")[0]
    assert to_rgb.shape == (6, 3, 8, 8)
    assert (to_rgb[:, 0] == to_rgb[:, 1]).all() and (to_rgb[:, 1] == to_rgb[:, 2]).all()
    assert (to_rgb[[1, 2, 4, 5], :, 2:6, 2:6] == grey).all()


def test_val_is_the_test_split_when_there_is_no_test(copy, tmp_path):
    (copy / "test").rename(copy / "val")
    meta = json.loads((prepare(copy, tmp_path / "data") / "meta.json").read_text())
    assert meta["test_from"] == "val" and "val/ is the test split" in meta["test_note"]
    assert meta["splits"]["test"]["count"] == 10 * TEST


def _no_train(src):
    shutil.rmtree(src / "train")


def _no_test(src):
    shutil.rmtree(src / "test")


def _empty_class(src):
    (src / "train/Zebra").mkdir()
    (src / "test/Zebra").mkdir()
    (src / "train/Zebra/notes.txt").write_text("not an image")   # files Pillow does not open do not count


def _classes_differ(src):
    shutil.rmtree(src / "test/Bag")


def _corrupt(src):
    (src / "test/Coat/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def _test_empty(src):
    shutil.rmtree(src / "test")
    (src / "test/Coat").mkdir(parents=True)


FAULTS = {   # damage → what the one-line message must say
    "source missing": (lambda src: shutil.rmtree(src), "image folder not found: {src}"),
    "no train": (_no_train, "{src} has no train/ folder"),
    "no val or test": (_no_test, "{src} has neither test/ nor val/"),
    "empty class": (_empty_class, "class folder {src}/train/Zebra holds no images"),
    "classes differ": (_classes_differ, "class 'Bag' is in train/ but not in test/"),
    "corrupt image": (_corrupt, "cannot read image {src}/test/Coat/broken.png"),
    "split without images": (_test_empty, "the test split ({src}/test) has no images"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_one_line_and_writes_nothing(copy, tmp_path, fault):
    damage, says = FAULTS[fault]
    damage(copy)
    with pytest.raises((DatasetMissing, ConfigError)) as e:
        prepare(copy, tmp_path / "data")
    assert says.format(src=copy) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data/images").exists() or not list((tmp_path / "data/images").iterdir())


def test_a_failed_preparation_keeps_the_previous_one(copy, tmp_path):
    out = prepare(copy, tmp_path / "data")
    before = (out / "meta.json").read_text()
    _corrupt(copy)   # the test split, decoded after the whole train split
    with pytest.raises(DatasetMissing, match="broken.png"):
        prepare(copy, tmp_path / "data")
    assert (out / "meta.json").read_text() == before
    assert [p.name for p in (tmp_path / "data/images").iterdir()] == ["fpng"]   # no temporary left


PARAMS = """
suite: tinyfolder
runs_dir: {runs}
data: {{dataset: imagefolder, root: {root}, path: '{path}', name: fpng, resize: {resize}, val_fraction: 0.1}}
model: {{arch: vit, image_size: {size}, patch_size: 7, in_channels: 1, num_classes: 10, hidden: 16, depth: 2,
         heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2, gamma: 0.05}}
train: {{epochs: 1.0, batch_size: 30, lr: 2.0e-3, ckpt_every: 100, curve_points: 1, threads: 1}}
eval: {{batch_size: 100, final_variants: []}}
arms:
  dblocks: {{mode: dblocks}}
"""


def params(tmp_path, path, resize="resize", size=28) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=tmp_path / "data", path=path, resize=resize, size=size))
    return p


@pytest.mark.parametrize("override, says", [
    ("data.name=", "needs data.path (the source folder) or data.name"),
    ("data.dataset=fashion_mnist", "data.path and data.name belong to data.dataset: imagefolder, not fashion_mnist"),
    ("data.resize=squash", "unknown data.resize 'squash'; choose resize or center_crop"),
    ("data.name=../up", "dataset name '../up' must be letters, digits"),
])
def test_params_keys_are_checked_before_anything_runs(tmp_path, override, says):
    with pytest.raises(ConfigError) as e:
        load_config(params(tmp_path, ""), "dblocks", [override])
    assert says in str(e.value)


def test_a_run_says_how_to_prepare_and_refuses_a_stale_directory(source, tmp_path):
    task = make_task(load_config(params(tmp_path, source), "dblocks"))
    with pytest.raises(DatasetMissing) as e:
        task.check()
    assert f"bench data images --source {source} --name fpng --image-size 28 --channels 1 --resize resize " \
           f"--root {tmp_path / 'data'}" in str(e.value)
    prepare(source, tmp_path / "data", resize="center_crop")
    for stale in (params(tmp_path, source), params(tmp_path, source, "center_crop", size=14)):
        with pytest.raises(DatasetMissing, match=r"was prepared from .* at 28×28, 1 channel\(s\), center_crop, but the "
                                                 r"params ask for .* replace it with `bench data images"):
            make_task(load_config(stale, "dblocks")).check()
    # data.path "": the prepared dataset as it is, and the model must fit it (one line naming both)
    with pytest.raises(ConfigError, match=r"the model takes 1×14×14 images and 10 classes, but imagefolder-fpng-\w+ "
                                          r"has 1×28×28 and 10"):
        make_task(load_config(params(tmp_path, "", size=14), "dblocks")).check()


def test_tiny_classification_run_end_to_end(source, tmp_path, one_thread):
    from bench.train import train
    out = prepare(source, tmp_path / "data")
    meta = json.loads((out / "meta.json").read_text())
    cfg = load_config(params(tmp_path, source), "dblocks")
    summary = train(cfg, progress=False, log=lambda *_: None)
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["optimizer_steps"] == 2 * (180 // 30)
    assert (Path(cfg.out_dir) / "final.pt").is_file()
    task = make_task(cfg)
    task.check()
    task.load()
    assert task.num_train == 180 and len(task.val_data) == 20    # validation carved from train
    x, _ = task._images(task.val_data, torch.arange(4), torch.device("cpu"))
    expected = (task.val_data.images[:4].float() / 255 - meta["mean"][0]) / meta["std"][0]
    torch.testing.assert_close(x, expected)                       # the recorded train statistics
    with selection("a test"), pytest.raises(TestSealed):
        task.test_data()                                          # test only through bench.splits.open_test
    assert len(task.test_data()) == 10 * TEST


def test_generation_reads_a_prepared_folder(source, tmp_path):
    prepare(source, tmp_path / "data")
    p = tmp_path / "gen.yaml"
    p.write_text(f"""
suite: tinygen
task: generation
runs_dir: {tmp_path / 'runs'}
data: {{dataset: imagefolder, root: {tmp_path / 'data'}, name: fpng}}
model: {{arch: dit, size: "", image_size: 28, patch_size: 4, in_channels: 1, num_classes: 10, depth: 2, hidden: 32, heads: 2}}
diffusion: {{num_blocks: 2}}
eval: {{fid_n: 20, curve_fid_n: 10, fid_ref_n: 10}}
arms: {{e2e: {{mode: e2e}}}}
""")
    task = make_task(load_config(p, "e2e"))
    assert task.shape() == (1, 28, 10)
    task.load()
    assert task.val_data.name.startswith("imagefolder-fpng-") and task.val_data.name.endswith("-first10")
    assert task.test_data().read().shape == (10, 1, 28, 28)


def test_bench_data_images(source, tmp_path, capsys):
    root = tmp_path / "data"
    assert bench_main(["data", "images", "--source", str(source), "--name", "small", "--image-size", "14",
                       "--channels", "3", "--resize", "center_crop", "--root", str(root)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {root / 'images/small'}" in said and "train 200, test 50" in said and "Ankle boot, Bag" in said
    assert arrays(root / "images/small", "test")[0].shape == (50, 3, 14, 14)
    assert bench_main(["data", "images", "--source", str(tmp_path / "nowhere"), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "image folder not found" in err and err.count("\n") == 1
