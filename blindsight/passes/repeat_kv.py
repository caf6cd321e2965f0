"""Look through the exporters' repeat of K/V per query head.

Transformers' ``repeat_kv`` exports as Unsqueeze(axis 2) -> Expand -> Reshape,
turning [B, kv, S, D] into [B, kv * rep, S, D]. A BlindSightAttention node fed
that way would copy K/V once per query head and run GroupQueryAttention as
plain multi-head attention. Feeding the node the un-repeated tensors with the
real ``kv_num_heads`` is exact: query head h reads KV head h // rep either way,
which is the grouping GroupQueryAttention (and the op, docs/specification.md §2) uses.
"""

from __future__ import annotations

import onnx_ir as ir

from blindsight.attention.schema import is_blindsight, read_attribute, write_attributes


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]


def _unrepeated(value: ir.Value, num_heads: int) -> tuple[ir.Value, int] | None:
    """(source [B, kv, S, D], kv) when ``value`` is repeat_kv(source), else None."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or _const_ints(unsqueeze.inputs[1]) not in ([2], [-3]):
        return None
    source = unsqueeze.inputs[0]
    expanded = expand.outputs[0].shape
    if source.shape is None or len(source.shape) != 4 or expanded is None or len(expanded) != 5:
        return None
    kv, rep = source.shape[1], expanded[1:3]
    if not isinstance(kv, int) or list(rep) != [kv, num_heads // kv] or num_heads % kv:
        return None
    out = value.shape
    if out is None or len(out) != 4 or out[1] != num_heads:
        return None
    return source, kv


def look_through_repeat_kv(model: ir.Model) -> int:
    """Rewire every BNSH node whose K and V are repeated; returns how many were."""
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_blindsight(node) or read_attribute(node, "qkv_format") != "BNSH":
            continue
        heads = read_attribute(node, "num_heads")
        if read_attribute(node, "kv_num_heads") != heads:
            continue
        k, v = _unrepeated(node.inputs[1], heads), _unrepeated(node.inputs[2], heads)
        if k is None or v is None or k[1] != v[1]:
            continue
        node.replace_input_with(1, k[0])
        node.replace_input_with(2, v[0])
        write_attributes(node, kv_num_heads=k[1])
        count += 1
    return count
