"""KV-cache steps whose queries are all text (decode): every category is
dense for a text query (docs/specification.md §2) and image blocks never hold one, so every
head attends all keys under the model's mask and the attributes' causality and
window, by absolute position (the queries are the last Sq of Skv).

One grouped MatMul/Softmax per KV group reads the cache in place: Q is
reshaped to [B, kv, g*Sq, D] so K/V are never repeated per query head nor
gathered, and the BNSH K^T feeds the MatMul as a transposed operand (ONNX
Runtime fuses it into FusedMatMul), which the reference body's per-head
Gather and explicit category masks do not."""

from __future__ import annotations

from blindsight.attention.schema import SPANS_INPUT, AttentionConfig
from blindsight.passes.lowering.builder import OPSET, Builder
from blindsight.passes.lowering.function import make_function, rename_output
from blindsight.passes.lowering.masks import keep_mask, position_keep


def queries_are_text(b: Builder, cfg: AttentionConfig) -> str:
    """Scalar bool: no image span reaches the queries' positions Skv-Sq..Skv-1
    (spans are sorted, so the last end decides; no image at all counts)."""
    axis = 2 if cfg.qkv_format == "BNSH" else 1
    first_query = b.op("Sub", b.shape_dim("key", axis), b.shape_dim("query", axis))
    ends = b.op("Slice", SPANS_INPUT, b.i64(1), b.i64(2), b.i64(1))  # [N, 1]
    last_end = b.op("ReduceMax", b.concat(b.op("Reshape", ends, b.i64(-1)), b.i64(0)), keepdims=0)
    return b.op("LessOrEqual", last_end, first_query)


def build_text_cached(cfg: AttentionConfig, opset: int = OPSET):
    b = Builder("dec", cfg.elem_type)
    H, kv, g = cfg.num_heads, cfg.kv_num_heads, cfg.group
    if cfg.qkv_format == "BNSH":
        sq = b.op("Shape", "query", start=2, end=3)
        qg = b.op("Reshape", "query", b.concat(b.i64(0, kv, -1), b.op("Shape", "query", start=3)))  # [B, kv, g*Sq, D]
        v = "value"
        kt = b.op("Transpose", "key", perm=[0, 1, 3, 2])
    else:
        sq = b.op("Shape", "query", start=1, end=2)
        q5 = b.op("Reshape", "query", b.i64(0, 0, kv, g, -1))  # [B, Sq, kv, g, D]
        qg = b.op("Reshape", b.op("Transpose", q5, perm=[0, 2, 3, 1, 4]), b.i64(0, kv, -1, cfg.head_size))
        k4 = b.op("Reshape", "key", b.i64(0, 0, kv, -1))  # [B, Skv, kv, D]
        kt = b.op("Transpose", k4, perm=[0, 2, 3, 1])  # [B, kv, D, Skv]
        v = b.op("Transpose", b.op("Reshape", "value", b.i64(0, 0, kv, -1)), perm=[0, 2, 1, 3])
    scores = b.op("Mul", b.op("MatMul", qg, kt), b.float(cfg.scale))  # [B, kv, g*Sq, Skv]

    skv = b.shape_dim("key", 2 if cfg.qkv_format == "BNSH" else 1)
    q_pos = b.op("Range", b.op("Sub", skv, b.op("Squeeze", sq, b.i64(0))), skv, b.scalar(1))
    k_pos = b.op("Range", b.scalar(0), skv, b.scalar(1))
    keep = position_keep(b, b.unsqueeze(q_pos, 1), b.unsqueeze(k_pos, 0), causal=bool(cfg.is_causal),
                         window=cfg.local_window_size)  # [Sq, Skv] or None
    if keep is not None:
        keep = b.unsqueeze(keep, 0, 1)  # [1, 1, Sq, Skv]
    if cfg.mask_type != "none":
        model = keep_mask(b, cfg, "attn_mask")  # [Bm, 1, Sq, Skv]
        keep = model if keep is None else b.op("And", keep, model)

    def per_head(x):  # [B, kv, g*Sq, n] -> [B, kv, g, Sq, n]: the mask broadcasts over the heads of a group
        return b.op("Reshape", x, b.concat(b.op("Shape", x, start=0, end=2), b.i64(g), sq, b.op("Shape", x, start=3)))

    s5 = per_head(scores)
    if cfg.mask_type == "float":
        s5 = b.op("Add", s5, b.unsqueeze("attn_mask", 1))
    if keep is not None:
        s5 = b.op("Where", b.unsqueeze(keep, 1), s5, b.float(b.finite_min()))
    probs = b.op("Reshape", b.op("Softmax", s5, axis=-1), b.op("Shape", scores))
    out = b.op("MatMul", probs, v)  # [B, kv, g*Sq, Dv]
    if keep is not None:
        # a row with no key (padding, or a window past every key) outputs zeros, as in the reference
        has_key = b.op("ReduceMax", b.cast(keep, cfg.elem_type), b.i64(-1), keepdims=1)  # [Bm|1, 1, Sq, 1]
        out = b.op("Reshape", b.op("Mul", per_head(out), b.unsqueeze(has_key, 1)), b.op("Shape", out))
    if cfg.qkv_format == "BNSH":
        out = b.op("Reshape", out, b.concat(b.i64(0, H), sq, b.op("Shape", out, start=3)))
    else:
        o5 = b.op("Reshape", out, b.concat(b.i64(0, kv, g), sq, b.op("Shape", out, start=3)))
        out = b.op("Reshape", b.op("Transpose", o5, perm=[0, 3, 1, 2, 4]), b.concat(b.i64(0), sq, b.i64(-1)))
    rename_output(b, out)
    return make_function(b, cfg, "text_cached", opset=opset)
