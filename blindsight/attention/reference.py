"""The numpy reference of docs/specification.md §2: per-head boolean masks and float64 attention.

Built from :mod:`blindsight.attention.semantics` alone; the lowerings, the
profiler and the tests compare against it."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from blindsight.attention.semantics import NumpyOps, TokenFacts, and_masks, category_mask_fn, model_mask
from blindsight.attention.spans import block_ids, token_facts


def allowed_mask(
    category: str,
    spans,
    q_len: int,
    kv_len: int | None = None,
    sink_tokens: int = 1,
    causal: bool = True,
    window: int = -1,
    image_blocks: bool = False,
) -> np.ndarray:
    """Boolean [q_len, kv_len] mask of one head (queries at kv_len - q_len ...),
    with the model's causality (and Gemma 3's image blocks) and optional sliding
    window applied."""
    kv_len = q_len if kv_len is None else kv_len
    past = kv_len - q_len
    qi, qs = token_facts(spans, q_len, sink_tokens, offset=past)
    ki, ks = token_facts(spans, kv_len, sink_tokens)
    qb, kb = block_ids(spans, q_len, offset=past), block_ids(spans, kv_len)
    q = TokenFacts(qi[:, None], qs[:, None], np.arange(past, kv_len)[:, None], qb[:, None])
    k = TokenFacts(ki[None, :], ks[None, :], np.arange(kv_len)[None, :], kb[None, :])
    structure = model_mask(causal, window, image_blocks)
    fn = category_mask_fn(category) if structure is None else and_masks(category_mask_fn(category), structure)
    return np.broadcast_to(fn(q, k, NumpyOps), (q_len, kv_len)).copy()


def head_masks(categories: Sequence[str], spans, q_len, kv_len=None, sink_tokens=1, causal=True, window=-1,
               image_blocks=False):
    """Boolean [H, q_len, kv_len]: one mask per query head."""
    cache = {c: allowed_mask(c, spans, q_len, kv_len, sink_tokens, causal, window, image_blocks) for c in set(categories)}
    return np.stack([cache[c] for c in categories])


def allowed_pairs(category: str, spans, seq_len: int, sink_tokens: int = 1, window: int = -1,
                  image_blocks: bool = False) -> int:
    """Number of allowed (q, k) pairs of one head over a prefill, by brute force."""
    return int(allowed_mask(category, spans, seq_len, sink_tokens=sink_tokens, window=window,
                            image_blocks=image_blocks).sum())


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    spans,
    categories: Sequence[str],
    *,
    sink_tokens: int = 1,
    scale: float | None = None,
    model_mask: np.ndarray | None = None,
    causal: bool = True,
    window: int = -1,
    image_blocks: bool = False,
) -> np.ndarray:
    """numpy BlindSight attention. q [B, H, Sq, D]; k, v [B, Hkv, Skv, D].

    ``model_mask`` (bool, broadcastable to [B, H, Sq, Skv]) is the model's own
    mask, applied on top of causality (with ``image_blocks``, Gemma 3's
    bidirectional image blocks) and ``window``. Computed in float64. A
    query left with no key outputs zeros.
    """
    b, h, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if len(categories) != h:
        raise ValueError(f"{len(categories)} categories for {h} query heads")
    group = h // hkv
    kr = np.repeat(k.astype(np.float64), group, axis=1)
    vr = np.repeat(v.astype(np.float64), group, axis=1)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    scores = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kr) * scale
    allowed = head_masks(categories, spans, sq, skv, sink_tokens, causal, window, image_blocks)[None]
    if model_mask is not None:
        allowed = allowed & model_mask
    scores = np.where(allowed, scores, -np.inf)
    # a row the model's mask leaves without keys (a sliding window over a sink
    # head) outputs zeros, like the exporters' IsNaN guard
    row_max = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    return np.einsum("bhqk,bhkd->bhqd", p, vr).astype(q.dtype)
