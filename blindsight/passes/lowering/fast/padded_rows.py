"""Own-image route for a batch: one right-padded ``GroupQueryAttention`` row
per image, the keys the category lets it see before it followed by its own
tokens (per-row ``seqlens_k``). Causality inside a row is causality by
position because rows keep position order."""

from __future__ import annotations

from onnx import TensorProto

from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.kernels import gqa, gqa_operands
from blindsight.passes.lowering.fast.scope import Scope


def padded_rows(s: Scope, heads: list[int], f: SpanFacts, category: str):
    """Returns (pool [B, N*R, h, D], index [S] of each image position in the pool)."""
    b, cfg = s.b, s.cfg
    seq = s.seq()
    before = b.op("Less", b.unsqueeze(f.pos, 0), b.unsqueeze(f.starts, 1))  # [N, S]
    visible = f.visible_keys(category, b)
    if visible is None:
        member = b.op("Transpose", f.in_span, perm=[1, 0])
    else:
        member = b.op("Or", b.op("And", before, b.unsqueeze(visible, 0)), b.op("Transpose", f.in_span, perm=[1, 0]))
    lengths = b.op("ReduceSum", b.cast(member, TensorProto.INT64), b.i64(1), keepdims=0)  # [N]
    width = b.op("ReduceMax", lengths, keepdims=1)  # [1]
    pos = b.unsqueeze(f.pos, 0)
    order_key = b.op("Where", member, pos, b.op("Add", pos, seq))
    _, idx = b.op("TopK", order_key, width, axis=1, largest=0, sorted=1, outputs=2)  # [N, R] positions

    q, k, v, nh, nkv = gqa_operands(s, heads)
    batch = s.batch()

    def flat(x):  # [B, S, X] -> rows [B*N, R, X]
        rows_x = b.gather(x, idx, 1)
        return b.op("Reshape", rows_x, b.concat(b.i64(-1), b.op("Shape", rows_x, start=2)))

    seqlens = b.cast(b.op("Tile", b.op("Sub", lengths, b.scalar(1)), batch), TensorProto.INT32)
    total = b.cast(b.op("Squeeze", width, b.i64(0)), TensorProto.INT32)

    qk = b.unsqueeze(idx, 2), b.unsqueeze(idx, 1)  # [N, R, 1], [N, 1, R]
    keep = s.keep(*qk, causal=False)  # GQA itself is causal
    m = s.mask3()
    if m is not None:
        rows = b.op("Gather", m, idx, axis=1)  # [Bm, N, R, S]
        n_r_r = b.op("Shape", keep if keep is not None else b.op("Add", *qk))
        cols = b.op("Expand", b.unsqueeze(b.unsqueeze(idx, 1), 0), b.concat(b.op("Shape", m, start=0, end=1), n_r_r))
        keep = b.all_of(keep, b.op("GatherElements", rows, cols, axis=3))  # [Bm, N, R, R]
    bias = None
    if keep is not None:
        shape4 = b.concat(batch, b.op("Shape", idx), b.op("Shape", idx, start=1))  # [B, N, R, R]
        bias = b.op("Reshape", b.op("Expand", s.to_bias(keep), shape4), b.i64(-1, 1, 0, 0))
    out = gqa(b, cfg, flat(q), flat(k), flat(v), nh, nkv, seqlens, total, bias)  # [B*N, R, h*D]
    pool = b.op("Reshape", out, b.concat(batch, b.i64(-1), b.op("Shape", out, start=2)))
    pool = b.op("Reshape", pool, b.i64(0, 0, nh, -1))  # [B, N*R, h, D]

    # position p of image i sits at row i, column len_i - (end_i - p)
    img = b.op("Max", f.image, b.scalar(0))
    col = b.op("Sub", b.gather(lengths, img, 0), b.op("Sub", b.gather(f.ends, img, 0), f.pos))
    return pool, b.op("Add", b.op("Mul", img, b.op("Squeeze", width, b.i64(0))), col)
