"""Reference lowering: an explicit per-head boolean mask and dense compute.

Slow by design; it is the validation path for the fast lowering and works
for any model mask, any KV-cache offset and any category of the rule table.
"""

from __future__ import annotations


from blindsight.attention import category_mask
from blindsight.attention.schema import SPANS_INPUT, AttentionConfig
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.function import make_function, rename_output
from blindsight.passes.lowering.masks import keep_mask, structural_keep


def to_bnsh(b: Builder, x: str, cfg: AttentionConfig, heads: int) -> str:
    if cfg.qkv_format == "BNSH":
        return x
    return b.op("Transpose", b.op("Reshape", x, b.i64(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def build_reference(cfg: AttentionConfig, opset: int = OPSET):
    b = Builder("ref", cfg.elem_type)
    q = to_bnsh(b, "query", cfg, cfg.num_heads)
    k = to_bnsh(b, "key", cfg, cfg.kv_num_heads)
    v = to_bnsh(b, "value", cfg, cfg.kv_num_heads)
    if cfg.group > 1:
        per_head = [cfg.kv_head(h) for h in range(cfg.num_heads)]
        k, v = b.gather(k, per_head, 1), b.gather(v, per_head, 1)

    sq, skv = b.shape_dim(q, 2), b.shape_dim(k, 2)
    facts = SpanFacts(b, SPANS_INPUT, skv, cfg.sink_tokens)
    # with a KV cache the queries are the last sq positions
    q_idx = b.op("Range", b.op("Sub", skv, sq), skv, b.scalar(1))
    qf, kf = facts.query_facts(q_idx), facts.key_facts()

    ops = facts.ops(b)
    used = sorted(set(cfg.categories), key=cfg.categories.index)
    per_cat = [b.unsqueeze(category_mask(c, qf, kf, ops), 0) for c in used]
    stacked = per_cat[0] if len(per_cat) == 1 else b.concat(*per_cat, axis=0)
    if len(used) > 1:
        stacked = b.gather(stacked, [used.index(c) for c in cfg.categories], 0)  # [H, Sq, Skv]
    keep = b.unsqueeze(stacked, 0)  # [1, H, Sq, Skv]
    structural = structural_keep(b, cfg, q_idx, facts.pos, facts.block if cfg.image_blocks else None)
    if structural is not None:
        keep = b.op("And", keep, structural)

    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.float(cfg.scale))
    if cfg.mask_type != "none":
        keep = b.op("And", keep, keep_mask(b, cfg, "attn_mask"))
        if cfg.mask_type == "float":
            scores = b.op("Add", scores, "attn_mask")
    # a finite masked score (docs/specification.md §4); a row left with no key outputs zeros
    scores = b.op("Where", keep, scores, b.float(b.finite_min()))
    probs = b.op("Softmax", scores, axis=-1)
    has_key = b.op("ReduceMax", b.cast(keep, b.elem_type), b.i64(-1), keepdims=1)
    out = b.op("Mul", b.op("MatMul", probs, v), has_key)
    if cfg.qkv_format == "BSD":
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.i64(0, 0, -1))
    rename_output(b, out)
    return make_function(b, cfg, "reference", opset=opset)
