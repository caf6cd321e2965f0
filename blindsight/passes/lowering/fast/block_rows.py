"""Own-image route under Gemma 3's image blocks (any batch): a Loop over row
chunks of the images, each a grouped MatMul/Softmax of one chunk's tokens over
the keys the category lets its image see before it and the image's own tokens.
GroupQueryAttention is causal; with the image's keys as past context (its own
new keys masked by the bias) it is exact but takes past context only at batch
1, and measured slower (16 x 512 tokens, 28/4 heads: intra 2.33 s vs 1.61 s,
dense 9.9 s vs 7.0 s).

Chunks bound the memory: a dense head's image rows see the whole prompt before
them, and one MatMul per 2048-token image at 8K context held 28 x 2048 x 8K
scores per copy (21.6 GB peak measured at 4 x 2048). Each image is cut into
the fewest equal chunks of at most ``ROW_CHUNK`` rows, so a 258-token Gemma 3
image stays one chunk and no chunk pads more than a row per chunk."""

from __future__ import annotations

from onnx import TensorProto, helper

from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.image_runs import image_pool_index
from blindsight.passes.lowering.fast.kernels import grouped_attention
from blindsight.passes.lowering.fast.scope import Scope

ROW_CHUNK = 512


def block_rows(s: Scope, heads: list[int], f: SpanFacts, category: str):
    """Returns (pool [B, N*W, h, D], index [S] of each image position in the pool),
    W >= the longest image: its chunks side by side."""
    b = s.b
    visible = f.visible_keys(category, b)
    width = b.op("ReduceMax", b.op("Sub", f.ends, f.starts), keepdims=1)  # [1]
    per_image = b.op("Div", b.op("Add", width, b.i64(ROW_CHUNK - 1)), b.i64(ROW_CHUNK))  # [1] chunks per image
    rows = b.op("Div", b.op("Sub", b.op("Add", width, per_image), b.i64(1)), per_image)  # [1] rows per chunk
    n_chunks = b.op("Squeeze", per_image, b.i64(0))
    chunk_rows = b.op("Squeeze", rows, b.i64(0))

    body = s.child("chunk")
    bb = body.b
    i, cond_in = bb.fresh("iter"), bb.fresh("cond")
    image = bb.op("Div", i, n_chunks)
    start = bb.op("Gather", f.starts, image, axis=0)  # scalar
    end = bb.op("Gather", f.ends, image, axis=0)
    first = bb.op("Add", start, bb.op("Mul", bb.op("Mod", i, n_chunks), chunk_rows))
    # rows past the image's end repeat its last row; the pool index never reads them
    q_pos = bb.op("Min", bb.op("Range", first, bb.op("Add", first, chunk_rows), bb.scalar(1)), bb.op("Sub", end, bb.scalar(1)))
    own = bb.op("Range", start, end, bb.scalar(1))
    if visible is None:
        k_pos = own
    else:
        k_pos = bb.concat(bb.nonzero(bb.op("And", visible, bb.op("Less", f.pos, start))), own)
    out = grouped_attention(body, heads, q_pos, k_pos)  # [B, h, chunk_rows, D]
    cond_out = bb.op("Identity", cond_in)
    graph = helper.make_graph(
        bb.nodes, "block_rows",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond_in, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), helper.make_tensor_value_info(out, bb.elem_type, None)],
    )
    trips = b.op("Mul", b.shape_dim(f.starts, 0), n_chunks)
    scan = b.op("Loop", trips, "", body=graph)  # [N*chunks, B, h, rows, D]
    rows_first = b.op("Transpose", scan, perm=[1, 0, 3, 2, 4])  # [B, N*chunks, rows, h, D]
    pool = b.op("Reshape", rows_first, b.concat(b.i64(0, -1), b.op("Shape", rows_first, start=3)))  # [B, N*W, h, D]
    return pool, image_pool_index(b, f, b.op("Mul", per_image, rows))
