"""The vision towers' attention on ONNX Runtime's fused kernel
(blindsight.passes.fused_attention): the rewritten graph gives the exported
graph's features for one image per call (the fused MultiHeadAttention runs) and
for several images in one call (the mask keeps patches apart: the chunked
fallback runs), for every family."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from _util import run, session
from blindsight import families
from blindsight.models.configs import FAMILIES

pytest.importorskip("torch")


def _calls(family, template, rng):
    """(one image, several images) feeds."""
    from blindsight.models.export_vision import qwen_vision_feeds

    v = template["vision"]
    if family == "gemma3":
        side = v["image_size"]
        return ({"pixel_values": rng.standard_normal((1, 3, side, side), dtype=np.float32)},
                {"pixel_values": rng.standard_normal((3, 3, side, side), dtype=np.float32)})
    width = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    calls = []
    for grid in ([[1, 8, 6]], [[1, 4, 4], [1, 8, 8], [1, 4, 6]]):
        grid = np.array(grid, dtype=np.int64)
        pixels = rng.standard_normal((int(grid.prod(-1).sum()), width), dtype=np.float32)
        calls.append(qwen_vision_feeds(family, v, pixels, grid))
    return calls


def _ops_run(path, feeds, tmp_path):
    """The output and the op types ONNX Runtime ran (its profile)."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "profile")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = s.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}})[0]
    events = json.loads(open(s.end_profiling()).read())
    return out, {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_tower_gives_the_exported_features(family, tmp_path):
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm
    from blindsight.passes.fused_attention import fuse_attention

    ckpt = make_tiny_checkpoint(family, tmp_path / "ckpt", seed=5)
    out = export_vlm(ckpt, tmp_path / "export", vision_query_rows=None).out_dir
    plain = out / "vision.onnx"
    softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(plain)).graph.node)
    template = json.loads((out / "template.json").read_text())
    model = ir.load(str(plain))
    fused, chunked = fuse_attention(model, rows=5)
    assert (fused, chunked) == (softmaxes, 0)
    path = tmp_path / "fused.onnx"
    ir.save(model, str(path))
    one, several = _calls(family, template, np.random.default_rng(2))
    windowed = families.get(family).windowed_vision
    for feeds, expect_fused in ((one, True), (several, family == "gemma3")):
        want = run(session(str(plain)), feeds)[0]
        got, ops = _ops_run(path, feeds, tmp_path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5)
        assert np.abs(want).max() > 1e-3
        # which path ran: the fused op for a mask that keeps every key, the chunks
        # otherwise (Qwen2.5-VL's window layers mask inside one image too)
        assert ("MultiHeadAttention" in ops) == expect_fused, ops
        assert ("Softmax" in ops) == (not expect_fused or windowed), ops


def test_bs_export_writes_the_fused_tower(tmp_path):
    """bs-export's default: every attention of the tower behind the fused op, with the
    chunked attention as the fallback, and no unchunked softmax left."""
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    ckpt = make_tiny_checkpoint("qwen2_vl", tmp_path / "ckpt", seed=5)
    graph = onnx.load(str(export_vlm(ckpt, tmp_path / "export").out_dir / "vision.onnx")).graph
    ifs = [n for n in graph.node if n.op_type == "If"]
    assert ifs and not [n for n in graph.node if n.op_type in ("Softmax", "Loop")]
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in branches["then_branch"].node].count("MultiHeadAttention") == 1
        assert [n.op_type for n in branches["else_branch"].node].count("Loop") == 1


def test_rows_must_be_positive():
    from blindsight.passes.fused_attention import fuse_attention

    with pytest.raises(ValueError, match="positive"):
        fuse_attention(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), rows=0)


def _attention_graph(dtype=onnx.TensorProto.FLOAT, scale_op="Mul"):
    """q [1, H, S, D], k^T [1, H, D, S], v, an additive mask [S, S]: MatMul, scaling
    by a constant, mask, Softmax, MatMul, as an exporter writes them."""
    from onnx import helper as h

    H, D = 2, 8
    c = 0.25 if scale_op == "Mul" else 4.0
    nodes = [h.make_node("MatMul", ["q", "kt"], ["s"]),
             h.make_node("Constant", [], ["c"], value=h.make_tensor("c", dtype, [], [c])),
             h.make_node(scale_op, ["s", "c"], ["s2"]),
             h.make_node("Add", ["s2", "mask"], ["s3"]),
             h.make_node("Softmax", ["s3"], ["p"], axis=-1),
             h.make_node("MatMul", ["p", "v"], ["o"])]
    info = h.make_tensor_value_info
    graph = h.make_graph(nodes, "attention", [info("q", dtype, [1, H, "s", D]), info("kt", dtype, [1, H, D, "s"]),
                                              info("v", dtype, [1, H, "s", D]), info("mask", dtype, ["s", "s"])],
                         [info("o", dtype, [1, H, "s", D])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(model)), 0.25  # the exporter's graphs carry shapes


@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_fused_attention_equals_numpy(scale_op, tmp_path):
    """Against numpy: the fused op where the mask is all zeros (its scale taken from
    the graph's constant), the chunks under a block-diagonal mask."""
    from blindsight.passes.fused_attention import fuse_attention

    model, scale = _attention_graph(scale_op=scale_op)
    assert fuse_attention(model, rows=3) == (1, 0)
    path = tmp_path / "fused.onnx"
    ir.save(model, str(path))
    rng = np.random.default_rng(0)
    S = 7
    q, v = rng.standard_normal((2, 1, 2, S, 8), dtype=np.float32)
    kt = rng.standard_normal((1, 2, 8, S), dtype=np.float32)
    seg = np.array([0, 0, 0, 1, 1, 1, 1])
    for mask, expect_fused in ((np.zeros((S, S), np.float32), True),
                               (np.where(seg[:, None] == seg[None], 0, -np.inf).astype(np.float32), False)):
        scores = (q @ kt) * scale + mask
        p = np.exp(scores - scores.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v
        got, ops = _ops_run(path, dict(q=q, kt=kt, v=v, mask=mask), tmp_path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert ("MultiHeadAttention" in ops) == expect_fused, ops


def test_bfloat16_attention_is_only_chunked():
    """ONNX Runtime's CPU provider has no bfloat16 MultiHeadAttention: such a tower
    keeps its chunks."""
    from blindsight.passes.fused_attention import fuse_attention

    model, _ = _attention_graph(onnx.TensorProto.BFLOAT16)
    assert fuse_attention(model, rows=3) == (0, 1)
    assert [n.op_type for n in model.graph].count("Loop") == 1
