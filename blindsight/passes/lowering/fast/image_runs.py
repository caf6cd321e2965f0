"""Own-image route, batch 1: one ``GroupQueryAttention`` per image, the keys
the category lets it see before the image as past context and the image's
own tokens as the new ones (no padding, no text query rows)."""

from __future__ import annotations

from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.runs import gqa_runs
from blindsight.passes.lowering.fast.scope import Scope


def image_runs(s: Scope, heads: list[int], f: SpanFacts, category: str):
    """Returns (pool [1, N*Lmax, h, D], index [S] of each image position in the pool)."""
    b = s.b
    visible = f.visible_keys(category, b)

    def past(body, start):  # visible positions before the image
        if visible is None:
            return body.op("Range", body.scalar(0), body.scalar(0), body.scalar(1))
        return body.nonzero(body.op("And", visible, body.op("Less", f.pos, start)))

    pool, width = gqa_runs(s, heads, f.starts, f.ends, past)
    return pool, image_pool_index(b, f, width)


def image_pool_index(b, f: SpanFacts, width: str) -> str:
    """[S]: where image position p sits in a pool of one row of ``width`` ([1]) per image."""
    img = b.op("Max", f.image, b.scalar(0))
    col = b.op("Sub", f.pos, b.gather(f.starts, img, 0))
    return b.op("Add", b.op("Mul", img, b.op("Squeeze", width, b.i64(0))), col)
