"""Image spans (docs/specification.md §2): validation, token facts, and spans found from token ids."""

from __future__ import annotations

import dataclasses

import numpy as np

from blindsight.errors import SpanError


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
    """numpy image ids (-1 for text) and sink flags of positions offset..offset+length-1."""
    spans = validate_spans(spans)
    pos = np.arange(offset, offset + length, dtype=np.int64)
    image = np.full(length, -1, dtype=np.int64)
    sink = np.zeros(length, dtype=bool)
    for i, (start, end) in enumerate(spans.tolist()):
        inside = (pos >= start) & (pos < end)
        image[inside] = i
        sink |= inside & (pos - start < sink_tokens)
    return image, sink


def block_ids(spans, length: int, offset: int = 0) -> np.ndarray:
    """numpy image-block id of positions offset..offset+length-1: span i's tokens
    strictly between its first and last (Gemma 3's soft tokens), -1 elsewhere."""
    spans = validate_spans(spans)
    pos = np.arange(offset, offset + length, dtype=np.int64)
    block = np.full(length, -1, dtype=np.int64)
    for i, (start, end) in enumerate(spans.tolist()):
        block[(pos > start) & (pos < end - 1)] = i
    return block


def token_type_ids(spans, length: int, past: int = 0, rows: int | None = None) -> np.ndarray:
    """transformers' Gemma 3 ``token_type_ids`` (1 on image soft tokens) of the
    positions past..past+length-1 of a prompt with these spans: what the Gemma 3
    exports take. [length], or [rows, length] (the row repeated) when ``rows`` is given.

    With a KV cache an image block is bidirectional only within one chunk, so a
    chunk that splits a block would not attend as the whole prompt does: a
    SpanError says so."""
    for i, (start, end) in enumerate(validate_spans(spans).tolist()):
        first, last = start + 1, end - 2  # the block, inclusive
        if first <= last and any(first <= cut - 1 < last for cut in (past, past + length) if 0 < cut):
            raise SpanError(
                f"a chunk of positions {past}..{past + length - 1} splits the image block {first}..{last} of image {i}; "
                "Gemma 3 attends within a whole block at once: start and end chunks outside image blocks")
    types = (block_ids(spans, length, offset=past) >= 0).astype(np.int64)
    return types if rows is None else np.tile(types, (rows, 1))


def chunk_bounds(length: int, chunk_size: int | None, spans=(), image_blocks: bool = False) -> list[tuple[int, int]]:
    """Half-open chunks covering positions 0..length-1 for a prefill through the
    KV cache, each of ``chunk_size`` tokens (None: one chunk). With Gemma 3's
    ``image_blocks`` a boundary never falls inside an image block (a span's tokens
    strictly between its first and last; :func:`token_type_ids`): it moves back to
    the block's start, or past its end when the chunk would be empty."""
    if chunk_size is None or chunk_size >= length:
        return [(0, length)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    blocks = [(a + 1, e - 1) for a, e in validate_spans(spans).tolist() if e - a >= 3] if image_blocks else []
    out, start = [], 0
    while start < length:
        end = min(start + chunk_size, length)
        for lo, hi in blocks:
            if lo < end < hi:
                end = lo if lo > start else hi
        out.append((start, end))
        start = end
    return out


@dataclasses.dataclass(frozen=True)
class Delimiters:
    """Token ids that open and close one image in a model family's prompt."""

    start: int
    end: int


def find_spans(input_ids, delimiters) -> np.ndarray:
    """Spans [start, end) from a 1-D id sequence: each opens at an image-start
    delimiter and closes after the matching image-end delimiter.
    ``delimiters``: a :class:`Delimiters` (by family name: :func:`blindsight.families.find_spans`)."""
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
