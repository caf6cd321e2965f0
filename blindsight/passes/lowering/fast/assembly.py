"""Putting a head group's rows back in prompt order, and the node's output layout."""

from __future__ import annotations

from onnx import TensorProto

from blindsight.passes.lowering.builder import Builder
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.scope import Scope


def rank(b: Builder, flags: str) -> str:
    """Index of each flagged position among the flagged ones (0 elsewhere)."""
    r = b.op("Sub", b.op("CumSum", b.cast(flags, TensorProto.INT64), b.scalar(0)), b.scalar(1))
    return b.op("Max", r, b.scalar(0))


def assemble(b: Builder, pool, index, text_out, text_rank, f: SpanFacts, flat: bool) -> str:
    """One Gather assembles a group: image rows from its pool, text rows after them.
    [B, S, h, D], or [B, S, h*D] with ``flat``."""
    image_rows = b.op("Shape", pool, start=1, end=2)
    index = b.op("Where", f.is_text, b.op("Add", text_rank, b.op("Squeeze", image_rows, b.i64(0))), index)
    pooled = b.concat(pool, text_out, axis=1)
    if flat:
        return b.op("Gather", b.op("Reshape", pooled, b.i64(0, 0, -1)), index, axis=1)
    return b.op("Gather", pooled, index, axis=1)


def final_layout(s: Scope, value: str) -> str:
    """[B, S, H, D] -> the node's output layout, by a real op where possible: a
    branch output made by a view (Reshape) costs ONNX Runtime a copy."""
    b = s.b
    if s.cfg.qkv_format == "BNSH":
        return b.op("Transpose", value, perm=[0, 2, 1, 3])
    return b.op("Reshape", value, b.i64(0, 0, -1))
