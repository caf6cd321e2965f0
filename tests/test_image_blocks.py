"""Gemma 3's bidirectional image blocks (docs/specification.md §2, node attribute ``image_blocks``):
the numpy reference against transformers' own mask, the closed-form pair
counts against brute force, and fast == reference == numpy on single nodes."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _util import _NODE_SESSIONS, EDGE_IDS, EDGE_TEMPLATES, category_lists, node_session, run, templates
from blindsight.attention import CATEGORIES, allowed_mask, attention_pairs, allowed_pairs, reference_attention
from blindsight.attention.schema import AttentionConfig
from blindsight.attention.spans import block_ids, token_type_ids

D = 8


def blocks_by_hand(spans, seq, window=-1):
    """The model mask [seq, seq] written out directly from the rule: causal, or
    both tokens strictly inside the same span; then the window."""
    keep = np.zeros((seq, seq), dtype=bool)
    for q in range(seq):
        for k in range(seq):
            same = any(s < q < e - 1 and s < k < e - 1 for s, e in spans)
            keep[q, k] = (k <= q or same) and (window <= 0 or k > q - window)
    return keep


def test_block_ids_are_the_span_interiors():
    spans = [(0, 4), (4, 5), (6, 8), (9, 13)]
    assert block_ids(spans, 14).tolist() == [-1, 0, 0, -1, -1, -1, -1, -1, -1, -1, 3, 3, -1, -1]
    assert token_type_ids(spans, 14).tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert block_ids(spans, 4, offset=10).tolist() == [3, 3, -1, -1]


@pytest.mark.parametrize("window", [-1, 3])
def test_reference_mask_equals_transformers_gemma3_mask(window):
    """The numpy reference's model mask is transformers' Gemma 3 mask built from
    token_type_ids (create_masks_for_vision_model, eager: additive)."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

    spans = [(1, 6), (6, 10), (12, 13), (14, 19)]
    seq = 21
    config = Gemma3TextConfig(sliding_window=window if window > 0 else 4096, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    embeds = torch.zeros(1, seq, 4)
    blocks = get_block_sequence_ids_for_mask(torch.from_numpy(token_type_ids(spans, seq))[None])
    masks = create_masks_for_vision_model(config, embeds, torch.ones(1, seq, dtype=torch.long), None,
                                          torch.arange(seq)[None], blocks)
    kind = "sliding_attention" if window > 0 else "full_attention"
    theirs = (masks[kind][0, 0] == 0).numpy()
    ours = allowed_mask("dense", spans, seq, window=window, image_blocks=True)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, blocks_by_hand(spans, seq, window))
    assert (ours & ~np.tril(np.ones((seq, seq), dtype=bool))).any()  # the blocks do reach forward


@settings(max_examples=80, deadline=None)
@given(template=templates(max_images=5, max_len=8), sink_tokens=st.integers(1, 3),
       window=st.sampled_from([-1, 2, 4, 9]))
def test_pair_counts_closed_form_equal_brute_force(template, sink_tokens, window):
    spans, seq = template
    for c in CATEGORIES:
        assert attention_pairs(c, spans, seq, sink_tokens, window if window > 0 else None, image_blocks=True) == \
            allowed_pairs(c, spans, seq, sink_tokens, window, image_blocks=True)


def _check(cats, spans, seq, batch, style, seed, *, window=-1, kv=2, sink_tokens=1, fmt="BNSH", pad_keys=1):
    """``style``: ``attr`` (is_causal=1, the rule from the attributes, no mask),
    ``bool``/``float`` (is_causal=0, the exported model's mask carries
    causality, blocks, window and padding, as a Gemma 3 export gives it)."""
    rng = np.random.default_rng(seed)
    H = len(cats)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    mask = np.broadcast_to(blocks_by_hand(spans.tolist(), seq, window), (batch, 1, seq, seq)).copy()
    if batch > 1 and style != "attr":
        mask[1, :, :, :pad_keys] = False  # left padding of row 1 (padded queries keep themselves, as in test_lowering_single_node)
        mask[1, :, np.arange(seq), np.arange(seq)] = True
    common = dict(sink_tokens=sink_tokens, image_blocks=1, qkv_format=fmt)
    if style == "attr":
        cfg = AttentionConfig(H, kv, D, 0.3, tuple(cats), mask_type="none", local_window_size=window, **common)
    else:
        cfg = AttentionConfig(H, kv, D, 0.3, tuple(cats), mask_type=style, is_causal=0, **common)
    q = rng.standard_normal((batch, H, seq, D), dtype=np.float32)
    k = rng.standard_normal((batch, kv, seq, D), dtype=np.float32)
    v = rng.standard_normal((batch, kv, seq, D), dtype=np.float32)
    feeds = dict(query=q, key=k, value=v, image_spans=spans)
    if fmt == "BSD":
        feeds.update({n: x.transpose(0, 2, 1, 3).reshape(batch, seq, -1) for n, x in (("query", q), ("key", k), ("value", v))})
    if style == "bool":
        feeds["attn_mask"] = mask
    elif style == "float":
        feeds["attn_mask"] = np.where(mask, 0.0, -np.inf).astype(np.float32)
    # the docs/specification.md §2 reference: the model mask given in full, the categories on top
    want = reference_attention(q, k, v, spans, cats, sink_tokens=sink_tokens, scale=0.3, model_mask=mask, causal=False)
    for lowering in ("reference", "fast"):
        got = run(node_session(cfg, lowering), feeds)[0]
        if fmt == "BSD":
            got = got.reshape(batch, seq, H, D).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{lowering} lowering, {cfg}")
    return want, (q, k, v)


def test_blocks_change_the_answer():
    """Guard for the tests below: with blocks an image token's output differs
    from the causal model's, so a lowering that ignored them would fail."""
    spans, seq = [(2, 8), (9, 13)], 15
    want, (q, k, v) = _check(["dense", "intra", "intra_sink", "sink"], spans, seq, 1, "attr", seed=1)
    causal = reference_attention(q, k, v, np.array(spans), ["dense", "intra", "intra_sink", "sink"], scale=0.3)
    changed = np.abs(want - causal).max(axis=-1)[0]  # [H, S]
    assert changed[:3, [3, 4, 5, 10]].min() > 1e-3  # block rows with later block keys, heads that see their own image
    np.testing.assert_allclose(changed[3], 0, atol=1e-6)  # sink heads see no later key of their block (sink_tokens 1)
    # delimiters, text and each block's last token stay causal
    np.testing.assert_allclose(changed[:, [0, 1, 2, 6, 7, 8, 11, 12, 13, 14]], 0, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=5), cats=category_lists(4), kv=st.sampled_from([1, 2, 4]),
       sink_tokens=st.integers(1, 3), style=st.sampled_from(["attr", "bool", "float"]), seed=st.integers(0, 2**16))
def test_random_profiles_and_templates(template, cats, kv, sink_tokens, style, seed):
    spans, seq = template
    _check(cats, spans, seq, 1, style, seed, kv=kv, sink_tokens=sink_tokens)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4), cats=category_lists(4), style=st.sampled_from(["bool", "float"]),
       fmt=st.sampled_from(["BNSH", "BSD"]), seed=st.integers(0, 2**16))
def test_batches_with_padding(template, cats, style, fmt, seed):
    spans, seq = template
    _check(cats, spans, seq, 2, style, seed, fmt=fmt, pad_keys=min(2, seq - 1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4, max_len=9), cats=category_lists(4), window=st.sampled_from([1, 2, 3, 5]),
       style=st.sampled_from(["attr", "bool"]), fmt=st.sampled_from(["BNSH", "BSD"]), seed=st.integers(0, 2**16))
def test_sliding_windows(template, cats, window, style, fmt, seed):
    """Windows shorter than an image hide its sink from later block tokens (rows of
    ``sink`` heads with no key output zeros) and bound block pairs backwards."""
    spans, seq = template
    _check(cats, spans, seq, 1, style, seed, window=window, fmt=fmt)


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("spans,seq", EDGE_TEMPLATES + [([(0, 4), (4, 8), (8, 9), (9, 11)], 11)],
                         ids=EDGE_IDS + ["adjacent-and-short"])
@pytest.mark.parametrize("style", ["attr", "bool"])
def test_edge_templates(category, spans, seq, style):
    _check([category] * 4, spans, seq, 1, style, seed=5)
    _check([category] * 4, spans, seq, 2, style, seed=6)


def test_window_hiding_a_sink_gives_zero_rows():
    """A window of 2 over a 7-token image: the sink head's late block rows see no key."""
    spans, seq = [(3, 10)], 12
    want, _ = _check(["sink"] * 2 + ["intra"] * 2, spans, seq, 1, "attr", seed=2, window=2)
    assert np.all(want[0, :2, 6:9] == 0)
    assert np.abs(want[0, 2:, 6:9]).min() > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(template=templates(max_images=4, max_len=9), cats=category_lists(4), chunk=st.integers(1, 4),
       batch=st.sampled_from([1, 2]), style=st.sampled_from(["attr", "bool"]), seed=st.integers(0, 2**16))
def test_images_cut_into_row_chunks(monkeypatch, template, cats, chunk, batch, style, seed):
    """block_rows cuts images longer than ROW_CHUNK into equal chunks (the last
    rows repeat the image's last row): still exact, with uneven lengths too."""
    from blindsight.passes.lowering.fast import block_rows

    monkeypatch.setattr(block_rows, "ROW_CHUNK", chunk)
    _NODE_SESSIONS.clear()  # sessions lowered with the default chunk must not be reused
    try:
        spans, seq = template
        _check(cats, spans, seq, batch, style, seed, pad_keys=min(2, seq - 1))
    finally:
        _NODE_SESSIONS.clear()
