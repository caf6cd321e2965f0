"""Which route each head group takes, and the function body that runs them.

Routes are derived from the rule table, never restated per category: a
category whose clauses include ``any`` is dense; one that adds the query's
own image to keys chosen by their facts alone takes the own-image routes;
one with keys chosen by their facts alone takes the key-set route.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from blindsight.attention import is_dense
from blindsight.attention.schema import SPANS_INPUT, AttentionConfig
from blindsight.attention.semantics import SAME_IMAGE, clauses
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.block_rows import block_rows
from blindsight.passes.lowering.fast.assembly import assemble, final_layout, rank
from blindsight.passes.lowering.fast.dense import dense
from blindsight.passes.lowering.fast.image_runs import image_runs
from blindsight.passes.lowering.fast.key_set import key_set
from blindsight.passes.lowering.fast.padded_rows import padded_rows
from blindsight.passes.lowering.fast.scope import Scope
from blindsight.passes.lowering.fast.text import text_queries
from blindsight.passes.lowering.function import OUTPUT_NAME, make_function, produce_as_output

DENSE, OWN_IMAGE, KEY_SET = "dense", "own_image", "key_set"


def route_of(category: str, image_blocks: bool = False) -> str:
    """``image_blocks``: a dense head's image queries see later keys of their
    block, which the dense route's causal kernel cannot give them, so they take
    the own-image routes with every earlier key visible."""
    if is_dense(category):
        return OWN_IMAGE if image_blocks else DENSE
    by_query = [c for c in clauses(category) if not c.key_only]
    if not by_query:
        return KEY_SET
    if by_query == [SAME_IMAGE]:
        return OWN_IMAGE
    raise ValueError(
        f"the fast lowering has no route for category {category!r} (clauses {[c.name for c in by_query]} read the "
        "query); compile it with --lowering reference"
    )


def head_groups(cfg: AttentionConfig) -> dict[str, list[int]]:
    """Query heads per category, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for h, c in enumerate(cfg.categories):
        groups.setdefault(c, []).append(h)
    return groups


def sparse(s: Scope, flat: bool = False) -> tuple[str, bool]:
    """All routes, assembled in head order: ([B, S, H, D], False), or
    ([B, S, H*D], True) when ``flat`` and a single group let the assembly
    Gather write the flat layout itself."""
    b, cfg = s.b, s.cfg
    f = SpanFacts(b, SPANS_INPUT, s.seq(), cfg.sink_tokens)
    if cfg.image_blocks:
        s.blocks = f.block
    groups = head_groups(cfg)
    routes = {c: route_of(c, cfg.image_blocks) for c in groups}
    sparse_heads = [h for h, c in enumerate(cfg.categories) if routes[c] != DENSE]
    text = text_queries(s, sparse_heads, f)
    text_rank = rank(b, f.is_text)
    parts, order = [], []
    for c, heads in groups.items():
        if routes[c] == DENSE:
            parts.append(dense(s, heads))
        else:
            text_out = text if heads == sparse_heads else b.gather(text, [sparse_heads.index(h) for h in heads], 2)
            single = flat and len(groups) == 1
            if routes[c] == OWN_IMAGE:
                # a single prompt runs one GQA per image with its visible keys as past
                # context (no padding, no text query rows); batches take padded rows
                if cfg.image_blocks:
                    # image tokens see later ones of their block, which a causal
                    # GroupQueryAttention cannot give: one MatMul/Softmax per image
                    # (measured faster than GQA with the image as past context)
                    pool, index = block_rows(s, heads, f, c)
                    part = assemble(b, pool, index, text_out, text_rank, f, single)
                else:
                    branches = []
                    for name, route in (("image_runs", image_runs), ("rows", padded_rows)):
                        branch = s.child(f"{name}_{c}")
                        pool, index = route(branch, heads, f, c)
                        branches.append(branch.b.subgraph(name, [assemble(branch.b, pool, index, text_out, text_rank, f, single)]))
                    part = b.op("If", s.single_prompt(), then_branch=branches[0], else_branch=branches[1])
            else:
                pool, index = key_set(s, heads, f, c)
                part = assemble(b, pool, index, text_out, text_rank, f, single)
            if single:
                return part, True
            parts.append(part)
        order += heads
    out = parts[0] if len(parts) == 1 else b.concat(*parts, axis=2)
    if order != list(range(cfg.num_heads)):
        out = b.gather(out, list(np.argsort(order)), 2)
    return out, False


def build_fast(cfg: AttentionConfig, opset: int = OPSET):
    top = Scope(cfg, Builder("fast", cfg.elem_type))
    b = top.b
    all_heads = list(range(cfg.num_heads))
    flat = cfg.qkv_format == "BSD"
    if all(route_of(c, cfg.image_blocks) == DENSE for c in cfg.categories):
        out = dense(top, all_heads, flat=flat)
        if not flat:
            out = final_layout(top, out)
        produce_as_output(b, out)
        return make_function(b, cfg, "fast", opset=opset)
    no_image = b.op("Equal", b.shape_dim(SPANS_INPUT, 0), b.scalar(0))
    branches = {}
    for name in ("dense", "sparse"):
        s = top.child(name)
        if name == "dense":
            value, is_flat = dense(s, all_heads, flat=flat), flat
        else:
            value, is_flat = sparse(s, flat=flat)
        if not is_flat:
            value = final_layout(s, value)
        branches[name] = s.b.subgraph(f"{name}_branch", [value])
    # the If writes the function output itself: no view of it after the branches
    b.nodes.append(helper.make_node("If", [no_image], [OUTPUT_NAME], then_branch=branches["dense"], else_branch=branches["sparse"]))
    return make_function(b, cfg, "fast", opset=opset)
