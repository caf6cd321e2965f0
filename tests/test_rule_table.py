"""The rule table is the only statement of what a category allows: categories
defined only there (toys, never written anywhere else) compile through both
lowerings and match the numpy docs/specification.md §2 reference, are counted by the FLOP
accounting, and the in-graph token facts equal the numpy ones."""

import contextlib

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from _util import run, session, templates
from blindsight.attention import allowed_mask, attention_pairs, reference_attention, token_facts
from blindsight.attention.schema import AttentionConfig
from blindsight.attention.semantics import RULES, SAME_IMAGE, SINK, TEXT, Clause
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast import route_of
from blindsight.passes.lowering.single_node import single_node_model

D = 8
TOYS = {
    "sinks_only": (SINK,),  # image queries see sink tokens only: no text at all
    "own_image_only": (SAME_IMAGE,),  # image queries see their own image only
    "own_image_and_sinks": (SAME_IMAGE, SINK),
    "text_and_own_image": (TEXT, SAME_IMAGE),  # the table's intra, under another name
}


@contextlib.contextmanager
def toy_rules():
    RULES.update(TOYS)
    try:
        yield
    finally:
        for name in TOYS:
            RULES.pop(name, None)


def literal(category, spans, q, k):
    """What each toy means, written out independently of the rule table."""
    if k > q:
        return False
    image_of = {t: i for i, (s, e) in enumerate(spans) for t in range(s, e)}
    qi, ki = image_of.get(q), image_of.get(k)
    if qi is None:
        return True
    k_sink = ki is not None and k == spans[ki][0]
    return {
        "sinks_only": k_sink,
        "own_image_only": ki == qi,
        "own_image_and_sinks": ki == qi or k_sink,
        "text_and_own_image": ki is None or ki == qi,
    }[category]


def test_routes_are_read_off_the_table():
    with toy_rules():
        assert route_of("sinks_only") == "key_set"
        assert route_of("own_image_only") == "own_image"
        assert route_of("own_image_and_sinks") == "own_image"
        assert [route_of(c) for c in ("dense", "sink", "intra", "intra_sink")] == ["dense", "key_set", "own_image", "own_image"]


def test_a_clause_no_route_handles_is_refused_clearly():
    odd = Clause("query_is_sink", lambda q, k, ops: q.sink, key_only=False)
    RULES["odd"] = (TEXT, odd)
    try:
        with pytest.raises(ValueError, match="no route for category 'odd'.*--lowering reference"):
            route_of("odd")
    finally:
        del RULES["odd"]


@pytest.mark.parametrize("category", sorted(TOYS))
@pytest.mark.parametrize("spans,seq", [([(0, 4)], 6), ([(2, 5), (5, 9)], 12), ([(1, 4), (6, 8), (9, 13)], 15)])
def test_reference_mask_and_pairs_of_toys(category, spans, seq):
    with toy_rules():
        got = allowed_mask(category, spans, seq)
        want = np.array([[literal(category, spans, q, k) for k in range(seq)] for q in range(seq)])
        np.testing.assert_array_equal(got, want)
        for window in (None, 3):
            brute = want & (np.arange(seq)[None, :] > np.arange(seq)[:, None] - window) if window else want
            assert attention_pairs(category, spans, seq, 1, window) == int(brute.sum())


def _check(cfg, spans, seq, batch, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, cfg.num_heads, seq, D), dtype=np.float32)
    k = rng.standard_normal((batch, cfg.kv_num_heads, seq, D), dtype=np.float32)
    v = rng.standard_normal((batch, cfg.kv_num_heads, seq, D), dtype=np.float32)
    feeds = dict(query=q, key=k, value=v, image_spans=spans)
    mask = np.broadcast_to(np.tril(np.ones((seq, seq), dtype=bool)), (batch, 1, seq, seq)).copy()
    if cfg.mask_type == "bool":
        feeds["attn_mask"] = mask
    want = reference_attention(q, k, v, spans, cfg.categories, scale=cfg.scale)
    for lowering in ("reference", "fast"):
        got = run(session(single_node_model(cfg, lowering)), feeds)[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{lowering}, {cfg.categories}")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=templates(max_images=4, max_len=6), seed=st.integers(0, 2**16), batch=st.sampled_from([1, 2]),
       cats=st.lists(st.sampled_from(sorted(TOYS) + ["dense", "sink"]), min_size=4, max_size=4))
def test_toy_categories_compile_and_match_numpy(template, seed, batch, cats):
    spans, seq = template
    with toy_rules():
        cfg = AttentionConfig(4, 2, D, 0.3, tuple(cats), mask_type="bool" if batch > 1 else "none")
        _check(cfg, spans, seq, batch, seed)


@pytest.mark.parametrize("spans,seq,sink_tokens", [([], 5, 1), ([(0, 3)], 3, 2), ([(1, 4), (4, 9), (11, 12)], 14, 2)])
def test_in_graph_token_facts_equal_numpy(spans, seq, sink_tokens):
    b = Builder("facts")
    f = SpanFacts(b, "image_spans", b.shape_dim("x", 0), sink_tokens)
    image, sink = b.op("Identity", f.image), b.op("Identity", f.sink)
    graph = helper.make_graph(
        b.nodes, "facts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S"]), helper.make_tensor_value_info("image_spans", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info(image, TensorProto.INT64, ["S"]), helper.make_tensor_value_info(sink, TensorProto.BOOL, ["S"])],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    got_image, got_sink = session(model).run(None, {"x": np.zeros(seq, np.float32), "image_spans": np.array(spans, np.int64).reshape(-1, 2)})
    want_image, want_sink = token_facts(spans, seq, sink_tokens)
    np.testing.assert_array_equal(got_image, want_image)
    np.testing.assert_array_equal(got_sink, want_sink)


def test_operator_reference_documents_every_attribute_of_the_schema():
    from pathlib import Path

    from blindsight.attention.schema import ATTRIBUTES, INPUTS, OUTPUTS

    reference = Path(__file__).resolve().parents[1] / "docs" / "operator.md"
    section = reference.read_text().split("## Operator `ai.blindsight::BlindSightAttention`")[1].split("\n## ")[0]
    for a in ATTRIBUTES:
        assert f"| `{a.name}` | {a.type} |" in section, f"docs/operator.md lacks attribute {a.name} ({a.type})"
    for name in INPUTS + OUTPUTS:
        assert f"`{name}`" in section
