"""Shared test helpers: running models in ONNX Runtime and random templates."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from hypothesis import strategies as st

from blindsight.attention import CATEGORIES
from blindsight.runtime.session import make_session


def session(model) -> ort.InferenceSession:
    """On the function bodies (native=False): these tests check the lowerings;
    tests/test_native.py checks the native kernel."""
    return make_session(model, threads=2, native=False)


_NODE_SESSIONS: dict = {}


def node_session(cfg, lowering: str) -> ort.InferenceSession:
    """A session over a single-node model, cached per (config, lowering)."""
    from blindsight.passes.lowering.single_node import single_node_model

    key = (cfg, lowering)
    if key not in _NODE_SESSIONS:
        _NODE_SESSIONS[key] = session(single_node_model(cfg, lowering))
    return _NODE_SESSIONS[key]


def run(sess: ort.InferenceSession, feeds: dict):
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


# prompts at the edges: no image, only an image, images at the very start and end, a 1-token prompt
EDGE_TEMPLATES = [([], 7), ([(0, 5)], 5), ([(0, 3), (3, 9)], 12), ([(4, 12)], 12), ([(0, 1)], 1)]
EDGE_IDS = ["no-image", "only-image", "start", "end", "single-token"]


@st.composite
def templates(draw, max_images=6, max_len=9, max_gap=4):
    """(spans, seq_len): text before, between and after 0..max_images images of varied length."""
    n = draw(st.integers(0, max_images))
    pos = draw(st.integers(0, max_gap))
    spans = []
    for _ in range(n):
        length = draw(st.integers(1, max_len))
        spans.append((pos, pos + length))
        pos += length + draw(st.integers(0, max_gap))
    seq = max(pos + draw(st.integers(0, max_gap)), 1)
    return np.array(spans, dtype=np.int64).reshape(-1, 2), seq


def category_lists(num_heads):
    return st.lists(st.sampled_from(CATEGORIES), min_size=num_heads, max_size=num_heads)
