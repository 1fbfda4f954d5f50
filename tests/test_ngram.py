"""The n-gram scorer: interpolated Kneser–Ney against its definition, normalisation, fit on real text, cache."""

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import ngram as NG
from bench.metrics.text import NGramReferenceLM

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "text" / "shakespeare_char"


def _kn_by_the_book(tokens: list[int], V: int, order: int):
    """Interpolated Kneser–Ney from its definition with dictionaries (Chen & Goodman 1999, eq. 17)."""
    grams = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, order + 1)}
    counts = {order: grams[order]}
    for k in range(1, order):   # continuation counts: distinct left neighbours of each k-gram
        counts[k] = Counter(g[1:] for g in grams[k + 1])
    D = {}
    for k, c in counts.items():
        n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
        D[k] = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    total, types = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    for k, c in counts.items():
        for g, v in c.items():
            total[k][g[:-1]] += v
            types[k][g[:-1]] += 1

    def prob(history: tuple, w: int) -> float:
        p = 1.0 / V
        for k in range(1, order + 1):
            if k - 1 > len(history):
                break
            h = history[len(history) - (k - 1):] if k > 1 else ()
            if total[k].get(h, 0) == 0:
                continue
            p = (max(counts[k].get(h + (w,), 0) - D[k], 0) + D[k] * types[k][h] * p) / total[k][h]
        return p
    return prob


@pytest.fixture(scope="module")
def shakespeare():
    from bench.data.text import PreparedText
    if not (SHAKESPEARE / "meta.json").is_file():
        pytest.skip(f"{SHAKESPEARE} is not prepared (bench data shakespeare)")
    data = PreparedText(SHAKESPEARE)
    return data, np.asarray(data.tokens("train")[:300_000]), np.asarray(data.tokens("val")[:20_000])


def test_matches_the_definition_on_a_small_corpus():
    rng = np.random.default_rng(0)
    V, order = 5, 3
    tokens = list(rng.choice(V, size=400, p=[0.4, 0.3, 0.15, 0.1, 0.05]))
    lm = NG.fit_kneser_ney(np.array(tokens), V, order)
    by_hand = _kn_by_the_book(tokens, V, order)
    histories = [(), (2,), (0, 1), (4, 4), (3, 0), (1, 2)]    # text start, seen and unseen contexts
    for h in histories:
        row = np.array([-1] * (order - 1 - len(h)) + list(h))[None]
        probs = NG.conditional_probs(lm, row)[0]
        assert probs == pytest.approx([by_hand(h, w) for w in range(V)], rel=1e-12)


def test_probabilities_sum_to_one_over_the_vocabulary(shakespeare):
    data, train, val = shakespeare
    lm = NG.fit_kneser_ney(train, data.vocab_size, 5)
    positions = np.arange(0, 2000, 37)
    histories = NG.histories_of(val, positions, 5)                           # real contexts (incl. the text start)
    rng = np.random.default_rng(1)
    histories = np.concatenate([histories, rng.integers(0, data.vocab_size, size=(20, 4)),  # mostly unseen
                                np.full((1, 4), -1)])                         # nothing before
    P = NG.conditional_probs(lm, histories)
    assert P.shape == (len(histories), data.vocab_size) and (P > 0).all()
    assert np.abs(P.sum(1) - 1).max() < 1e-12
    # the per-target query is the same distribution read at the target
    targets = rng.integers(0, data.vocab_size, size=len(histories))
    assert NG.conditional_probs(lm, histories, targets) == pytest.approx(P[np.arange(len(P)), targets], rel=1e-12)


def test_own_text_scores_lower_than_shuffled_text(shakespeare):
    data, train, val = shakespeare
    lm = NG.fit_kneser_ney(train, data.vocab_size, 5)
    own, held_out = NG.perplexity(lm, train[:20_000]), NG.perplexity(lm, val)
    shuffled = NG.perplexity(lm, np.random.default_rng(0).permutation(val))
    assert own < held_out < shuffled
    assert held_out < 8 and shuffled > 30            # characters: a 5-gram knows English; shuffled is noise
    # the scorer of the task reads the continuation only, after the prompt
    ref = NGramReferenceLM(lm)
    p, c = val[:32].tolist(), val[32:96].tolist()
    nll, n = ref.score([p], [c])
    assert n.tolist() == [64] and nll[0] == pytest.approx(NG.sequence_nll(lm, p + c, start=32).sum())
    with pytest.raises(ValueError, match="no hidden states"):
        ref.features([p], [c])


def test_fit_once_per_content_in_memory_and_on_disk(tmp_path, monkeypatch):
    tokens = np.random.default_rng(0).integers(0, 7, size=3000).astype(np.uint16)
    monkeypatch.setattr(NG, "_FITTED", {})
    first = NG.fitted(tokens, 7, 4, cache_dir=tmp_path)
    assert NG.fitted(tokens, 7, 4, cache_dir=tmp_path) is first                 # memory
    assert len(list(tmp_path.glob("kn4_*.npz"))) == 1
    monkeypatch.setattr(NG, "_FITTED", {})
    again = NG.fitted(tokens, 7, 4, cache_dir=tmp_path)                         # disk
    h = NG.histories_of(tokens[:50], np.arange(50), 4)
    assert again is not first and np.array_equal(NG.conditional_probs(again, h), NG.conditional_probs(first, h))
    other = tokens.copy()
    other[10] = (other[10] + 1) % 7
    assert NG.fitted(other, 7, 4, cache_dir=tmp_path) is not again              # another content, another fit
    assert NG.content_hash(tokens, 7, 4) != NG.content_hash(tokens, 7, 3)


def test_bad_orders():
    with pytest.raises(ValueError, match="overflows int64 keys; use order <= 4"):
        NG.check_order(5, 32768)
    with pytest.raises(ValueError, match="order >= 1"):
        NG.check_order(0, 84)
    with pytest.raises(ValueError, match="at least 5 training tokens"):
        NG.fit_kneser_ney(np.arange(3), 84, 5)
