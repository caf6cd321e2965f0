"""bs-demo: the whole flow on an embedded default that installs offline, in one table.

1. VLM path, random weights: a tiny random VLM checkpoint (real images, real
   processor, real prompt structure) is exported with bs-export, given a head
   profile, compiled (all-dense, fast, reference) and run with the bs-run
   pipeline: greedy answers of the compiled models are compared token for token.
2. Prefill speed on real attention dimensions: a language model with
   Qwen2-VL-2B's text dimensions (random weights, a few layers) on a
   multi-image surrogate prompt (docs/specification.md §6 template: random embeddings stand in
   for image tokens), dense vs BlindSight, timed interleaved, beside the FLOP
   bound of the profile.
3. Real weights (when bs-profile / bs-eval and Gemma 3 270M are installed):
   calibrate a profile on Gemma 3 270M with surrogate images (text segments
   wrapped in image delimiters) and measure its accuracy with a small bs-eval run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from blindsight.errors import BlindSightError, missing_dependency
from blindsight.attention import CATEGORIES
from blindsight.families import FAMILIES

STEPS = 7


class Table:
    """Rows of (part, check, value, note); progress lines go to stderr as steps start."""

    def __init__(self, quiet: bool):
        self.rows: list[dict] = []
        self.quiet = quiet
        self.n = 0

    def step(self, name: str):
        self.n += 1
        if not self.quiet:
            print(f"[{self.n}/{STEPS}] {name} ...", file=sys.stderr, flush=True)
        return time.perf_counter()

    def add(self, part: str, check: str, value, note: str = "", ok: bool | None = None):
        self.rows.append({"part": part, "check": check, "value": value, "note": note, "ok": ok})

    def render(self) -> str:
        def fmt(v):
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        w = [max(len(r[k]) if k != "value" else len(fmt(r[k])) for r in self.rows) for k in ("part", "check", "value")]
        lines = [f"{'part':<{w[0]}}  {'check':<{w[1]}}  {'value':>{w[2]}}  note", "-" * (sum(w) + 12)]
        for r in self.rows:
            mark = {True: "ok", False: "FAILED", None: ""}[r["ok"]]
            note = "; ".join(x for x in (mark, r["note"]) if x)
            lines.append(f"{r['part']:<{w[0]}}  {r['check']:<{w[1]}}  {fmt(r['value']):>{w[2]}}  {note}")
        return "\n".join(lines)


def mixed_profile(num_layers: int, num_heads: int, num_kv_heads: int):
    from blindsight.profile import Profile

    # head h of layer L: the categories in turn, starting L places along
    return Profile.mixed(num_layers, num_heads, cycle=CATEGORIES, rotate=True, num_kv_heads=num_kv_heads,
                         model="bs-demo: hand-made mix (random weights have nothing to calibrate)")


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((112, 112), Image.NEAREST)
            for _ in range(n)]


def vlm_path(args, out: Path, table: Table, record: dict):
    """Export, profile, compile and answer with the tiny random VLM; returns (template, paths, profile)."""
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm
    from blindsight.profile import Profile, save
    from blindsight.runtime.pipeline import Pipeline

    part = f"VLM {args.family} (random weights)"
    t = table.step(f"tiny random {args.family} checkpoint and bs-export")
    ck = make_tiny_checkpoint(args.family, out / "checkpoint", num_layers=args.layers)
    exp = export_vlm(ck, out / "export", overwrite=True).out_dir
    template = json.loads((exp / "template.json").read_text())
    table.add(part, "bs-export: vision, embed, language model (KV cache)", f"{time.perf_counter() - t:.1f}s",
              f"{template['num_layers']} layers, {template['num_heads']} heads")

    t = table.step("profile and bs-compile (all-dense, fast, reference)")
    profile = mixed_profile(template["num_layers"], template["num_heads"], template["num_kv_heads"])
    save(profile, exp / "profile.json")
    lm = exp / template["files"]["language_model"]
    dense = Profile.uniform("dense", template["num_layers"], template["num_heads"], num_kv_heads=template["num_kv_heads"])
    paths = {
        "dense": compile_model(lm, dense, exp / "language_model.dense.onnx").output,
        "fast": compile_model(lm, profile, exp / "language_model.blindsight.onnx", "fast").output,
        "reference": compile_model(lm, profile, exp / "language_model.reference.onnx", "reference").output,
        "export": lm,
    }
    counts = ", ".join(f"{c} {n}" for c, n in profile.counts().items())
    table.add(part, "profile (hand-made mix) + bs-compile x3", f"{time.perf_counter() - t:.1f}s", counts)

    t = table.step("answer with the bs-run pipeline: 3 images + a question")
    prompt = "Here are three pictures: <image>, <image> and <image>. Which one is the brightest?"
    answers = {}
    for name in ("export", "dense", "fast", "reference"):
        pipe = Pipeline(exp, compiled=paths[name], threads=args.threads)
        answers[name] = pipe.generate(_images(3), prompt, args.new_tokens)
    a = answers
    table.add(part, "image spans found in the prompt ids", len(a["fast"].image_spans),
              f"{a['fast'].prefill_tokens} prompt tokens, spans {a['fast'].image_spans}")
    same_dense = a["dense"].token_ids == a["export"].token_ids
    same_sparse = a["fast"].token_ids == a["reference"].token_ids
    table.add(part, "compiled all-dense == dense export (greedy tokens)", f"{len(a['dense'].token_ids)} tokens",
              "", same_dense)
    table.add(part, "sparse fast == reference lowering (greedy tokens)", f"{len(a['fast'].token_ids)} tokens",
              "", same_sparse)
    table.add(part, "time to first token, compiled (ms)", 1000 * a["fast"].ttft_s,
              f"{a['fast'].tokens_per_s:.0f} tokens/s decoding; answer tokens {a['fast'].token_ids} (random weights)")
    ttft = tiny_ttft(exp, paths, prompt, args)
    body = ttft["export"] / ttft["fast_bodies"]
    slower = "SLOWER: at 4 heads of 16 the per-node fixed costs outweigh the work saved; " if ttft["ratio"] < 1 else ""
    table.add(part, "time to first token, compiled mix vs dense export", f"{ttft['ratio']:.2f}x",
              f"{slower}compiled on {ttft['attention']}; on the function bodies {body:.2f}x; "
              f"medians of {args.repeats}, whole pipeline (vision, embedding, prefill)")
    record["vlm_ttft"] = ttft
    record["vlm"] = {"template": {k: template[k] for k in ("family", "num_layers", "num_heads", "num_kv_heads")},
                     "answers": {k: v.to_dict() for k, v in answers.items()},
                     "parity_dense": same_dense, "parity_sparse": same_sparse,
                     "profile_counts": profile.counts()}
    return template, paths, profile, same_dense and same_sparse


def tiny_ttft(exp: Path, paths: dict, prompt: str, args) -> dict:
    """Median time to first token of the tiny VLM's pipeline: the dense export, the
    compiled mix on its default route (the native kernel when built) and on its
    function bodies, interleaved after a warm-up round."""
    from blindsight.bench.timing import interleaved
    from blindsight.runtime.pipeline import Pipeline

    pipes = {"export": Pipeline(exp, compiled=paths["export"], threads=args.threads),
             "fast": Pipeline(exp, compiled=paths["fast"], threads=args.threads),
             "fast_bodies": Pipeline(exp, compiled=paths["fast"], threads=args.threads, native=False)}
    images = _images(3)
    runs = {k: (lambda pipe=pipe: pipe.generate(images, prompt, 1)) for k, pipe in pipes.items()}
    med = interleaved(runs, args.repeats, seconds=lambda result: result.ttft_s)
    return {"median_s": med, "ratio": med["export"] / med["fast"], "export": med["export"], "fast": med["fast"],
            "fast_bodies": med["fast_bodies"], "attention": pipes["fast"].attention}


def time_prefills(paths: dict, feeds: dict, repeats: int, threads: int) -> dict:
    """Median seconds of one prefill per model, the models run interleaved after a warm-up round."""
    from blindsight.bench.timing import interleaved
    from blindsight.runtime.session import make_session

    runs = {}
    for k, p in paths.items():
        sess = make_session(p, threads=threads)
        names = {i.name for i in sess.get_inputs()}
        inputs = {n: v for n, v in feeds.items() if n in names}
        runs[k] = lambda sess=sess, inputs=inputs: sess.run([sess.get_outputs()[0].name], inputs)
    return interleaved(runs, repeats)


def speed_rows(part: str, med: dict, flops, seq_len: int, args, table: Table) -> dict:
    speedup = med["dense"] / med["fast"]
    # a slowdown is said to be one, with its reason, never shown as a bare headline
    slower = "SLOWER: fixed per-node costs outweigh the attention work saved at these dimensions; " if speedup < 1 else ""
    table.add(part, f"prefill speed-up vs all-dense compile ({seq_len} tokens)", f"{speedup:.2f}x",
              f"{slower}FLOP bound: attention {flops.attention_bound:.2f}x, whole prefill {flops.prefill_bound:.2f}x "
              f"(efficiency {speedup / flops.prefill_bound:.0%}); median of {args.repeats}, {args.threads} threads")
    table.add(part, "prefill speed-up vs raw export", f"{med['export'] / med['fast']:.2f}x",
              f"attention FLOPs saved {flops.attention_reduction:.0%}, prefill FLOPs saved {flops.prefill_reduction:.0%}")
    return {"seq_len": int(seq_len), "median_s": med, "speedup_vs_dense": speedup,
            "speedup_vs_export": med["export"] / med["fast"], "flops": flops.to_dict()}


def speed(args, out: Path, table: Table, record: dict):
    """Prefill speed where attention has real dimensions: a language model with
    Qwen2-VL-2B's text dimensions (12 query / 2 KV heads of 128, hidden 1536;
    random weights, ``--speed-layers`` layers, vocabulary cut as bs-bench's
    prefill level does) on a multi-image prompt, dense vs BlindSight. The tiny
    VLM's 4 heads of 16 are all fixed per-node cost, so timing them would say
    nothing about a real model."""
    from blindsight.bench import prefill
    from blindsight.bench.op import OpShape, categories_of, compiled_node, dense_baseline, feeds_for, flop_bound
    from blindsight.flops import count_flops

    case = prefill.PrefillCase(num_layers=args.speed_layers, num_images=args.images, image_len=args.image_len)
    dims, tpl = case.dims(), case.template
    table.step(f"prefill timing, Qwen2-VL-2B dimensions ({case.num_layers} layers, random weights): "
               f"{args.images} images x {args.image_len} tokens")
    # one layer's attention alone: the mixed layer as one BlindSightAttention node vs GroupQueryAttention
    shape = OpShape(dims.num_heads, dims.num_kv_heads, dims.head_dim)
    op_med = time_prefills({"gqa": dense_baseline(shape), "fast": compiled_node(shape, "mixed")}, feeds_for(shape, tpl),
                           args.repeats, args.threads)
    op_speedup, op_bound = op_med["gqa"] / op_med["fast"], flop_bound("mixed", shape, tpl)
    slower = "SLOWER: fixed per-node costs outweigh the work saved; " if op_speedup < 1 else ""
    cats = categories_of("mixed", shape.num_heads)
    mix = ", ".join(f"{c} {cats.count(c)}" for c in sorted(set(cats)))
    table.add("Qwen2-VL-2B dims, one attention layer (random inputs, surrogate prompt)",
              f"attention speed-up vs GroupQueryAttention ({tpl.seq_len} tokens)", f"{op_speedup:.2f}x",
              f"{slower}FLOP bound {op_bound:.2f}x (efficiency {op_speedup / op_bound:.0%}); mixed layer "
              f"({mix}); median of {args.repeats}, {args.threads} threads")
    record["attention_qwen2_vl_2b_dims"] = {"seq_len": int(tpl.seq_len), "median_s": op_med, "speedup": op_speedup,
                                            "flop_bound": op_bound}
    paths = prefill.build(case, out / "speed")
    med = time_prefills({"export": paths["raw"], "dense": paths["dense"], "fast": paths["mix"]}, prefill.feeds(case),
                        args.repeats, args.threads)
    flops = count_flops(dims, prefill.profile_mix(dims), tpl.spans, tpl.seq_len, logit_positions=tpl.seq_len)
    record["speed_qwen2_vl_2b_dims"] = speed_rows(
        f"Qwen2-VL-2B dims, {case.num_layers} layers (random weights, surrogate prompt)", med, flops, tpl.seq_len, args, table)


def real_weights(args, out: Path, table: Table, record: dict):
    """Calibrate, evaluate and time Gemma 3 270M, if those parts are installed; else say why not."""
    part = "Gemma 3 270M (real weights, surrogate images)"
    table.step("bs-profile calibration on real weights")
    try:
        from blindsight.calibration import calibrate
        from blindsight.evaluation import evaluate
        from blindsight.evaluation.onnx_models import compile_with, export_dense
        from blindsight.evaluation.runner import onnx_feeds
        from blindsight.models import pretrained

        loaded = pretrained.load(pretrained.DEFAULT_MODEL)
    except (ImportError, AttributeError, BlindSightError, OSError) as exc:
        reason = f"skipped: {exc}".splitlines()[0][:120]
        table.add(part, "bs-profile + bs-eval", "-", reason)
        record["real_weights"] = {"skipped": reason}
        return
    from blindsight.flops import Template, count_flops
    from blindsight.profile import Profile

    t = time.perf_counter()
    cal = calibrate(loaded, num_prompts=args.calibration_prompts, progress=not args.quiet)
    p = cal.profile
    counts = ", ".join(f"{c} {n}" for c, n in p.counts().items())
    table.add(part, f"bs-profile ({args.calibration_prompts} prompts)", f"{time.perf_counter() - t:.1f}s", counts)

    table.step("bs-eval accuracy: dense vs compiled")
    t = time.perf_counter()
    ev = evaluate(p, loaded, num_prompts=args.eval_prompts, work_dir=out / "eval",
                  threads=args.threads, progress=not args.quiet)
    table.add(part, f"bs-eval accuracy, compiled ({args.eval_prompts} prompts)", ev["compiled_accuracy"],
              f"dense {ev['dense_accuracy']:.3g}, chance {ev['chance_accuracy']:.2g}, top-1 agreement "
              f"{ev['top1_agreement']:.0%}, mean KL {ev['mean_kl']:.2g}; {time.perf_counter() - t:.0f}s")
    record["real_weights"] = {"profile_counts": p.counts(), "calibration_prompts": args.calibration_prompts,
                              "eval": {k: v for k, v in ev.items() if not isinstance(v, dict)}}

    table.step(f"prefill timing, Gemma 3 270M: {args.images} images x {args.image_len} tokens")
    tpl = Template(num_images=args.images, image_len=args.image_len)
    raw = export_dense(loaded.family, loaded.directory, out / "eval")
    dense = Profile.uniform("dense", p.num_layers, p.num_heads, num_kv_heads=p.num_kv_heads)
    paths = {"export": raw, "dense": compile_with(raw, dense), "fast": compile_with(raw, p)}
    ids = np.random.default_rng(0).integers(10, 1000, tpl.seq_len)  # only the shapes matter for timing
    feeds = {**onnx_feeds(loaded, ids, tpl.spans), "image_spans": tpl.spans}
    med = time_prefills(paths, feeds, args.repeats, args.threads)
    flops = count_flops(loaded.directory, p, tpl.spans, tpl.seq_len, sink_tokens=p.sink_tokens)
    record["speed_real_weights"] = speed_rows(part, med, flops, tpl.seq_len, args, table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bs-demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bs-demo-out", help="folder for the checkpoint, export, profile and compiled models")
    p.add_argument("--family", default="qwen2_vl", choices=FAMILIES)
    p.add_argument("--layers", type=int, default=2, help="layers of the tiny random VLM (default 2)")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per answer (default 8)")
    p.add_argument("--images", type=int, default=4, help="images in the surrogate timing prompts (default 4)")
    p.add_argument("--image-len", type=int, default=1000, help="tokens per surrogate image (default 1000)")
    p.add_argument("--speed-layers", type=int, default=3,
                   help="layers of the Qwen2-VL-2B-sized timing model (default 3: layer 0 dense, then the bench's mixed layer)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (default 3)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--calibration-prompts", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--no-real-weights", action="store_true", help="skip the Gemma 3 270M calibration and bs-eval part")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    args = p.parse_args(argv)
    for name in ("layers", "new_tokens", "images", "image_len", "repeats", "threads", "speed_layers"):
        if getattr(args, name) < 1:
            print(f"bs-demo: error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"bs-demo: error: {missing_dependency(exc) or exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, record = Table(args.quiet), {}
    start = time.perf_counter()
    try:
        template, paths, profile, ok = vlm_path(args, out, table, record)
        speed(args, out, table, record)
        if args.no_real_weights:
            table.add("Gemma 3 270M (real weights, surrogate images)", "bs-profile + bs-eval", "-", "skipped: --no-real-weights")
            record["real_weights"] = {"skipped": "--no-real-weights"}
        else:
            real_weights(args, out, table, record)
    except BlindSightError as exc:
        print(f"bs-demo: error: {exc}", file=sys.stderr)
        return 2
    record.update(ok=ok, rows=table.rows, total_s=time.perf_counter() - start, outputs=str(out))
    if args.json:
        print(json.dumps(record, default=str))
    else:
        print(f"\nBlindSight demo ({time.perf_counter() - start:.0f}s). Random weights: the tiny {args.family} VLM "
              f"(its images, processor and prompt are real), and the Qwen2-VL-2B-sized timing model. Surrogate: "
              f"the timing prompts' image tokens are random embeddings; Gemma 3 270M's images are text segments.\n")
        print(table.render())
        print(f"\nfiles in {out}/export: template.json, vision.onnx, embed.onnx, language_model*.onnx, profile.json; "
              f"try: bs-run {out}/export --image a.png --prompt 'What is in the picture?'")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
