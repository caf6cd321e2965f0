"""Batch 1: a Loop with one ``GroupQueryAttention`` per run of new tokens
whose visible earlier keys enter as past context. Used for the tokens of
each image (``intra`` routes) and for each run of text tokens."""

from __future__ import annotations

from onnx import TensorProto, helper

from blindsight.passes.lowering.fast.kernels import gqa, gqa_operands
from blindsight.passes.lowering.fast.scope import Scope


def gqa_runs(s: Scope, heads: list[int], starts: str, ends: str, past_positions):
    """One GroupQueryAttention per run [starts[i], ends[i]): the run's tokens are
    the new ones, the keys at ``past_positions(body, start)`` (1-D, sorted, all
    before the run) enter as past context. Causality, the window and the model
    mask hold by absolute position. Returns (pool [1, runs*width, h, D], width [1]);
    run i's outputs fill rows i*width .. i*width + len_i - 1."""
    b, cfg = s.b, s.cfg
    q, k, v, nh, nkv = gqa_operands(s, heads)  # [1, S, X]
    past_k, past_v = (b.op("Transpose", b.op("Reshape", x, b.i64(0, 0, nkv, -1)), perm=[0, 2, 1, 3]) for x in (k, v))
    width = b.op("ReduceMax", b.op("Sub", ends, starts), keepdims=1)  # [1]; at least one run on this path
    m = s.mask3()

    body = s.child("run")
    bb = body.b
    i, cond_in = bb.fresh("iter"), bb.fresh("cond")
    start = bb.unsqueeze(bb.op("Gather", starts, i, axis=0), 0)  # [1]
    end = bb.unsqueeze(bb.op("Gather", ends, i, axis=0), 0)
    idx = past_positions(bb, start)
    qc, kc, vc = (bb.op("Slice", x, start, end, bb.i64(1)) for x in (q, k, v))
    pk, pv = (bb.op("Gather", x, idx, axis=2) for x in (past_k, past_v))
    total = bb.op("Add", bb.op("Shape", idx), bb.op("Sub", end, start))  # [1]
    seqlens = bb.cast(bb.op("Sub", total, bb.i64(1)), TensorProto.INT32)
    total32 = bb.cast(bb.op("Squeeze", total, bb.i64(0)), TensorProto.INT32)
    q_pos = bb.op("Range", bb.op("Squeeze", start, bb.i64(0)), bb.op("Squeeze", end, bb.i64(0)), bb.scalar(1))
    k_pos = bb.concat(idx, q_pos)
    qp, kp = bb.unsqueeze(q_pos, 1), bb.unsqueeze(k_pos, 0)
    in_mask = None if m is None else bb.op("Gather", bb.op("Gather", m, q_pos, axis=1), k_pos, axis=2)  # [Bm, L, P+L]
    keep = bb.all_of(body.keep(qp, kp, causal=False), in_mask)  # GQA itself is causal
    bias = None
    if keep is not None:
        keep = keep if m is not None else bb.unsqueeze(keep, 0)
        bias = body.to_bias(bb.unsqueeze(keep, 1))
    out = gqa(bb, cfg, qc, kc, vc, nh, nkv, seqlens, total32, bias, past=(pk, pv), outputs=3)
    padded = bb.op("Pad", out, bb.concat(bb.i64(0, 0, 0, 0), bb.op("Sub", width, bb.op("Sub", end, start)), bb.i64(0)))
    cond_out = bb.op("Identity", cond_in)
    graph = helper.make_graph(
        bb.nodes, "gqa_run",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info(padded, bb.elem_type, None)],
    )
    scan = b.op("Loop", b.op("Squeeze", b.op("Shape", starts), b.i64(0)), "", body=graph)  # [runs, 1, width, h*D]
    pool = b.op("Reshape", scan, b.concat(b.i64(1, -1, nh), b.op("Shape", past_k, start=3)))  # [1, runs*width, h, D]
    return pool, width
