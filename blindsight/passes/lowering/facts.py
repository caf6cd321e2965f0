"""docs/specification.md §2 in the graph: the ONNX backend of the mask functions and the token
facts of :func:`blindsight.attention.token_facts` computed from ``image_spans``."""

from __future__ import annotations

from onnx import TensorProto

from blindsight.attention import TokenFacts
from blindsight.attention.semantics import key_only_mask
from blindsight.passes.lowering.builder import Builder


class OnnxOps:
    """ONNX backend for :mod:`blindsight.attention.semantics` mask functions.
    ``known`` maps values to facts already in the graph (a text flag), so a
    mask function reuses them instead of emitting them again."""

    def __init__(self, b: Builder, known: dict | None = None):
        self.b = b
        self.known = known or {}

    def or_(self, x, y):
        return self.b.op("Or", x, y)

    def and_(self, x, y):
        return self.b.op("And", x, y)

    def eq(self, x, y):
        return self.b.op("Equal", x, y)

    def le(self, x, y):
        return self.b.op("LessOrEqual", x, y)

    def within(self, k_pos, q_pos, window: int):
        return self.b.op("Greater", k_pos, self.b.op("Sub", q_pos, self.b.scalar(window)))

    def is_member(self, ids):
        return self.b.op("GreaterOrEqual", ids, self.b.scalar(0))

    def is_text(self, image):
        if ("is_text", image) in self.known:
            return self.known["is_text", image]
        return self.b.op("Less", image, self.b.scalar(0))

    def true_like(self, q: TokenFacts, k: TokenFacts):
        # x == x is all True; Or broadcasts [Sq, 1] with [1, Skv]
        return self.b.op("Or", self.b.op("Equal", q.image, q.image), self.b.op("Equal", k.image, k.image))


class SpanFacts:
    """In-graph token facts of positions 0..length-1 given spans [N, 2].

    ``image`` int64 [P] (-1 for text), ``sink`` bool [P], ``in_span`` bool [P, N],
    ``is_text`` / ``is_image`` bool [P], ``starts`` / ``ends`` int64 [N], and
    (made on first use) ``block`` int64 [P], the image block of each position.
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
        self._in_span_i, self._start_of = in_span_i, start_of
        self._block = None
        self.is_image = b.op("GreaterOrEqual", self.image, b.scalar(0))
        self.is_text = b.op("Not", self.is_image)
        self.sink = b.op("And", self.is_image, b.op("Less", b.op("Sub", self.pos, start_of), b.scalar(sink_tokens)))

    @property
    def block(self) -> str:
        """int64 [P]: span i for its tokens strictly between the first and the last, else -1."""
        if self._block is None:
            b = self.b
            end_of = b.op("ReduceSum", b.op("Mul", self._in_span_i, b.unsqueeze(self.ends, 0)), b.i64(1), keepdims=0)
            inner = b.op("And", b.op("Greater", self.pos, self._start_of), b.op("Less", self.pos, b.op("Sub", end_of, b.scalar(1))))
            self._block = b.op("Where", b.op("And", self.is_image, inner), self.image, b.scalar(-1))
        return self._block

    def ops(self, b: Builder) -> OnnxOps:
        """Mask-function backend emitting into ``b`` (this builder or a child) that knows these facts."""
        return OnnxOps(b, {("is_text", self.image): self.is_text})

    def query_facts(self, idx: str | None = None) -> TokenFacts:
        image, sink = self.image, self.sink
        if idx is not None:
            image, sink = self.b.gather(image, idx, 0), self.b.gather(sink, idx, 0)
        return TokenFacts(self.b.unsqueeze(image, 1), self.b.unsqueeze(sink, 1))

    def key_facts(self, idx: str | None = None) -> TokenFacts:
        image, sink = self.image, self.sink
        if idx is not None:
            image, sink = self.b.gather(image, idx, 0), self.b.gather(sink, idx, 0)
        return TokenFacts(self.b.unsqueeze(image, 0), self.b.unsqueeze(sink, 0))

    def visible_keys(self, category: str, b: Builder) -> str | None:
        """bool [P]: keys an image query of ``category`` sees by the key's facts
        alone (text, sinks; its own image aside), or None for no such key."""
        fn = key_only_mask(category)
        if fn is None:
            return None
        k = TokenFacts(self.image, self.sink)
        return fn(k, k, self.ops(b))  # key-only clauses never read the query
