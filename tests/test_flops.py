"""FLOP accounting against brute-force counts over explicit masks (docs/specification.md §2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _util import category_lists, templates
from blindsight.errors import BlindSightError
from blindsight.flops import ModelDims, Template, attention_pairs, builtin_models, count_flops, model_dims
from blindsight.attention import CATEGORIES, allowed_mask


def brute_pairs(category, spans, seq, sink_tokens, window):
    mask = allowed_mask(category, spans, seq, sink_tokens=sink_tokens)
    if window:
        q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
        mask &= k > q - window
    return int(mask.sum())


@settings(max_examples=150, deadline=None)
@given(templates(), st.sampled_from(CATEGORIES), st.integers(1, 3), st.one_of(st.none(), st.integers(1, 12)))
def test_pairs_equal_brute_force(template, category, sink_tokens, window):
    spans, seq = template
    assert attention_pairs(category, spans, seq, sink_tokens, window) == brute_pairs(category, spans, seq, sink_tokens, window)


def test_template_matches_spec_layout():
    t = Template(num_images=3, image_len=5, prefix=24, gap=8, question=32)
    assert t.spans.tolist() == [[32, 37], [45, 50], [58, 63]]
    assert t.seq_len == 63 + 32


TINY = ModelDims("tiny", num_layers=3, hidden_size=16, intermediate_size=40, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50, layer_windows=(5, None, 7))


@settings(max_examples=25, deadline=None)
@given(templates(max_images=4), st.lists(category_lists(4), min_size=3, max_size=3), st.integers(1, 4))
def test_count_flops_brute_force(template, layers, logit_positions):
    spans, seq = template
    att_dense = att_sparse = 0
    for cats, window in zip(layers, TINY.layer_windows):
        for c in cats:
            att_dense += 4 * 8 * brute_pairs("dense", spans, seq, 1, window)
            att_sparse += 4 * 8 * brute_pairs(c, spans, seq, 1, window)
    # every weight matrix of a layer written out: (in, out) -> 2 * tokens * in * out
    mats = [(16, 4 * 8), (16, 2 * 8), (16, 2 * 8), (4 * 8, 16), (16, 40), (16, 40), (40, 16)]
    linear = 3 * sum(2 * seq * a * b for a, b in mats) + 2 * logit_positions * 16 * 50
    r = count_flops(TINY, layers, spans, seq, logit_positions=logit_positions)
    assert (r.attention_dense, r.attention_sparse) == (att_dense, att_sparse)
    assert (r.prefill_dense, r.prefill_sparse) == (linear + att_dense, linear + att_sparse)
    assert sum(r.per_category_heads.values()) == 12
    d = r.to_dict()
    assert d["attention_reduction"] == pytest.approx(1 - att_sparse / att_dense)


def test_builtin_configs_load():
    names = builtin_models()
    assert {"qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "gemma-3-4b", "gemma-3-12b"} <= set(names)
    q = model_dims("qwen2-vl-7b")
    assert (q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim) == (28, 28, 4, 128)
    assert q.layer_windows == (None,) * 28
    g = model_dims("gemma-3-4b")
    # five sliding layers, then one global, repeated
    assert g.layer_windows[:6] == (1024,) * 5 + (None,)
    assert sum(w is None for w in g.layer_windows) == 34 // 6


def test_transformers_config_file(tmp_path):
    from blindsight.models.configs import tiny_config

    cfg = tiny_config("gemma3")
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json_string())
    dims = model_dims(path)
    t = cfg.get_text_config()
    expected = tuple(t.sliding_window if ty == "sliding_attention" else None for ty in t.layer_types)
    assert dims.layer_windows == expected and any(w for w in expected)
    assert model_dims(tmp_path) == dims
    assert model_dims(cfg).num_heads == t.num_attention_heads


def test_bad_model_names(tmp_path):
    with pytest.raises(BlindSightError, match="built-in name"):
        model_dims("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(BlindSightError, match="num_hidden_layers"):
        model_dims(tmp_path)
    with pytest.raises(BlindSightError, match="layers"):
        count_flops(TINY, [["dense"] * 4], [], 10)
