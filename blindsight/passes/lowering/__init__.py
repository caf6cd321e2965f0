"""Function bodies for ``BlindSightAttention`` (docs/specification.md §4): ONNX and
``com.microsoft`` operators only, so a plain InferenceSession runs them.

- ``reference``: explicit per-head mask, dense compute (:mod:`.reference`);
- ``fast``: skips the masked-out work (:mod:`.fast`) on a prefill; on KV-cache
  steps text queries (decode) attend in place and a chunk with image tokens
  skips the masked-out work too (:func:`prefill_or_cached`).
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper

from blindsight.attention.schema import SPANS_INPUT, AttentionConfig
from blindsight.errors import ModelError
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.fast import build_fast
from blindsight.passes.lowering.fast.image_cached import build_image_cached
from blindsight.passes.lowering.fast.text_cached import build_text_cached, queries_are_text
from blindsight.passes.lowering.function import OUTPUT_NAME
from blindsight.passes.lowering.reference import build_reference

MIN_OPSET = 15  # Shape(start, end) and axes-as-input Squeeze/ReduceSum
GQA_HEAD_MULTIPLE = 8  # onnxruntime 1.31 GroupQueryAttention: "head_size must be a multiple of 8" (measured, fp32 and fp16)


def _branch(function: onnx.FunctionProto, name: str, elem_type: int) -> onnx.GraphProto:
    """A function body as an If branch: its nodes read the enclosing function's
    formal inputs from the outer scope; the output gets a branch-unique name."""
    out = f"{name}_{OUTPUT_NAME}"
    nodes = [copy.deepcopy(n) for n in function.node]
    for n in nodes:
        n.output[:] = [out if o == OUTPUT_NAME else o for o in n.output]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, elem_type, None)])


def prefill_or_cached(cfg: AttentionConfig, opset: int) -> onnx.FunctionProto:
    """The fast lowering assumes a prefill (query length == key length). With a
    KV cache (past > 0) the queries sit at absolute positions past..past+Sq-1:
    when they are all text (decode steps), every head is dense by docs/specification.md §2 and
    one grouped MatMul reads the cache in place (:mod:`.fast.text_cached`); in a
    chunk that holds image tokens the image rows of sparse heads read only the
    keys their category may see (:mod:`.fast.image_cached`). Spans reaching
    past the keys are cut where the keys end first."""
    if cfg.head_size % GQA_HEAD_MULTIPLE:
        raise ModelError(
            f"layer {cfg.layer}: head size {cfg.head_size} is not a multiple of {GQA_HEAD_MULTIPLE}, which ONNX Runtime's "
            "GroupQueryAttention (the fast lowering's kernel) needs; compile with --lowering reference"
        )
    fast = build_fast(cfg, opset)
    seq_axis = 2 if cfg.qkv_format == "BNSH" else 1
    # KV-cache steps: text queries take the decode route, a chunk with image tokens the image route
    b = Builder("kv", cfg.elem_type)
    cached_out = b.op(
        "If", queries_are_text(b, cfg),
        then_branch=_branch(build_text_cached(cfg, opset), "text_cached", cfg.elem_type),
        else_branch=_branch(build_image_cached(cfg, opset), "image_cached", cfg.elem_type),
    )
    cached = b.subgraph("kv_cache", [cached_out])
    cond = "kv_is_prefill"
    given = SPANS_INPUT + "_given"

    def ints(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values))

    nodes = [
        helper.make_node("Shape", ["query"], ["kv_q_len"], start=seq_axis, end=seq_axis + 1),
        helper.make_node("Shape", ["key"], ["kv_k_len"], start=seq_axis, end=seq_axis + 1),
        # the spans as far as the keys reach (a chunk of a longer prompt may be given the whole
        # prompt's spans): spans that start at or after the last key are dropped, the rest end there
        # at the latest, as the native kernel reads them; every route below reads these
        ints("kv_c0", [0]), ints("kv_c1", [1]),
        helper.make_node("Slice", [given, "kv_c0", "kv_c1", "kv_c1"], ["kv_span_starts"]),
        helper.make_node("Squeeze", ["kv_span_starts", "kv_c1"], ["kv_span_starts_n"]),
        helper.make_node("Less", ["kv_span_starts_n", "kv_k_len"], ["kv_span_seen"]),
        helper.make_node("Compress", [given, "kv_span_seen"], ["kv_spans_seen"], axis=0),
        helper.make_node("Min", ["kv_spans_seen", "kv_k_len"], [SPANS_INPUT]),
        helper.make_node("Equal", ["kv_q_len", "kv_k_len"], ["kv_same_len"]),
        helper.make_node("Squeeze", ["kv_same_len"], [cond]),
        helper.make_node("If", [cond], [OUTPUT_NAME], then_branch=_branch(fast, "prefill", cfg.elem_type), else_branch=cached),
    ]
    inputs = [given if name == SPANS_INPUT else name for name in fast.input]
    return helper.make_function(
        fast.domain, fast.name, inputs, [OUTPUT_NAME], nodes, list(fast.opset_import),
        overload=fast.overload,
        doc_string=fast.doc_string + "; KV-cache steps (past > 0): text queries dense in place, image queries on their key sets",
    )


LOWERINGS = {"fast": prefill_or_cached, "reference": build_reference}


def build_function(cfg: AttentionConfig, lowering: str, opset: int = OPSET) -> onnx.FunctionProto:
    try:
        builder = LOWERINGS[lowering]
    except KeyError:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {', '.join(LOWERINGS)}") from None
    return builder(cfg, max(opset, MIN_OPSET))
