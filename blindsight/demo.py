"""bs-demo: a one-command tour on an embedded default (a tiny random Qwen2-VL).

Export the language model, write a mixed head profile, compile it both ways,
and check parity: the all-dense compile against the original export, the fast
lowering against the reference lowering, with the attention FLOPs saved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from blindsight.errors import BlindSightError
from blindsight.semantics import CATEGORIES, allowed_pairs


def template_spans(n_images: int, image_len: int, prefix=24, gap=8, question=32):
    """SPEC §6 template: prefix text, N images each after `gap` text tokens, a question."""
    spans, pos = [], prefix
    for _ in range(n_images):
        pos += gap
        spans.append((pos, pos + image_len))
        pos += image_len
    return np.array(spans, dtype=np.int64), pos + question


def _step(name, fn, rows):
    t0 = time.perf_counter()
    print(f"[{len(rows) + 1}] {name} ...", file=sys.stderr, flush=True)
    out = fn()
    rows.append((name, time.perf_counter() - t0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bs-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bs-demo-out", help="folder for the export, profile and compiled models")
    p.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl", "gemma3"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image-len", type=int, default=48)
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    args = p.parse_args(argv)
    try:
        from blindsight.compiler.pipeline import compile_model
        from blindsight.models.configs import tiny_config
        from blindsight.models.export import example_inputs, export_language_model, text_dims
    except ImportError as exc:
        print(f"bs-demo: error: {exc.name} is missing; install the export extra: pip install -e '.[export]'", file=sys.stderr)
        return 2
    from blindsight.profile import Profile, save
    from blindsight.runtime.session import CompiledSession
    import onnxruntime as ort

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps: list = []
    config = tiny_config(args.family, num_layers=4)
    dims = text_dims(args.family, config)
    src = _step("export (tiny random config, eager attention)", lambda: export_language_model(args.family, "eager", out / "lm.onnx", config=config), steps)
    H = dims["num_heads"]
    layers = [[CATEGORIES[(layer + h) % 4] for h in range(H)] for layer in range(dims["num_layers"])]
    profile = Profile(layers, num_kv_heads=dims["num_kv_heads"], model=f"bs-demo {args.family} (hand-made mix)")
    save(profile, out / "profile.json")
    dense = Profile.uniform("dense", dims["num_layers"], H, num_kv_heads=dims["num_kv_heads"])
    try:
        _step("compile all-dense", lambda: compile_model(src, dense, out / "lm.dense.onnx"), steps)
        res = _step("compile fast", lambda: compile_model(src, profile, out / "lm.fast.onnx", "fast"), steps)
        _step("compile reference", lambda: compile_model(src, profile, out / "lm.reference.onnx", "reference"), steps)
    except BlindSightError as exc:
        print(f"bs-demo: error: {exc}", file=sys.stderr)
        return 2

    spans, seq = template_spans(args.images, args.image_len)
    feeds = example_inputs(args.family, config, 1, seq)
    orig = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = orig.run(None, feeds)[0]
    logits = {name: CompiledSession(out / f"lm.{name}.onnx").run(feeds, spans, seq)[0] for name in ("dense", "fast", "reference")}
    total = {c: allowed_pairs(c, spans, seq) for c in CATEGORIES}
    heads = profile.counts()
    flops = sum(total[c] * n for c, n in heads.items()) / (total["dense"] * sum(heads.values()))
    record = {
        "family": args.family,
        "weights": "random (tiny config)",
        "seq_len": int(seq),
        "images": int(len(spans)),
        "attention_nodes": res.num_nodes,
        "head_counts": heads,
        "dense_compile_vs_export_max_abs": float(np.abs(logits["dense"] - want).max()),
        "fast_vs_reference_max_abs": float(np.abs(logits["fast"] - logits["reference"]).max()),
        "attention_flop_reduction_pct": round(100 * (1 - flops), 2),
        "steps_s": {name: round(t, 2) for name, t in steps},
        "outputs": str(out),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"\nBlindSight demo: {args.family}, tiny random weights (no real checkpoint), {len(spans)} images x {args.image_len} tokens, {seq} tokens")
    print(f"  {'check':<52}{'value':>14}")
    print(f"  {'attention nodes rewritten':<52}{res.num_nodes:>14}")
    print(f"  {'heads ' + ', '.join(f'{c}={n}' for c, n in heads.items()):<52}")
    print(f"  {'all-dense compile vs export (max |diff|)':<52}{record['dense_compile_vs_export_max_abs']:>14.2e}")
    print(f"  {'fast vs reference lowering (max |diff|)':<52}{record['fast_vs_reference_max_abs']:>14.2e}")
    print(f"  {'attention FLOPs saved on this prompt':<52}{record['attention_flop_reduction_pct']:>13.1f}%")
    for name, t in steps:
        print(f"  {'time: ' + name:<52}{t:>13.1f}s")
    print(f"  files in {out}/: lm.onnx, profile.json, lm.dense.onnx, lm.fast.onnx, lm.reference.onnx")
    ok = record["dense_compile_vs_export_max_abs"] <= 1e-5 and record["fast_vs_reference_max_abs"] <= 1e-4
    print("  parity:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
