"""The model families BlindSight knows (placeholder until the registry lands)."""

from __future__ import annotations

from blindsight.attention.spans import Delimiters
from blindsight.errors import SpanError

FAMILY_DELIMITERS = {
    "qwen2_vl": Delimiters(start=151652, end=151653),
    "qwen2_5_vl": Delimiters(start=151652, end=151653),
    "gemma3": Delimiters(start=255999, end=256000),
}


def delimiters_of(family: str) -> Delimiters:
    try:
        return FAMILY_DELIMITERS[family]
    except KeyError:
        raise SpanError(f"unknown model family {family!r}; known: {', '.join(FAMILY_DELIMITERS)}") from None
