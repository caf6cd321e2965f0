"""Dense route: one causal ``GroupQueryAttention`` over the whole prompt, the
model's mask as its attention_bias and the window as its own."""

from __future__ import annotations

from onnx import TensorProto

from blindsight.passes.lowering.fast.kernels import gqa, gqa_operands
from blindsight.passes.lowering.fast.scope import Scope


def dense(s: Scope, heads: list[int], flat: bool = False) -> str:
    """[B, S, len(heads), D] ([B, S, h*D] if flat)."""
    b = s.b
    q, k, v, nh, nkv = gqa_operands(s, heads)
    seq = s.seq()
    seqlens = b.op("Expand", b.cast(b.op("Sub", seq, b.scalar(1)), TensorProto.INT32), s.batch())
    total = b.cast(seq, TensorProto.INT32)
    m = s.mask3()
    bias = None if m is None else s.to_bias(b.unsqueeze(m, 1))
    out = gqa(b, s.cfg, q, k, v, nh, nkv, seqlens, total, bias, window=s.cfg.local_window_size)
    return out if flat else b.op("Reshape", out, b.i64(0, 0, nh, -1))
