"""Op-level benchmark: one BlindSightAttention node (fast lowering) against
ONNX Runtime's fastest dense causal attention, ``GroupQueryAttention``, for
the same shapes (docs/specification.md §5, §6). With Gemma 3's image blocks the causal kernel
is not exact dense attention; the baseline becomes the all-dense node with
the blocks (the exact dense answer), and the causal kernel is timed beside it
for reference."""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from blindsight.bench.timing import interleaved, measure_in_child, peak_rss_mb, reset_peak_rss, session
from blindsight.flops import Template, attention_pairs
from blindsight.attention import CATEGORIES
from blindsight.attention.schema import AttentionConfig, elem_type_of, np_dtype_of
from blindsight.passes.lowering.builder import MS_DOMAIN, OPSET
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.profile import MIXED, mixed_layer

CATEGORY_CASES = (*CATEGORIES, MIXED)  # MIXED: the mixed layer (profile.mixed_layer)


@dataclass(frozen=True)
class OpShape:
    num_heads: int = 28
    kv_num_heads: int = 4
    head_dim: int = 128
    dtype: str = "float32"  # of Q/K/V and the output (the attention's dtype)
    image_blocks: bool = False  # Gemma 3's bidirectional image blocks (docs/specification.md §2)

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
    """Causal GroupQueryAttention over a whole prefill, BSD inputs (what the node gets),
    with an empty past and present buffers of the prompt's length, as a decoder
    (onnxruntime-genai's) runs it: on onnxruntime 1.32's CPU provider that path
    took half the time of the same node without cache outputs (2B and 7B
    shapes, 4K-16K tokens, docs/benchmarks.md)."""
    H, Hkv, D = shape.num_heads, shape.kv_num_heads, shape.head_dim
    zero = helper.make_tensor("zero", shape.elem_type, [1], np.zeros(1, shape.np_dtype).tobytes(), raw=True)
    nodes = [
        helper.make_node("Shape", ["query"], ["s"], start=1, end=2),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        helper.make_node("Sub", ["s", "one"], ["s1"]),
        helper.make_node("Cast", ["s1"], ["seqlens"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["s"], ["s0"]),
        helper.make_node("Cast", ["s0"], ["total"], to=TensorProto.INT32),
        # past buffers [1, kv_heads, S, head_dim] of zeros: none of it is read (seqlens says S new tokens)
        helper.make_node("Constant", [], ["b_kv"], value=helper.make_tensor("b_kv", TensorProto.INT64, [2], [1, Hkv])),
        helper.make_node("Constant", [], ["d"], value=helper.make_tensor("d", TensorProto.INT64, [1], [D])),
        helper.make_node("Concat", ["b_kv", "s", "d"], ["past_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["past_shape"], ["past"], value=zero),
        helper.make_node(
            "GroupQueryAttention", ["query", "key", "value", "past", "past", "seqlens", "total"],
            ["output", "present_key", "present_value"],
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


def run(sizes, cases, threads, repeats, memory, bar, explain=False, dtype="float32", provider="cpu",
              image_blocks=False, native=False) -> list[dict]:
    """bs-bench --level op: each category case against the dense baseline at each
    N x L of ``sizes``, interleaved; one row each."""
    shape = OpShape(dtype=dtype, image_blocks=image_blocks)
    out = []
    for n, l in sizes:
        t = Template(n, l)
        feeds = feeds_for(shape, t)
        plain = {k: v for k, v in feeds.items() if k != "image_spans"}
        # with image blocks three sessions are alive at once (the causal GQA's arena alone
        # holds about 8 GB at 8K tokens): without arenas each run frees what it took
        arena = not image_blocks
        base = session(dense_baseline(shape), threads, provider=provider, arena=arena)
        base_feeds = feeds if image_blocks else plain
        # with image blocks the causal kernel (not exact there) is timed beside, for reference
        gqa = session(causal_gqa(shape), threads, provider=provider, arena=False) if image_blocks else None
        med, base_med, gqa_med, nat_med, why = {}, {}, {}, {}, {}
        for c in cases:
            # one compiled session at a time beside the baseline: at 8K tokens a
            # GroupQueryAttention arena alone holds S x S scores per head (GBs)
            s = session(compiled_node(shape, c), threads, provider=provider, arena=arena)
            runs = {"baseline": lambda base=base: base.run(None, base_feeds), c: lambda s=s: s.run(None, feeds)}
            if gqa is not None:
                runs["causal_gqa"] = lambda gqa=gqa: gqa.run(None, plain)
            if native:  # the same node on the native kernel, in the same loop
                sn = session(compiled_node(shape, c), threads, provider=provider, native=True, arena=arena)
                runs["native"] = lambda sn=sn: sn.run(None, feeds)
            pair = interleaved(runs, repeats, progress=bar)
            med[c], base_med[c], gqa_med[c] = pair[c], pair["baseline"], pair.get("causal_gqa")
            if native:
                nat_med[c] = pair["native"]
                del sn
            del s
            if explain:
                why[c] = breakdown(compiled_node(shape, c), feeds, threads, provider=provider)
            gc.collect()
        del base, gqa
        gc.collect()
        mem = {}
        if memory:
            for v in ["baseline", *cases, *([f"native:{c}" for c in cases] if native else [])]:
                mem[v] = measure_in_child("blindsight.bench.op", {"variant": v, "threads": threads, "shape": vars(shape), "provider": provider,
                                                                  "template": {"num_images": n, "image_len": l}})["peak_rss_mb"]
                bar.update(1)
        for c in cases:
            speedup, bound = base_med[c] / med[c], flop_bound(c, shape, t)
            out.append({"category": c, "N": n, "L": l, "seq_len": t.seq_len, "dtype": dtype, "provider": provider,
                        "image_blocks": image_blocks,
                        "baseline": "all-dense BlindSightAttention, image blocks" if image_blocks else "GroupQueryAttention",
                        "speedup": speedup, "flop_bound": bound,
                        "efficiency": speedup / bound, "time_s": med[c], "baseline_s": base_med[c],
                        "peak_rss_mb": mem.get(c), "baseline_peak_rss_mb": mem.get("baseline")})
            if image_blocks:
                out[-1]["causal_gqa_s"] = gqa_med[c]
            if native:  # the native kernel against the same baseline runs and the function body
                ns = base_med[c] / nat_med[c]
                out[-1].update(native_s=nat_med[c], native_speedup=ns, native_efficiency=ns / bound,
                               native_vs_function_body=med[c] / nat_med[c], native_peak_rss_mb=mem.get(f"native:{c}"))
            if explain:
                out[-1]["breakdown_ms"] = why[c]
    return out
