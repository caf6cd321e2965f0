"""Node placement from ONNX Runtime's profiler: which provider ran each node,
and which nodes fell back to the CPU when a GPU provider was asked for."""

import numpy as np

from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.runtime.placement import node_placement, parse_profile


def _feeds():
    rng = np.random.default_rng(0)
    f = {n: rng.standard_normal((1, h, 20, 8)).astype(np.float32) for n, h in (("query", 4), ("key", 2), ("value", 2))}
    f["image_spans"] = np.array([[3, 9], [11, 16]], dtype=np.int64)
    return f


def test_a_cpu_run_places_every_node_on_the_cpu_and_reports_no_fallback():
    cfg = AttentionConfig(4, 2, 8, 0.3, ("dense", "sink", "intra", "intra_sink"))
    p = node_placement(single_node_model(cfg, "fast"), _feeds(), "cpu")
    assert set(p.nodes) == {"CPUExecutionProvider"}
    ops = {op for _, op in p.nodes["CPUExecutionProvider"]}
    assert {"GroupQueryAttention", "Softmax"} <= ops  # function bodies and their branches are inlined
    assert p.fallbacks == [] and "fell back" not in p.summary()


def _event(name, op, provider):
    return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": provider}}


def test_fallbacks_are_the_cpu_nodes_of_a_gpu_run():
    events = [_event("attn/gqa", "GroupQueryAttention", "CUDAExecutionProvider"),
              _event("attn/shape", "Shape", "CPUExecutionProvider"),
              _event("attn/softmax", "Softmax", "CPUExecutionProvider"),
              {"cat": "Session", "name": "model_run", "args": {}},
              _event("attn/softmax", "Softmax", "CPUExecutionProvider")]  # a second run of the same node
    p = parse_profile(events, "cuda")
    assert p.fallbacks == [("attn/shape", "Shape"), ("attn/softmax", "Softmax")]
    s = p.summary()
    assert "1 on CUDAExecutionProvider" in s and "2 fell back to the CPU" in s and "Softmax x1" in s and "attn/softmax" in s
    assert p.to_dict()["cpu_fallbacks"] == [{"name": "attn/shape", "op_type": "Shape"}, {"name": "attn/softmax", "op_type": "Softmax"}]


def test_asking_for_a_gpu_and_running_on_the_cpu_reports_every_node():
    cfg = AttentionConfig(4, 2, 8, 0.3, ("sink",) * 4)
    p = node_placement(single_node_model(cfg, "fast"), _feeds(), "cpu")
    p.requested = "cuda"  # as if the CUDA provider had handed everything back
    assert len(p.fallbacks) == len(p.nodes["CPUExecutionProvider"]) > 0
