"""A smoothed n-gram LM over the task's tokens: interpolated Kneser–Ney, numpy only.

An independent scorer for generated text.  It shares nothing with either arm (no network, no
embedding table, no training recipe), it is fit on the train split only, and its probabilities are
exact and normalised, so its perplexity of a text is a true likelihood figure of *that* model.

Interpolated Kneser–Ney (Chen & Goodman 1999, eq. 17), with one discount per order:

  P_k(w | h) = max(c_k(hw) − D_k, 0) / c_k(h·)  +  D_k · N1+(h·) / c_k(h·) · P_{k−1}(w | h')
               h: the last k − 1 tokens, h': the last k − 2; c_k(h·) = Σ_w c_k(hw);
               N1+(h·) = the number of distinct w with c_k(hw) > 0
  c_n          the raw count of the n-gram in the training text (the highest order n)
  c_k, k < n   the continuation count N1+(·hw): how many distinct tokens precede hw in the text
  P_0(w)       1 / V (every token of the vocabulary keeps some probability)
  D_k          n1 / (n1 + 2·n2), n_r = the number of k-grams whose count is r
  unseen h     P_k(w | h) = P_{k−1}(w | h') (all of the mass backs off)

Each level is a proper distribution when the one below is, so Σ_w P_n(w | h) = 1 for every h.
Near the start of a text (fewer than n − 1 tokens of history) the highest order with a full
context is used.  k-grams are int64 keys Σ_i t_i·V^(k−1−i), so V^n must stay below 2^63.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_DIR = Path(os.environ.get("BENCH_CACHE", ".cache/bench")) / "ngram"
_FITTED: dict[str, "NGramLM"] = {}   # content hash → model, for the life of the process


@dataclass(frozen=True)
class OrderTable:
    """The counts of one order k: every k-gram seen, and per (k − 1)-token context its total and types."""
    grams: np.ndarray            # sorted int64 keys of the k-grams with count > 0
    counts: np.ndarray           # their counts (raw at the highest order, continuation counts below), float64
    contexts: np.ndarray         # sorted int64 keys of the contexts of those k-grams
    context_total: np.ndarray    # c_k(h·)
    context_types: np.ndarray    # N1+(h·)
    discount: float              # D_k


@dataclass(frozen=True)
class NGramLM:
    order: int
    vocab_size: int
    tables: tuple                # OrderTable of order k at index k − 1
    train_tokens: int            # tokens it was fit on


# ---- fitting ------------------------------------------------------------------------------------------------
def check_order(order: int, vocab_size: int) -> None:
    if order < 1:
        raise ValueError(f"an n-gram LM needs order >= 1, got {order}")
    if vocab_size ** order >= 2 ** 63:
        biggest = max(k for k in range(1, order) if vocab_size ** k < 2 ** 63)
        raise ValueError(f"n-gram order {order} over {vocab_size} tokens overflows int64 keys; use order <= {biggest}")


def gram_keys(tokens: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """The int64 key of every k-gram of `tokens`, in text order."""
    t = np.asarray(tokens, dtype=np.int64)
    n = len(t) - k + 1
    keys = np.zeros(max(n, 0), dtype=np.int64)
    for i in range(k):
        keys = keys * vocab_size + t[i:i + n]
    return keys


def kn_discount(counts: np.ndarray) -> float:
    """D = n1 / (n1 + 2·n2) (Ney, Essen & Kneser 1994); 0.5 when the order has no singletons or doubletons."""
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5


def order_table(grams: np.ndarray, counts: np.ndarray, vocab_size: int) -> OrderTable:
    """Context totals and types of sorted k-gram keys (a context is key // V, so contexts are contiguous)."""
    contexts, start, types = np.unique(grams // vocab_size, return_index=True, return_counts=True)
    counts = counts.astype(np.float64)
    return OrderTable(grams, counts, contexts, np.add.reduceat(counts, start), types.astype(np.float64),
                      kn_discount(counts))


def fit_kneser_ney(tokens: np.ndarray, vocab_size: int, order: int = 5) -> NGramLM:
    """Interpolated Kneser–Ney of `order` fit on `tokens` (token ids in [0, vocab_size))."""
    check_order(order, vocab_size)
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < order:
        raise ValueError(f"an order-{order} n-gram LM needs at least {order} training tokens, got {len(tokens)}")
    tables = [None] * order
    top, top_counts = np.unique(gram_keys(tokens, order, vocab_size), return_counts=True)
    tables[order - 1] = order_table(top, top_counts, vocab_size)
    for k in range(order - 1, 0, -1):
        longer = top if k == order - 1 else np.unique(gram_keys(tokens, k + 1, vocab_size))
        # continuation count of a k-gram: the distinct (k+1)-grams that end with it
        grams, counts = np.unique(longer % vocab_size ** k, return_counts=True)
        tables[k - 1] = order_table(grams, counts, vocab_size)
    return NGramLM(order, vocab_size, tuple(tables), len(tokens))


# ---- probabilities ----------------------------------------------------------------------------------------------
def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values at query, found) for sorted `keys`; 0 where absent."""
    if len(keys) == 0:
        return np.zeros(query.shape), np.zeros(query.shape, dtype=bool)
    i = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = keys[i] == query
    return np.where(found, values[i], 0.0), found


def conditional_probs(lm: NGramLM, histories: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """P(w | history) for each row of `histories` (N, order − 1; −1 where the text had not started):
    of `targets` (N,) → (N,), or of every token of the vocabulary → (N, V)."""
    V, n = lm.vocab_size, lm.order
    histories = np.asarray(histories, dtype=np.int64).reshape(-1, n - 1)
    w = np.arange(V)[None, :] if targets is None else np.asarray(targets, dtype=np.int64)[:, None]
    p = np.full((len(histories), w.shape[1]), 1.0 / V)
    for k in range(1, n + 1):
        tab = lm.tables[k - 1]
        h = histories[:, n - k:]                                   # the last k − 1 tokens
        has_history = (h >= 0).all(1)
        ctx = np.zeros(len(h), dtype=np.int64)
        for j in range(k - 1):
            ctx = ctx * V + np.maximum(h[:, j], 0)
        total, seen = _lookup(tab.contexts, tab.context_total, ctx)
        types, _ = _lookup(tab.contexts, tab.context_types, ctx)
        c, _ = _lookup(tab.grams, tab.counts, ctx[:, None] * V + w)
        use = has_history & seen
        D = tab.discount
        mixed = (np.maximum(c - D, 0.0) + D * types[:, None] * p) / np.where(use, total, 1.0)[:, None]
        p = np.where(use[:, None], mixed, p)
    return p if targets is None else p[:, 0]


def histories_of(seq: np.ndarray, positions: np.ndarray, order: int) -> np.ndarray:
    """The order − 1 tokens before each position of `seq`, −1 before the text's start: (len(positions), order − 1)."""
    padded = np.concatenate([np.full(order - 1, -1, dtype=np.int64), np.asarray(seq, dtype=np.int64)])
    return padded[np.asarray(positions)[:, None] + np.arange(order - 1)[None, :]]


def sequence_nll(lm: NGramLM, seq, start: int = 0) -> np.ndarray:
    """−ln P(seq[j] | seq[<j]) for j = start … len(seq) − 1."""
    seq = np.asarray(seq, dtype=np.int64)
    positions = np.arange(start, len(seq))
    return -np.log(conditional_probs(lm, histories_of(seq, positions, lm.order), seq[positions]))


def perplexity(lm: NGramLM, tokens) -> float:
    """exp(mean −ln P) of every token of `tokens` after the first."""
    return float(np.exp(sequence_nll(lm, tokens, start=1).mean()))


# ---- fit once, cached by content ----------------------------------------------------------------------------------
def content_hash(tokens: np.ndarray, vocab_size: int, order: int) -> str:
    h = hashlib.sha256(f"kneser-ney v1 order {order} vocab {vocab_size} dtype {np.asarray(tokens).dtype};".encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    return h.hexdigest()[:20]


def _save(path: Path, lm: NGramLM) -> None:
    arrays = {f"{name}{k}": getattr(t, name) for k, t in enumerate(lm.tables)
              for name in ("grams", "counts", "contexts", "context_total", "context_types")}
    arrays["discounts"] = np.array([t.discount for t in lm.tables])
    arrays["meta"] = np.array([lm.order, lm.vocab_size, lm.train_tokens])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:   # written whole, then renamed: a reader never sees half a file
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> NGramLM:
    z = np.load(path)
    order, vocab, n_train = (int(x) for x in z["meta"])
    tables = tuple(OrderTable(z[f"grams{k}"], z[f"counts{k}"], z[f"contexts{k}"], z[f"context_total{k}"],
                              z[f"context_types{k}"], float(z["discounts"][k])) for k in range(order))
    return NGramLM(order, vocab, tables, n_train)


def fitted(tokens: np.ndarray, vocab_size: int, order: int = 5, cache_dir: Path | None = CACHE_DIR) -> NGramLM:
    """The Kneser–Ney LM of `tokens`, fit once per content: kept in memory and, unless cache_dir is
    None, in <cache_dir>/kn<order>_<hash>.npz (every arm and every curve point reuses it)."""
    key = content_hash(tokens, vocab_size, order)
    if key not in _FITTED:
        path = Path(cache_dir) / f"kn{order}_{key}.npz" if cache_dir is not None else None
        if path is not None and path.is_file():
            _FITTED[key] = _load(path)
        else:
            _FITTED[key] = fit_kneser_ney(tokens, vocab_size, order)
            if path is not None:
                _save(path, _FITTED[key])
    return _FITTED[key]
