"""Pattern rules that find attention cores and rewrite each into one
``BlindSightAttention`` node (docs/specification.md §4), one class per exported form.

The node is created with placeholder categories (all ``dense``); the
annotate pass numbers layers in topological order and applies the profile.
The shared ``image_spans`` input is created by the compiler and wired later.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchFailureError

from blindsight.attention.schema import DOMAIN, AttentionConfig

_MS = "com.microsoft"


def _static_dim(value: ir.Value | None, axis: int, what: str) -> int:
    shape = value.shape if value is not None else None
    if shape is None or len(shape) <= abs(axis) - (axis < 0) or not isinstance(shape[axis], int):
        raise MatchFailureError(f"{what} needs a static size on axis {axis}", value)
    return shape[axis]


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _scalar(value: ir.Value | None, name: str) -> float:
    if value is None or value.const_value is None:
        raise MatchFailureError(f"{name} is not a constant", value)
    arr = value.const_value.numpy()
    if arr.size != 1:
        raise MatchFailureError(f"{name} is not a scalar", value)
    return float(arr.reshape(()))


def _scale(node: ir.Node, head_size: int) -> float:
    """The node's ``scale`` attribute; absent or 0 means the default 1/sqrt(head_size)."""
    attr = node.attributes.get("scale")
    return attr.value if attr is not None and attr.value else 1.0 / math.sqrt(head_size)


def _mask_4d(op, mask: ir.Value | None):
    """Masks reach the node as rank 4 [B|1, 1, Sq, Skv]."""
    rank = _rank(mask)
    if mask is None or rank == 4:
        return mask
    if rank is None or rank > 4:
        raise MatchFailureError("mask rank is unknown", mask)
    out = op.Reshape(mask, op.Concat(op.Constant(value_ints=[1] * (4 - rank)), op.Shape(mask), axis=0))
    out.dtype = mask.dtype  # the lowering picks bool or additive handling from it
    return out


def _emit(op, q, k, v, mask, *, num_heads, kv_num_heads, scale, is_causal=0, window=-1, fmt="BNSH"):
    cfg = AttentionConfig.placeholder(num_heads, kv_num_heads, scale, is_causal=is_causal, local_window_size=window, qkv_format=fmt)
    return op.BlindSightAttention(q, k, v, mask, _domain=DOMAIN, **cfg.attributes())


class AttentionOp(pattern.RewriteRuleClassBase):
    """ONNX ``Attention`` (opset 23/24), 4-D Q/K/V, as the dynamo exporter emits at opset 23."""

    def __init__(self, with_mask: bool):
        super().__init__(f"AttentionOp{'Masked' if with_mask else ''}")
        self.with_mask = with_mask

    def pattern(self, op, query, key, value, mask):
        inputs = [query, key, value] + ([mask] if self.with_mask else [])
        return op.Attention(*inputs, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, query, key, value, out, mask=None, **_):
        node = out.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            raise MatchFailureError("Attention with KV-cache or score outputs in use")
        attrs = node.attributes
        for name in ("softcap", "qk_matmul_output_mode"):
            if name in attrs and attrs[name].value not in (0, 0.0):
                raise MatchFailureError(f"Attention attribute {name} is not supported")
        if _rank(query) != 4 or _rank(key) != 4 or _rank(value) != 4:
            raise MatchFailureError("only 4-D Attention inputs are rewritten")
        if mask is None and not ("is_causal" in attrs and attrs["is_causal"].value):
            raise MatchFailureError("attention with neither mask nor is_causal is bidirectional")
        if mask is not None and _rank(mask) is not None and _rank(mask) == 4:
            if mask.shape[1] not in (1,):
                raise MatchFailureError("per-head masks are not supported")
        return True

    def rewrite(self, op, query, key, value, out, mask=None, **_):
        attrs = out.producer().attributes
        scale = _scale(out.producer(), _static_dim(query, 3, "query"))
        is_causal = int(attrs["is_causal"].value) if "is_causal" in attrs else 0
        return _emit(
            op, query, key, value, _mask_4d(op, mask),
            num_heads=_static_dim(query, 1, "query"), kv_num_heads=_static_dim(key, 1, "key"),
            scale=scale, is_causal=is_causal,
        )


class DecomposedAttention(pattern.RewriteRuleClassBase):
    """MatMul/Softmax/MatMul attention as exporters decompose it: optional Mul/Div
    scaling of Q, of K^T and of the scores, an optional additive mask, and the
    optional IsNaN/Where guard after Softmax."""

    def __init__(self):
        super().__init__("DecomposedAttention")

    def pattern(self, op, query, key, value, mask, q_scale, k_scale, s_scale):
        # K^T directly, through a 3-D reshape (dynamo), or from a [B, S, H, D] key
        via_3d = op.Reshape(op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE)
        key_t = pattern.OrValue(
            [op.Transpose(key, perm=[0, 1, 3, 2]), via_3d, op.Transpose(key, perm=[0, 2, 3, 1])],
            tag_var="key_layout",
            tag_values=["BHSD", "BHSD", "BSHD"],
        )
        query = pattern.OrValue([op.Mul(query, q_scale), op.Div(query, q_scale), query], tag_var="q_scaling", tag_values=["Mul", "Div", None])
        key_t = pattern.OrValue([op.Mul(key_t, k_scale), op.Div(key_t, k_scale), key_t], tag_var="k_scaling", tag_values=["Mul", "Div", None])
        scores = op.MatMul(query, key_t)
        scores = pattern.OrValue([op.Mul(scores, s_scale), op.Div(scores, s_scale), scores], tag_var="s_scaling", tag_values=["Mul", "Div", None])
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs])
        return op.MatMul(probs, value)

    def _factor(self, kind, value, name):
        if kind is None:
            return 1.0
        s = _scalar(value, name)
        return s if kind == "Mul" else 1.0 / s

    def check(self, context, query, key, value, probs, key_layout, mask=None, **b):
        axis = probs.producer().attributes.get("axis")
        if axis is not None and axis.value not in (-1, 3):
            raise MatchFailureError("Softmax is not over the key axis", probs)
        if _rank(query) != 4 or _rank(key) != 4 or _rank(value) != 4:
            raise MatchFailureError("attention core without 4-D Q/K/V")
        if mask is None:
            # no mask means bidirectional attention (a vision encoder): not ours to touch
            raise MatchFailureError("attention without a mask is not causal")
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                raise MatchFailureError("an added mask must be float", mask)
            if _rank(mask) == 4 and mask.shape[1] != 1:
                raise MatchFailureError("per-head masks are not supported", mask)
        self._scale_value = (
            self._factor(b.get("q_scaling"), b.get("q_scale"), "query scale")
            * self._factor(b.get("k_scaling"), b.get("k_scale"), "key scale")
            * self._factor(b.get("s_scaling"), b.get("s_scale"), "score scale")
        )
        return True

    def rewrite(self, op, query, key, value, key_layout, mask=None, **_):
        if key_layout == "BSHD":
            key = op.Transpose(key, perm=[0, 2, 1, 3])
        heads = _static_dim(query, 1, "query")
        kv_heads = _static_dim(value, 1, "value")
        return _emit(
            op, query, key, value, _mask_4d(op, mask),
            num_heads=heads, kv_num_heads=kv_heads, scale=self._scale_value,
        )


def _only_inputs(node: ir.Node, used: set[int]) -> None:
    extra = [i for i, v in enumerate(node.inputs) if v is not None and i not in used]
    if extra:
        raise MatchFailureError(f"{node.op_type} inputs {extra} (bias, padding or KV cache) are not supported")
    if any(o.uses() for o in node.outputs[1:]):
        raise MatchFailureError(f"{node.op_type} KV-cache outputs are in use")


class MicrosoftMultiHeadAttention(pattern.RewriteRuleClassBase):
    """``com.microsoft.MultiHeadAttention`` with 3-D Q/K/V [B, S, H*D], causal
    through ``unidirectional`` or an additive ``attention_bias``."""

    def __init__(self):
        super().__init__("MicrosoftMultiHeadAttention")

    def pattern(self, op, query, key, value):
        return op.MultiHeadAttention(query, key, value, _domain=_MS, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, query, key, value, out, **_):
        node = out.producer()
        _only_inputs(node, {0, 1, 2, 5})
        if _rank(query) != 3 or _rank(key) != 3 or _rank(value) != 3:
            raise MatchFailureError("MultiHeadAttention with packed or 4-D inputs")
        bias = node.inputs[5] if len(node.inputs) > 5 else None
        unidirectional = node.attributes.get("unidirectional")
        if bias is None and not (unidirectional and unidirectional.value):
            raise MatchFailureError("non-causal MultiHeadAttention (no bias, not unidirectional)")
        if bias is not None and (_rank(bias) != 4 or bias.shape[1] != 1):
            raise MatchFailureError("attention_bias must be [B|1, 1, S, S]")
        return True

    def rewrite(self, op, query, key, value, out, **_):
        node = out.producer()
        heads = node.attributes["num_heads"].value
        unidirectional = node.attributes.get("unidirectional")
        return _emit(
            op, query, key, value, node.inputs[5] if len(node.inputs) > 5 else None,
            num_heads=heads, kv_num_heads=heads, scale=_scale(node, _static_dim(query, 2, "query") // heads),
            is_causal=int(bool(unidirectional and unidirectional.value)), fmt="BSD",
        )


class MicrosoftGroupQueryAttention(pattern.RewriteRuleClassBase):
    """``com.microsoft.GroupQueryAttention`` of a prefill: separate Q/K/V, no
    past, no fused rotary (Q and K must enter after rotary). Per-row
    ``seqlens_k`` becomes a key padding mask."""

    def __init__(self):
        super().__init__("MicrosoftGroupQueryAttention")

    def pattern(self, op, query, key, value, seqlens_k, total):
        return op.GroupQueryAttention(
            query, key, value, None, None, seqlens_k, total,
            _domain=_MS, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"],
        )

    def check(self, context, query, key, value, out, **_):
        node = out.producer()
        _only_inputs(node, {0, 1, 2, 5, 6})
        attrs = node.attributes
        for name in ("do_rotary", "softcap", "smooth_softmax"):
            if name in attrs and attrs[name].value:
                raise MatchFailureError(f"GroupQueryAttention with {name} is not supported")
        if _rank(query) != 3 or _rank(key) != 3:
            raise MatchFailureError("GroupQueryAttention with packed QKV")
        return True

    def rewrite(self, op, query, key, value, seqlens_k, out, **_):
        node = out.producer()
        attrs = node.attributes
        heads, kv_heads = attrs["num_heads"].value, attrs["kv_num_heads"].value
        window = attrs.get("local_window_size")
        # key k of row b is real when k <= seqlens_k[b] (the last valid index)
        seq = op.Gather(op.Shape(key), op.Constant(value_int=1), axis=0)
        positions = op.Range(op.Constant(value_int=0), seq, op.Constant(value_int=1))
        last = op.Unsqueeze(op.Cast(seqlens_k, to=ir.DataType.INT64), op.Constant(value_ints=[1, 2, 3]))
        mask = op.LessOrEqual(positions, last)  # [B, 1, 1, S]
        mask.dtype = ir.DataType.BOOL
        return _emit(
            op, query, key, value, mask,
            num_heads=heads, kv_num_heads=kv_heads, scale=_scale(node, _static_dim(query, 2, "query") // heads),
            is_causal=1, window=window.value if window and window.value > 0 else -1, fmt="BSD",
        )


def _const_ints(op, values):
    return op.Constant(value_ints=list(values))


def _sliding_cache(node: ir.Node) -> bool:
    attr = node.attributes.get("sliding_window_cache")
    return bool(attr is not None and attr.value)


class MicrosoftGroupQueryAttentionKV(pattern.RewriteRuleClassBase):
    """``com.microsoft.GroupQueryAttention`` with a KV cache, as
    onnxruntime-genai's model builder emits it: separate 3-D Q/K/V after rotary
    (``do_rotary`` 0) or with ``cos_cache``/``sin_cache`` (``do_rotary`` 1: the
    rewrite applies com.microsoft RotaryEmbedding at the positions the tokens
    are written to, as GroupQueryAttention does), ``past_key``/``past_value``
    [B, kv, L, D] (or, with ``sliding_window_cache``, window-sized buffers that
    keep the last C positions; exact for rows without padding, and onnxruntime
    1.31's GroupQueryAttention refuses a right-padded prompt with them) and the
    ``present_*`` outputs, ``seqlens_k`` [B] (the last valid key index per row)
    and ``total_sequence_length``.

    The rewrite keeps the node's interface. The cache update is an explicit
    subgraph that writes the new keys/values as GroupQueryAttention does: at
    position 0 in a first prompt (Sq == total), else at ``seqlens_k[b] + 1 - Sq``
    of row b, into the past buffer grown to ``max(L, total)`` (with
    ``past_present_share_buffer`` the buffer keeps its length L and the present
    is that buffer with the new tokens written; without it, the present is past
    followed by the new tokens). BlindSightAttention then reads the first
    ``total`` positions of the present (BNSH), keys k <= seqlens_k[b] of row b,
    causal with queries at total - Sq ... total - 1. GroupQueryAttention puts
    row b's queries at 0 ... Sq - 1 in a first prompt, else at
    seqlens_k[b] + 1 - Sq ..., and counts ``local_window_size`` from there:
    the same whenever a row's queries sit at total - Sq (every row of a batch
    without padding, a first prompt with right padding). For a shorter row
    after its first prompt, a layer with a window reads row b's keys shifted
    right by total - 1 - seqlens_k[b] (the slots before them masked), so the
    window counts from the row's own position; without a window a decode step
    (Sq = 1) is exact either way (keys 0..seqlens_k[b]). A chunked prompt
    (1 < Sq < total) of rows of different lengths is not matched: without a
    window the shorter rows' queries are causal from other positions, and the
    image spans would meet a shifted row's keys at other positions.
    """

    def __init__(self):
        super().__init__("MicrosoftGroupQueryAttentionKV")

    def pattern(self, op, query, key, value, past_key, past_value, seqlens_k, total):
        return op.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total,
            _domain=_MS, _allow_other_inputs=True, _allow_other_attributes=True,
            _outputs=["out", "present_key", "present_value"],
        )

    def check(self, context, query, key, value, past_key, past_value, out, **_):
        node = out.producer()
        attrs = node.attributes
        rotary = bool("do_rotary" in attrs and attrs["do_rotary"].value)
        allowed = 9 if rotary else 7  # cos_cache, sin_cache with do_rotary
        extra = [i for i, v in enumerate(node.inputs) if v is not None and i >= allowed]
        if extra:
            raise MatchFailureError(f"GroupQueryAttention inputs {extra} (position ids, bias, sinks) are not supported")
        if rotary and (len(node.inputs) < 9 or node.inputs[7] is None or node.inputs[8] is None):
            raise MatchFailureError("do_rotary without cos/sin caches")
        for name in ("softcap", "smooth_softmax", "k_quant_type", "v_quant_type"):
            if name in attrs and attrs[name].value not in (0, 0.0, "NONE", "none", ""):
                raise MatchFailureError(f"GroupQueryAttention with {name} is not supported")
        if _sliding_cache(node) and not (attrs.get("local_window_size") and attrs["local_window_size"].value > 0):
            raise MatchFailureError("sliding_window_cache without a local_window_size")
        if key is None or value is None or _rank(query) != 3 or _rank(key) != 3:
            raise MatchFailureError("GroupQueryAttention with packed QKV")
        if _rank(past_key) != 4 or _rank(past_value) != 4:
            raise MatchFailureError("past_key/past_value must be [B, kv, L, D]")
        return True

    def rewrite(self, op, query, key, value, past_key, past_value, seqlens_k, total, out, **_):
        node = out.producer()
        attrs = node.attributes
        heads, kv_heads = attrs["num_heads"].value, attrs["kv_num_heads"].value
        head_size = _static_dim(query, 2, "query") // heads
        window = attrs.get("local_window_size")
        i64 = ir.DataType.INT64
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        seq = op.Gather(op.Shape(query), one, axis=0)  # Sq, a scalar
        total64 = op.Cast(total, to=i64)
        last = op.Cast(seqlens_k, to=i64)  # [B]
        # where row b's new tokens go: 0 in a first prompt, else seqlens_k[b] + 1 - Sq
        start = op.Where(op.Equal(seq, total64), op.Mul(last, zero), op.Sub(op.Add(last, one), seq))
        rows = op.Add(op.Unsqueeze(start, _const_ints(op, [1])), op.Range(zero, seq, one))  # [B, Sq]
        index = op.Unsqueeze(rows, _const_ints(op, [1, 3]))  # [B, 1, Sq, 1]

        def bnsh(x, n):
            return op.Transpose(op.Reshape(x, _const_ints(op, [0, 0, n, head_size])), perm=[0, 2, 1, 3])

        def update(past, new):
            # write the new tokens at their rows, into the buffer grown to max(L, total) with zeros.
            # The If keeps a buffer that fits (past and present sharing one buffer) out of Pad:
            # ScatterElements then writes into the bound present in place, with no copy of the cache
            length = op.Gather(op.Shape(past), op.Constant(value_int=2), axis=0)
            grow = op.Max(op.Sub(total64, length), zero)
            pads = op.Concat(_const_ints(op, [0, 0, 0, 0, 0, 0]), op.Unsqueeze(grow, _const_ints(op, [0])),
                             _const_ints(op, [0]), axis=0)
            where = op.Expand(index, op.Shape(new))
            in_place = ir.node("ScatterElements", [past, where, new], attributes={"axis": 2})
            padded = ir.node("Pad", [past, pads])
            grown = ir.node("ScatterElements", [padded.outputs[0], where, new], attributes={"axis": 2})
            for n in (in_place, grown):
                n.outputs[0].dtype = past.dtype
            present = op.If(op.GreaterOrEqual(length, total64),
                            then_branch=ir.Graph([], in_place.outputs, nodes=[in_place], name="cache_fits"),
                            else_branch=ir.Graph([], grown.outputs, nodes=[padded, grown], name="cache_grows"))
            present.dtype = past.dtype
            return present

        if "do_rotary" in attrs and attrs["do_rotary"].value:
            # the rotary GroupQueryAttention applies: at the positions the new tokens are written to
            cos, sin = node.inputs[7], node.inputs[8]
            interleaved = attrs["rotary_interleaved"].value if "rotary_interleaved" in attrs else 0
            rot = {}
            half = cos.shape[1] if cos.shape is not None and len(cos.shape) == 2 else None
            if isinstance(half, int) and 2 * half != head_size:
                rot["rotary_embedding_dim"] = 2 * half
            query = op.RotaryEmbedding(query, rows, cos, sin, _domain=_MS, interleaved=interleaved, num_heads=heads, **rot)
            key = op.RotaryEmbedding(key, rows, cos, sin, _domain=_MS, interleaved=interleaved, num_heads=kv_heads, **rot)
            query.shape, query.dtype = node.inputs[0].shape, node.inputs[0].dtype
        new_k, new_v = bnsh(key, kv_heads), bnsh(value, kv_heads)
        positions = op.Range(zero, total64, one)
        keep = op.LessOrEqual(positions, op.Unsqueeze(last, _const_ints(op, [1, 2, 3])))  # [B, 1, 1, total]
        if _sliding_cache(node):
            # a buffer of capacity C >= W (the window) holds, left-aligned, the last
            # held(n) of n tokens: n while n <= C, else W + (n - W) mod (C - W + 1)
            # (GroupQueryAttention evicts down to the window when full; measured on
            # onnxruntime 1.31, C = W gives min(n, C)). The present keeps the last
            # held(total) of past + new, zero-filled behind (GroupQueryAttention leaves
            # older values there). The node reads the logical keys 0..total-1 with
            # zeros before the first held position (masked, and outside the window).
            cap = op.Gather(op.Shape(past_key), op.Constant(value_int=2), axis=0)
            w = op.Constant(value_int=window.value)

            def held_of(n):
                return op.Where(op.LessOrEqual(n, cap), n, op.Add(w, op.Mod(op.Sub(n, w), op.Add(op.Sub(cap, w), one))))

            past_len = op.Sub(total64, seq)
            held = held_of(past_len)
            first = op.Sub(past_len, held)  # position of the buffer's slot 0
            as_1d = lambda x: op.Unsqueeze(x, _const_ints(op, [0]))  # noqa: E731
            length = op.Add(held, seq)
            drop = op.Sub(length, held_of(total64))

            def window_update(past, new):
                joined = op.Concat(op.Slice(past, _const_ints(op, [0]), as_1d(held), _const_ints(op, [2])), new, axis=2)
                tail = op.Slice(joined, as_1d(drop), _const_ints(op, [2**62]), _const_ints(op, [2]))
                behind = op.Sub(cap, op.Sub(length, drop))
                present = op.Pad(tail, op.Concat(_const_ints(op, [0, 0, 0, 0, 0, 0]), as_1d(behind), _const_ints(op, [0]), axis=0))
                logical = op.Pad(joined, op.Concat(_const_ints(op, [0, 0]), as_1d(first), _const_ints(op, [0, 0, 0, 0, 0]), axis=0))
                return present, logical

            (present_k, k_valid), (present_v, v_valid) = window_update(past_key, new_k), window_update(past_value, new_v)
            keep = op.And(keep, op.GreaterOrEqual(positions, first))
        elif window and window.value > 0:
            present_k, present_v = update(past_key, new_k), update(past_value, new_v)
            # GroupQueryAttention counts a row's window from the row's own query positions
            # (start[b] ..), the node from total - Sq .. (docs/specification.md §2): row b's keys
            # are read shifted right by total - Sq - start[b] (0 in a first prompt and for full
            # rows), which makes the two agree; the slots the shift opens are masked
            shift = op.Sub(op.Sub(total64, seq), start)  # [B]
            src = op.Max(op.Sub(op.Unsqueeze(positions, _const_ints(op, [0])), op.Unsqueeze(shift, _const_ints(op, [1]))), zero)
            gather = op.Expand(op.Unsqueeze(src, _const_ints(op, [1, 3])), _const_ints(op, [1, kv_heads, 1, 1]))  # [B, kv, total, 1]
            k_valid = op.GatherND(present_k, gather, batch_dims=2)
            v_valid = op.GatherND(present_v, gather, batch_dims=2)
            shift4 = op.Unsqueeze(shift, _const_ints(op, [1, 2, 3]))
            keep = op.And(op.GreaterOrEqual(positions, shift4),
                          op.LessOrEqual(positions, op.Add(op.Unsqueeze(last, _const_ints(op, [1, 2, 3])), shift4)))
        else:
            present_k, present_v = update(past_key, new_k), update(past_value, new_v)
            ends = op.Unsqueeze(total64, _const_ints(op, [0]))
            k_valid = op.Slice(present_k, _const_ints(op, [0]), ends, _const_ints(op, [2]))
            v_valid = op.Slice(present_v, _const_ints(op, [0]), ends, _const_ints(op, [2]))
        q = bnsh(query, heads)
        batch = query.shape[0] if query.shape is not None else None
        q.shape = ir.Shape([batch, heads, query.shape[1], head_size])
        q.dtype = query.dtype
        for v_, n in ((k_valid, kv_heads), (v_valid, kv_heads)):
            v_.shape = ir.Shape([batch, n, None, head_size])
            v_.dtype = query.dtype
        keep.dtype = ir.DataType.BOOL
        attn = _emit(
            op, q, k_valid, v_valid, keep,
            num_heads=heads, kv_num_heads=kv_heads, scale=_scale(node, head_size),
            is_causal=1, window=window.value if window and window.value > 0 else -1,
        )
        attn.shape = ir.Shape([batch, heads, query.shape[1], head_size])
        attn.dtype = query.dtype
        output = op.Reshape(op.Transpose(attn, perm=[0, 2, 1, 3]), _const_ints(op, [0, 0, heads * head_size]))
        return output, present_k, present_v


def attention_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            AttentionOp.rule(True),
            AttentionOp.rule(False),
            DecomposedAttention.rule(),
            MicrosoftMultiHeadAttention.rule(),
            MicrosoftGroupQueryAttention.rule(),
            MicrosoftGroupQueryAttentionKV.rule(),
        ],
        commute=True,
    )
