"""Two builds of the native kernel on decode-shaped BlindSightAttention nodes, side by side.

A decode step's attention is one query position per query head over the whole
cache. This times one node of that shape per build, interleaved in one process
(medians), at each cache length: ``cold`` calls walk through as many distinct
K/V tensors as the model has layers, as a decode step does, so the cache comes
from memory; ``warm`` calls repeat one layer's K/V, so it comes from the CPU's
caches and the figure is the kernel's arithmetic. Every build's output is
checked against a numpy reference before anything is timed.

    python -m blindsight.native build                       # the build under test
    cp blindsight/native/_build/libblindsight_ort.so /tmp/new.so
    git stash && python -m blindsight.native build && cp blindsight/native/_build/libblindsight_ort.so /tmp/base.so
    git stash pop
    python -m benchmarks.native_ab /tmp/base.so /tmp/new.so --contexts 4160,16480

Thread-pool spinning is off in every session, so that one session's idle
workers do not take the cores from the other's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _node_model(heads: int, kv_heads: int, dim: int, keys: int, spans: int) -> bytes:
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, heads, 1, dim]),
              helper.make_tensor_value_info("k", f, [1, kv_heads, keys, dim]),
              helper.make_tensor_value_info("v", f, [1, kv_heads, keys, dim]),
              helper.make_tensor_value_info("spans", TensorProto.INT64, [spans, 2])]
    node = helper.make_node("BlindSightAttention", ["q", "k", "v", "", "spans"], ["o"], domain="ai.blindsight",
                            num_heads=heads, kv_num_heads=kv_heads, scale=dim ** -0.5, categories=["dense"] * heads,
                            key_clauses=[1] * heads, layer=0)
    graph = helper.make_graph([node], "decode_attention", inputs,
                              [helper.make_tensor_value_info("o", f, [1, heads, 1, dim])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.blindsight", 1)])
    return model.SerializeToString()


def _session(model: bytes, library: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Dense attention of the last position (a decode step's text query sees every key)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kk = np.repeat(k, heads // kv_heads, axis=1).astype(np.float64)
    vv = np.repeat(v, heads // kv_heads, axis=1).astype(np.float64)
    s = (q.astype(np.float64) @ kk.transpose(0, 1, 3, 2)) * q.shape[-1] ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def measure(libraries: list[Path], contexts: list[int], heads: int = 12, kv_heads: int = 2, dim: int = 128,
            layers: int = 28, repeats: int = 7, threads: int = 2) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for keys in contexts:
        # four images over most of the cache; a decode query is text, so every key is visited
        step = max(keys // 5, 2)
        spans = np.array([[1 + i * step, (i + 1) * step] for i in range(4)], dtype=np.int64)
        model = _node_model(heads, kv_heads, dim, keys, len(spans))
        q = rng.standard_normal((1, heads, 1, dim), dtype=np.float32)
        kv = [(rng.standard_normal((1, kv_heads, keys, dim), dtype=np.float32),
               rng.standard_normal((1, kv_heads, keys, dim), dtype=np.float32)) for _ in range(layers)]
        sessions = {lib: _session(model, lib, threads) for lib in libraries}
        want = _reference(q, *kv[-1])
        for lib, sess in sessions.items():
            got = sess.run(None, {"q": q, "k": kv[-1][0], "v": kv[-1][1], "spans": spans})[0]
            err = float(np.abs(got - want).max())
            if not err < 1e-4:
                raise SystemExit(f"native_ab: {lib} differs from the numpy reference by {err:.3g} at {keys} keys")
        cold = {lib: [] for lib in libraries}
        warm = {lib: [] for lib in libraries}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for lib, sess in sessions.items():
                t0 = time.perf_counter()
                for k, v in kv:
                    sess.run(None, {"q": q, "k": k, "v": v, "spans": spans})
                cold[lib].append(time.perf_counter() - t0)
                k, v = kv[0]
                t0 = time.perf_counter()
                for _ in range(layers):
                    sess.run(None, {"q": q, "k": k, "v": v, "spans": spans})
                warm[lib].append(time.perf_counter() - t0)
        for lib in libraries:
            rows.append({"library": str(lib), "keys": keys, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                         "head_dim": dim, "threads": threads, "repeats": repeats,
                         "cache_mb": round(2 * layers * kv_heads * keys * dim * 4 / 2 ** 20, 1),
                         "cold_ms": round(1000 * float(np.median(cold[lib][1:])), 2),
                         "warm_ms": round(1000 * float(np.median(warm[lib][1:])), 2)})
        del sessions, kv
    return rows


def table(rows: list[dict], libraries: list[Path]) -> str:
    base = str(libraries[0])
    lines = ["| build | cache tokens | K/V read (MB) | cold ms (vs first) | warm ms (vs first) |", "|---|---|---|---|---|"]
    for r in rows:
        b = next(x for x in rows if x["keys"] == r["keys"] and x["library"] == base)
        lines.append(f"| {r['library']} | {r['keys']:,} | {r['cache_mb']:,} | {r['cold_ms']} ({b['cold_ms'] / r['cold_ms']:.2f}x) "
                     f"| {r['warm_ms']} ({b['warm_ms'] / r['warm_ms']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.native_ab", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("libraries", nargs="+", type=Path, help="libblindsight_ort.so builds; the first is the baseline")
    ap.add_argument("--contexts", default="4160,16480", help="cache lengths in tokens, comma-separated (default 4160,16480)")
    ap.add_argument("--heads", type=int, default=12, help="query heads (default 12, Qwen2-VL-2B)")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2)")
    ap.add_argument("--head-dim", type=int, default=128, help="head size (default 128)")
    ap.add_argument("--layers", type=int, default=28, help="distinct K/V tensors per cold round (default 28)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per build (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    for lib in args.libraries:
        if not lib.is_file():
            ap.error(f"{lib} is not a file: give built libraries (python -m blindsight.native build writes one)")
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
    except ValueError:
        ap.error(f"--contexts {args.contexts!r}: give token counts separated by commas, e.g. 4160,16480")
    if not contexts or min(contexts) < 1 or args.heads % args.kv_heads or min(args.layers, args.repeats) < 1:
        ap.error("--contexts must be positive, --kv-heads must divide --heads, --layers and --repeats at least 1")
    rows = measure(args.libraries, contexts, args.heads, args.kv_heads, args.head_dim, args.layers, args.repeats,
                   args.threads)
    print(json.dumps(rows, indent=1) if args.json else table(rows, args.libraries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
