"""bs-demo: the whole flow on an embedded default that installs offline, in one table.

1. The native kernel: built on first use (about 10 s; the ONNX Runtime headers
   are fetched once), or the tour says why not and runs the function bodies.
2. VLM path, random weights: a tiny random VLM checkpoint (real images, real
   processor, real prompt structure) is exported with bs-export, given a head
   profile, compiled (all-dense, fast, reference) and run with the bs-run
   pipeline: greedy answers of the compiled models are compared token for token.
3. Time to first token where BlindSight pays: Qwen2-VL-2B's language model
   (its width, heads and vocabulary; random weights, --speed-layers layers) on a
   16-image prompt of 1,024 tokens each, prefilled in chunks through the KV
   cache with last-position logits: raw export vs all-dense compile vs the
   profile mix, timed interleaved, beside the FLOP bound.
4. Real weights: calibrate a profile on Gemma 3 270M (text-only weights, surrogate
   images: text segments wrapped in image delimiters) under the causal mask it
   was trained with, and measure its accuracy dense vs compiled with bs-eval.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

from blindsight.errors import BlindSightError, missing_dependency
from blindsight.attention import CATEGORIES
from blindsight.families import FAMILIES

STEPS = 6
WIDTH = 100  # the table fits a 100-column terminal
MORE = "more: BENCHMARKS.md and docs/demo.md"


class Table:
    """Rows of (part, check, value, note) under part headings; progress lines go to stderr."""

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

    def render(self, width: int = WIDTH) -> str:
        """Each part a heading; each row its check and value on one line, the note wrapped under it."""
        def fmt(v):
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        lines, part = [], None
        for r in self.rows:
            if r["part"] != part:
                part = r["part"]
                lines += ["" if lines else None, part, "-" * min(len(part), width)]
            mark = {True: "  ok", False: "  FAILED", None: ""}[r["ok"]]
            value = fmt(r["value"]) + mark
            room = width - 2 - len(value) - 2
            check = r["check"] if len(r["check"]) <= room else r["check"][: room - 3] + "..."
            lines.append(f"  {check:<{room}}  {value}")
            if r["note"]:
                lines += textwrap.wrap(r["note"], width, initial_indent="      ", subsequent_indent="      ")
        return "\n".join(x for x in lines if x is not None)


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


def kernel(args, table: Table, record: dict) -> bool:
    """The native kernel, built on first use; False (with the reason in the table) where it cannot be."""
    from blindsight import native

    part = "Native CPU kernel (BlindSightAttention)"
    t = table.step("native kernel")
    if args.no_native:
        table.add(part, "kernel", "off", "--no-native: every compiled model runs on its function bodies")
        record["native"] = {"used": False, "reason": "--no-native"}
        return False
    built_now = False
    if not native.available():
        from blindsight.native.build import build

        if not args.quiet:
            print("      building the native kernel on first use (about 10 s, once) ...", file=sys.stderr, flush=True)
        try:
            build(quiet=True)
            built_now = True
        except (BlindSightError, OSError) as exc:
            reason = str(exc).splitlines()[0][:200]
            table.add(part, "kernel", "not built",
                      f"{reason}; the compiled models run on their function bodies (ONNX operators only), "
                      "slower; `python -m blindsight.native build` says more")
            record["native"] = {"used": False, "reason": reason}
            return False
    how = f"built now in {time.perf_counter() - t:.0f} s" if built_now else "already built"
    lib = native.library_path()
    table.add(part, "kernel", native.isa() or "yes", f"{native.describe().replace(str(lib), lib.name)}; {how}")
    record["native"] = {"used": True, "built_now": built_now, "library": native.describe()}
    return True


def vlm_path(args, out: Path, table: Table, record: dict, use_native: bool) -> bool:
    """Export, profile, compile and answer with the tiny random VLM; True when every parity check holds."""
    from blindsight.compiler.pipeline import compile_model
    from blindsight.models.checkpoints import make_tiny_checkpoint
    from blindsight.models.export_vlm import export_vlm
    from blindsight.profile import Profile, save
    from blindsight.runtime.pipeline import Pipeline

    part = f"Tiny {args.family} VLM (random weights): export, compile, answer"
    t = table.step(f"tiny random {args.family} checkpoint, bs-export and bs-compile")
    ck = make_tiny_checkpoint(args.family, out / "checkpoint", num_layers=args.layers)
    exp = export_vlm(ck, out / "export", overwrite=True).out_dir
    template = json.loads((exp / "template.json").read_text())
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
    table.add(part, "bs-export (vision, embed, language model) + bs-compile x3", f"{time.perf_counter() - t:.0f} s",
              f"{template['num_layers']} layers, {template['num_heads']} heads; hand-made profile: {counts}; "
              "compiled all-dense, fast and reference lowerings")

    table.step("answer with the bs-run pipeline: 3 images + a question")
    prompt = "Here are three pictures: <image>, <image> and <image>. Which one is the brightest?"
    answers = {}
    for name in ("export", "dense", "fast", "reference"):
        pipe = Pipeline(exp, compiled=paths[name], threads=args.threads, native=None if use_native else False)
        answers[name] = pipe.generate(_images(3), prompt, args.new_tokens)
        if name == "fast":
            route = pipe.attention
    a = answers
    table.add(part, "image spans found in the prompt ids", len(a["fast"].image_spans),
              f"{a['fast'].prefill_tokens} prompt tokens, spans {a['fast'].image_spans}")
    same_dense = a["dense"].token_ids == a["export"].token_ids
    same_sparse = a["fast"].token_ids == a["reference"].token_ids
    table.add(part, "compiled all-dense == dense export (greedy tokens)", f"{len(a['dense'].token_ids)} tokens",
              "", same_dense)
    table.add(part, "sparse fast == reference lowering (greedy tokens)", f"{len(a['fast'].token_ids)} tokens",
              f"fast lowering on {route}", same_sparse)
    record["vlm"] = {"template": {k: template[k] for k in ("family", "num_layers", "num_heads", "num_kv_heads")},
                     "answers": {k: v.to_dict() for k, v in answers.items()},
                     "parity_dense": same_dense, "parity_sparse": same_sparse,
                     "profile_counts": profile.counts(), "attention": route}
    return same_dense and same_sparse


def speed(args, out: Path, table: Table, record: dict, use_native: bool, overrides: dict | None = None) -> dict:
    """Time to first token of Qwen2-VL-2B's language model (random weights, ``--speed-layers``
    layers, every one the op-level benchmark's mixed layer) on ``--images`` x ``--image-len``,
    raw export vs all-dense compile vs profile mix, chunked prefill, interleaved medians."""
    import gc

    from blindsight.bench import model as bench_model
    from blindsight.flops import count_flops

    text = {"num_hidden_layers": args.speed_layers, **(overrides or {}).get("text_config", {})}
    case = bench_model.ModelCase("qwen2-vl-2b", args.images, args.image_len, overrides={**(overrides or {}),
                                 "text_config": text}, chunk=args.chunk_size, first_dense=False)
    dims, tpl = case.dims(), case.template
    part = (f"Qwen2-VL-2B language model, {dims.num_layers} layer{'s' * (dims.num_layers > 1)} (random weights): "
            f"{args.images} images x {args.image_len} tokens")
    t = table.step(f"time to first token, Qwen2-VL-2B language model ({dims.num_layers} layer{'s' * (dims.num_layers > 1)}): "
                   f"{args.images} images x {args.image_len} tokens = {tpl.seq_len} tokens")
    paths = bench_model.build(case, out / "speed", progress=False)
    build_s = time.perf_counter() - t
    sessions = bench_model.open_sessions(paths, args.threads, native=None if use_native else False)
    route = sessions["mix"].blindsight_attention
    bench_model.warm_up(sessions, dims, case.dtype)
    med, logits = bench_model.time_to_first_token(sessions, case, dims, args.repeats)
    # the dense graphs compute the same model: their first token must agree
    first = {k: int(np.argmax(v[0, -1])) for k, v in logits.items()}
    dense_diff = float(np.abs(logits["dense"].astype(np.float64) - logits["raw"]).max())
    del sessions
    gc.collect()
    layers = bench_model.layers_of(dims, "mix", first_dense=False)
    flops = count_flops(dims, layers, tpl.spans, tpl.seq_len)
    vs_dense, vs_raw = med["dense"] / med["mix"], med["raw"] / med["mix"]
    mix = Counter(layers[0])
    on = f"on the {route.split(' (')[0]}" if route else ""
    timing = (f"median of {args.repeats}, {args.threads} threads, chunks of {case.chunk} tokens, "
              f"last-position logits")

    def slower(x):
        # a slowdown is said to be one, with its reason, never shown as a bare headline
        return "SLOWER at this size: per-node fixed costs outweigh the attention work saved; " if x < 1 else ""

    table.add(part, "time to first token: mix vs all-dense compile", f"{vs_dense:.2f}x",
              f"{slower(vs_dense)}{med['dense']:.1f} s -> {med['mix']:.1f} s {on}; Amdahl bound from FLOPs "
              f"{flops.prefill_bound:.2f}x (attention alone {flops.attention_bound:.2f}x), efficiency "
              f"{vs_dense / flops.prefill_bound:.2f}; {timing}")
    table.add(part, "time to first token: mix vs raw export", f"{vs_raw:.2f}x",
              f"{slower(vs_raw)}raw export {med['raw']:.1f} s (eager attention, ONNX operators); most of this gap "
              "is the compile replacing the export's attention, the rest the profile")
    table.add(part, "dense graphs agree (raw export vs all-dense compile)", f"{dense_diff:.1g}",
              f"max |logit difference|; first tokens raw {first['raw']}, dense {first['dense']}, "
              f"mix {first['mix']}", first["raw"] == first["dense"])
    table.add(part, "profile and FLOPs", f"-{flops.attention_reduction:.0%}",
              f"every layer mixed: {', '.join(f'{c} {n}' for c, n in sorted(mix.items()))} of {dims.num_heads} "
              f"heads; attention FLOPs saved {flops.attention_reduction:.0%}, prefill FLOPs saved "
              f"{flops.prefill_reduction:.0%}; build {build_s:.0f} s")
    result = {"images": args.images, "image_len": args.image_len, "seq_len": int(tpl.seq_len), "num_layers": dims.num_layers, "chunk": case.chunk, "median_s": med,
              "speedup_vs_dense": vs_dense, "speedup_vs_export": vs_raw, "attention": route, "first_tokens": first,
              "dense_vs_raw_max_abs_logit_diff": dense_diff, "flops": flops.to_dict(),
              "efficiency": vs_dense / flops.prefill_bound}
    record["speed_qwen2_vl_2b"] = result
    return result


def real_weights(args, out: Path, table: Table, record: dict, use_native: bool, background=None):
    """Calibrate and evaluate Gemma 3 270M under the causal surrogate mask, if installed; else say why not."""
    part = "Gemma 3 270M (real weights; surrogate images; causal mask as trained)"
    table.step(f"bs-profile ({args.calibration_prompts} prompts) and bs-eval ({args.eval_prompts} prompts), "
               "Gemma 3 270M")
    if background is not None:
        background.wait()  # its files are cached; on failure the steps below redo the work and say why
    try:
        from blindsight.calibration import calibrate
        from blindsight.evaluation import evaluate
        from blindsight.models import pretrained

        loaded = pretrained.load(pretrained.DEFAULT_MODEL, mask="causal")
    except (ImportError, AttributeError, BlindSightError, OSError) as exc:
        reason = f"skipped: {exc}".splitlines()[0][:200]
        table.add(part, "bs-profile + bs-eval", "-", reason)
        record["real_weights"] = {"skipped": reason}
        return

    t = time.perf_counter()
    cal = calibrate(loaded, num_prompts=args.calibration_prompts, progress=not args.quiet)
    p = cal.profile
    counts = ", ".join(f"{c} {n}" for c, n in p.counts().items())
    table.add(part, f"bs-profile --mask causal ({args.calibration_prompts} prompts)",
              f"{time.perf_counter() - t:.0f} s", f"heads: {counts}")
    t = time.perf_counter()
    ev = evaluate(p, loaded, num_prompts=args.eval_prompts, work_dir=out / "eval", threads=args.threads,
                  progress=not args.quiet, native=None if use_native else False)

    def ci(key):
        lo, hi = ev[key]
        return f"95% CI {lo:.0%}-{hi:.0%}"

    n = ev["num_prompts"]
    table.add(part, f"bs-eval accuracy, compiled ({n} prompts)", f"{ev['compiled_accuracy']:.1%}",
              f"{round(ev['compiled_accuracy'] * n)} of {n} right ({ci('compiled_accuracy_ci95')}); dense "
              f"{ev['dense_accuracy']:.1%} ({ci('dense_accuracy_ci95')}), {ev['accuracy_delta_points']:+.1f} points; "
              f"chance {ev['chance_accuracy']:.0%}", abs(ev["accuracy_delta_points"]) <= 2.0)
    table.add(part, "top-1 agreement, compiled vs dense", f"{ev['top1_agreement']:.1%}",
              f"mean KL {ev['mean_kl']:.2g}; attention FLOPs saved {ev['attention_flop_reduction']:.0%} on these "
              f"short prompts ({ev['mean_tokens']:.0f} tokens); compiled on {ev['attention']}; "
              f"{time.perf_counter() - t:.0f} s")
    record["real_weights"] = {"profile_counts": p.counts(), "calibration_prompts": args.calibration_prompts,
                              "mask": loaded.mask_description,
                              "eval": {k: v for k, v in ev.items() if not isinstance(v, dict)}}


def prepare_gemma(work_dir: Path) -> None:
    """Convert Gemma 3 270M's weights and write its bs-eval export (both cached): single-threaded
    Python work that the demo runs in a background process while it times the 2B model."""
    from blindsight.evaluation.onnx_models import export_dense
    from blindsight.models import pretrained

    p = pretrained.spec(pretrained.DEFAULT_MODEL)
    export_dense(p.family, pretrained.hf_dir(p.name), work_dir)


def start_background(out: Path):
    """``prepare_gemma`` in a child process at the lowest CPU priority, so that it takes the
    cores only while the tour runs Python work and leaves the timed runs alone; None where
    it cannot start (the Gemma step then does the same work itself)."""
    import os
    import subprocess

    log = open(out / "gemma-prepare.log", "w")
    code = f"from blindsight.demo import prepare_gemma; from pathlib import Path; prepare_gemma(Path({str(out / 'eval')!r}))"
    try:
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.nice(19))
    except OSError:
        return None
    finally:
        log.close()


def headline(record: dict) -> str:
    s = record.get("speed_qwen2_vl_2b")
    if not s:
        return f"BlindSight demo done; {MORE}"
    return (f"Headline: {s['images']} images x {s['image_len']:,} tokens ({s['seq_len']:,} tokens), Qwen2-VL-2B "
            f"language model ({s['num_layers']} layer{'s' * (s['num_layers'] > 1)}, {s['attention'].split(' (')[0]}): first token {s['speedup_vs_dense']:.2f}x sooner than the all-dense compile (bound "
            f"{s['flops']['prefill_bound']:.2f}x), {s['speedup_vs_export']:.2f}x sooner than the raw export; {MORE}")


def main(argv=None, *, speed_overrides: dict | None = None) -> int:
    """``speed_overrides`` ({"text_config": {...}}) shrinks the timing model (tests)."""
    p = argparse.ArgumentParser(prog="bs-demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bs-demo-out", help="folder for the checkpoint, exports, profiles and compiled models")
    p.add_argument("--family", default="qwen2_vl", choices=FAMILIES, help="family of the tiny random VLM")
    p.add_argument("--layers", type=int, default=2, help="layers of the tiny random VLM (default 2)")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per answer (default 8)")
    p.add_argument("--images", type=int, default=16, help="images in the timing prompt (default 16)")
    p.add_argument("--image-len", type=int, default=1024, help="tokens per image of the timing prompt (default 1024)")
    p.add_argument("--speed-layers", type=int, default=1,
                   help="layers of the Qwen2-VL-2B timing model, each the same mixed layer (default 1; time grows "
                        "linearly, the ratios hardly change)")
    p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk of the timing model (default 2048)")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds after a warm-up (default 1)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--calibration-prompts", type=int, default=8, help="Gemma 3 270M calibration prompts (default 8)")
    p.add_argument("--eval-prompts", type=int, default=100, help="Gemma 3 270M bs-eval prompts (default 100)")
    p.add_argument("--no-native", action="store_true", help="run every compiled model on its function bodies")
    p.add_argument("--no-real-weights", action="store_true", help="skip the Gemma 3 270M calibration and bs-eval part")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    args = p.parse_args(argv)
    for name in ("layers", "new_tokens", "images", "image_len", "repeats", "threads", "speed_layers", "chunk_size",
                 "calibration_prompts", "eval_prompts"):
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
    background = None if args.no_real_weights else start_background(out)
    try:
        use_native = kernel(args, table, record)
        ok = vlm_path(args, out, table, record, use_native)
        speed(args, out, table, record, use_native, speed_overrides)
        if args.no_real_weights:
            table.step("Gemma 3 270M skipped")
            table.add("Gemma 3 270M (real weights)", "bs-profile + bs-eval", "-", "skipped: --no-real-weights")
            record["real_weights"] = {"skipped": "--no-real-weights"}
        else:
            real_weights(args, out, table, record, use_native, background)
    except BlindSightError as exc:
        print(f"bs-demo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if background is not None and background.poll() is None:
            background.kill()
    record.update(ok=ok, rows=table.rows, total_s=time.perf_counter() - start, outputs=str(out), headline=headline(record))
    if args.json:
        print(json.dumps(record, default=str))
    else:
        intro = (f"BlindSight demo, {time.perf_counter() - start:.0f} s. Random weights: the tiny {args.family} VLM "
                 f"(its images, processor and prompt are real) and the Qwen2-VL-2B timing model, whose image "
                 f"tokens are random embeddings. Gemma 3 270M: real weights, images are text segments.")
        print("\n" + textwrap.fill(intro, WIDTH) + "\n")
        print(table.render())
        print(f"\nfiles: {out}/export (template.json, vision.onnx, embed.onnx, language_model*.onnx, profile.json)")
        print(f"try:   bs-run {out}/export --image a.png --prompt 'What is in the picture?'")
        print("\n" + textwrap.fill(record["headline"], WIDTH))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
