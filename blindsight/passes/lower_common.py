"""Pieces both lowerings share: SPEC §2 token facts computed in-graph from
``image_spans``, the ONNX backend of the semantics' mask functions, and
layout conversions."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from blindsight.passes.builder import OPSET, MS_DOMAIN, Builder
from blindsight.passes.op import DOMAIN, INPUTS, OUTPUTS, AttentionConfig
from blindsight.semantics import TokenFacts


class OnnxOps:
    """ONNX backend for blindsight.semantics mask functions."""

    def __init__(self, b: Builder):
        self.b = b

    def or_(self, x, y):
        return self.b.op("Or", x, y)

    def and_(self, x, y):
        return self.b.op("And", x, y)

    def eq(self, x, y):
        return self.b.op("Equal", x, y)

    def is_text(self, image):
        return self.b.op("Less", image, self.b.scalar(0))

    def true_like(self, q: TokenFacts, k: TokenFacts):
        # x == x is all True; Or broadcasts [Sq, 1] with [1, Skv]
        return self.b.op("Or", self.b.op("Equal", q.image, q.image), self.b.op("Equal", k.image, k.image))


class SpanFacts:
    """In-graph facts about positions 0..length-1 given spans [N, 2].

    ``image`` int64 [P] (-1 for text), ``sink`` bool [P], ``in_span`` bool [P, N].
    The image id is a sum over spans (they never overlap), so N = 0 needs no branch.
    """

    def __init__(self, b: Builder, spans: str, length: str, sink_tokens: int):
        self.b = b
        self.pos = b.op("Range", b.scalar(0), length, b.scalar(1))
        self.starts = b.op("Squeeze", b.gather(spans, [0], axis=1), b.i64(1))  # [N]
        self.ends = b.op("Squeeze", b.gather(spans, [1], axis=1), b.i64(1))
        p = b.unsqueeze(self.pos, 1)  # [P, 1]
        self.in_span = b.op("And", b.op("GreaterOrEqual", p, b.unsqueeze(self.starts, 0)), b.op("Less", p, b.unsqueeze(self.ends, 0)))
        in_span_i = b.cast(self.in_span, TensorProto.INT64)
        n = b.shape_dim(spans, 0)
        ids1 = b.op("Range", b.scalar(1), b.op("Add", n, b.scalar(1)), b.scalar(1))  # 1..N
        self.image = b.op("Sub", b.op("ReduceSum", b.op("Mul", in_span_i, b.unsqueeze(ids1, 0)), b.i64(1), keepdims=0), b.scalar(1))
        start_of = b.op("ReduceSum", b.op("Mul", in_span_i, b.unsqueeze(self.starts, 0)), b.i64(1), keepdims=0)
        self.is_image = b.op("GreaterOrEqual", self.image, b.scalar(0))
        self.is_text = b.op("Not", self.is_image)
        self.sink = b.op("And", self.is_image, b.op("Less", b.op("Sub", self.pos, start_of), b.scalar(sink_tokens)))

    def rows(self, x: str) -> str:
        return self.b.unsqueeze(x, 1)

    def cols(self, x: str) -> str:
        return self.b.unsqueeze(x, 0)

    def query_facts(self, idx: str | None = None) -> TokenFacts:
        image, sink = self.image, self.sink
        if idx is not None:
            image, sink = self.b.gather(image, idx, 0), self.b.gather(sink, idx, 0)
        return TokenFacts(self.rows(image), self.rows(sink))

    def key_facts(self, idx: str | None = None) -> TokenFacts:
        image, sink = self.image, self.sink
        if idx is not None:
            image, sink = self.b.gather(image, idx, 0), self.b.gather(sink, idx, 0)
        return TokenFacts(self.cols(image), self.cols(sink))


def to_bnsh(b: Builder, x: str, cfg: AttentionConfig, heads: int) -> str:
    if cfg.qkv_format == "BNSH":
        return x
    return b.op("Transpose", b.op("Reshape", x, b.i64(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def keep_mask(b: Builder, cfg: AttentionConfig, mask: str) -> str:
    """The model's mask as bool (True keeps); float masks keep entries > -inf/2."""
    if cfg.mask_type == "bool":
        return mask
    return b.op("Greater", mask, b.scalar(np.finfo(np.float32).min / 2, np.float32))


def additive_bias(b: Builder, cfg: AttentionConfig, mask: str) -> str:
    if cfg.mask_type == "float":
        return mask
    return b.op("Where", mask, b.scalar(0.0, np.float32), b.scalar(-np.inf, np.float32))


def structural_keep(b: Builder, cfg: AttentionConfig, q_pos: str, k_pos: str) -> str | None:
    """Causality and sliding window from attributes (bool [Sq, Skv]) or None."""
    q = b.unsqueeze(q_pos, 1)
    k = b.unsqueeze(k_pos, 0)
    terms = []
    if cfg.is_causal:
        terms.append(b.op("LessOrEqual", k, q))
    if cfg.local_window_size > 0:
        terms.append(b.op("Greater", k, b.op("Sub", q, b.scalar(cfg.local_window_size))))
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = b.op("And", out, t)
    return out


def make_function(b: Builder, cfg: AttentionConfig, lowering: str, output: str, opset: int = OPSET):
    return helper.make_function(
        DOMAIN,
        "BlindSightAttention",
        list(INPUTS),
        [output],
        b.nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        overload=cfg.overload(lowering),
        doc_string=f"BlindSightAttention, {lowering} lowering, categories={','.join(cfg.categories)}",
    )


def rename_output(b: Builder, value: str, name: str) -> str:
    b.nodes.append(helper.make_node("Identity", [value], [name]))
    return name


OUTPUT_NAME = OUTPUTS[0]
