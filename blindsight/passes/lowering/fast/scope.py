"""One builder of the fast lowering (the function body, an If branch or a
Loop body) with the layer's configuration and the values made in it.

Values are cached per scope: a branch must not read a value its sibling
made, so a :meth:`Scope.child` starts with an empty cache and its own builder;
it may read everything its enclosing scopes made (ONNX outer-scope names).
"""

from __future__ import annotations

from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.builder import Builder
from blindsight.passes.lowering.masks import keep_mask, position_keep


class Scope:
    def __init__(self, cfg: AttentionConfig, b: Builder, blocks: str | None = None):
        self.cfg, self.b = cfg, b
        # int64 [S] image-block id of every position (SpanFacts.block), needed by
        # keep() when the layer has Gemma 3's image blocks; made in an enclosing scope
        self.blocks = blocks
        self._cache: dict = {}

    def child(self, name: str) -> "Scope":
        return Scope(self.cfg, self.b.child(name), self.blocks)

    def once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ----------------------------------------------------------- layouts
    @property
    def seq_axis(self) -> int:
        return 2 if self.cfg.qkv_format == "BNSH" else 1

    def heads_of(self, name: str) -> int:
        return self.cfg.num_heads if name == "query" else self.cfg.kv_num_heads

    def bsd(self, name: str) -> str:
        """[B, S, heads*D], the layout GroupQueryAttention reads."""
        if self.cfg.qkv_format == "BSD":
            return name
        b = self.b
        return self.once(("bsd", name), lambda: b.op("Reshape", b.op("Transpose", name, perm=[0, 2, 1, 3]), b.i64(0, 0, -1)))

    def at_positions(self, name: str, heads: list[int] | None, pos: str) -> str:
        """[B, len(heads), P, D] of positions ``pos`` (1-D), gathered in the input's layout."""
        b, total = self.b, self.heads_of(name)
        sub = heads is not None and heads != list(range(total))
        if self.cfg.qkv_format == "BNSH":
            x = b.gather(name, heads, 1) if sub else name
            return b.op("Gather", x, pos, axis=2)
        rows = b.op("Gather", name, pos, axis=1)  # [B, P, total*D]; P may be 0, so no -1 in the shape
        d = b.op("Div", b.op("Shape", rows, start=2), b.i64(total))
        x = b.op("Reshape", rows, b.concat(b.op("Shape", rows, start=0, end=2), b.i64(total), d))  # [B, P, total, D]
        if sub:
            x = b.gather(x, heads, 2)
        return b.op("Transpose", x, perm=[0, 2, 1, 3])

    def seq(self) -> str:
        """Scalar int64 prompt length."""
        return self.once("seq", lambda: self.b.shape_dim("query", self.seq_axis))

    def batch(self) -> str:
        """[1] int64 batch size."""
        return self.once("batch", lambda: self.b.op("Shape", "query", start=0, end=1))

    def single_prompt(self) -> str:
        """Scalar bool: batch == 1."""
        b = self.b
        return b.op("Equal", b.op("Squeeze", self.batch(), b.i64(0)), b.scalar(1))

    # ----------------------------------------------------------- the model's mask
    def mask3(self) -> str | None:
        """The model's keep mask as [Bm, S, S] bool (key-padding masks broadcast)."""
        if self.cfg.mask_type == "none":
            return None

        def make():
            b = self.b
            keep = keep_mask(b, self.cfg, "attn_mask")
            # only [B, 1, 1, S] key padding needs the Expand; a full mask passes through unchanged in shape
            s = b.op("Shape", "query", start=self.seq_axis, end=self.seq_axis + 1)
            full = b.op("Expand", keep, b.concat(b.i64(1, 1), s, s))
            return b.op("Squeeze", full, b.i64(1))

        return self.once("mask3", make)

    def gathered_mask(self, mask3: str | None, q_idx: str, k_idx: str) -> str | None:
        """The model mask at (q_idx[i], k_idx[j]) for 1-D index vectors: [Bm, Q, K]."""
        if mask3 is None:
            return None
        return self.b.op("Gather", self.b.op("Gather", mask3, q_idx, axis=1), k_idx, axis=2)

    def keep(self, q_pos: str, k_pos: str, *, causal: bool) -> str | None:
        """Causality (when asked; with image blocks, causality or the same block)
        and the attributes' window by absolute position."""
        blocks = None
        if causal and self.cfg.image_blocks:
            if self.blocks is None:
                raise ValueError("a layer with image blocks needs the scope's block ids")
            blocks = (self.b.op("Gather", self.blocks, q_pos, axis=0), self.b.op("Gather", self.blocks, k_pos, axis=0))
        return position_keep(self.b, q_pos, k_pos, causal=causal, window=self.cfg.local_window_size, blocks=blocks)

    def to_bias(self, keep: str) -> str:
        """Additive bias in the attention's dtype: 0 where ``keep``, else a finite
        masked score (docs/specification.md §4), so a row with no key gives a uniform softmax
        (zeroed where that can happen), never NaN."""
        b = self.b
        return b.op("Where", keep, b.float(0.0), b.float(b.finite_min()))
