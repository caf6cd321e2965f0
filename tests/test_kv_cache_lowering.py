"""Single BlindSightAttention nodes with a KV cache (query length < key length):
both lowerings equal the numpy docs/specification.md §2 reference with queries at absolute
positions past..past+Sq-1."""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import category_lists, node_session, run, templates
from blindsight.passes.lowering.single_node import single_node_model
from blindsight.attention.schema import AttentionConfig
from blindsight.attention import reference_attention

D = 8


def _model_mask(batch, past, q_len, window):
    kv = past + q_len
    q_pos = np.arange(past, kv)[:, None]
    k_pos = np.arange(kv)[None, :]
    keep = k_pos <= q_pos
    if window > 0:
        keep &= k_pos > q_pos - window
    return np.broadcast_to(keep, (batch, 1, q_len, kv)).copy()


def _check(cfg, spans, past, q_len, batch, seed):
    rng = np.random.default_rng(seed)
    kv = past + q_len
    H, Hkv = cfg.num_heads, cfg.kv_num_heads
    q = rng.standard_normal((batch, H, q_len, D), dtype=np.float32)
    k = rng.standard_normal((batch, Hkv, kv, D), dtype=np.float32)
    v = rng.standard_normal((batch, Hkv, kv, D), dtype=np.float32)
    mask = _model_mask(batch, past, q_len, max(cfg.local_window_size, 0))
    feeds = dict(query=q, key=k, value=v, image_spans=spans)
    if cfg.qkv_format == "BSD":
        feeds.update({n: x.transpose(0, 2, 1, 3).reshape(batch, x.shape[2], -1) for n, x in (("query", q), ("key", k), ("value", v))})
    if cfg.mask_type == "bool":
        feeds["attn_mask"] = mask
    elif cfg.mask_type == "float":
        feeds["attn_mask"] = np.where(mask, 0.0, -np.inf).astype(np.float32)
    want = reference_attention(q, k, v, spans, cfg.categories, sink_tokens=cfg.sink_tokens, scale=cfg.scale, model_mask=mask)
    for lowering in ("reference", "fast"):
        got = run(node_session(cfg, lowering), feeds)[0]
        if cfg.qkv_format == "BSD":
            got = got.reshape(batch, q_len, H, D).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{lowering} lowering, past {past}, {cfg}")


@pytest.mark.parametrize("mask_type,is_causal,window,fmt", [
    ("float", 0, -1, "BNSH"),
    ("bool", 0, -1, "BNSH"),
    ("none", 1, -1, "BNSH"),
    ("float", 0, 5, "BNSH"),
    ("none", 1, 4, "BSD"),
])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cached_queries_equal_numpy_reference(mask_type, is_causal, window, fmt, data):
    spans, seq = data.draw(templates(max_images=4, max_len=6))
    seq = max(seq, 2)
    q_len = data.draw(st.integers(1, min(seq - 1, 3)))  # past >= 1: prefills are test_lowering_single_node's
    past = seq - q_len
    hkv = data.draw(st.sampled_from([1, 2, 4]))
    cfg = AttentionConfig(
        num_heads=4, kv_num_heads=hkv, head_size=D, scale=float(data.draw(st.sampled_from([D ** -0.5, 0.2]))),
        categories=tuple(data.draw(category_lists(4))), sink_tokens=data.draw(st.integers(1, 2)),
        is_causal=is_causal, local_window_size=window, qkv_format=fmt, mask_type=mask_type,
    )
    _check(cfg, spans, past, q_len, batch=data.draw(st.integers(1, 2)), seed=data.draw(st.integers(0, 99)))


def test_decode_step_inside_an_image_and_after_the_last():
    """A query that is itself an image token at past > 0 (a chunked prefill) and
    a text query after every image: both follow docs/specification.md §2 by absolute position."""
    cfg = AttentionConfig(num_heads=4, kv_num_heads=2, head_size=D, scale=D ** -0.5,
                          categories=("dense", "sink", "intra", "intra_sink"), is_causal=0, mask_type="float")
    spans = np.array([[2, 7], [9, 15]], dtype=np.int64)
    for past, q_len in ((10, 2), (12, 4), (15, 1), (16, 1)):
        _check(cfg, spans, past, q_len, batch=1, seed=past)


def test_chunk_image_rows_never_read_keys_their_category_hides():
    """In a KV-cache chunk, image queries of sparse heads skip the keys of earlier
    images (their sinks aside): NaN in those keys reaches none of their outputs,
    where a dense compute under a mask (the reference lowering) multiplies the
    NaN values by zero probabilities. Text queries still read every key."""
    cfg = AttentionConfig(num_heads=4, kv_num_heads=2, head_size=D, scale=D ** -0.5,
                          categories=("sink", "intra", "intra_sink", "sink"), is_causal=1, mask_type="none")
    spans = np.array([[2, 7], [9, 15], [17, 23]], dtype=np.int64)
    past, q_len = 15, 8  # rows 15, 16 text, 17..22 the third image
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, q_len, D), dtype=np.float32)
    k = rng.standard_normal((1, 2, past + q_len, D), dtype=np.float32)
    v = rng.standard_normal((1, 2, past + q_len, D), dtype=np.float32)
    hidden = [3, 4, 5, 6, 10, 11, 12, 13, 14]  # non-sink tokens of the first two images
    want = reference_attention(q, k, v, spans, cfg.categories, scale=cfg.scale,
                               model_mask=_model_mask(1, past, q_len, 0))[:, :, 2:]
    k[:, :, hidden], v[:, :, hidden] = np.nan, np.nan
    feeds = dict(query=q, key=k, value=v, image_spans=spans)
    fast = run(node_session(cfg, "fast"), feeds)[0]
    np.testing.assert_allclose(fast[:, :, 2:], want, atol=1e-5, rtol=0)
    assert np.isnan(fast[:, :, :2]).all()  # text rows attend densely, the hidden keys included
    assert np.isnan(run(node_session(cfg, "reference"), feeds)[0][:, :, 2:]).all()


def test_fast_function_has_a_prefill_branch_and_a_cached_branch():
    cfg = AttentionConfig(num_heads=4, kv_num_heads=2, head_size=D, scale=D ** -0.5,
                          categories=("intra",) * 4, mask_type="float", is_causal=0)
    model = single_node_model(cfg, "fast")
    onnx.checker.check_model(model)
    body = model.functions[0]
    ifs = [n for n in body.node if n.op_type == "If"]
    assert len(ifs) == 1
    branches = {a.name: _op_types(a.g) for a in ifs[0].attribute}
    assert "GroupQueryAttention" in branches["then_branch"]  # the fast body still runs the prefill
    assert "GroupQueryAttention" not in branches["else_branch"]
    # KV-cache steps: text queries (decode) and chunks with image tokens (their key sets) branch apart
    inner = [n for n in ifs[0].attribute if n.name == "else_branch"][0].g
    (cached,) = [n for n in inner.node if n.op_type == "If"]
    gathers = {a.name: sum(m.op_type == "Gather" for m in a.g.node) for a in cached.attribute}
    assert gathers["then_branch"] == 0  # the decode route reads the cache in place
    assert gathers["else_branch"] > 0  # the image route gathers its key sets


def test_decode_with_padding_and_gemma3_blocks():
    """Decode steps of text after images in a batch with left padding, and with
    Gemma 3's image blocks (the model mask carries them; text queries stay causal)."""
    from blindsight.attention.spans import block_ids

    spans = np.array([[2, 7], [9, 15]], dtype=np.int64)
    for blocks in (0, 1):
        for past, q_len in ((15, 1), (16, 1), (16, 3)):
            kv = past + q_len
            cfg = AttentionConfig(num_heads=4, kv_num_heads=2, head_size=D, scale=D ** -0.5,
                                  categories=("dense", "sink", "intra", "intra_sink"), is_causal=0, mask_type="bool",
                                  image_blocks=blocks)
            rng = np.random.default_rng(past + 7 * q_len + blocks)
            q = rng.standard_normal((2, 4, q_len, D), dtype=np.float32)
            k = rng.standard_normal((2, 2, kv, D), dtype=np.float32)
            v = rng.standard_normal((2, 2, kv, D), dtype=np.float32)
            mask = _model_mask(2, past, q_len, 0)
            if blocks:
                b = block_ids(spans, kv)
                same = (b[past:, None] == b[None, :]) & (b[past:, None] >= 0)
                mask |= same[None, None]
            mask[1, :, :, :2] = False  # row 1 left-padded by two tokens
            want = reference_attention(q, k, v, spans, cfg.categories, scale=cfg.scale, model_mask=mask)
            feeds = dict(query=q, key=k, value=v, image_spans=spans, attn_mask=mask)
            for lowering in ("reference", "fast"):
                got = run(node_session(cfg, lowering), feeds)[0]
                np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{lowering}, past {past}, blocks {blocks}")


def _op_types(graph):
    ops = set()
    for n in graph.node:
        ops.add(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops |= _op_types(a.g)
    return ops
