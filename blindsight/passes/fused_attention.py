"""A vision tower's attention on ONNX Runtime's fused attention kernel.

The tower's exported attention (:func:`~blindsight.passes.query_chunks.match_attention`)
writes the scores out, adds the block-diagonal mask that keeps patches inside
their image, takes the softmax, guards it against NaN and multiplies by V, each a
pass over [heads, rows, patches] in memory. With one image per call (how the
runtime calls the tower) that mask keeps every key, and the same numbers come
from ``com.microsoft::MultiHeadAttention``, which ONNX Runtime's CPU provider runs
as a tiled flash attention (MLAS) that never holds the scores; CUDA and ROCm
have the op too. Measured at Qwen2-VL-2B's tower (16 heads x 80, 4,096 patches,
fp32, 2 threads): 1.3 s per attention against 2.5 s for the chunked graph, and
attention was half the tower's time.

So each matched attention becomes ``If(mask keeps every key)``: the fused op, or
else the query-chunked ``Loop`` (:func:`~blindsight.passes.query_chunks.chunk_loop`)
that masks exactly as exported. Several images in one call stay exact; the
condition (a max over the mask) is computed once per distinct mask. Attentions
that do not fit (no static head count, a rank other than 4, bfloat16, a chain
with more than one additive mask or a scaling that is not a constant) are only
chunked.
"""

from __future__ import annotations

import onnx_ir as ir

from .query_chunks import DEFAULT_ROWS, _const, chunk_loop, match_attention, replace_attention

MS_DOMAIN = "com.microsoft"
#: the types ONNX Runtime's CPU provider runs MultiHeadAttention in (1.31: no bfloat16)
FUSED_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _scalar(value: ir.Value) -> float | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _plan(match) -> tuple[int, float, ir.Value | None] | None:
    """(heads, scale, additive mask or None) for a [B, H, S, D] attention with a static
    head count whose chain holds at most one additive mask and scalings by
    constants; None where the fused op cannot take it."""
    q, k, chain, guard, scores, softmax, out = match
    v = out.inputs[1]
    if any(x.shape is None or len(x.shape) != 4 for x in (q, k, v)) or not isinstance(q.shape[1], int):
        return None
    if q.dtype not in FUSED_TYPES:
        return None
    scale, mask = 1.0, None
    for node, main in chain:
        side = node.inputs[1 - main]
        if node.op_type == "Add" and mask is None:
            mask = side
        elif node.op_type in ("Mul", "Div") and (c := _scalar(side)) is not None and not (node.op_type == "Div" and main == 1):
            # the fused path runs only where the mask is all zeros, so a scaling
            # before or after the mask scales the scores alike
            scale = scale * c if node.op_type == "Mul" else scale / c
        else:
            return None
    return q.shape[1], scale, mask


def _fused(match, heads: int, scale: float, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """[B, H, S, D] queries, [B, H, D, S] keys (as the scores' MatMul takes them) and
    [B, H, S, Dv] values through MultiHeadAttention ([B, S, H x D] in and out) with
    the chain's scale: its nodes and result."""
    q, k, chain, guard, scores, softmax, out = match
    v = out.inputs[1]
    t = ir.tape.Tape()
    flat = _const(t, [0, 0, -1])

    def bsd(x, perm):
        return t.op("Reshape", [t.op("Transpose", [x], attributes={"perm": perm}), flat])

    o = t.op("MultiHeadAttention", [bsd(q, [0, 2, 1, 3]), bsd(k, [0, 3, 1, 2]), bsd(v, [0, 2, 1, 3])],
             domain=MS_DOMAIN, attributes={"num_heads": heads, "scale": scale})
    o = t.op("Transpose", [t.op("Reshape", [o, _const(t, [0, 0, heads, -1])])], attributes={"perm": [0, 2, 1, 3]})
    for j, value in enumerate(x for n in t.nodes for x in n.outputs):
        value.name = f"{tag}_fused_{j}"  # unique across the scopes
    o.type, o.shape = out.outputs[0].type, out.outputs[0].shape
    return list(t.nodes), o


def fuse_attention(model: ir.Model, rows: int = DEFAULT_ROWS) -> tuple[int, int]:
    """Rewrite every matched attention of ``model``'s main graph in place: fused where
    the mask keeps every key, in chunks of ``rows`` queries otherwise (module
    docstring). Returns (fused, only chunked)."""
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    graph = model.graph
    matches = [m for node in list(graph) if node.op_type == "Softmax" and (m := match_attention(node))]
    conditions: dict[int, ir.Value] = {}
    fused = 0
    for i, m in enumerate(matches):
        tag = f"attention_{i}"
        plan = _plan(m)
        if plan is None:
            replace_attention(graph, m, *chunk_loop(m, rows, f"{tag}_chunks"))
            continue
        heads, scale, mask = plan
        fused += 1
        if mask is None:  # nothing to keep out: the fused op alone
            replace_attention(graph, m, *_fused(m, heads, scale, tag))
            continue
        outer = ir.tape.Tape()
        if id(mask) not in conditions:
            # an additive mask keeps every key where it is all zeros (-inf and large
            # negatives have a nonzero magnitude); computed once, before the first
            # attention that reads this mask
            peak = outer.op("ReduceMax", [outer.op("Abs", [mask])], attributes={"keepdims": 0})
            zero = _const(outer, 0, mask.dtype.numpy())
            conditions[id(mask)] = outer.op("Equal", [peak, zero])
            for j, value in enumerate(x for n in outer.nodes for x in n.outputs):
                value.name = f"{tag}_mask_{j}"
        then_nodes, then_out = _fused(m, heads, scale, tag)
        else_nodes, else_out = chunk_loop(m, rows, f"{tag}_chunks")
        result = outer.op("If", [conditions[id(mask)]], attributes={
            "then_branch": ir.AttrGraph("then_branch", ir.Graph([], [then_out], nodes=then_nodes, name=f"{tag}_fused")),
            "else_branch": ir.AttrGraph("else_branch", ir.Graph([], [else_out], nodes=else_nodes, name=f"{tag}_chunked")),
        })
        result.name = f"{tag}_out"
        result.type, result.shape = m[6].outputs[0].type, m[6].outputs[0].shape
        replace_attention(graph, m, list(outer.nodes), result)
    if fused:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused, len(matches) - fused
