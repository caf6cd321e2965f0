"""KV-cache steps whose queries hold image tokens (a chunk of a chunked
prefill): the queries sit at absolute positions Skv-Sq..Skv-1 and the masked-out
work is skipped, as in a one-shot prefill.

Per head group of one category:

- ``dense`` heads: every query row against every key;
- the other categories: text query rows against every key (docs/specification.md §2:
  a text query is dense in every category), image query rows against only the
  keys any of them may see: those the category admits by the key's facts (text,
  sinks) and, for categories that see their own image, every key from the
  start of the chunk's first image on. A key of an earlier image that is not a
  sink is never read for them.

Each pass applies the whole rule (category, causality, window, image blocks,
the model's mask) to the pairs it computes, gathered by absolute position, so
it equals the reference body on them; the rows are put back in order with one
Gather.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from blindsight.attention import category_mask, is_dense, model_mask, sees_own_image
from blindsight.attention.schema import SPANS_INPUT, AttentionConfig
from blindsight.attention.semantics import SAME_IMAGE, clauses
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.function import make_function, rename_output
from blindsight.passes.lowering.masks import keep_mask, position_keep
from blindsight.passes.lowering.reference import to_bnsh


class _Chunk:
    """The values every pass of one body reads: Q/K/V in BNSH, the span facts
    of all key positions and the queries' absolute positions."""

    def __init__(self, b: Builder, cfg: AttentionConfig):
        self.b, self.cfg = b, cfg
        self.q = to_bnsh(b, "query", cfg, cfg.num_heads)
        self.k = to_bnsh(b, "key", cfg, cfg.kv_num_heads)
        self.v = to_bnsh(b, "value", cfg, cfg.kv_num_heads)
        self.sq, self.skv = b.shape_dim(self.q, 2), b.shape_dim(self.k, 2)
        self.past = b.op("Sub", self.skv, self.sq)
        self.facts = SpanFacts(b, SPANS_INPUT, self.skv, cfg.sink_tokens)
        self.rows = b.op("Range", b.scalar(0), self.sq, b.scalar(1))  # the chunk's query rows
        is_image = b.gather(self.facts.is_image, b.op("Add", self.rows, self.past), 0)
        self.text_rows = b.nonzero(b.op("Not", is_image))
        self.image_rows = b.nonzero(is_image)
        if cfg.mask_type != "none":
            m = "attn_mask"  # [Bm, 1, Sq or 1, Skv or 1]: a broadcast axis is read at index 0
            self.mask_last = (b.op("Sub", b.shape_dim(m, 2), b.scalar(1)), b.op("Sub", b.shape_dim(m, 3), b.scalar(1)))

    def own_image_keys(self) -> str:
        """bool [Skv]: every key from the start of the first image the chunk's image rows belong to."""
        b, f = self.b, self.facts
        images = b.gather(f.image, b.op("Add", self.image_rows, self.past), 0)
        starts = b.concat(b.gather(f.starts, images, 0), b.op("Reshape", self.skv, b.i64(1)))  # Skv when no image row
        return b.op("GreaterOrEqual", f.pos, b.op("ReduceMin", starts, keepdims=0))

    def key_set(self, category: str) -> str | None:
        """1-D key positions the image rows of ``category`` may see, or None for all."""
        b, f = self.b, self.facts
        if any(not c.key_only for c in clauses(category) if c is not SAME_IMAGE):
            return None  # a clause that reads the query beyond its image: no cheaper key set
        by_facts = f.visible_keys(category, b)
        own = self.own_image_keys() if sees_own_image(category) else None
        flags = by_facts if own is None else own if by_facts is None else b.op("Or", by_facts, own)
        return None if flags is None else b.nonzero(flags)

    def attend(self, heads: list[int], category: str, rows: str | None, keys: str | None) -> str:
        """[B, len(heads), R, D]: ``heads`` attend from query rows ``rows`` (None: all) to key
        positions ``keys`` (None: all) under the whole rule for ``category``."""
        b, cfg, f = self.b, self.cfg, self.facts
        kv_heads = [cfg.kv_head(h) for h in heads]
        q = self.q if heads == list(range(cfg.num_heads)) else b.gather(self.q, heads, 1)
        k, v = b.gather(self.k, kv_heads, 1), b.gather(self.v, kv_heads, 1)
        if rows is not None:
            q = b.op("Gather", q, rows, axis=2)
        if keys is not None:
            k, v = b.op("Gather", k, keys, axis=2), b.op("Gather", v, keys, axis=2)
        q_pos = b.op("Add", self.rows if rows is None else rows, self.past)
        k_pos = f.pos if keys is None else keys

        keep = None
        if not is_dense(category):
            keep = category_mask(category, f.query_facts(q_pos), f.key_facts(keys), f.ops(b))  # [R, K]
        if model_mask(cfg.is_causal, cfg.local_window_size) is not None:
            blocks = None
            if cfg.image_blocks and cfg.is_causal:
                blocks = (b.unsqueeze(b.gather(f.block, q_pos, 0), 1), b.unsqueeze(b.gather(f.block, k_pos, 0), 0))
            keep = b.all_of(keep, position_keep(b, b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0), causal=bool(cfg.is_causal),
                                                window=cfg.local_window_size, blocks=blocks))
        if keep is not None:
            keep = b.unsqueeze(keep, 0, 1)  # [1, 1, R, K]

        scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.float(cfg.scale))
        if cfg.mask_type != "none":
            m = "attn_mask"
            if rows is not None:
                m = b.op("Gather", m, b.op("Min", rows, self.mask_last[0]), axis=2)
            if keys is not None:
                m = b.op("Gather", m, b.op("Min", keys, self.mask_last[1]), axis=3)
            keep = b.all_of(keep, keep_mask(b, cfg, m))
            if cfg.mask_type == "float":
                scores = b.op("Add", scores, m)
        if keep is None:
            return b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
        # a finite masked score (docs/specification.md §4); a row left with no key outputs zeros
        probs = b.op("Softmax", b.op("Where", keep, scores, b.float(b.finite_min())), axis=-1)
        # keys per row as a MatMul with ones: ONNX Runtime 1.31's reductions return a zero-row input unreduced
        kept = b.cast(keep, b.elem_type)
        ones = b.op("Expand", b.float(1.0), b.concat(b.op("Shape", kept, start=-1), b.i64(1)))  # [K, 1]
        has_key = b.op("Min", b.op("MatMul", kept, ones), b.float(1.0))
        return b.op("Mul", b.op("MatMul", probs, v), has_key)

    def in_row_order(self, text_out: str, image_out: str) -> str:
        """Text and image rows [B, h, R_t | R_i, D] back in the chunk's row order."""
        b = self.b
        order = b.concat(self.text_rows, self.image_rows)
        zeros = b.op("ConstantOfShape", b.op("Shape", order), value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]))
        where = b.op("ScatterElements", zeros, order, self.rows, axis=0)  # where[order[j]] = j
        return b.op("Gather", b.concat(text_out, image_out, axis=2), where, axis=2)


def build_image_cached(cfg: AttentionConfig, opset: int = OPSET):
    b = Builder("img", cfg.elem_type)
    c = _Chunk(b, cfg)
    groups: dict[str, list[int]] = {}
    for h, cat in enumerate(cfg.categories):
        groups.setdefault(cat, []).append(h)
    parts, order = [], []
    for cat, heads in groups.items():
        if is_dense(cat):
            parts.append(c.attend(heads, cat, None, None))
        else:
            text = c.attend(heads, "dense", c.text_rows, None)
            parts.append(c.in_row_order(text, c.attend(heads, cat, c.image_rows, c.key_set(cat))))
        order += heads
    out = parts[0] if len(parts) == 1 else b.concat(*parts, axis=1)
    if order != list(range(cfg.num_heads)):
        out = b.gather(out, list(np.argsort(order)), 1)
    if cfg.qkv_format == "BSD":
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))
    rename_output(b, out)
    return make_function(b, cfg, "image_cached", opset=opset)
