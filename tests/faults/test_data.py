"""Corrupt data files end in one line naming the file, before any training step."""

import shutil

import numpy as np
import pytest

from bench.cli import main

PARAMS = """
suite: faults
runs_dir: {runs}
data: {{dataset: fashion_mnist, root: {root}, train_subset: 128, test_subset: 100, val_subset: 100, verify: {verify}}}
model: {{arch: vit, image_size: 28, patch_size: 7, hidden: 16, depth: 2, heads: 2, mlp_dim: 32}}
diffusion: {{num_blocks: 2}}
train: {{epochs: 1.0, batch_size: 32, threads: 1, curve_points: 1}}
eval: {{batch_size: 100, final_variants: []}}
arms: {{dblocks: {{mode: dblocks}}}}
"""


def damaged_copy(fashion_root, tmp_path, name, damage):
    root = tmp_path / "data"
    shutil.copytree(fashion_root / "fashion_mnist", root / "fashion_mnist")
    path = root / "fashion_mnist" / name
    raw = bytearray(path.read_bytes())
    damage(raw)
    path.write_bytes(bytes(raw))
    return root


def run(tmp_path, root, capsys, verify="true"):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.format(runs=tmp_path / "runs", root=root, verify=verify))
    code = main(["train", str(p), "--arm", "dblocks", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not (tmp_path / "runs/faults/dblocks/params.yaml").exists()   # nothing written
    return err[0]


def test_corrupt_pixels_of_the_right_size_fail_the_checksum(tmp_path, fashion_root, capsys):
    root = damaged_copy(fashion_root, tmp_path, "train-images-idx3-ubyte", lambda b: b.__setitem__(5000, b[5000] ^ 0xFF))
    assert "does not match its published SHA-256" in run(tmp_path, root, capsys)


def test_labels_outside_the_classes_are_refused_even_unverified(tmp_path, fashion_root, capsys):
    root = damaged_copy(fashion_root, tmp_path, "train-labels-idx1-ubyte", lambda b: b.__setitem__(20, 42))
    assert "labels outside 0..9" in run(tmp_path, root, capsys, verify="false")


def test_a_truncated_idx_file_is_one_line(tmp_path, fashion_root, capsys):
    root = damaged_copy(fashion_root, tmp_path, "train-labels-idx1-ubyte", lambda b: b.__delitem__(slice(100, None)))
    assert "train-labels-idx1-ubyte" in run(tmp_path, root, capsys, verify="false")


def test_a_one_character_corpus_is_not_a_text(tmp_path, capsys):
    source = tmp_path / "a.txt"
    source.write_text("a" * 200_000)
    assert main(["data", "text", "--source", str(source), "--root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 distinct non-space character" in err[0]


def test_token_ids_outside_the_vocabulary_are_caught_at_load(tmp_path, capsys):
    from bench.data.text import PreparedText, TextFileError
    source = tmp_path / "t.txt"
    source.write_text("".join(np.random.default_rng(0).choice(list("abcdefgh \n"), 50_000)))
    assert main(["data", "text", "--source", str(source), "--root", str(tmp_path / "data")]) == 0
    (prepared,) = [p.parent for p in (tmp_path / "data").rglob("meta.json")]
    text = PreparedText(prepared)
    assert text.tokens("train").max() < text.vocab_size
    raw = np.fromfile(prepared / "train.bin", dtype=text.dtype)
    raw[7] = text.vocab_size + 3
    raw.tofile(prepared / "train.bin")
    with pytest.raises(TextFileError, match="outside the vocabulary"):
        PreparedText(prepared).tokens("train")
