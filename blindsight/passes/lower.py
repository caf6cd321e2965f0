"""Give every BlindSightAttention node a model-local function body."""

from __future__ import annotations

import copy

import onnx
import onnx_ir as ir
from onnx import helper

from blindsight.passes.builder import MS_DOMAIN, OPSET
from blindsight.passes.lower_fast import build_fast
from blindsight.passes.lower_reference import build_reference
from blindsight.passes.op import DOMAIN, INPUTS, OP_TYPE, OP_VERSION, OUTPUTS, AttentionConfig

OUTPUT = OUTPUTS[0]
MIN_OPSET = 15  # Shape(start, end) and axes-as-input Squeeze/ReduceSum


def build_function(cfg: AttentionConfig, lowering: str, opset: int = OPSET) -> onnx.FunctionProto:
    try:
        builder = LOWERINGS[lowering]
    except KeyError:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}") from None
    return builder(cfg, max(opset, MIN_OPSET))


def _branch(function: onnx.FunctionProto, name: str) -> onnx.GraphProto:
    """A function body as an If branch: its nodes read the enclosing function's
    formal inputs from the outer scope; the output gets a branch-unique name."""
    out = f"{name}_{OUTPUT}"
    nodes = [copy.deepcopy(n) for n in function.node]
    for n in nodes:
        n.output[:] = [out if o == OUTPUT else o for o in n.output]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)])


def _prefill_or_cached(cfg: AttentionConfig, opset: int) -> onnx.FunctionProto:
    """The fast lowering assumes a prefill (query length == key length). With a
    KV cache (past > 0, decode steps or a chunked prefill) the queries sit at
    absolute positions past..past+Sq-1 and the reference body, which handles
    that offset, runs instead; decode steps of text tokens are dense by SPEC §2."""
    fast = build_fast(cfg, opset)
    cached = build_reference(cfg, opset)
    seq_axis = 2 if cfg.qkv_format == "BNSH" else 1
    cond = "kv_is_prefill"
    nodes = [
        helper.make_node("Shape", ["query"], ["kv_q_len"], start=seq_axis, end=seq_axis + 1),
        helper.make_node("Shape", ["key"], ["kv_k_len"], start=seq_axis, end=seq_axis + 1),
        helper.make_node("Equal", ["kv_q_len", "kv_k_len"], ["kv_same_len"]),
        helper.make_node("Squeeze", ["kv_same_len"], [cond]),
        helper.make_node(
            "If", [cond], [OUTPUT],
            then_branch=_branch(fast, "prefill"), else_branch=_branch(cached, "cached"),
        ),
    ]
    return helper.make_function(
        fast.domain, fast.name, list(fast.input), [OUTPUT], nodes, list(fast.opset_import),
        overload=fast.overload, doc_string=fast.doc_string + "; KV-cache steps (past > 0): reference body",
    )


LOWERINGS = {"fast": _prefill_or_cached, "reference": build_reference}


def is_blindsight(node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def config_of(node: ir.Node) -> AttentionConfig:
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    mask_type = "none"
    if mask is not None:
        if mask.dtype is None:
            raise ValueError(f"{node.name}: the attn_mask input has no known element type")
        mask_type = "bool" if mask.dtype == ir.DataType.BOOL else "float"
    q_shape = node.inputs[0].shape
    fmt = _attr(node, "qkv_format", "BNSH")
    head_size = 0
    if q_shape is not None and isinstance(q_shape[-1], int):
        head_size = q_shape[-1] if fmt == "BNSH" else q_shape[-1] // _attr(node, "num_heads")
    return AttentionConfig(
        num_heads=_attr(node, "num_heads"),
        kv_num_heads=_attr(node, "kv_num_heads"),
        head_size=head_size,
        scale=_attr(node, "scale"),
        categories=tuple(_attr(node, "categories")),
        sink_tokens=_attr(node, "sink_tokens", 1),
        layer=_attr(node, "layer", 0),
        is_causal=_attr(node, "is_causal", 1),
        local_window_size=_attr(node, "local_window_size", -1),
        qkv_format=fmt,
        mask_type=mask_type,
    )


def lower_model(model: ir.Model, lowering: str) -> int:
    """Attach function bodies; returns the number of nodes lowered."""
    opset = model.opset_imports.get("", OPSET)
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not is_blindsight(node):
            continue
        cfg = config_of(node)
        overload = cfg.overload(lowering)
        key = (DOMAIN, OP_TYPE, overload)
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(build_function(cfg, lowering, opset))
        node.overload = overload
        count += 1
    model.opset_imports[DOMAIN] = OP_VERSION
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    model.opset_imports.setdefault("", OPSET)
    return count


def single_node_model(cfg: AttentionConfig, lowering: str, *, dtype=onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A model holding one BlindSightAttention node (tests and op-level benchmarks).

    Inputs follow the node: query, key, value, [attn_mask,] image_spans; the
    key length may exceed the query length (a KV cache: past = Skv - S).
    """
    H, Hkv = cfg.num_heads, cfg.kv_num_heads
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
    inputs.append(helper.make_tensor_value_info("image_spans", onnx.TensorProto.INT64, ["N", 2]))
    node_inputs.append("image_spans")
    node = helper.make_node(OP_TYPE, node_inputs, ["output"], domain=DOMAIN, overload=cfg.overload(lowering), **cfg.attributes())
    graph = helper.make_graph([node], "blindsight_single", inputs, [helper.make_tensor_value_info("output", dtype, out_shape)])
    return helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(DOMAIN, OP_VERSION)],
        functions=[build_function(cfg, lowering)],
    )
