"""Key-set route: the category's image queries see a set of keys fixed by the
keys' own facts (``sink``: text and sink tokens), short, so a grouped
MatMul/Softmax over [image tokens x key set] is cheap."""

from __future__ import annotations

from blindsight.attention import visible_classes
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.assembly import rank
from blindsight.passes.lowering.fast.kernels import grouped_attention
from blindsight.passes.lowering.fast.scope import Scope


def key_set(s: Scope, heads: list[int], f: SpanFacts, category: str):
    """Image queries over the key set: (pool [B, M, h, D], index [S])."""
    b = s.b
    img_pos = b.nonzero(f.is_image)
    key_pos = b.nonzero(f.visible_keys(category, b))
    # an image query sees its own image's first token (its sink) whenever the rule shows own sinks
    own_sink = all(visible_classes(category, query_is_sink)["own_sink"] for query_is_sink in (False, True))
    pool = b.op("Transpose", grouped_attention(s, heads, img_pos, key_pos, keeps_own_key=own_sink), perm=[0, 2, 1, 3])
    return pool, rank(b, f.is_image)
