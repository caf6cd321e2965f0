"""The vision towers' attention in query chunks (blindsight.passes.query_chunks):
the rewritten graph gives the exported graph's features, on several images in one
call (Qwen: a block-diagonal mask, sliced with its queries; Qwen2.5-VL: windows;
Gemma 3: no mask), with chunks that do not divide the patches."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from _util import run, session
from blindsight.models.configs import FAMILIES

pytest.importorskip("torch")


def _feeds(family, template, rng):
    from blindsight.models.export_vision import qwen_vision_feeds

    v = template["vision"]
    if family == "gemma3":
        return {"pixel_values": rng.standard_normal((3, 3, v["image_size"], v["image_size"]), dtype=np.float32)}
    grid = np.array([[1, 4, 4], [1, 8, 8], [1, 4, 6]], dtype=np.int64)
    width = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    return qwen_vision_feeds(family, v, rng.standard_normal((int(grid.prod(-1).sum()), width), dtype=np.float32), grid)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_chunks_give_the_exported_features(family, tmp_path):
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm
    from blindsight.passes.query_chunks import chunk_attention_queries

    ckpt = make_tiny_checkpoint(family, tmp_path / "ckpt", seed=5)
    out = export_vlm(ckpt, tmp_path / "export", vision_query_rows=None).out_dir
    plain = out / "vision.onnx"
    softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(plain)).graph.node)
    assert softmaxes >= 1
    template = json.loads((out / "template.json").read_text())
    feeds = _feeds(family, template, np.random.default_rng(2))
    want = run(session(str(plain)), feeds)[0]
    for rows in (1, 5, 4096):  # one query per chunk, a ragged last chunk, one chunk
        model = ir.load(str(plain))
        assert chunk_attention_queries(model, rows=rows) == softmaxes
        path = tmp_path / f"chunked{rows}.onnx"
        ir.save(model, str(path))
        graph = onnx.load(str(path)).graph
        assert not [n for n in graph.node if n.op_type == "Softmax"]
        assert sum(n.op_type == "Loop" for n in graph.node) == softmaxes
        got = run(session(str(path)), feeds)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-5, err_msg=f"rows {rows}")  # fp32 MatMul blocking
    assert np.abs(want).max() > 1e-3


def test_bs_export_writes_the_tower_in_query_chunks(tmp_path):
    """bs-export's chunked vision attention: every attention of the tower in chunks,
    nothing else changed."""
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    ckpt = make_tiny_checkpoint("qwen2_vl", tmp_path / "ckpt", seed=5)
    out = export_vlm(ckpt, tmp_path / "export", vision_attention="chunked").out_dir
    graph = onnx.load(str(out / "vision.onnx")).graph
    loops = [n for n in graph.node if n.op_type == "Loop"]
    assert loops and not [n for n in graph.node if n.op_type == "Softmax"]
    assert all(any(x.op_type == "Softmax" for x in n.attribute[0].g.node) for n in loops)


def test_rows_must_be_positive():
    from blindsight.passes.query_chunks import chunk_attention_queries

    with pytest.raises(ValueError, match="positive"):
        chunk_attention_queries(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), rows=0)
