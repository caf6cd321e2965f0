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
  a grouped MatMul/Softmax over [image tokens x (text + sinks)] is cheap.

Text queries of every non-dense head are dense by SPEC §2; there are few of
them, so they take one grouped MatMul/Softmax over all keys. Each group's
output is assembled with one Gather from a pool of its image rows and the
text rows. Everything that depends on the spans (row indices, lengths, maps)
is computed in-graph from ``image_spans``; a prompt with no image takes the
dense route through an If.

Copies are what this lowering pays beyond the FLOPs it keeps, so: K/V are
never repeated per query head (MatMuls run per KV group), rows are gathered
from the input's own layout, and masked scores get a finite bias with empty
rows zeroed on the small output instead of a NaN guard over the scores.

Assumes a causal model (the model mask never allows k > q) and a prefill
(query and key lengths equal); ``lower.py`` routes KV-cache steps elsewhere.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from blindsight.passes.builder import OPSET, MS_DOMAIN, Builder
from blindsight.passes.lower_common import OUTPUT_NAME, SpanFacts, keep_mask, make_function
from blindsight.passes.op import AttentionConfig
from blindsight.semantics import KEY_ANY, KEY_SAME_IMAGE, KEY_SINK, uses

NEG_INF = -np.inf
# finite, so a row with no key gives a uniform softmax (zeroed afterwards), never NaN
MASKED = np.float32(np.finfo(np.float32).min / 2)


class _Layer:
    """Shared values of one lowering; ``b`` is swapped for If branches, and
    values are cached per builder (a branch must not read its sibling's)."""

    def __init__(self, cfg: AttentionConfig, b: Builder):
        self.cfg, self.b = cfg, b
        self._cache: dict = {}

    def _once(self, key, make):
        key = (self.b, key)  # the builder itself: an id() of a freed branch builder can come back
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # ----------------------------------------------------------- layouts
    def _heads(self, name: str) -> int:
        return self.cfg.num_heads if name == "query" else self.cfg.kv_num_heads

    def bsd(self, name: str) -> str:
        """[B, S, heads*D], the layout GroupQueryAttention reads."""
        if self.cfg.qkv_format == "BSD":
            return name
        b = self.b
        return self._once(("bsd", name), lambda: b.op("Reshape", b.op("Transpose", name, perm=[0, 2, 1, 3]), b.i64(0, 0, -1)))

    def at_positions(self, name: str, heads: list[int] | None, pos: str) -> str:
        """[B, len(heads), P, D] of positions ``pos`` (1-D), gathered in the input's layout."""
        b, total = self.b, self._heads(name)
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
        return self._once("seq", lambda: self.b.op("Squeeze", self.b.op("Shape", "query", start=self._seq_axis(), end=self._seq_axis() + 1), self.b.i64(0)))

    def batch(self) -> str:
        return self._once("batch", lambda: self.b.op("Shape", "query", start=0, end=1))

    def _seq_axis(self) -> int:
        return 2 if self.cfg.qkv_format == "BNSH" else 1

    # ----------------------------------------------------------- masks
    def mask3(self) -> str | None:
        """The model's keep mask as [Bm, S, S] bool (key-padding masks broadcast)."""
        if self.cfg.mask_type == "none":
            return None

        def make():
            b = self.b
            keep = keep_mask(b, self.cfg, "attn_mask")
            # only [B, 1, 1, S] key padding needs the Expand; a full mask passes through unchanged in shape
            s = b.op("Shape", "query", start=self._seq_axis(), end=self._seq_axis() + 1)
            full = b.op("Expand", keep, b.concat(b.i64(1, 1), s, s))
            return b.op("Squeeze", full, b.i64(1))

        return self._once("mask3", make)

    def window_keep(self, q_pos: str, k_pos: str) -> str | None:
        """Sliding window of the attributes, by absolute position (broadcasting)."""
        w = self.cfg.local_window_size
        if w <= 0:
            return None
        return self.b.op("Greater", k_pos, self.b.op("Sub", q_pos, self.b.scalar(w)))

    def gathered_mask(self, q_idx: str, k_idx: str) -> str | None:
        """Model mask at (q_idx[i], k_idx[j]) for 1-D index vectors: [Bm, Q, K]."""
        m = self.mask3()
        if m is None:
            return None
        return self.b.op("Gather", self.b.op("Gather", m, q_idx, axis=1), k_idx, axis=2)

    def combine(self, *keeps):
        keeps = [k for k in keeps if k is not None]
        if not keeps:
            return None
        out = keeps[0]
        for k in keeps[1:]:
            out = self.b.op("And", out, k)
        return out

    def to_bias(self, keep: str, masked=NEG_INF) -> str:
        return self.b.op("Where", keep, self.b.scalar(0.0, np.float32), self.b.scalar(masked, np.float32))

    # ----------------------------------------------------------- kernels
    def gqa(self, q, k, v, nh, nkv, seqlens, total, bias, window: int = -1):
        inputs = [q, k, v, "", "", seqlens, total]
        if bias is not None:
            inputs += ["", "", "", bias]
        # ORT 1.31 CPU: local_window_size w keeps keys q-w+1..q, the op's own window (measured, tested)
        return self.b.op("GroupQueryAttention", *inputs, domain=MS_DOMAIN, num_heads=nh, kv_num_heads=nkv,
                         scale=float(self.cfg.scale), local_window_size=window if window > 0 else None)

    def gqa_operands(self, heads: list[int]):
        """BSD Q/K/V for a head subset: whole KV groups keep GQA sharing, else K/V per head."""
        cfg, b = self.cfg, self.b
        kvs = sorted({cfg.kv_head(h) for h in heads})
        whole_groups = all(all(g * cfg.group + j in heads for j in range(cfg.group)) for g in kvs)
        kv_list = kvs if whole_groups else [cfg.kv_head(h) for h in heads]

        def sub(name, total, idx):
            x = self.bsd(name)
            if idx == list(range(total)):
                return x
            return b.op("Reshape", b.gather(b.op("Reshape", x, b.i64(0, 0, total, -1)), idx, 2), b.i64(0, 0, -1))

        q = sub("query", cfg.num_heads, heads)
        k = sub("key", cfg.kv_num_heads, kv_list)
        v = sub("value", cfg.kv_num_heads, kv_list)
        return q, k, v, len(heads), len(kv_list)

    def grouped_attention(self, heads: list[int], q_pos: str, k_pos: str) -> str:
        """Queries at q_pos attend keys at k_pos (1-D, sorted), causal by position,
        through the layer's model mask and window: [B, len(heads), Q, D].

        Heads run per KV group (Q reshaped to [B, kv, g*Q, D]) so K/V are read,
        never copied per query head; a head subset that splits a group falls
        back to one group per head."""
        b, cfg = self.b, self.cfg
        kvs = [cfg.kv_head(h) for h in heads]
        uniq = sorted(set(kvs))
        whole = heads == [g * cfg.group + j for g in uniq for j in range(cfg.group)]
        kv_list, g = (uniq, cfg.group) if whole else (kvs, 1)
        q = self.at_positions("query", heads, q_pos)  # [B, h, Q, D]
        k = self.at_positions("key", kv_list, k_pos)  # [B, kv, K, D]
        v = self.at_positions("value", kv_list, k_pos)
        qg = b.op("Reshape", q, b.concat(b.i64(0, len(kv_list), -1), b.op("Shape", q, start=3))) if g > 1 else q
        # scale right on the MatMul so ORT fuses both into one FusedMatMul (alpha, transB)
        scores = b.op("Mul", b.op("MatMul", qg, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.scalar(cfg.scale, np.float32))  # [B, kv, g*Q, K]
        qp, kp = b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0)
        keep = self.combine(b.op("LessOrEqual", kp, qp), self.window_keep(qp, kp), self.gathered_mask(q_pos, k_pos))
        if keep is None:
            keep = b.op("LessOrEqual", kp, qp)
        keep3 = b.unsqueeze(keep, 0) if self.cfg.mask_type == "none" else keep  # [Bm|1, Q, K]
        bias = self.to_bias(keep3, MASKED)
        if g > 1:
            # allowzero: Q may be 0 (no text token), and a 0 must not copy the input's dim
            five = b.concat(b.op("Shape", scores, start=0, end=1), b.i64(len(kv_list), g), b.op("Shape", keep3, start=1))
            s5 = b.op("Reshape", scores, five, allowzero=1)
            s5 = b.op("Add", s5, b.unsqueeze(bias, 1, 2))
            probs = b.op("Reshape", b.op("Softmax", s5, axis=-1), b.op("Shape", scores), allowzero=1)
        else:
            probs = b.op("Softmax", b.op("Add", scores, b.unsqueeze(bias, 1)), axis=-1)
        out = b.op("MatMul", probs, v)  # [B, kv, g*Q, D]
        out = b.op("Reshape", out, b.concat(b.i64(0, len(heads), -1), b.op("Shape", out, start=3))) if g > 1 else out
        if self.cfg.mask_type == "none" and self.cfg.local_window_size <= 0:
            return out  # every row keeps a key: a text query itself, an image query its own sink
        # a row with no key at all (a window or padding hid everything) outputs zeros, as in the reference
        has_key = b.op("ReduceMax", b.cast(keep3, TensorProto.FLOAT), b.i64(2), keepdims=0)  # [Bm|1, Q]
        return b.op("Mul", out, b.unsqueeze(has_key, 1, 3))

    # ----------------------------------------------------------- routes
    def dense(self, heads: list[int], flat: bool = False) -> str:
        """Causal GQA over the whole prompt: [B, S, len(heads), D] ([B, S, h*D] if flat)."""
        b = self.b
        q, k, v, nh, nkv = self.gqa_operands(heads)
        seq = self.seq()
        seqlens = b.op("Expand", b.cast(b.op("Sub", seq, b.scalar(1)), TensorProto.INT32), self.batch())
        total = b.cast(seq, TensorProto.INT32)
        m = self.mask3()
        bias = None if m is None else self.to_bias(b.unsqueeze(m, 1))
        out = self.gqa(q, k, v, nh, nkv, seqlens, total, bias, window=self.cfg.local_window_size)
        return out if flat else b.op("Reshape", out, b.i64(0, 0, nh, -1))

    def rows(self, heads: list[int], f: SpanFacts, with_sinks: bool):
        """One GQA row per image. Returns (pool [B, N*R, h, D], index [S] of each
        image position in the pool)."""
        b = self.b
        seq = self.seq()
        # b.unsqueeze, not f.cols/f.rows: those emit into the builder f was made with, and this may run in a branch
        before = b.op("Less", b.unsqueeze(f.pos, 0), b.unsqueeze(f.starts, 1))  # [N, S]
        visible = b.op("Or", f.is_text, f.sink) if with_sinks else f.is_text
        member = b.op("Or", b.op("And", before, b.unsqueeze(visible, 0)), b.op("Transpose", f.in_span, perm=[1, 0]))
        lengths = b.op("ReduceSum", b.cast(member, TensorProto.INT64), b.i64(1), keepdims=0)  # [N]
        width = b.op("ReduceMax", lengths, keepdims=1)  # [1]
        pos = b.unsqueeze(f.pos, 0)
        order_key = b.op("Where", member, pos, b.op("Add", pos, seq))
        _, idx = b.op("TopK", order_key, width, axis=1, largest=0, sorted=1, outputs=2)  # [N, R] positions

        q, k, v, nh, nkv = self.gqa_operands(heads)
        batch = self.batch()

        def flat(x):  # [B, S, X] -> rows [B*N, R, X]
            rows_x = b.gather(x, idx, 1)
            return b.op("Reshape", rows_x, b.concat(b.i64(-1), b.op("Shape", rows_x, start=2)))

        seqlens = b.cast(b.op("Tile", b.op("Sub", lengths, b.scalar(1)), batch), TensorProto.INT32)
        total = b.cast(b.op("Squeeze", width, b.i64(0)), TensorProto.INT32)

        qk = b.unsqueeze(idx, 2), b.unsqueeze(idx, 1)  # [N, R, 1], [N, 1, R]
        keep = self.window_keep(*qk)
        m = self.mask3()
        if m is not None:
            rows = b.op("Gather", m, idx, axis=1)  # [Bm, N, R, S]
            n_r_r = b.op("Shape", keep if keep is not None else b.op("Add", *qk))
            cols = b.op("Expand", b.unsqueeze(b.unsqueeze(idx, 1), 0), b.concat(b.op("Shape", m, start=0, end=1), n_r_r))
            keep = self.combine(keep, b.op("GatherElements", rows, cols, axis=3))  # [Bm, N, R, R]
        bias = None
        if keep is not None:
            shape4 = b.concat(batch, b.op("Shape", idx), b.op("Shape", idx, start=1))  # [B, N, R, R]
            bias = b.op("Reshape", b.op("Expand", self.to_bias(keep), shape4), b.i64(-1, 1, 0, 0))
        out = self.gqa(flat(q), flat(k), flat(v), nh, nkv, seqlens, total, bias)  # [B*N, R, h*D]
        pool = b.op("Reshape", out, b.concat(batch, b.i64(-1), b.op("Shape", out, start=2)))
        pool = b.op("Reshape", pool, b.i64(0, 0, nh, -1))  # [B, N*R, h, D]

        # position p of image i sits at row i, column len_i - (end_i - p)
        img = b.op("Max", f.image, b.scalar(0))
        col = b.op("Sub", b.gather(lengths, img, 0), b.op("Sub", b.gather(f.ends, img, 0), f.pos))
        return pool, b.op("Add", b.op("Mul", img, b.op("Squeeze", width, b.i64(0))), col)

    def sinks_only(self, heads: list[int], f: SpanFacts):
        """Image queries over text and sink keys: (pool [B, M, h, D], index [S])."""
        b = self.b
        img_pos = b.op("Squeeze", b.op("NonZero", f.is_image), b.i64(0))
        key_pos = b.op("Squeeze", b.op("NonZero", b.op("Or", f.is_text, f.sink)), b.i64(0))
        pool = b.op("Transpose", self.grouped_attention(heads, img_pos, key_pos), perm=[0, 2, 1, 3])
        return pool, _rank(b, f.is_image)

    def text_queries(self, heads: list[int], f: SpanFacts) -> str:
        """Dense rows of the text queries: [B, T, len(heads), D].

        A single prompt runs each run of text tokens as one GroupQueryAttention
        with everything before it as past context (a Loop over the N + 1 runs):
        causal work only, fused softmax. Batches (GQA takes past context with
        more than one new token only at batch 1) and prompts with no text take
        one grouped MatMul/Softmax over all keys."""
        b, cfg = self.b, self.cfg
        # whole KV groups share K/V reads; the few extra text rows of dense heads are cheap
        groups = sorted({cfg.kv_head(h) for h in heads})
        full = [g * cfg.group + j for g in groups for j in range(cfg.group)]
        one = b.op("Equal", b.op("Squeeze", self.batch(), b.i64(0)), b.scalar(1))
        some_text = b.op("ReduceMax", b.cast(f.is_text, TensorProto.INT64), keepdims=0)
        use_loop = b.op("And", one, b.cast(b.op("Max", some_text, b.scalar(0)), TensorProto.BOOL))
        outer = self.b
        branches = []
        for route in (self._text_runs_gqa, self._text_matmul):
            self.b = Builder(f"{outer._prefix}_{route.__name__.strip('_')}")
            branches.append(self.b.subgraph(route.__name__.strip("_"), [route(full, f)]))
        self.b = outer
        out = b.op("If", use_loop, then_branch=branches[0], else_branch=branches[1])
        return out if full == heads else b.gather(out, [full.index(h) for h in heads], 2)

    def _text_matmul(self, heads: list[int], f: SpanFacts) -> str:
        b = self.b
        text_pos = b.op("Squeeze", b.op("NonZero", f.is_text), b.i64(0))
        return b.op("Transpose", self.grouped_attention(heads, text_pos, f.pos), perm=[0, 2, 1, 3])

    def _gqa_runs(self, heads: list[int], starts: str, ends: str, past_positions):
        """Batch 1: a Loop with one GroupQueryAttention per run [starts[i], ends[i]):
        the run's tokens are the new ones, the keys at ``past_positions(body, start)``
        (1-D, sorted, all before the run) enter as past context. Causality, the
        window and the model mask hold by absolute position. Returns
        (pool [1, runs*width, h, D], width [1]); run i's outputs fill rows
        i*width .. i*width + len_i - 1."""
        b, cfg = self.b, self.cfg
        q, k, v, nh, nkv = self.gqa_operands(heads)  # [1, S, X]
        past_k, past_v = (b.op("Transpose", b.op("Reshape", x, b.i64(0, 0, nkv, -1)), perm=[0, 2, 1, 3]) for x in (k, v))
        width = b.op("ReduceMax", b.op("Sub", ends, starts), keepdims=1)  # [1]; at least one run on this path
        m = self.mask3()

        outer = self.b
        body = self.b = Builder(f"{outer._prefix}_run")
        i, cond_in = body.fresh("iter"), body.fresh("cond")
        s = body.op("Unsqueeze", body.op("Gather", starts, i, axis=0), body.i64(0))  # [1]
        e = body.op("Unsqueeze", body.op("Gather", ends, i, axis=0), body.i64(0))
        idx = past_positions(body, s)
        qc, kc, vc = (body.op("Slice", x, s, e, body.i64(1)) for x in (q, k, v))
        pk, pv = (body.op("Gather", x, idx, axis=2) for x in (past_k, past_v))
        total = body.op("Add", body.op("Shape", idx), body.op("Sub", e, s))  # [1]
        seqlens = body.cast(body.op("Sub", total, body.i64(1)), TensorProto.INT32)
        inputs = [qc, kc, vc, pk, pv, seqlens, body.cast(body.op("Squeeze", total, body.i64(0)), TensorProto.INT32)]
        q_pos = body.op("Range", body.op("Squeeze", s, body.i64(0)), body.op("Squeeze", e, body.i64(0)), body.scalar(1))
        k_pos = body.concat(idx, q_pos)
        qp, kp = body.unsqueeze(q_pos, 1), body.unsqueeze(k_pos, 0)
        in_mask = None if m is None else body.op("Gather", body.op("Gather", m, q_pos, axis=1), k_pos, axis=2)  # [Bm, L, P+L]
        keep = self.combine(self.window_keep(qp, kp), in_mask)
        if keep is not None:
            keep = keep if m is not None else body.unsqueeze(keep, 0)
            inputs += ["", "", "", self.to_bias(body.unsqueeze(keep, 1), MASKED)]
        out = body.op("GroupQueryAttention", *inputs, domain=MS_DOMAIN, outputs=3, num_heads=nh, kv_num_heads=nkv,
                      scale=float(cfg.scale))[0]
        padded = body.op("Pad", out, body.concat(body.i64(0, 0, 0, 0), body.op("Sub", width, body.op("Sub", e, s)), body.i64(0)))
        cond_out = body.op("Identity", cond_in)
        self.b = outer
        graph = helper.make_graph(
            body.nodes, "gqa_run",
            [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info(padded, TensorProto.FLOAT, None)],
        )
        scan = b.op("Loop", b.op("Squeeze", b.op("Shape", starts), b.i64(0)), "", body=graph)  # [runs, 1, width, h*D]
        pool = b.op("Reshape", scan, b.concat(b.i64(1, -1, nh), b.op("Shape", past_k, start=3)))  # [1, runs*width, h, D]
        return pool, width

    def _text_runs_gqa(self, heads: list[int], f: SpanFacts) -> str:
        """Each run of text tokens attends everything before it: [1, T, h, D]."""
        b = self.b
        text = b.cast(f.is_text, TensorProto.INT64)
        before = b.op("Pad", text, b.i64(1, 0))  # is_text[p - 1], 0 before the prompt
        after = b.op("Slice", b.op("Pad", text, b.i64(0, 1)), b.i64(1), b.i64(2**62), b.i64(0))  # is_text[p + 1]
        first = b.op("And", f.is_text, b.op("Not", b.cast(b.op("Slice", before, b.i64(0), b.op("Shape", text), b.i64(0)), TensorProto.BOOL)))
        last = b.op("And", f.is_text, b.op("Not", b.cast(after, TensorProto.BOOL)))
        starts = b.op("Squeeze", b.op("NonZero", first), b.i64(0))  # [C]
        ends = b.op("Add", b.op("Squeeze", b.op("NonZero", last), b.i64(0)), b.scalar(1))
        pool, width = self._gqa_runs(heads, starts, ends, lambda body, s: body.op("Range", body.scalar(0), body.op("Squeeze", s, body.i64(0)), body.scalar(1)))
        # text position p sits in run r(p) at column p - start(r)
        run_of = b.op("Sub", b.op("CumSum", b.cast(first, TensorProto.INT64), b.scalar(0)), b.scalar(1))
        text_pos = b.op("Squeeze", b.op("NonZero", f.is_text), b.i64(0))
        r = b.op("Gather", run_of, text_pos, axis=0)
        idx = b.op("Add", b.op("Mul", r, b.op("Squeeze", width, b.i64(0))), b.op("Sub", text_pos, b.op("Gather", starts, r, axis=0)))
        return b.op("Gather", pool, idx, axis=1)  # [1, T, h, D]

    def _assemble(self, pool, index, text_out, text_rank, f: SpanFacts, flat: bool) -> str:
        """One Gather assembles a group: image rows from its pool, text rows after them."""
        b = self.b
        image_rows = b.op("Shape", pool, start=1, end=2)
        index = b.op("Where", f.is_text, b.op("Add", text_rank, b.op("Squeeze", image_rows, b.i64(0))), index)
        pooled = b.concat(pool, text_out, axis=1)
        if flat:
            return b.op("Gather", b.op("Reshape", pooled, b.i64(0, 0, -1)), index, axis=1)
        return b.op("Gather", pooled, index, axis=1)

    def image_runs(self, heads: list[int], f: SpanFacts, with_sinks: bool):
        """Batch 1: one GroupQueryAttention per image, its visible keys (text, plus
        earlier sinks with ``with_sinks``) as past context and its own tokens as the
        new ones. Returns (pool [1, N*Lmax, h, D], index [S])."""
        b = self.b
        visible = b.op("Or", f.is_text, f.sink) if with_sinks else f.is_text

        def past(body, s):  # visible positions before the image
            return body.op("Squeeze", body.op("NonZero", body.op("And", visible, body.op("Less", f.pos, s))), body.i64(0))

        pool, width = self._gqa_runs(heads, f.starts, f.ends, past)
        img = b.op("Max", f.image, b.scalar(0))
        col = b.op("Sub", f.pos, b.gather(f.starts, img, 0))
        return pool, b.op("Add", b.op("Mul", img, b.op("Squeeze", width, b.i64(0))), col)

    def sparse(self, flat: bool = False) -> str:
        """All routes, assembled to [B, S, H, D] in head order. With ``flat`` and a
        single category the assembly Gather writes [B, S, H*D] itself (sets ``flat_done``)."""
        b, cfg = self.b, self.cfg
        self.flat_done = False
        f = SpanFacts(b, "image_spans", self.seq(), cfg.sink_tokens)
        groups: dict[str, list[int]] = {}
        for h, c in enumerate(cfg.categories):
            groups.setdefault(c, []).append(h)
        sparse_heads = [h for h, c in enumerate(cfg.categories) if not uses(c, KEY_ANY)]
        text = self.text_queries(sparse_heads, f)
        text_rank = _rank(b, f.is_text)
        parts, order = [], []
        for c, heads in groups.items():
            if uses(c, KEY_ANY):
                parts.append(self.dense(heads))
            else:
                text_out = text if heads == sparse_heads else b.gather(text, [sparse_heads.index(h) for h in heads], 2)
                single = flat and len(groups) == 1
                if uses(c, KEY_SAME_IMAGE):
                    # a single prompt runs one GQA per image with its visible keys as past
                    # context (no padding, no text query rows); batches take padded rows
                    outer, branches = self.b, []
                    for route in (self.image_runs, self.rows):
                        self.b = Builder(f"{outer._prefix}_{route.__name__}_{c}")
                        pool, index = route(heads, f, with_sinks=uses(c, KEY_SINK))
                        branches.append(self.b.subgraph(route.__name__, [self._assemble(pool, index, text_out, text_rank, f, single)]))
                    self.b = outer
                    one = b.op("Equal", b.op("Squeeze", self.batch(), b.i64(0)), b.scalar(1))
                    part = b.op("If", one, then_branch=branches[0], else_branch=branches[1])
                else:
                    pool, index = self.sinks_only(heads, f)
                    part = self._assemble(pool, index, text_out, text_rank, f, single)
                if single:
                    self.flat_done = True
                    return part
                parts.append(part)
            order += heads
        out = parts[0] if len(parts) == 1 else b.concat(*parts, axis=2)
        if order != list(range(cfg.num_heads)):
            out = b.gather(out, list(np.argsort(order)), 2)
        return out


def _rank(b: Builder, flags: str) -> str:
    """Index of each flagged position among the flagged ones (0 elsewhere)."""
    rank = b.op("Sub", b.op("CumSum", b.cast(flags, TensorProto.INT64), b.scalar(0)), b.scalar(1))
    return b.op("Max", rank, b.scalar(0))


def _final_layout(layer: _Layer, value: str) -> str:
    """[B, S, H, D] -> the node's output layout, by a real op where possible: a
    branch output made by a view (Reshape) costs ONNX Runtime a copy."""
    b = layer.b
    if layer.cfg.qkv_format == "BNSH":
        return b.op("Transpose", value, perm=[0, 2, 1, 3])
    return b.op("Reshape", value, b.i64(0, 0, -1))


def _produce_as_output(b: Builder, value: str) -> None:
    """Let the op that computes ``value`` write the function output (an Identity would be a view)."""
    producer = next(n for n in reversed(b.nodes) if value in n.output)
    producer.output[list(producer.output).index(value)] = OUTPUT_NAME


def build_fast(cfg: AttentionConfig, opset: int = OPSET):
    b = Builder("fast")
    layer = _Layer(cfg, b)
    all_heads = list(range(cfg.num_heads))
    if all(uses(c, KEY_ANY) for c in cfg.categories):
        out = layer.dense(all_heads, flat=cfg.qkv_format == "BSD")
        if cfg.qkv_format == "BNSH":
            out = _final_layout(layer, out)
        _produce_as_output(b, out)
        return make_function(b, cfg, "fast", OUTPUT_NAME, opset)
    no_image = b.op("Equal", b.shape_dim("image_spans", 0), b.scalar(0))
    branches = {}
    for name in ("dense", "sparse"):
        layer.b = Builder(f"fast_{name}")
        if name == "dense":
            value = layer.dense(all_heads, flat=cfg.qkv_format == "BSD")
            value = value if cfg.qkv_format == "BSD" else _final_layout(layer, value)
        else:
            value = layer.sparse(flat=cfg.qkv_format == "BSD")
            value = value if cfg.qkv_format == "BSD" and layer.flat_done else _final_layout(layer, value)
        branches[name] = layer.b.subgraph(f"{name}_branch", [value])
    layer.b = b
    # the If writes the function output itself: no view of it after the branches
    b.nodes.append(helper.make_node("If", [no_image], [OUTPUT_NAME], then_branch=branches["dense"], else_branch=branches["sparse"]))
    return make_function(b, cfg, "fast", OUTPUT_NAME, opset)
