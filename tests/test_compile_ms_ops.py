"""Graphs that already use com.microsoft MultiHeadAttention / GroupQueryAttention."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h

from _util import category_lists, run, session, templates
from blindsight.compiler.pipeline import compile_model
from blindsight.profile import Profile
from blindsight.attention import reference_attention

H, HKV, D = 4, 2, 8


def _graph(kind, path, window=-1):
    if kind == "gqa":
        node = h.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"], ["o"],
                           domain="com.microsoft", num_heads=H, kv_num_heads=HKV, scale=0.3, local_window_size=window)
        kv = HKV
        extra = [h.make_tensor_value_info("seqlens_k", T.INT32, ["B"]), h.make_tensor_value_info("total", T.INT32, [])]
    else:
        node = h.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft",
                           num_heads=H, scale=0.3, unidirectional=1)
        kv = H
        extra = []
    inputs = [h.make_tensor_value_info("q", T.FLOAT, ["B", "S", H * D]),
              h.make_tensor_value_info("k", T.FLOAT, ["B", "S", kv * D]),
              h.make_tensor_value_info("v", T.FLOAT, ["B", "S", kv * D])] + extra
    g = h.make_graph([node], "g", inputs, [h.make_tensor_value_info("o", T.FLOAT, ["B", "S", H * D])])
    onnx.save(h.make_model(g, ir_version=10, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]), str(path))
    return kv


def _feeds(rng, kv, seq, spans, lengths):
    q = rng.standard_normal((len(lengths), H, seq, D), dtype=np.float32)
    k = rng.standard_normal((len(lengths), kv, seq, D), dtype=np.float32)
    v = rng.standard_normal((len(lengths), kv, seq, D), dtype=np.float32)
    to3 = lambda x: x.transpose(0, 2, 1, 3).reshape(x.shape[0], seq, -1)
    feeds = dict(q=to3(q), k=to3(k), v=to3(v), image_spans=spans,
                 seqlens_k=np.array(lengths, np.int32) - 1, total=np.array(seq, np.int32))
    return feeds, (q, k, v)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_all_dense_equals_original(kind, tmp_path):
    kv = _graph(kind, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds, _ = _feeds(rng, kv, 20, np.array([[2, 9], [11, 16]]), [20])
    want = run(session(str(tmp_path / "m.onnx")), feeds)[0]
    compile_model(tmp_path / "m.onnx", Profile.uniform("dense", 1, H), tmp_path / "c.onnx")
    assert np.abs(run(session(str(tmp_path / "c.onnx")), feeds)[0] - want).max() <= 1e-5


def test_gqa_local_window_keeps_its_meaning(tmp_path):
    """ORT 1.31 GQA local_window_size w keeps the w keys q-w+1..q (measured); compiled, the window stays."""
    _graph("gqa", tmp_path / "m.onnx", window=3)
    feeds, _ = _feeds(np.random.default_rng(3), HKV, 20, np.array([[2, 9], [11, 16]]), [20])
    want = run(session(str(tmp_path / "m.onnx")), feeds)[0]
    for lowering in ("fast", "reference"):
        compile_model(tmp_path / "m.onnx", Profile.uniform("dense", 1, H), tmp_path / f"{lowering}.onnx", lowering)
        assert np.abs(run(session(str(tmp_path / f"{lowering}.onnx")), feeds)[0] - want).max() <= 1e-5, lowering


@pytest.mark.parametrize("kind", ["mha", "gqa"])
@settings(max_examples=12, deadline=None)
@given(template=templates(max_images=4), cats=category_lists(H), seed=st.integers(0, 999))
def test_random_profiles_against_numpy(kind, template, cats, seed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(kind)
    kv = _graph(kind, tmp / "m.onnx")
    spans, seq = template
    rng = np.random.default_rng(seed)
    batch_lengths = [seq, max(1, seq - 2)] if kind == "gqa" else [seq]  # GQA: a right-padded second row
    feeds, (q, k, v) = _feeds(rng, kv, seq, spans, batch_lengths)
    mask = np.tril(np.ones((seq, seq), bool))[None, None].repeat(len(batch_lengths), 0)
    for b, n in enumerate(batch_lengths):
        mask[b, :, :, n:] = False
    want = reference_attention(q, k, v, spans, cats, scale=0.3, model_mask=mask)
    for lowering in ("fast", "reference"):
        compile_model(tmp / "m.onnx", Profile([cats]), tmp / f"{lowering}.onnx", lowering)
        got = run(session(str(tmp / f"{lowering}.onnx")), feeds)[0]
        got = got.reshape(len(batch_lengths), seq, H, D).transpose(0, 2, 1, 3)
        for b, n in enumerate(batch_lengths):  # padded query rows are unspecified
            np.testing.assert_allclose(got[b, :, :n], want[b, :, :n], atol=1e-4, err_msg=lowering)
