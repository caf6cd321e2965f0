"""Op-level benchmark: one BlindSightAttention node (fast lowering) against
ONNX Runtime's fastest dense causal attention, ``GroupQueryAttention``, for
the same shapes (SPEC §5, §6). With Gemma 3's image blocks the causal kernel
is not exact dense attention; the baseline becomes the all-dense node with
the blocks (the exact dense answer), and the causal kernel is timed beside it
for reference."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from blindsight.bench.timing import peak_rss_mb, reset_peak_rss, session
from blindsight.flops import Template, attention_pairs
from blindsight.attention import CATEGORIES
from blindsight.attention.schema import AttentionConfig, elem_type_of, np_dtype_of
from blindsight.passes.lowering.builder import MS_DOMAIN, OPSET
from blindsight.passes.lowering.fixture import single_node_model
from blindsight.profile import MIXED, mixed_layer

CATEGORY_CASES = (*CATEGORIES, MIXED)  # MIXED: the mixed layer (profile.mixed_layer)


@dataclass(frozen=True)
class OpShape:
    num_heads: int = 28
    kv_num_heads: int = 4
    head_dim: int = 128
    dtype: str = "float32"  # of Q/K/V and the output (the attention's dtype)
    image_blocks: bool = False  # Gemma 3's bidirectional image blocks (SPEC §2)

    @property
    def elem_type(self) -> int:
        return elem_type_of(self.dtype)

    @property
    def np_dtype(self):
        return np_dtype_of(self.dtype)

    @property
    def scale(self) -> float:
        return 1.0 / float(np.sqrt(self.head_dim))


def categories_of(case: str, num_heads: int) -> tuple[str, ...]:
    return mixed_layer(num_heads) if case == MIXED else (case,) * num_heads


def compiled_node(shape: OpShape, case: str, lowering: str = "fast") -> onnx.ModelProto:
    cfg = AttentionConfig(shape.num_heads, shape.kv_num_heads, shape.head_dim, shape.scale, categories_of(case, shape.num_heads),
                          qkv_format="BSD", dtype=shape.dtype, image_blocks=int(shape.image_blocks))
    return single_node_model(cfg, lowering)


def dense_baseline(shape: OpShape) -> onnx.ModelProto:
    """The dense answer the node is timed against: causal GroupQueryAttention,
    or with image blocks the all-dense node with the blocks."""
    if shape.image_blocks:
        return compiled_node(shape, "dense")
    return causal_gqa(shape)


def causal_gqa(shape: OpShape) -> onnx.ModelProto:
    """Causal GroupQueryAttention over a whole prefill, BSD inputs (what the node gets)."""
    H, Hkv, D = shape.num_heads, shape.kv_num_heads, shape.head_dim
    nodes = [
        helper.make_node("Shape", ["query"], ["s"], start=1, end=2),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        helper.make_node("Sub", ["s", "one"], ["s1"]),
        helper.make_node("Cast", ["s1"], ["seqlens"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["s"], ["s0"]),
        helper.make_node("Cast", ["s0"], ["total"], to=TensorProto.INT32),
        helper.make_node(
            "GroupQueryAttention", ["query", "key", "value", "", "", "seqlens", "total"], ["output"],
            domain=MS_DOMAIN, num_heads=H, kv_num_heads=Hkv, scale=shape.scale,
        ),
    ]
    f = shape.elem_type
    graph = helper.make_graph(
        nodes, "dense_gqa",
        [helper.make_tensor_value_info("query", f, [1, "S", H * D]), helper.make_tensor_value_info("key", f, [1, "S", Hkv * D]),
         helper.make_tensor_value_info("value", f, [1, "S", Hkv * D])],
        [helper.make_tensor_value_info("output", f, [1, "S", H * D])],
    )
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])


def feeds_for(shape: OpShape, template: Template, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    S = template.seq_len

    def x(heads):
        return rng.standard_normal((1, S, heads * shape.head_dim), dtype=np.float32).astype(shape.np_dtype)

    return {"query": x(shape.num_heads), "key": x(shape.kv_num_heads), "value": x(shape.kv_num_heads), "image_spans": template.spans}


def flop_bound(case: str, shape: OpShape, template: Template) -> float:
    spans, S = template.spans, template.seq_len
    cats = categories_of(case, shape.num_heads)
    blocks = shape.image_blocks
    dense = attention_pairs("dense", spans, S, image_blocks=blocks) * len(cats)
    return dense / sum(attention_pairs(c, spans, S, image_blocks=blocks) for c in cats)


def _child() -> None:
    """Peak RSS of one variant in a fresh process (see timing.measure_in_child)."""
    args = json.loads(sys.stdin.read())
    shape, template = OpShape(**args["shape"]), Template(**args["template"])
    feeds = feeds_for(shape, template)
    variants = {"baseline": dense_baseline, "causal_gqa": causal_gqa}
    variant = args["variant"]
    native = variant.startswith("native:")
    case = variant.removeprefix("native:")
    model = variants[case](shape) if case in variants else compiled_node(shape, case)
    sess = session(model, args["threads"], provider=args.get("provider", "cpu"), native=native)
    names = {i.name for i in sess.get_inputs()}
    reset_peak_rss()
    sess.run(None, {k: v for k, v in feeds.items() if k in names})
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    _child()


KERNEL_CLASSES = {
    "GroupQueryAttention": "attention kernel (GQA)",
    "MatMul": "MatMul", "FusedMatMul": "MatMul",
    "Softmax": "softmax + bias", "Add": "softmax + bias", "Where": "softmax + bias",
    "Gather": "copies (gather/concat/transpose)", "Concat": "copies (gather/concat/transpose)",
    "Transpose": "copies (gather/concat/transpose)", "Reshape": "copies (gather/concat/transpose)",
    "GatherElements": "copies (gather/concat/transpose)",
}


def breakdown(model: onnx.ModelProto, feeds: dict, threads: int, runs: int = 2, provider: str = "cpu") -> dict[str, float]:
    """Milliseconds per kernel class of one run (ORT profiler, If bodies included):
    where the time goes beyond the FLOPs."""
    from blindsight.runtime.placement import profiled_runs

    events = profiled_runs(model, feeds, provider=provider, threads=threads, runs=runs + 1, log_severity=3)
    total: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op in ("If", "Loop", "Scan"):
            continue  # their bodies are reported node by node
        cls = KERNEL_CLASSES.get(op, "other")
        total[cls] = total.get(cls, 0.0) + e["dur"] / 1000.0
    # the first run fills the arena; count the last `runs`
    return {k: v / (runs + 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
