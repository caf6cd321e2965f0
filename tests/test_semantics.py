"""docs/specification.md §2 semantics: masks against a literal reading of the table, spans, reference attention."""

import numpy as np
import pytest

from blindsight import attention as sem
from blindsight.errors import SpanError


def literal_allowed(category, spans, q, k, sink_tokens):
    """The docs/specification.md §2 table, one (q, k) pair at a time, written independently of the module."""
    if k > q:
        return False
    def image_of(t):
        for i, (s, e) in enumerate(spans):
            if s <= t < e:
                return i
        return None
    def is_sink(t):
        i = image_of(t)
        return i is not None and t - spans[i][0] < sink_tokens
    qi, ki = image_of(q), image_of(k)
    if qi is None or category == "dense":
        return True
    k_text = ki is None
    if category == "sink":
        return k_text or is_sink(k)
    if category == "intra":
        return k_text or ki == qi
    if category == "intra_sink":
        return k_text or ki == qi or is_sink(k)
    raise AssertionError(category)


TEMPLATES = [
    ([], 6),
    ([(0, 4)], 6),                      # image at the very start
    ([(2, 5), (7, 12)], 12),            # image at the very end
    ([(1, 3), (3, 6), (8, 9)], 11),     # adjacent images, a 1-token image
    ([(2, 9), (10, 14)], 16),
]


@pytest.mark.parametrize("spans,seq", TEMPLATES)
@pytest.mark.parametrize("category", sem.CATEGORIES)
@pytest.mark.parametrize("sink_tokens", [1, 2, 3])
def test_allowed_mask_matches_table(spans, seq, category, sink_tokens):
    got = sem.allowed_mask(category, spans, seq, sink_tokens=sink_tokens)
    want = np.array([[literal_allowed(category, spans, q, k, sink_tokens) for k in range(seq)] for q in range(seq)])
    np.testing.assert_array_equal(got, want)
    assert got.any(axis=1).all(), "no query row may be empty"


def test_no_image_every_category_is_dense():
    dense = sem.allowed_mask("dense", [], 9)
    for c in sem.CATEGORIES:
        np.testing.assert_array_equal(sem.allowed_mask(c, [], 9), dense)


def test_kv_cache_offset_queries_are_last_positions():
    spans = [(1, 5), (6, 10)]
    full = sem.allowed_mask("intra", spans, 12)
    np.testing.assert_array_equal(sem.allowed_mask("intra", spans, 3, 12), full[-3:])


@pytest.mark.parametrize(
    "spans,seq,message",
    [
        ([(3, 3)], 10, "empty"),
        ([(5, 2)], 10, "empty or reversed"),
        ([(-1, 2)], 10, "before position 0"),
        ([(2, 12)], 10, "ends past"),
        ([(4, 8), (6, 9)], 10, "overlaps"),
        ([(6, 8), (1, 3)], 10, "sorted"),
        ([[1, 2, 3]], 10, "shape"),
        ([("a", 2)], 10, "integer"),
    ],
)
def test_invalid_spans_are_named(spans, seq, message):
    with pytest.raises(SpanError, match=message):
        sem.validate_spans(spans, seq)


def test_find_spans_from_delimiters():
    d = sem.Delimiters(start=100, end=101)
    ids = [100, 5, 5, 101, 7, 7, 100, 5, 101]
    np.testing.assert_array_equal(sem.find_spans(ids, d), [[0, 4], [6, 9]])
    assert sem.find_spans([1, 2, 3], d).shape == (0, 2)
    with pytest.raises(SpanError, match="never closed"):
        sem.find_spans([1, 100, 5], d)
    with pytest.raises(SpanError, match="no open image"):
        sem.find_spans([1, 101], d)


def test_reference_attention_against_loop():
    rng = np.random.default_rng(0)
    B, H, Hkv, S, D = 1, 4, 2, 10, 3
    spans = [(1, 4), (5, 9)]
    cats = ["dense", "sink", "intra", "intra_sink"]
    q, k, v = (rng.standard_normal((B, n, S, D)) for n in (H, Hkv, Hkv))
    out = sem.reference_attention(q, k, v, spans, cats, sink_tokens=1, scale=0.5)
    for h, c in enumerate(cats):
        for i in range(S):
            keys = [j for j in range(S) if literal_allowed(c, spans, i, j, 1)]
            s = np.array([q[0, h, i] @ k[0, h // 2, j] * 0.5 for j in keys])
            p = np.exp(s - s.max()); p /= p.sum()
            np.testing.assert_allclose(out[0, h, i], p @ v[0, h // 2, keys], rtol=1e-10)


def test_allowed_pairs_counts_mask():
    spans = [(2, 6), (8, 12)]
    assert sem.allowed_pairs("dense", spans, 14) == 14 * 15 // 2
    # intra: image 1's tokens (8..11) lose image 0's 4 keys each
    assert sem.allowed_pairs("intra", spans, 14) == 14 * 15 // 2 - 4 * 4