"""A model holding one BlindSightAttention node, lowered: what the op-level
benchmark times and the single-node tests check."""

from __future__ import annotations

import onnx
from onnx import helper

from blindsight.attention.schema import DOMAIN, OP_TYPE, OP_VERSION, SPANS_INPUT, AttentionConfig
from blindsight.passes.lowering import build_function
from blindsight.passes.lowering.builder import MS_DOMAIN, OPSET


def single_node_model(cfg: AttentionConfig, lowering: str) -> onnx.ModelProto:
    """Inputs follow the node: query, key, value, [attn_mask,] image_spans, in
    ``cfg.dtype``; the key length may exceed the query length (a KV cache: past = Skv - S)."""
    H, Hkv = cfg.num_heads, cfg.kv_num_heads
    dtype = cfg.elem_type
    if cfg.qkv_format == "BNSH":
        shapes = {"query": ["B", H, "S", "D"], "key": ["B", Hkv, "Skv", "D"], "value": ["B", Hkv, "Skv", "D"]}
        out_shape = ["B", H, "S", "D"]
    else:
        shapes = {"query": ["B", "S", "HD"], "key": ["B", "Skv", "KD"], "value": ["B", "Skv", "KD"]}
        out_shape = ["B", "S", "HD"]
    inputs = [helper.make_tensor_value_info(n, dtype, shapes[n]) for n in ("query", "key", "value")]
    node_inputs = ["query", "key", "value"]
    if cfg.mask_type != "none":
        mt = onnx.TensorProto.BOOL if cfg.mask_type == "bool" else dtype
        inputs.append(helper.make_tensor_value_info("attn_mask", mt, ["MB", 1, "S", "Skv"]))
        node_inputs.append("attn_mask")
    else:
        node_inputs.append("")
    inputs.append(helper.make_tensor_value_info(SPANS_INPUT, onnx.TensorProto.INT64, ["N", 2]))
    node_inputs.append(SPANS_INPUT)
    node = helper.make_node(OP_TYPE, node_inputs, ["output"], domain=DOMAIN, overload=cfg.overload(lowering), **cfg.attributes())
    graph = helper.make_graph([node], "blindsight_single", inputs, [helper.make_tensor_value_info("output", dtype, out_shape)])
    return helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(DOMAIN, OP_VERSION)],
        functions=[build_function(cfg, lowering)],
    )
