"""Write a small real ImageFolder of PNGs from the Fashion-MNIST in data/fashion_mnist (the worked
example of `data.dataset: imagefolder`, and the tests' source folder):

    python scripts/export_fashion_pngs.py /tmp/fashion_png [--train-per-class 200] [--test-per-class 50]

OUT/train/<class>/<index>.png holds the first --train-per-class images of each class of the train
split, OUT/test/<class>/… the first --test-per-class of the test split (28×28 grey PNGs, <index>
the image's position in its split).  The class folders are Fashion-MNIST's class names ("/" → "_",
e.g. T-shirt_top); `bench data images` sorts them, so its labels are not Fashion-MNIST's numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data.images import CLASS_NAMES, load_dataset  # noqa: E402


def export(out: str | Path, train_per_class: int = 200, test_per_class: int = 50, root: str | Path = "data") -> Path:
    """Write the folder (see the module docstring); returns it.  Existing files are overwritten."""
    from PIL import Image
    out = Path(out)
    data = load_dataset("fashion_mnist", root, splits=("train", "test"))
    folders = [name.replace("/", "_") for name in CLASS_NAMES["fashion_mnist"]]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = data[split].labels.numpy()
        for k, folder in enumerate(folders):
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            for i in (labels == k).nonzero()[0][:per_class]:
                Image.fromarray(data[split].images[i, 0].numpy()).save(out / split / folder / f"{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder to write (created; files already there are overwritten)")
    p.add_argument("--train-per-class", type=int, default=200, help="images per class from the train split (default 200)")
    p.add_argument("--test-per-class", type=int, default=50, help="images per class from the test split (default 50)")
    p.add_argument("--root", default=str(ROOT / "data"), help="data.root holding fashion_mnist/ (default: the repository's data/)")
    a = p.parse_args(argv)
    out = export(a.out, a.train_per_class, a.test_per_class, a.root)
    print(f"wrote {out}/train/<class>/ ({a.train_per_class} per class) and {out}/test/<class>/ "
          f"({a.test_per_class} per class), 10 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
