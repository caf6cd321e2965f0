"""Allowed (q, k) pair counts in closed form (FLOPs = 4 x head_dim x pairs, docs/specification.md §2).

Per query row the keys fall into disjoint classes (text, the query's own image
split into sink and non-sink tokens, other images' sinks, other images' other
tokens); each class's size inside the row's causal window is a prefix-sum
difference, and whether a class is visible is read off the rule table by
evaluating the category's mask function on a representative of the class. So
a 300K-token prompt costs O(S) per category, and a new category in the table
is counted without new code here.
"""

from __future__ import annotations

import numpy as np

from blindsight.attention.semantics import RULES, NumpyOps, TokenFacts, category_mask_fn
from blindsight.attention.spans import validate_spans
from blindsight.errors import BlindSightError

# (image of the key relative to the query's image, key is a sink); image -1 = text
_KEY_CLASSES = {
    "text": (-1, False),
    "own": (0, False),
    "own_sink": (0, True),
    "other": (1, False),
    "other_sink": (1, True),
}


def visible_classes(category: str, query_is_sink: bool = False) -> dict[str, bool]:
    """Which key classes an image query (of image 0) sees under ``category``."""
    fn = category_mask_fn(category)
    q = TokenFacts(np.int64(0), np.bool_(query_is_sink))
    return {
        name: bool(fn(q, TokenFacts(np.int64(image), np.bool_(sink)), NumpyOps))
        for name, (image, sink) in _KEY_CLASSES.items()
    }


def _prefix(flags: np.ndarray) -> np.ndarray:
    """c[i] = number of set flags in [0, i)."""
    return np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])


def attention_pairs(category: str, spans, seq_len: int, sink_tokens: int = 1, window: int | None = None,
                    image_blocks: bool = False) -> int:
    """Allowed (q, k) pairs of one head of ``category`` over a prefill: causal,
    with an optional sliding window (k > q - window) and, with ``image_blocks``,
    Gemma 3's bidirectional image blocks (a block query also sees the later keys
    of its block, which no window hides)."""
    if category not in RULES:
        raise BlindSightError(f"unknown category {category!r}; expected one of {', '.join(RULES)}")
    spans = validate_spans(spans, seq_len)
    q = np.arange(seq_len, dtype=np.int64)
    lo = np.maximum(q - window + 1, 0) if window else np.zeros_like(q)
    total = q - lo + 1
    if len(spans) == 0:
        return int(total.sum())
    image = np.full(seq_len, -1, dtype=np.int64)
    sink = np.zeros(seq_len, dtype=bool)
    for i, (s, e) in enumerate(spans):
        image[s:e] = i
        sink[s : min(s + sink_tokens, e)] = True
    text_c, sink_c = _prefix(image < 0), _prefix(sink)

    def in_range(c, a, b):  # flags in [a, b] inclusive
        return c[b + 1] - c[a]

    img_q = image >= 0
    text = in_range(text_c, lo, q)
    own_start = np.where(img_q, spans[np.maximum(image, 0), 0], 0)
    own_lo = np.maximum(own_start, lo)
    own_all = np.where(img_q, q - own_lo + 1, 0)  # own-image keys in the window, <= q
    own_sink = np.where(img_q, np.maximum(np.minimum(own_start + sink_tokens, q + 1) - own_lo, 0), 0)
    other_sink = in_range(sink_c, lo, q) - own_sink
    sizes = {
        "text": text,
        "own": own_all - own_sink,
        "own_sink": own_sink,
        "other_sink": other_sink,
        "other": total - text - own_all - other_sink,
    }
    if image_blocks:
        # later keys of the query's own block (span interior: start < k < end - 1)
        own_end = np.where(img_q, spans[np.maximum(image, 0), 1], 0)
        in_block = img_q & (q > own_start) & (q < own_end - 1)
        later = np.where(in_block, own_end - 2 - q, 0)
        later_sink = np.where(in_block, np.maximum(np.minimum(own_start + sink_tokens, own_end - 1) - (q + 1), 0), 0)
        later = {"own": later - later_sink, "own_sink": later_sink}
    q_sink = sink & img_q
    count = np.zeros_like(q)
    for is_sink_query in (False, True):
        seen = visible_classes(category, is_sink_query)
        rows = img_q & (q_sink == is_sink_query)
        visible = sum((sizes[c] for c, on in seen.items() if on), np.zeros_like(q))
        if image_blocks:
            visible = visible + sum((later[c] for c in later if seen[c]), np.zeros_like(q))
        count = np.where(rows, visible, count)
    return int(np.where(img_q, count, total).sum())
