"""The two kernels every route is made of: ``GroupQueryAttention`` (ONNX
Runtime's fastest causal attention, docs/specification.md §5) and a grouped MatMul/Softmax
for short key sets."""

from __future__ import annotations


from blindsight.attention.schema import AttentionConfig
from blindsight.passes.lowering.builder import MS_DOMAIN, Builder
from blindsight.passes.lowering.fast.scope import Scope


def kv_layout(cfg: AttentionConfig, heads: list[int]) -> tuple[list[int], int]:
    """(KV heads to read, query heads per KV head) for a sorted query-head subset:
    whole KV groups keep their sharing; a subset that splits a group reads one
    KV head per query head."""
    uniq = sorted({cfg.kv_head(h) for h in heads})
    if heads == [g * cfg.group + j for g in uniq for j in range(cfg.group)]:
        return uniq, cfg.group
    return [cfg.kv_head(h) for h in heads], 1


def gqa(b: Builder, cfg: AttentionConfig, q, k, v, nh, nkv, seqlens, total, bias=None, window: int = -1,
        past=("", ""), outputs: int = 1):
    """A ``GroupQueryAttention`` call on BSD operands; ``bias`` is its attention_bias."""
    inputs = [q, k, v, *past, seqlens, total]
    if bias is not None:
        inputs += ["", "", "", bias]
    # ORT 1.31 CPU: local_window_size w keeps keys q-w+1..q, the op's own window (measured, tested)
    out = b.op("GroupQueryAttention", *inputs, domain=MS_DOMAIN, outputs=outputs, num_heads=nh, kv_num_heads=nkv,
               scale=float(cfg.scale), local_window_size=window if window > 0 else None)
    return out if outputs == 1 else out[0]


def gqa_operands(s: Scope, heads: list[int]):
    """BSD Q/K/V of a head subset and their head counts."""
    cfg, b = s.cfg, s.b
    kv_list, _ = kv_layout(cfg, heads)

    def sub(name, total, idx):
        x = s.bsd(name)
        if idx == list(range(total)):
            return x
        return b.op("Reshape", b.gather(b.op("Reshape", x, b.i64(0, 0, total, -1)), idx, 2), b.i64(0, 0, -1))

    q = sub("query", cfg.num_heads, heads)
    k = sub("key", cfg.kv_num_heads, kv_list)
    v = sub("value", cfg.kv_num_heads, kv_list)
    return q, k, v, len(heads), len(kv_list)


def grouped_attention(s: Scope, heads: list[int], q_pos: str, k_pos: str, keeps_own_key: bool = True) -> str:
    """Queries at q_pos attend keys at k_pos (1-D, sorted), causal by position,
    through the layer's model mask and window: [B, len(heads), Q, D].
    ``keeps_own_key``: every query's key set holds a key at or before it that
    causality alone never hides (itself, or its image's sink), so without a
    model mask and window no row can be empty.

    Heads run per KV group (Q reshaped to [B, kv, g*Q, D]) so K/V are read,
    never copied per query head."""
    b, cfg = s.b, s.cfg
    kv_list, g = kv_layout(cfg, heads)
    q = s.at_positions("query", heads, q_pos)  # [B, h, Q, D]
    k = s.at_positions("key", kv_list, k_pos)  # [B, kv, K, D]
    v = s.at_positions("value", kv_list, k_pos)
    qg = b.op("Reshape", q, b.concat(b.i64(0, len(kv_list), -1), b.op("Shape", q, start=3))) if g > 1 else q
    # scale right on the MatMul so ORT fuses both into one FusedMatMul (alpha, transB)
    scores = b.op("Mul", b.op("MatMul", qg, b.op("Transpose", k, perm=[0, 1, 3, 2])), b.float(cfg.scale))  # [B, kv, g*Q, K]
    qp, kp = b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0)
    keep = b.all_of(s.keep(qp, kp, causal=True), s.gathered_mask(s.mask3(), q_pos, k_pos))
    keep3 = b.unsqueeze(keep, 0) if cfg.mask_type == "none" else keep  # [Bm|1, Q, K]
    bias = s.to_bias(keep3)
    if g > 1:
        # allowzero: Q may be 0 (no text token), and a 0 must not copy the input's dim
        five = b.concat(b.op("Shape", scores, start=0, end=1), b.i64(len(kv_list), g), b.op("Shape", keep3, start=1))
        s5 = b.op("Reshape", scores, five, allowzero=1)
        s5 = b.op("Add", s5, b.unsqueeze(bias, 1, 2))
        probs = b.op("Reshape", b.op("Softmax", s5, axis=-1), b.op("Shape", scores), allowzero=1)
    else:
        probs = b.op("Softmax", b.op("Add", scores, b.unsqueeze(bias, 1)), axis=-1)
    out = b.op("MatMul", probs, v)  # [B, kv, g*Q, D]
    out = b.op("Reshape", out, b.concat(b.i64(0, len(heads), -1), b.op("Shape", out, start=3))) if g > 1 else out
    if keeps_own_key and cfg.mask_type == "none" and cfg.local_window_size <= 0:
        return out
    # a row with no key at all (a window or padding hid everything) outputs zeros, as in the reference
    has_key = b.op("ReduceMax", b.cast(keep3, b.elem_type), b.i64(2), keepdims=0)  # [Bm|1, Q]
    return b.op("Mul", out, b.unsqueeze(has_key, 1, 3))

