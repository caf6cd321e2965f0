"""fast == reference == numpy reference (docs/specification.md §2) on single-node graphs."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import EDGE_IDS, EDGE_TEMPLATES, category_lists, node_session, run, templates
from blindsight.attention.schema import AttentionConfig
from blindsight.attention import reference_attention

D = 8


def _feeds(rng, cfg, batch, seq, spans, mask):
    H, Hkv = cfg.num_heads, cfg.kv_num_heads
    q = rng.standard_normal((batch, H, seq, D), dtype=np.float32)
    k = rng.standard_normal((batch, Hkv, seq, D), dtype=np.float32)
    v = rng.standard_normal((batch, Hkv, seq, D), dtype=np.float32)
    feeds = dict(query=q, key=k, value=v, image_spans=spans)
    if cfg.qkv_format == "BSD":
        feeds.update({n: x.transpose(0, 2, 1, 3).reshape(batch, seq, -1) for n, x in (("query", q), ("key", k), ("value", v))})
    if cfg.mask_type == "bool":
        feeds["attn_mask"] = mask
    elif cfg.mask_type == "float":
        feeds["attn_mask"] = np.where(mask, 0.0, -np.inf).astype(np.float32)
    return feeds, (q, k, v)


def _check(cfg, spans, seq, batch, seed, pad_keys=0):
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    mask = np.broadcast_to(causal, (batch, 1, seq, seq)).copy()
    if pad_keys and batch > 1:
        mask[1, :, :, :pad_keys] = False  # left padding of row 1
        mask[1, :, np.arange(seq), np.arange(seq)] = True
    if cfg.local_window_size > 0:
        pos = np.arange(seq)
        mask &= (pos[None, :] > pos[:, None] - cfg.local_window_size)
    feeds, (q, k, v) = _feeds(rng, cfg, batch, seq, spans, mask)
    want = reference_attention(
        q, k, v, spans, cfg.categories, sink_tokens=cfg.sink_tokens, scale=cfg.scale,
        model_mask=mask if cfg.mask_type != "none" else None,
    )
    if cfg.mask_type == "none" and cfg.local_window_size > 0:
        want = reference_attention(q, k, v, spans, cfg.categories, sink_tokens=cfg.sink_tokens, scale=cfg.scale, model_mask=mask)
    for lowering in ("reference", "fast"):
        got = run(node_session(cfg, lowering), feeds)[0]
        if cfg.qkv_format == "BSD":
            got = got.reshape(batch, seq, cfg.num_heads, D).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{lowering} lowering, {cfg}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    template=templates(),
    kv=st.sampled_from([(4, 2), (4, 4), (4, 1)]),
    cats=category_lists(4),
    sink_tokens=st.integers(1, 3),
    mask_type=st.sampled_from(["none", "bool", "float"]),
    seed=st.integers(0, 2**16),
)
def test_random_profiles_and_templates(template, kv, cats, sink_tokens, mask_type, seed):
    spans, seq = template
    cfg = AttentionConfig(kv[0], kv[1], D, 0.3, tuple(cats), sink_tokens=sink_tokens, mask_type=mask_type)
    _check(cfg, spans, seq, batch=1, seed=seed)


@settings(max_examples=25, deadline=None)
@given(template=templates(max_images=4), cats=category_lists(6), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["BNSH", "BSD"]), window=st.sampled_from([-1, 3, 6]))
def test_batch_padding_window_and_layouts(template, cats, seed, fmt, window):
    spans, seq = template
    cfg = AttentionConfig(6, 2, D, 0.25, tuple(cats), sink_tokens=1, mask_type="bool", qkv_format=fmt,
                          local_window_size=window)
    _check(cfg, spans, seq, batch=2, seed=seed, pad_keys=min(2, seq - 1))


@pytest.mark.parametrize("category", ["dense", "sink", "intra", "intra_sink"])
@pytest.mark.parametrize("spans,seq", EDGE_TEMPLATES, ids=EDGE_IDS)
@pytest.mark.parametrize("fmt", ["BNSH", "BSD"])
def test_edge_templates(category, spans, seq, fmt):
    cfg = AttentionConfig(4, 2, D, 0.35, (category,) * 4, mask_type="none", qkv_format=fmt)
    _check(cfg, np.array(spans, dtype=np.int64).reshape(-1, 2), seq, batch=1, seed=3)


@settings(max_examples=15, deadline=None)
@given(template=templates(max_images=4), cats=category_lists(4), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["BNSH", "BSD"]), window=st.sampled_from([2, 5]))
def test_window_without_mask(template, cats, seed, fmt, window):
    """A window given only as the attribute (as a GroupQueryAttention model carries it)."""
    spans, seq = template
    cfg = AttentionConfig(4, 2, D, 0.3, tuple(cats), mask_type="none", qkv_format=fmt, local_window_size=window)
    _check(cfg, spans, seq, batch=1, seed=seed)


@pytest.mark.parametrize("spans", [[[2, 6], [8, 15], [16, 20]], [[12, 20]], [[0, 12]], [[3, 5], [11, 13]]],
                         ids=["straddles-and-beyond", "all-beyond", "ends-at-last", "last-key-is-a-sink"])
def test_spans_reaching_past_the_keys_are_cut_where_the_keys_end(spans):
    """A chunk of a longer prompt given the whole prompt's spans: both lowerings
    attend as if the spans were cut at the last key (spans starting at or after
    it dropped), by the numpy reference on spans cut here."""
    seq = 12
    given = np.array(spans, dtype=np.int64).reshape(-1, 2)
    cut = np.array([[a, min(e, seq)] for a, e in spans if a < seq], dtype=np.int64).reshape(-1, 2)
    cfg = AttentionConfig(4, 2, D, 0.3, ("dense", "sink", "intra", "intra_sink"), mask_type="none")
    rng = np.random.default_rng(5)
    feeds, (q, k, v) = _feeds(rng, cfg, 1, seq, given, None)
    want = reference_attention(q, k, v, cut, cfg.categories, scale=cfg.scale)
    for lowering in ("reference", "fast"):
        got = run(node_session(cfg, lowering), feeds)[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=lowering)
