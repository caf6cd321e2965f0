"""bs-quantize: int8 weights, checked against onnxruntime's own quantize_dynamic, numpy and the float model."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from blindsight.compiler.pipeline import compile_model
from blindsight.compiler.quantize import quantize_export, quantize_file
from blindsight.compiler.quantize_cli import main as quantize_main
from blindsight.errors import ModelError
from blindsight.passes.quantize import quantize_columns
from blindsight.profile import Profile


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _lm_feeds(sess, seq=9, seed=0):
    """The tiny Qwen2-VL prefill export's inputs: embeddings, M-RoPE positions, a full mask."""
    rng = np.random.default_rng(seed)
    hidden = sess.get_inputs()[0].shape[-1]
    assert [i.name for i in sess.get_inputs()] == ["inputs_embeds", "position_ids", "attention_mask"]
    return {"inputs_embeds": rng.standard_normal((1, seq, hidden)).astype(np.float32),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (3, 1, 1)),
            "attention_mask": np.ones((1, seq), np.int64)}


def test_columns_round_trip_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 12)).astype(np.float32) * np.linspace(0.01, 3, 12, dtype=np.float32)
    w[:, 5] = 0.0
    q, scale = quantize_columns(w)
    assert q.dtype == np.int8 and scale.shape == (12,)
    assert np.abs(q).max() <= 127 and (q[:, 5] == 0).all()
    nonzero = [c for c in range(12) if c != 5]
    assert (np.abs(q[:, nonzero]).max(axis=0) == 127).all(), "each column's largest weight maps to +-127"
    assert (np.abs(w - q * scale) <= scale / 2 + 1e-7).all()


def test_language_model_equals_onnxruntime_quantize_dynamic(exported, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = exported("qwen2_vl", "eager")
    mine = quantize_file(src, tmp_path / "mine.onnx").output
    proto = onnx.load(str(src))
    outputs = {o.name for o in proto.graph.output}
    head = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.output[0] in outputs]
    assert len(head) == 1
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(src, theirs, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=head, extra_options={"MatMulConstBOnly": True})
    s_mine, s_theirs, s_float = _session(mine), _session(theirs), _session(src)
    feeds = _lm_feeds(s_float)
    got, want, ref = (s.run(["logits"], feeds)[0] for s in (s_mine, s_theirs, s_float))
    np.testing.assert_array_equal(got, want)
    assert 0 < np.abs(got - ref).max() < 0.1 * np.abs(ref).max(), "int8 moves the logits a little, not a lot"
    inits = {i.name for i in proto.graph.initializer}
    weighted = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert _ops(mine).count("MatMulInteger") == len(weighted) - 1 == 14  # 2 layers x (q, k, v, o, gate, up, down)
    quantized = onnx.load(str(mine))
    left = [n for n in quantized.graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in quantized.graph.initializer}]
    assert [n.output[0] for n in left] == ["logits"], "the LM head stays float32"


def test_lm_head_int8_equals_quantize_dynamic_on_every_matmul(exported, tmp_path):
    """--lm-head int8: the LM head too, as quantize_dynamic with nothing excluded; logits stay the graph output."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = exported("qwen2_vl", "eager")
    mine = quantize_file(src, tmp_path / "mine.onnx", lm_head=True)
    assert mine.lm_head and "LM head int8" in mine.summary()
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(src, theirs, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})
    s_mine, s_theirs, s_float = _session(mine.output), _session(theirs), _session(src)
    assert [o.name for o in s_mine.get_outputs()] == [o.name for o in s_float.get_outputs()]
    feeds = _lm_feeds(s_float)
    got, want, ref = (s.run(["logits"], feeds)[0] for s in (s_mine, s_theirs, s_float))
    np.testing.assert_array_equal(got, want)
    head_only = _session(quantize_file(src, tmp_path / "body.onnx").output).run(["logits"], feeds)[0]
    assert np.abs(got - head_only).max() > 0, "the LM head's weights changed the logits"
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    quantized = onnx.load(str(mine.output))
    inits = {i.name for i in quantized.graph.initializer}
    assert _ops(mine.output).count("MatMulInteger") == 15  # 2 layers x 7 and the LM head
    assert not [n for n in quantized.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _dynamic_quantize_linear(x):
    """ONNX DynamicQuantizeLinear, from its specification."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int64), scale, int(zero)


def test_gemm_with_transposed_weight_and_bias_against_numpy(tmp_path):
    """A Gemm with transB and a bias, and a MatMul reading the same (tied) weight untransposed."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 16)).astype(np.float32)
    b = rng.standard_normal((4, 10)).astype(np.float32)
    w = rng.standard_normal((10, 16)).astype(np.float32)  # stored [N, K] for the Gemm, as linear layers export
    c = rng.standard_normal(10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w", "c"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"]),
         helper.make_node("MatMul", ["b", "w"], ["t"]), helper.make_node("Relu", ["t"], ["z"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 16]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    src = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = quantize_file(src).output
    assert out.name == "gemm.int8.onnx" and "Gemm" not in _ops(out) and _ops(out).count("MatMulInteger") == 2
    y, z = _session(out).run(None, {"a": a, "b": b})
    for got, x, matrix, bias in ((y, a, w.T, c), (z, b, w, 0)):
        x_q, x_scale, x_zero = _dynamic_quantize_linear(x)
        w_q, w_scale = quantize_columns(matrix)
        want = np.maximum((x_q - x_zero) @ w_q.astype(np.int64) * (x_scale * w_scale) + bias, 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        exact = np.maximum(x @ matrix + bias, 0)
        assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()


def test_external_data_is_written_beside_the_output_and_links(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
                              [numpy_helper.from_array(w, "w")])
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src),
              save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out = quantize_file(src, tmp_path / "out" / "m.int8.onnx").output
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.int8.onnx", "m.int8.onnx.data"]
    a = rng.standard_normal((5, 64)).astype(np.float32)
    got = _session(out).run(None, {"a": a})[0]
    exact = np.maximum(a @ w, 0)
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()

    # a second hard link to the weights (as bs-compile --genai makes): read, the same result
    os.link(src.with_name("m.onnx.data"), tmp_path / "elsewhere.data")
    assert os.stat(src.with_name("m.onnx.data")).st_nlink == 2
    linked = quantize_file(src, tmp_path / "linked" / "m.int8.onnx").output
    np.testing.assert_array_equal(_session(linked).run(None, {"a": a})[0], got)

    # weights reached through a symbolic link out of the model's folder: refused, nothing written
    away = tmp_path / "away"
    away.mkdir()
    shutil.copy2(src, away / "m.onnx")
    (away / "m.onnx.data").symlink_to(src.with_name("m.onnx.data"))
    rc, _, err = _cli([str(away / "m.onnx"), "-o", str(tmp_path / "sym" / "m.onnx")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "outside its folder" in lines[0]
    assert not (tmp_path / "sym").exists() or not any((tmp_path / "sym").iterdir())


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm

    root = tmp_path_factory.mktemp("quantize_export")
    out = export_vlm(make_tiny_checkpoint("qwen2_vl", root / "checkpoint"), root / "export").out_dir
    kv = json.loads((out / "template.json").read_text())["num_kv_heads"]
    compile_model(out / "language_model.onnx", Profile.uniform("dense", 2, 4, num_kv_heads=kv),
                  out / "language_model.blindsight.onnx")
    return root, out, kv


def test_export_directory_runs_and_compiles(tiny_export):
    from PIL import Image

    from blindsight.runtime.pipeline import Pipeline

    root, src, kv = tiny_export
    result = quantize_export(src, root / "int8")
    out = result.output
    template = json.loads((out / "template.json").read_text())
    assert template["quantized"]["scheme"] == "int8-dynamic"
    assert template["quantized"]["graphs"] == result.graphs and all(n > 0 for n in result.graphs.values())
    assert "MatMulInteger" in _ops(out / "vision.onnx") and "MatMulInteger" in _ops(out / "language_model.onnx")
    assert (out / "embed.onnx").read_bytes() == (src / "embed.onnx").read_bytes()
    assert result.left_out == ["language_model.blindsight.onnx"] and not (out / "language_model.blindsight.onnx").exists()

    compiled = compile_model(out / "language_model.onnx", Profile.uniform("dense", 2, 4, num_kv_heads=kv),
                             out / "language_model.blindsight.onnx").output
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((56, 56), Image.NEAREST)
              for _ in range(2)]
    raw = Pipeline(out, compiled="dense", threads=2)
    prompt = raw.prompts.build(images, "compare <image> with <image>")
    want = raw.generate_from(prompt, 6)
    got = Pipeline(out, compiled=compiled, threads=2).generate_from(raw.prompts.build(images, "compare <image> with <image>"), 6)
    assert got.token_ids == want.token_ids, "the compile of the int8 export computes what the int8 export computes"

    f32 = Pipeline(src, compiled="dense", threads=2)
    p32 = f32.prompts.build(images, "compare <image> with <image>")
    feats32 = f32.image_features(p32)
    feats8 = raw.image_features(raw.prompts.build(images, "compare <image> with <image>"))
    assert feats8.shape == feats32.shape
    assert 0 < np.abs(feats8 - feats32).max() < 0.1 * np.abs(feats32).max()


def test_cli_lm_head_int8_reaches_the_language_model_only(tiny_export, tmp_path):
    """bs-quantize DIR --lm-head int8: the language model's head is int8, the vision tower's output projection is not."""
    root, src, _ = tiny_export

    def weighted_float_matmuls(path):
        proto = onnx.load(str(path))
        inits = {i.name: i for i in proto.graph.initializer}
        return [n.output[0] for n in proto.graph.node
                if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits
                and inits[n.input[1]].data_type == TensorProto.FLOAT]

    rc, out, err = _cli([str(src), "-o", str(tmp_path / "all"), "--lm-head", "int8"])
    assert rc == 0, err
    assert "LM head int8" in out
    template = json.loads((tmp_path / "all" / "template.json").read_text())
    assert template["quantized"]["lm_head"] == "int8"
    assert "logits" in weighted_float_matmuls(src / "language_model.onnx")
    assert weighted_float_matmuls(tmp_path / "all" / "language_model.onnx") == []
    vision_outputs = {o.name for o in onnx.load(str(src / "vision.onnx"), load_external_data=False).graph.output}
    kept = weighted_float_matmuls(tmp_path / "all" / "vision.onnx")
    assert kept and set(kept) <= vision_outputs


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = quantize_main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_refusals_are_one_line_and_write_nothing(tiny_export, tmp_path):
    root, src, _ = tiny_export
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        ([str(src)], "-o OUT_DIR"),
        ([str(src), "-o", str(busy)], "--overwrite"),
        ([str(src), "-o", str(src)], "is the export or inside it"),
        ([str(src), "-o", str(src / "inside")], "is the export or inside it"),
        ([str(tmp_path / "none.onnx")], "not found"),
        ([str(src / "language_model.onnx"), "-o", str(src / "language_model.onnx")], "is the input model"),
        ([str(src / "embed.onnx"), "-o", str(tmp_path / "e.onnx")], "nothing to quantize"),
    ]
    for argv, words in cases:
        rc, _, err = _cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]

    rc, out, _ = _cli([str(src), "-o", str(busy), "--overwrite"])
    assert rc == 0 and "int8 weights" in out and not (busy / "keep.txt").exists()
    rc, _, err = _cli([str(busy), "-o", str(tmp_path / "again")])
    assert rc == 2 and "already quantized" in err and not (tmp_path / "again").exists()


def test_fp16_export_is_refused_with_the_fix(exports, tmp_path):
    from blindsight.models.configs import tiny_config
    from blindsight.models.export import export_language_model

    src = export_language_model("qwen2_vl", "eager", tmp_path / "lm16.onnx", config=tiny_config("qwen2_vl"), dtype="fp16")
    with pytest.raises(ModelError, match="not float32.*fp32"):
        quantize_file(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
