"""fp16 and bf16 function bodies (docs/specification.md §4: the compiled graph keeps the source
dtype). fp16 runs on ONNX Runtime's CPU provider and is checked against the
numpy docs/specification.md §2 reference; bf16 has no CPU kernels for MatMul, Add, Where,
Softmax or GroupQueryAttention in onnxruntime 1.31 (measured), so its bodies
are checked structurally and by the ONNX checker only: they run on GPU
providers."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from _util import EDGE_IDS, EDGE_TEMPLATES, category_lists, node_session, run, templates
from blindsight.attention import CATEGORIES, reference_attention
from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.single_node import single_node_model

D = 8
# Tolerance of fp16 against the float64 reference computed from the same
# fp16-rounded inputs: fp16 keeps 11 significant bits (eps 2^-10 ~ 1e-3).
# Scores here are O(1-3) and outputs O(1): the scores, probabilities and the
# output are each rounded once or twice in fp16 (and MatMul/Softmax may
# accumulate in fp16), which stays below ~5 eps on these unit-scale values;
# 1e-2 absolute leaves headroom while a wrong key set (an error of O(0.1-1)
# on unit-variance values) still fails by far.
FP16_ATOL = 1e-2


def _inputs(rng, cfg, batch, q_len, kv_len):
    shapes = {"query": cfg.num_heads, "key": cfg.kv_num_heads, "value": cfg.kv_num_heads}
    lens = {"query": q_len, "key": kv_len, "value": kv_len}
    bnsh = {n: rng.standard_normal((batch, h, lens[n], D)).astype(np.float16) for n, h in shapes.items()}
    feeds = dict(bnsh)
    if cfg.qkv_format == "BSD":
        feeds = {n: x.transpose(0, 2, 1, 3).reshape(batch, x.shape[2], -1) for n, x in bnsh.items()}
    return feeds, bnsh


def _check(cfg, spans, seq, batch, seed, past=0, window_mask=False):
    rng = np.random.default_rng(seed)
    kv = past + seq
    feeds, bnsh = _inputs(rng, cfg, batch, seq, kv)
    q_pos, k_pos = np.arange(past, kv)[:, None], np.arange(kv)[None, :]
    mask = np.broadcast_to(k_pos <= q_pos, (batch, 1, seq, kv)).copy()
    if cfg.local_window_size > 0:
        mask &= k_pos > q_pos - cfg.local_window_size
    if cfg.mask_type == "bool":
        feeds["attn_mask"] = mask
    elif cfg.mask_type == "float":
        feeds["attn_mask"] = np.where(mask, 0.0, -np.inf).astype(np.float16)
    feeds["image_spans"] = spans
    want = reference_attention(*(bnsh[n].astype(np.float64) for n in ("query", "key", "value")), spans, cfg.categories,
                               sink_tokens=cfg.sink_tokens, scale=cfg.scale, model_mask=mask)
    for lowering in ("reference", "fast"):
        got = run(node_session(cfg, lowering), feeds)[0]
        assert got.dtype == np.float16
        if cfg.qkv_format == "BSD":
            got = got.reshape(batch, seq, cfg.num_heads, D).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got.astype(np.float64), want, atol=FP16_ATOL, rtol=0, err_msg=f"{lowering} lowering, {cfg}")


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("spans,seq", EDGE_TEMPLATES, ids=EDGE_IDS)
@pytest.mark.parametrize("fmt", ["BNSH", "BSD"])
def test_fp16_edge_templates(category, spans, seq, fmt):
    cfg = AttentionConfig(4, 2, D, 0.35, (category,) * 4, mask_type="none", qkv_format=fmt, dtype="float16")
    _check(cfg, np.array(spans, dtype=np.int64).reshape(-1, 2), seq, batch=1, seed=3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(), kv=st.sampled_from([(4, 2), (4, 4), (4, 1)]), cats=category_lists(4),
       sink_tokens=st.integers(1, 3), mask_type=st.sampled_from(["none", "bool", "float"]),
       fmt=st.sampled_from(["BNSH", "BSD"]), window=st.sampled_from([-1, 3]), batch=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_fp16_random_profiles_masks_windows_and_batches(template, kv, cats, sink_tokens, mask_type, fmt, window, batch, seed):
    spans, seq = template
    cfg = AttentionConfig(kv[0], kv[1], D, 0.3, tuple(cats), sink_tokens=sink_tokens, mask_type=mask_type,
                          qkv_format=fmt, local_window_size=window, dtype="float16")
    _check(cfg, spans, seq, batch=batch, seed=seed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fp16_kv_cache_steps(data):
    spans, seq = data.draw(templates(max_images=3, max_len=6))
    seq = max(seq, 2)
    q_len = data.draw(st.integers(1, min(seq - 1, 3)))
    cfg = AttentionConfig(4, 2, D, D ** -0.5, tuple(data.draw(category_lists(4))), is_causal=0,
                          mask_type=data.draw(st.sampled_from(["bool", "float"])), dtype="float16")
    _check(cfg, spans, q_len, batch=1, seed=data.draw(st.integers(0, 99)), past=seq - q_len)


def _float_types(graph, found):
    """Element types of every float constant, Cast target and declared value in a graph, recursively."""
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                found.add(("constant", a.t.data_type))
            if n.op_type == "Cast" and a.name == "to":
                found.add(("cast", a.i))
            if a.type == onnx.AttributeProto.GRAPH:
                for v in list(a.g.output) + list(a.g.input):
                    found.add(("value", v.type.tensor_type.elem_type))
                _float_types(a.g, found)
    return found


FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@pytest.mark.parametrize("dtype,elem", [("float16", TensorProto.FLOAT16), ("bfloat16", TensorProto.BFLOAT16)])
@pytest.mark.parametrize("lowering", ["fast", "reference"])
@pytest.mark.parametrize("mask_type,fmt,window", [("none", "BSD", -1), ("float", "BNSH", -1), ("bool", "BNSH", 4)])
def test_bodies_carry_no_float32(dtype, elem, lowering, mask_type, fmt, window):
    cfg = AttentionConfig(4, 2, D, 0.3, ("dense", "sink", "intra", "intra_sink"), mask_type=mask_type,
                          qkv_format=fmt, local_window_size=window, dtype=dtype)
    model = single_node_model(cfg, lowering)
    onnx.checker.check_model(model, full_check=True)
    found = set()
    for f in model.functions:
        _float_types(f, found)
    floats = {t for kind, t in found if t in FLOATS}
    assert floats == {elem}, f"float types in the {lowering} body: {sorted(floats)}"
    assert model.graph.output[0].type.tensor_type.elem_type == elem


def test_bf16_masked_value_is_finite_in_bf16():
    import ml_dtypes

    cfg = AttentionConfig(4, 2, D, 0.3, ("sink",) * 4, dtype="bfloat16")
    body = single_node_model(cfg, "fast").functions[0]
    found = []

    def walk(graph):
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.BFLOAT16:
                    found.append(float(onnx.numpy_helper.to_array(a.t)))
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(body)
    lowest = float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    assert min(found) < -1e30 and all(np.isfinite(found)) and min(found) > lowest


def _attention_model(elem):
    from onnx import helper

    shape = ["B", 2, "S", 8]  # GroupQueryAttention needs head_size % 8 == 0
    io = [helper.make_tensor_value_info(n, elem, shape) for n in ("q", "k", "v")]
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    graph = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("y", elem, shape)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23)])


def test_compiling_an_attention_dtype_the_op_does_not_take_is_one_line(tmp_path):
    src = tmp_path / "f64.onnx"
    onnx.save(_attention_model(TensorProto.DOUBLE), src)
    (tmp_path / "p.json").write_text('{"format": "blindsight-profile", "version": 1, "num_layers": 1, "num_heads": 2, "layers": [["dense", "sink"]]}')
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "blindsight.compiler.cli", str(src), "--profile", str(tmp_path / "p.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "double" in r.stderr and "float32, float16, bfloat16" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "f64.blindsight.onnx").exists()


def test_fp16_graph_compiles_to_fp16_bodies(tmp_path):
    from blindsight.compiler.pipeline import compile_model
    from blindsight.profile import Profile

    src = tmp_path / "f16.onnx"
    onnx.save(_attention_model(TensorProto.FLOAT16), src)
    out = compile_model(src, Profile([["sink", "intra"]]), tmp_path / "out.onnx").output
    model = onnx.load(out)
    floats = {t for f in model.functions for kind, t in _float_types(f, set()) if t in FLOATS}
    assert floats == {TensorProto.FLOAT16}
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)).astype(np.float16) for _ in range(3))
    spans = np.array([[2, 5], [6, 8]], dtype=np.int64)
    got = run(node_session_of(out), dict(q=q, k=k, v=v, image_spans=spans))[0]
    want = reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), spans, ("sink", "intra"), scale=8 ** -0.5)
    np.testing.assert_allclose(got.astype(np.float64), want, atol=FP16_ATOL)


def node_session_of(path):
    from _util import session

    return session(str(path))


def test_fast_lowering_refuses_a_head_size_gqa_cannot_take():
    from blindsight.errors import ModelError

    cfg = AttentionConfig(2, 2, 4, 0.5, ("intra", "dense"))  # head size 4
    with pytest.raises(ModelError, match="head size 4 is not a multiple of 8.*--lowering reference"):
        single_node_model(cfg, "fast")
    onnx.checker.check_model(single_node_model(cfg, "reference"))
