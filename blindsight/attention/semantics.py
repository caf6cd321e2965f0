"""The BlindSight attention semantics (docs/specification.md §2), stated once.

A mask is a tiny pure function ``mask(q, k, ops)`` of query and key token
facts, like FlexAttention's ``mask_mod``; masks compose with
:func:`and_masks` / :func:`or_masks`, and ``ops`` is the backend the same
definition evaluates in (numpy here, ONNX nodes in the lowerings).

A head category is a row of the rule table :data:`RULES`: the key clauses an
*image* query may use. Text queries see every key the model's mask allows,
whatever the category. Everything else (the numpy reference, both lowerings'
routes, the FLOP counts, the profiler's recalls) is derived from this table.
"""

from __future__ import annotations

import dataclasses
from functools import reduce
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenFacts:
    """What a mask function may read of a token: ``image`` (span index, -1 for
    text), ``sink`` (bool), ``pos`` (absolute position) and ``block`` (the
    image block it belongs to, -1 for none: see :func:`image_block`). Arrays or
    graph values, shaped to broadcast (queries along rows, keys along columns)."""

    image: Any
    sink: Any
    pos: Any = None
    block: Any = None


MaskFn = Callable[[TokenFacts, TokenFacts, Any], Any]


class NumpyOps:
    """numpy backend for mask functions."""

    or_ = staticmethod(np.logical_or)
    and_ = staticmethod(np.logical_and)
    eq = staticmethod(np.equal)
    le = staticmethod(np.less_equal)

    @staticmethod
    def is_text(image):
        return image < 0

    @staticmethod
    def is_member(ids):
        return ids >= 0

    @staticmethod
    def within(k_pos, q_pos, window: int):
        """k_pos > q_pos - window."""
        return k_pos > q_pos - window

    @staticmethod
    def true_like(q: TokenFacts, k: TokenFacts):
        return np.ones(np.broadcast_shapes(np.shape(q.image), np.shape(k.image)), dtype=bool)


# ------------------------------------------------------------------ combinators


def and_masks(*masks: MaskFn) -> MaskFn:
    """Allowed where every mask allows (FlexAttention's ``and_masks``)."""
    return lambda q, k, ops: reduce(ops.and_, [m(q, k, ops) for m in masks])


def or_masks(*masks: MaskFn) -> MaskFn:
    """Allowed where any mask allows (FlexAttention's ``or_masks``)."""
    return lambda q, k, ops: reduce(ops.or_, [m(q, k, ops) for m in masks])


def everything(q, k, ops):
    return ops.true_like(q, k)


# ------------------------------------------------------------------ the model's own mask


def causal(q, k, ops):
    return ops.le(k.pos, q.pos)


def sliding_window(window: int) -> MaskFn:
    """The w keys q-w+1 .. q (with causality); ``window <= 0`` means none."""
    return lambda q, k, ops: ops.within(k.pos, q.pos, window)


def image_block(q, k, ops):
    """Gemma 3's bidirectional image blocks: q and k lie in the same block (an
    image's soft tokens, which transformers marks with ``token_type_ids`` = 1:
    the tokens of a span strictly between its first and last token)."""
    return ops.and_(ops.is_member(q.block), ops.eq(q.block, k.block))


def model_mask(is_causal: bool = True, window: int = -1, image_blocks: bool = False) -> MaskFn | None:
    """Causality (or, with ``image_blocks``, causality or the same image block:
    transformers' ``or_mask_function``) and a sliding window as one mask, or None
    when neither applies. As in transformers, the window bounds block pairs too."""
    order = or_masks(causal, image_block) if image_blocks else causal
    parts = ([order] if is_causal else []) + ([sliding_window(window)] if window > 0 else [])
    return and_masks(*parts) if parts else None


# ------------------------------------------------------------------ clauses and the rule table


@dataclasses.dataclass(frozen=True)
class Clause:
    """One kind of key an image query may see. ``key_only`` clauses read the
    key's facts alone, so a lowering can precompute their key set once."""

    name: str
    mask: MaskFn
    key_only: bool


TEXT = Clause("text", lambda q, k, ops: ops.is_text(k.image), key_only=True)
SINK = Clause("sink", lambda q, k, ops: k.sink, key_only=True)
SAME_IMAGE = Clause("same_image", lambda q, k, ops: ops.eq(q.image, k.image), key_only=False)
ANY = Clause("any", everything, key_only=True)

# Which keys an image-token query may see besides the model's own mask (docs/specification.md §2).
RULES: dict[str, tuple[Clause, ...]] = {
    "dense": (ANY,),
    "sink": (TEXT, SINK),
    "intra": (TEXT, SAME_IMAGE),
    "intra_sink": (TEXT, SAME_IMAGE, SINK),
}

CATEGORIES = tuple(RULES)

#: Each clause's bit in a node's ``key_clauses`` attribute, the per-head form of
#: this table that compiled nodes carry (the native kernel reads these bits, not
#: category names). A clause without a bit here is written as OTHER_CLAUSE.
CLAUSE_BITS: dict[Clause, int] = {ANY: 1, TEXT: 2, SINK: 4, SAME_IMAGE: 8}
#: the bit of a head whose category holds a clause outside CLAUSE_BITS (only the
#: function bodies run such a head)
OTHER_CLAUSE = 1 << 30

# Denser categories first; the profiler falls back along this order.
DENSITY_ORDER = ("dense", "intra_sink", "intra", "sink")


def clauses(category: str) -> tuple[Clause, ...]:
    try:
        return RULES[category]
    except KeyError:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(RULES)}") from None


def is_dense(category: str) -> bool:
    return ANY in clauses(category)


def query_is_text(q, k, ops):
    return ops.is_text(q.image)


def category_mask_fn(category: str) -> MaskFn:
    """Allowed (q, k) pairs of one head category, before the model's own mask."""
    if is_dense(category):
        return everything
    return or_masks(query_is_text, *(c.mask for c in clauses(category)))


def category_mask(category: str, q: TokenFacts, k: TokenFacts, ops=NumpyOps):
    return category_mask_fn(category)(q, k, ops)


def key_only_mask(category: str) -> MaskFn | None:
    """The part of an image query's rule that reads the key alone (text, sinks),
    or None; with :func:`sees_own_image` it is the whole rule of a non-dense
    category, which is what the fast lowering routes on."""
    parts = [c.mask for c in clauses(category) if c.key_only]
    return or_masks(*parts) if parts else None


def sees_own_image(category: str) -> bool:
    return SAME_IMAGE in clauses(category)


def key_clauses(category: str) -> int:
    """The bit set of ``category``'s key clauses (:data:`CLAUSE_BITS`), read off the rule table."""
    bits = 0
    for c in clauses(category):
        bits |= CLAUSE_BITS.get(c, OTHER_CLAUSE)
    return bits


def clause_names(bits: int) -> list[str]:
    """The clauses of a ``key_clauses`` bit set, by name; unknown bits as numbers."""
    names = [c.name for c, bit in CLAUSE_BITS.items() if bits & bit]
    rest = bits & ~sum(CLAUSE_BITS.values())
    return names + ([f"bits {rest:#x}"] if rest else [])
