"""Attention in query chunks: bound the scores a bidirectional attention holds.

An exported attention without a fused kernel (MatMul -> [Mul / Add mask] ->
Softmax -> [NaN guard] -> MatMul, as torch's dynamo writes sdpa, and as a vision
tower's attention stays) materialises every query against every key at once,
several times over: for Qwen2-VL-2B's vision tower on one 896 x 896 px image
(4,096 patches, 16 heads) each such tensor is 1.07 GB, and ONNX Runtime held
5.3 GB of them per call. Rows of a softmax are independent, so the rewrite runs
the same nodes on ``rows`` queries at a time in a ``Loop`` and concatenates the
outputs: the same numbers, and scores sized rows x keys. A side input of the
chain (a mask, [.., S, S] or [.., 1, S]) is sliced with its queries where it has
a row per query and broadcast where it has one.

Causal language-model attention is left to bs-compile (BlindSightAttention);
this pass is for the towers that bs-export writes beside it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DEFAULT_ROWS = 512
_ELEMENTWISE = ("Add", "Mul", "Div", "Sub")


def _const(tape: ir.tape.Tape, values, dtype=np.int64) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(values, dtype=dtype))})


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def match_attention(softmax: ir.Node):
    """(q, k, chain [(node, main input index)], guard nodes, scores MatMul, Softmax, output MatMul) or None."""
    if softmax.domain not in ("", "ai.onnx"):
        return None
    rank = _rank(softmax.inputs[0])
    axis = softmax.attributes.get_int("axis", -1)
    if rank is None or axis not in (-1, rank - 1):
        return None
    chain, value = [], softmax.inputs[0]
    while True:  # back through elementwise ops to the scores' MatMul
        node = value.producer()
        if node is None or len(value.uses()) != 1:
            return None
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            break
        if node.op_type not in _ELEMENTWISE or node.domain not in ("", "ai.onnx"):
            return None
        mains = [i for i, x in enumerate(node.inputs) if x is not None and x.producer() is not None
                 and x.producer().op_type in (*_ELEMENTWISE, "MatMul") and _rank(x) == rank]
        if len(mains) != 1:
            return None
        chain.insert(0, (node, mains[0]))
        value = node.inputs[mains[0]]
    scores = node
    q, k = scores.inputs
    if _rank(q) != rank or rank < 2:
        return None
    probs, guard = softmax.outputs[0], []
    users = {u.node for u in probs.uses()}
    if len(users) == 2:  # IsNaN -> Where(isnan, 0, probs): the exporter's guard for all-masked rows
        isnan = next((n for n in users if n.op_type == "IsNaN"), None)
        where = next((n for n in users if n.op_type == "Where"), None)
        if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs:
            return None
        if len(isnan.outputs[0].uses()) != 1:
            return None
        guard, probs = [isnan, where], where.outputs[0]
        users = {u.node for u in probs.uses()}
    if len(users) != 1:
        return None
    out = users.pop()
    if out.op_type != "MatMul" or out.inputs[0] is not probs or _rank(out.inputs[1]) != rank:
        return None
    return q, k, chain, guard, scores, softmax, out


def chunk_loop(match, rows: int, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """The nodes of a ``Loop`` that computes ``match``'s attention ``rows`` queries at a
    time, and its result; nothing is inserted or removed."""
    q, k, chain, guard, scores, softmax, out = match
    v = out.inputs[1]
    outer = ir.tape.Tape()
    axes = _const(outer, [-2])
    n_rows = outer.op("Shape", [q], attributes={"start": -2, "end": -1})  # [1]
    step = _const(outer, [rows])
    count = outer.op("Squeeze", [outer.op("Div", [outer.op("Add", [n_rows, _const(outer, [rows - 1])]), step])])
    empty = outer.op("Slice", [v, _const(outer, [0]), _const(outer, [0]), axes])  # [.., 0, dv]
    keep_going = _const(outer, True, np.bool_)

    it = ir.Value(name=f"{tag}_i", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond_in = ir.Value(name=f"{tag}_cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc = ir.Value(name=f"{tag}_acc", type=out.outputs[0].type)
    body = ir.tape.Tape()
    start = body.op("Mul", [body.op("Unsqueeze", [it, _const(body, [0])]), step])
    end = body.op("Min", [body.op("Add", [start, step]), n_rows])
    x = body.op("Slice", [q, start, end, axes])
    x = body.op("MatMul", [x, k])
    for node, main in chain:
        inputs = []
        for i, side in enumerate(node.inputs):
            if i == main:
                inputs.append(x)
            elif _rank(side) is not None and _rank(side) >= 2:
                # a row per query: slice with the queries; a single row: broadcast as it is
                height = body.op("Shape", [side], attributes={"start": -2, "end": -1})
                last = body.op("Sub", [height, _const(body, [1])])
                inputs.append(body.op("Slice", [side, body.op("Min", [start, last]), body.op("Min", [end, height]), axes]))
            else:
                inputs.append(side)
        x = body.op(node.op_type, inputs, attributes=node.attributes)
    x = body.op("Softmax", [x], attributes=softmax.attributes)
    if guard:
        where = guard[1]
        x = body.op("Where", [body.op("IsNaN", [x]), where.inputs[1], x])
    x = body.op("MatMul", [x, v])
    acc_out = body.op("Concat", [acc, x], attributes={"axis": -2})
    cond_out = body.op("Identity", [cond_in])
    for j, value in enumerate(o for n in (*outer.nodes, *body.nodes) for o in n.outputs):
        value.name = f"{tag}_{j}"  # unique across the scopes (the saver's default names are per graph)
    loop_body = ir.Graph([it, cond_in, acc], [cond_out, acc_out], nodes=body.nodes, name=tag)
    result = outer.op("Loop", [count, keep_going, empty], attributes={"body": ir.AttrGraph("body", loop_body)})
    result.name = f"{tag}_out"
    result.type, result.shape = out.outputs[0].type, out.outputs[0].shape
    return list(outer.nodes), result


def replace_attention(graph: ir.Graph, match, nodes: list[ir.Node], result: ir.Value) -> None:
    """Insert ``nodes`` before ``match``'s output MatMul, let ``result`` take the place of
    its output and remove the matched nodes."""
    q, k, chain, guard, scores, softmax, out = match
    graph.insert_before(out, nodes)
    old = out.outputs[0]
    if old.is_graph_output():  # the graph's output first: the uses' replacement refuses one
        index = graph.outputs.index(old)
        name, old.name = old.name, None
        result.name, graph.outputs[index] = name, result
    ir.convenience.replace_all_uses_with(old, result)
    graph.remove([scores, *(n for n, _ in chain), softmax, *guard, out], safe=True)


def chunk_attention_queries(model: ir.Model, rows: int = DEFAULT_ROWS) -> int:
    """Rewrite every matched attention of ``model``'s main graph in place to run
    ``rows`` queries at a time; returns how many were rewritten."""
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    matches = [m for node in list(model.graph) if node.op_type == "Softmax" and (m := match_attention(node))]
    for i, m in enumerate(matches):
        replace_attention(model.graph, m, *chunk_loop(m, rows, f"query_chunks_{i}"))
    return len(matches)
