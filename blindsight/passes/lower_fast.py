"""Fast lowering: the masked-out work is skipped, on ONNX Runtime's fastest
kernels (SPEC §5).

Per layer, query heads are grouped by category and each group takes the
cheapest exact route for its image-token queries:

- ``dense``: one causal ``GroupQueryAttention`` over the whole prompt.
- ``intra`` / ``intra_sink``: one batched ``GroupQueryAttention`` with a row
  per image: the keys that image may see before it (text, plus earlier sinks
  for ``intra_sink``) followed by the image's own tokens, right-padded to the
  longest row (per-row ``seqlens_k``). Causality inside a row is causality by
  position because rows keep position order.
- ``sink``: image queries see only text and sink tokens, a short key set, so
  a MatMul/Softmax over [image tokens x (text + sinks)] is cheap.

Text queries of every non-dense head are dense by SPEC §2; there are few of
them, so they take one MatMul/Softmax over all keys. Everything that depends
on the spans (row indices, lengths, scatter maps) is computed in-graph from
``image_spans``; a prompt with no image takes the dense route through an If.

Assumes a causal model (the model mask never allows k > q) and a prefill
(query and key lengths equal); the reference lowering has neither limit.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from blindsight.passes.builder import OPSET, MS_DOMAIN, Builder
from blindsight.passes.lower_common import (
    OUTPUT_NAME,
    SpanFacts,
    keep_mask,
    make_function,
    rename_output,
    to_bnsh,
    to_bsd,
)
from blindsight.passes.op import AttentionConfig
from blindsight.semantics import KEY_ANY, KEY_SAME_IMAGE, KEY_SINK, uses

NEG_INF = -np.inf


class _Layer:
    """Shared values of one lowering; ``b`` is swapped for If branches."""

    def __init__(self, cfg: AttentionConfig, b: Builder):
        self.cfg, self.b = cfg, b
        H, Hkv = cfg.num_heads, cfg.kv_num_heads
        self.q3, self.k3, self.v3 = (to_bsd(b, n, cfg, h) for n, h in (("query", H), ("key", Hkv), ("value", Hkv)))
        self.q4, self.k4, self.v4 = (to_bnsh(b, n, cfg, h) for n, h in (("query", H), ("key", Hkv), ("value", Hkv)))
        self.batch = b.op("Shape", self.q3, start=0, end=1)  # [1]
        self.seq = b.shape_dim(self.q3, 1)
        self.mask3 = None
        if cfg.mask_type != "none":
            keep = keep_mask(b, cfg, "attn_mask")
            # broadcast masks ([B, 1, 1, S] key padding) to [Bm, 1, S, S], then drop the head axis
            full = b.op("Expand", keep, b.concat(b.i64(1, 1), b.op("Shape", self.q3, start=1, end=2), b.op("Shape", self.k3, start=1, end=2)))
            self.mask3 = b.op("Squeeze", full, b.i64(1))

    # ----------------------------------------------------------- helpers
    def heads_of(self, x3: str, total: int, heads: list[int]) -> str:
        if heads == list(range(total)):
            return x3
        b = self.b
        return b.op("Reshape", b.gather(b.op("Reshape", x3, b.i64(0, 0, total, -1)), heads, 2), b.i64(0, 0, -1))

    def gqa_operands(self, heads: list[int]):
        cfg = self.cfg
        kvs = sorted({cfg.kv_head(h) for h in heads})
        whole_groups = all(all(g * cfg.group + j in heads for j in range(cfg.group)) for g in kvs)
        kv_list = kvs if whole_groups else [cfg.kv_head(h) for h in heads]
        q = self.heads_of(self.q3, cfg.num_heads, heads)
        k = self.heads_of(self.k3, cfg.kv_num_heads, kv_list)
        v = self.heads_of(self.v3, cfg.kv_num_heads, kv_list)
        return q, k, v, len(heads), len(kv_list)

    def gqa(self, q, k, v, nh, nkv, seqlens, total, bias):
        inputs = [q, k, v, "", "", seqlens, total]
        if bias is not None:
            inputs += ["", "", "", bias]
        return self.b.op("GroupQueryAttention", *inputs, domain=MS_DOMAIN, num_heads=nh, kv_num_heads=nkv, scale=float(self.cfg.scale))

    def window_keep(self, q_pos: str, k_pos: str) -> str | None:
        """Sliding window of the attributes, by absolute position (broadcasting)."""
        w = self.cfg.local_window_size
        if w <= 0:
            return None
        return self.b.op("Greater", k_pos, self.b.op("Sub", q_pos, self.b.scalar(w)))

    def gathered_mask(self, q_idx: str, k_idx: str) -> str | None:
        """Model mask at (q_idx[i], k_idx[j]) for 1-D index vectors: [Bm, 1, Q, K]."""
        if self.mask3 is None:
            return None
        b = self.b
        return b.unsqueeze(b.op("Gather", b.op("Gather", self.mask3, q_idx, axis=1), k_idx, axis=2), 1)

    def combine(self, *keeps):
        keeps = [k for k in keeps if k is not None]
        if not keeps:
            return None
        out = keeps[0]
        for k in keeps[1:]:
            out = self.b.op("And", out, k)
        return out

    def to_bias(self, keep: str) -> str:
        return self.b.op("Where", keep, self.b.scalar(0.0, np.float32), self.b.scalar(NEG_INF, np.float32))

    def matmul_attention(self, heads: list[int], q_idx: str, k_idx: str) -> str:
        """Queries at positions q_idx attend keys at k_idx (both 1-D, sorted) with
        causality by position: [B, len(heads), Q, D]."""
        b, cfg = self.b, self.cfg
        q = b.gather(b.gather(self.q4, heads, 1) if heads != list(range(cfg.num_heads)) else self.q4, q_idx, 2)
        kv_list = [cfg.kv_head(h) for h in heads]
        k = b.gather(b.gather(self.k4, kv_list, 1), k_idx, 2)
        v = b.gather(b.gather(self.v4, kv_list, 1), k_idx, 2)
        qp, kp = b.unsqueeze(q_idx, 1), b.unsqueeze(k_idx, 0)
        keep = self.combine(b.op("LessOrEqual", kp, qp), self.window_keep(qp, kp), self.gathered_mask(q_idx, k_idx))
        scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.scalar(cfg.scale, np.float32))
        probs = b.op("Softmax", b.op("Where", keep, scores, b.scalar(NEG_INF, np.float32)), axis=-1)
        # a sliding window can leave a sink-head row with no key: it outputs zeros, as in the reference
        probs = b.op("Where", b.op("IsNaN", probs), b.scalar(0.0, np.float32), probs)
        return b.op("MatMul", probs, v)

    # ----------------------------------------------------------- routes
    def dense(self, heads: list[int]) -> str:
        """Causal GQA over the whole prompt: [B, S, len(heads), D]."""
        b = self.b
        q, k, v, nh, nkv = self.gqa_operands(heads)
        seqlens = b.op("Expand", b.cast(b.op("Sub", self.seq, b.scalar(1)), TensorProto.INT32), self.batch)
        total = b.cast(self.seq, TensorProto.INT32)
        pos = b.op("Range", b.scalar(0), self.seq, b.scalar(1))
        window = self.window_keep(b.unsqueeze(pos, 1), b.unsqueeze(pos, 0))
        keep = self.combine(b.unsqueeze(self.mask3, 1) if self.mask3 is not None else None, window)
        out = self.gqa(q, k, v, nh, nkv, seqlens, total, None if keep is None else self.to_bias(keep))
        return b.op("Reshape", out, b.i64(0, 0, nh, -1))

    def rows(self, heads: list[int], f: SpanFacts, with_sinks: bool) -> str:
        """One GQA row per image; returns image-query outputs at every position [B, S, h, D]."""
        b = self.b
        before = b.op("Less", f.cols(f.pos), f.rows(f.starts))  # [N, S]
        visible = b.op("Or", f.is_text, f.sink) if with_sinks else f.is_text
        member = b.op("Or", b.op("And", before, f.cols(visible)), b.op("Transpose", f.in_span, perm=[1, 0]))
        lengths = b.op("ReduceSum", b.cast(member, TensorProto.INT64), b.i64(1), keepdims=0)  # [N]
        width = b.op("ReduceMax", lengths, keepdims=1)  # [1]
        order_key = b.op("Where", member, f.cols(f.pos), b.op("Add", f.cols(f.pos), self.seq))
        _, idx = b.op("TopK", order_key, width, axis=1, largest=0, sorted=1, outputs=2)  # [N, R] positions

        q, k, v, nh, nkv = self.gqa_operands(heads)
        def flat(x):  # [B, S, X] -> rows [B*N, R, X]
            rows_x = b.gather(x, idx, 1)
            return b.op("Reshape", rows_x, b.concat(b.i64(-1), b.op("Shape", rows_x, start=2)))

        seqlens = b.cast(b.op("Tile", b.op("Sub", lengths, b.scalar(1)), self.batch), TensorProto.INT32)
        total = b.cast(b.op("Squeeze", width, b.i64(0)), TensorProto.INT32)

        qk = b.unsqueeze(idx, 2), b.unsqueeze(idx, 1)  # [N, R, 1], [N, 1, R]
        keep = self.window_keep(*qk)
        if self.mask3 is not None:
            rows = b.op("Gather", self.mask3, idx, axis=1)  # [Bm, N, R, S]
            n_r_r = b.op("Shape", keep if keep is not None else b.op("Add", *qk))
            cols = b.op("Expand", b.unsqueeze(b.unsqueeze(idx, 1), 0), b.concat(b.op("Shape", self.mask3, start=0, end=1), n_r_r))
            keep = self.combine(keep, b.op("GatherElements", rows, cols, axis=3))  # [Bm, N, R, R]
        bias = None
        if keep is not None:
            shape4 = b.concat(self.batch, b.op("Shape", idx), b.op("Shape", idx, start=1))  # [B, N, R, R]
            bias = b.op("Reshape", b.op("Expand", self.to_bias(keep), shape4), b.i64(-1, 1, 0, 0))
        out = self.gqa(flat(q), flat(k), flat(v), nh, nkv, seqlens, total, bias)  # [B*N, R, h*D]
        out = b.op("Reshape", b.op("Reshape", out, b.concat(self.batch, b.i64(-1, 0))), b.i64(0, 0, nh, -1))

        # position p of image i sits at row i, column len_i - (end_i - p)
        img = b.op("Max", f.image, b.scalar(0))
        col = b.op("Sub", b.gather(lengths, img, 0), b.op("Sub", b.gather(f.ends, img, 0), f.pos))
        src = b.op("Add", b.op("Mul", img, b.op("Squeeze", width, b.i64(0))), col)
        src = b.op("Where", f.is_image, src, b.scalar(0))
        return b.gather(out, src, 1)

    def sinks_only(self, heads: list[int], f: SpanFacts) -> str:
        b = self.b
        img_pos = b.op("Squeeze", b.op("NonZero", f.is_image), b.i64(0))
        key_pos = b.op("Squeeze", b.op("NonZero", b.op("Or", f.is_text, f.sink)), b.i64(0))
        out = b.op("Transpose", self.matmul_attention(heads, img_pos, key_pos), perm=[0, 2, 1, 3])  # [B, M, h, D]
        return b.gather(out, self._rank(f.is_image), 1)

    def text_queries(self, heads: list[int], f: SpanFacts) -> str:
        b = self.b
        text_pos = b.op("Squeeze", b.op("NonZero", f.is_text), b.i64(0))
        out = b.op("Transpose", self.matmul_attention(heads, text_pos, f.pos), perm=[0, 2, 1, 3])  # [B, T, h, D]
        out = b.op("Pad", out, b.i64(0, 0, 0, 0, 0, 1, 0, 0))  # a zero row so T = 0 still gathers
        return b.gather(out, self._rank(f.is_text), 1)

    def _rank(self, flags: str) -> str:
        b = self.b
        rank = b.op("Sub", b.op("CumSum", b.cast(flags, TensorProto.INT64), b.scalar(0)), b.scalar(1))
        return b.op("Max", rank, b.scalar(0))

    def sparse(self) -> str:
        """All routes, assembled to [B, S, H, D] in head order."""
        b, cfg = self.b, self.cfg
        f = SpanFacts(b, "image_spans", self.seq, cfg.sink_tokens)
        groups: dict[str, list[int]] = {}
        for h, c in enumerate(cfg.categories):
            groups.setdefault(c, []).append(h)
        sparse_heads = [h for h, c in enumerate(cfg.categories) if not uses(c, KEY_ANY)]
        text = self.text_queries(sparse_heads, f)
        text_rows = b.unsqueeze(f.is_text, 0, 2, 3)
        parts, order = [], []
        for c, heads in groups.items():
            if uses(c, KEY_ANY):
                parts.append(self.dense(heads))
            else:
                if uses(c, KEY_SAME_IMAGE):
                    image_out = self.rows(heads, f, with_sinks=uses(c, KEY_SINK))
                else:
                    image_out = self.sinks_only(heads, f)
                text_out = b.gather(text, [sparse_heads.index(h) for h in heads], 2)
                parts.append(b.op("Where", text_rows, text_out, image_out))
            order += heads
        out = parts[0] if len(parts) == 1 else b.concat(*parts, axis=2)
        if order != list(range(cfg.num_heads)):
            out = b.gather(out, list(np.argsort(order)), 2)
        return out


def build_fast(cfg: AttentionConfig, opset: int = OPSET):
    b = Builder("fast")
    layer = _Layer(cfg, b)
    all_heads = list(range(cfg.num_heads))
    if all(uses(c, KEY_ANY) for c in cfg.categories):
        out = layer.dense(all_heads)
    else:
        no_image = b.op("Equal", b.shape_dim("image_spans", 0), b.scalar(0))
        branches = {}
        for name, route in (("dense", lambda: layer.dense(all_heads)), ("sparse", layer.sparse)):
            layer.b = Builder(f"fast_{name}")
            value = route()
            branches[name] = layer.b.subgraph(f"{name}_branch", [value])
        layer.b = b
        out = b.op("If", no_image, then_branch=branches["dense"], else_branch=branches["sparse"])
    if cfg.qkv_format == "BNSH":
        out = b.op("Transpose", out, perm=[0, 2, 1, 3])
    else:
        out = b.op("Reshape", out, b.i64(0, 0, -1))
    rename_output(b, out, OUTPUT_NAME)
    return make_function(b, cfg, "fast", OUTPUT_NAME, opset)
