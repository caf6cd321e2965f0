"""Text queries of the sparse heads: dense by docs/specification.md §2, and few.

A single prompt runs each run of text tokens as one ``GroupQueryAttention``
with everything before it as past context (a Loop over the runs): causal
work only, fused softmax. Batches (GQA takes past context with more than one
new token only at batch 1) and prompts with no text take one grouped
MatMul/Softmax over all keys."""

from __future__ import annotations

from onnx import TensorProto

from blindsight.passes.lowering.facts import SpanFacts
from blindsight.passes.lowering.fast.kernels import grouped_attention
from blindsight.passes.lowering.fast.runs import gqa_runs
from blindsight.passes.lowering.fast.scope import Scope


def text_queries(s: Scope, heads: list[int], f: SpanFacts) -> str:
    """[B, T, len(heads), D] for the T text positions in order."""
    b, cfg = s.b, s.cfg
    # whole KV groups share K/V reads; the few extra text rows of dense heads are cheap
    groups = sorted({cfg.kv_head(h) for h in heads})
    full = [g * cfg.group + j for g in groups for j in range(cfg.group)]
    one = s.single_prompt()
    some_text = b.op("ReduceMax", b.cast(f.is_text, TensorProto.INT64), keepdims=0)
    use_loop = b.op("And", one, b.cast(b.op("Max", some_text, b.scalar(0)), TensorProto.BOOL))
    branches = []
    for name, route in (("text_runs_gqa", _text_runs), ("text_matmul", _text_matmul)):
        branch = s.child(name)
        branches.append(branch.b.subgraph(name, [route(branch, full, f)]))
    out = b.op("If", use_loop, then_branch=branches[0], else_branch=branches[1])
    return out if full == heads else b.gather(out, [full.index(h) for h in heads], 2)


def _text_matmul(s: Scope, heads: list[int], f: SpanFacts) -> str:
    b = s.b
    text_pos = b.nonzero(f.is_text)
    return b.op("Transpose", grouped_attention(s, heads, text_pos, f.pos), perm=[0, 2, 1, 3])


def _text_runs(s: Scope, heads: list[int], f: SpanFacts) -> str:
    """Each run of text tokens attends everything before it: [1, T, h, D]."""
    b = s.b
    text = b.cast(f.is_text, TensorProto.INT64)
    before = b.op("Pad", text, b.i64(1, 0))  # is_text[p - 1], 0 before the prompt
    after = b.op("Slice", b.op("Pad", text, b.i64(0, 1)), b.i64(1), b.i64(2**62), b.i64(0))  # is_text[p + 1]
    first = b.op("And", f.is_text, b.op("Not", b.cast(b.op("Slice", before, b.i64(0), b.op("Shape", text), b.i64(0)), TensorProto.BOOL)))
    last = b.op("And", f.is_text, b.op("Not", b.cast(after, TensorProto.BOOL)))
    starts = b.nonzero(first)  # [C]
    ends = b.op("Add", b.nonzero(last), b.scalar(1))

    def everything_before(body, start):
        return body.op("Range", body.scalar(0), body.op("Squeeze", start, body.i64(0)), body.scalar(1))

    pool, width = gqa_runs(s, heads, starts, ends, everything_before)
    # text position p sits in run r(p) at column p - start(r)
    run_of = b.op("Sub", b.op("CumSum", b.cast(first, TensorProto.INT64), b.scalar(0)), b.scalar(1))
    text_pos = b.nonzero(f.is_text)
    r = b.op("Gather", run_of, text_pos, axis=0)
    idx = b.op("Add", b.op("Mul", r, b.op("Squeeze", width, b.i64(0))), b.op("Sub", text_pos, b.op("Gather", starts, r, axis=0)))
    return b.op("Gather", pool, idx, axis=1)  # [1, T, h, D]
