"""The BlindSight attention semantics (SPEC §2), defined once.

Every consumer (the numpy reference, the ONNX lowerings, the profiler, the
tests) derives its masks from the clause table and the mask functions here.
Masks are built like FlexAttention's ``mask_mod``: small pure functions of
query and key token facts, combined with ``or``/``and`` through an ``ops``
backend, so the same definition evaluates in numpy and emits ONNX nodes.
"""

from __future__ import annotations

import dataclasses
from functools import reduce
from typing import Any, Sequence

import numpy as np

from blindsight.errors import SpanError

CATEGORIES = ("dense", "sink", "intra", "intra_sink")

# Which keys an image-token query may see besides the model's own mask.
# Text queries always see every key, whatever the category.
KEY_ANY = "any"
KEY_TEXT = "text"
KEY_SAME_IMAGE = "same_image"
KEY_SINK = "sink"

CATEGORY_CLAUSES: dict[str, tuple[str, ...]] = {
    "dense": (KEY_ANY,),
    "sink": (KEY_TEXT, KEY_SINK),
    "intra": (KEY_TEXT, KEY_SAME_IMAGE),
    "intra_sink": (KEY_TEXT, KEY_SAME_IMAGE, KEY_SINK),
}

# Denser categories first; the profiler falls back along this order.
DENSITY_ORDER = ("dense", "intra_sink", "intra", "sink")


def uses(category: str, clause: str) -> bool:
    return clause in CATEGORY_CLAUSES[category]


@dataclasses.dataclass(frozen=True)
class TokenFacts:
    """Per-position facts a mask function reads: ``image`` (span index, -1 for
    text) and ``sink`` (bool). Arrays or graph values, already shaped to
    broadcast (queries along rows, keys along columns)."""

    image: Any
    sink: Any


class NumpyOps:
    """numpy backend for the mask functions."""

    or_ = staticmethod(np.logical_or)
    and_ = staticmethod(np.logical_and)
    eq = staticmethod(np.equal)

    @staticmethod
    def is_text(image):
        return image < 0

    @staticmethod
    def true_like(q: TokenFacts, k: TokenFacts):
        return np.ones(np.broadcast_shapes(np.shape(q.image), np.shape(k.image)), dtype=bool)


def _clause(clause: str, q: TokenFacts, k: TokenFacts, ops):
    if clause == KEY_TEXT:
        return ops.is_text(k.image)
    if clause == KEY_SAME_IMAGE:
        return ops.eq(q.image, k.image)
    if clause == KEY_SINK:
        return k.sink
    raise ValueError(f"unknown clause {clause!r}")


def category_mask(category: str, q: TokenFacts, k: TokenFacts, ops=NumpyOps):
    """Allowed (q, k) pairs for one head category, before the model's own mask."""
    clauses = CATEGORY_CLAUSES[category]
    if KEY_ANY in clauses:
        return ops.true_like(q, k)
    terms = [ops.is_text(q.image)] + [_clause(c, q, k, ops) for c in clauses]
    return reduce(ops.or_, terms)


def causal_mask(q_pos, k_pos):
    return k_pos <= q_pos


# ---------------------------------------------------------------- spans


def validate_spans(spans, seq_len: int | None = None) -> np.ndarray:
    """Return spans as int64 [N, 2] or raise SpanError naming the first fault."""
    try:
        arr = np.asarray(spans, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise SpanError(f"image_spans must be integer pairs (start, end): {exc}") from None
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise SpanError(
            f"image_spans must have shape [N, 2] (rows of start, end); got shape {list(arr.shape)}"
        )
    prev_end = None
    for i, (start, end) in enumerate(arr.tolist()):
        if start < 0:
            raise SpanError(f"image span {i} ({start}, {end}) starts before position 0")
        if end <= start:
            raise SpanError(f"image span {i} ({start}, {end}) is empty or reversed: end must exceed start")
        if seq_len is not None and end > seq_len:
            raise SpanError(
                f"image span {i} ({start}, {end}) ends past the prompt of {seq_len} tokens"
            )
        if prev_end is not None and start < prev_end:
            raise SpanError(
                f"image span {i} ({start}, {end}) overlaps or precedes span {i - 1}, which ends at "
                f"{prev_end}: spans must be sorted and non-overlapping"
            )
        prev_end = end
    return arr


def token_facts(spans, length: int, sink_tokens: int = 1, offset: int = 0):
    """numpy image ids and sink flags of absolute positions offset..offset+length-1."""
    spans = validate_spans(spans)
    pos = np.arange(offset, offset + length, dtype=np.int64)
    image = np.full(length, -1, dtype=np.int64)
    sink = np.zeros(length, dtype=bool)
    for i, (start, end) in enumerate(spans.tolist()):
        inside = (pos >= start) & (pos < end)
        image[inside] = i
        sink |= inside & (pos - start < sink_tokens)
    return image, sink


def allowed_mask(
    category: str,
    spans,
    q_len: int,
    kv_len: int | None = None,
    sink_tokens: int = 1,
    causal: bool = True,
) -> np.ndarray:
    """Boolean [q_len, kv_len] mask of one head (queries at kv_len - q_len ...)."""
    kv_len = q_len if kv_len is None else kv_len
    past = kv_len - q_len
    qi, qs = token_facts(spans, q_len, sink_tokens, offset=past)
    ki, ks = token_facts(spans, kv_len, sink_tokens)
    mask = category_mask(category, TokenFacts(qi[:, None], qs[:, None]), TokenFacts(ki[None, :], ks[None, :]))
    if causal:
        mask = mask & causal_mask(np.arange(past, kv_len)[:, None], np.arange(kv_len)[None, :])
    return mask


def head_masks(categories: Sequence[str], spans, q_len, kv_len=None, sink_tokens=1, causal=True):
    """Boolean [H, q_len, kv_len]: one mask per query head."""
    cache = {c: allowed_mask(c, spans, q_len, kv_len, sink_tokens, causal) for c in set(categories)}
    return np.stack([cache[c] for c in categories])


def allowed_pairs(category: str, spans, seq_len: int, sink_tokens: int = 1) -> int:
    """Number of allowed causal (q, k) pairs of one head over a prefill of seq_len."""
    return int(allowed_mask(category, spans, seq_len, sink_tokens=sink_tokens).sum())


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
) -> np.ndarray:
    """numpy BlindSight attention. q [B, H, Sq, D]; k, v [B, Hkv, Skv, D].

    ``model_mask`` (bool, broadcastable to [B, H, Sq, Skv]) is the model's own
    mask, applied on top. Computed in float64. A query left with no key
    outputs zeros.
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
    allowed = head_masks(categories, spans, sq, skv, sink_tokens, causal)[None]
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


# ---------------------------------------------------------------- spans from ids


@dataclasses.dataclass(frozen=True)
class Delimiters:
    """Token ids that open and close one image in a model family's prompt."""

    start: int
    end: int


# Image delimiters of the families' released tokenizers (Qwen2-VL and
# Qwen2.5-VL: <|vision_start|> / <|vision_end|>; Gemma 3: <start_of_image> /
# <end_of_image>, the config's boi/eoi_token_index).
FAMILY_DELIMITERS = {
    "qwen2_vl": Delimiters(start=151652, end=151653),
    "qwen2_5_vl": Delimiters(start=151652, end=151653),
    "gemma3": Delimiters(start=255999, end=256000),
}


def find_spans(input_ids, delimiters: Delimiters | str) -> np.ndarray:
    """Spans [start, end) from a 1-D id sequence: each opens at an image-start
    delimiter and closes after the matching image-end delimiter."""
    if isinstance(delimiters, str):
        try:
            delimiters = FAMILY_DELIMITERS[delimiters]
        except KeyError:
            raise SpanError(f"unknown model family {delimiters!r}; known: {', '.join(FAMILY_DELIMITERS)}") from None
    ids = np.asarray(input_ids).reshape(-1).tolist()
    spans, open_at = [], None
    for t, tok in enumerate(ids):
        if tok == delimiters.start:
            if open_at is not None:
                raise SpanError(f"image-start token at position {t} before the image opened at {open_at} was closed")
            open_at = t
        elif tok == delimiters.end:
            if open_at is None:
                raise SpanError(f"image-end token at position {t} with no open image")
            spans.append((open_at, t + 1))
            open_at = None
    if open_at is not None:
        raise SpanError(f"image opened at position {open_at} is never closed")
    return validate_spans(spans, len(ids))
