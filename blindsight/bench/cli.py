"""bs-flops and bs-bench command lines."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from pathlib import Path

from blindsight.errors import BlindSightError
from blindsight.tables import fmt_table
from blindsight.attention.schema import SHORT_DTYPES
from blindsight.runtime.session import PROVIDERS, resolve_provider

# ----------------------------------------------------------------- bs-flops


def _template_args(p: argparse.ArgumentParser, images=8, image_len=1024):
    g = p.add_argument_group("prompt template (SPEC §6)")
    g.add_argument("--images", type=int, default=images, help=f"number of images N (default {images})")
    g.add_argument("--image-len", type=int, default=image_len, help=f"tokens per image L, delimiters included (default {image_len})")
    g.add_argument("--prefix", type=int, default=24, help="text tokens before the first image (default 24)")
    g.add_argument("--gap", type=int, default=8, help="text tokens before every image (default 8)")
    g.add_argument("--question", type=int, default=32, help="text tokens after the last image (default 32)")


def _check_template(args):
    from blindsight.flops import Template

    for name in ("images", "prefix", "gap", "question"):
        if getattr(args, name) < 0:
            raise BlindSightError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.image_len < 1:
        raise BlindSightError(f"--image-len must be >= 1, got {args.image_len}")
    return Template(args.images, args.image_len, args.prefix, args.gap, args.question)


def flops_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="bs-flops",
        description="Attention and whole-prefill FLOPs of one prompt, dense vs BlindSight, with the speed-up bounds. "
        "Attention FLOPs of a head = 4 x head_dim x allowed causal (q, k) pairs (SPEC §2); the prefill adds the "
        "Q/K/V/O projections, the gated MLP and the LM head (1 position unless --logit-positions). Sliding-window "
        "layers (Gemma 3) are counted with their window.",
    )
    p.add_argument("--model", default="qwen2-vl-7b", help="built-in name (see --list) or a transformers config.json / checkpoint directory")
    p.add_argument("--profile", help="head profile JSON (format v1); without it, one row per uniform category and the bench's mixed layer")
    p.add_argument("--sink-tokens", type=int, default=None, help="sink tokens per image (default: the profile's, else 1)")
    p.add_argument("--logit-positions", type=int, default=1, help="positions the LM head runs on (default 1: the last)")
    p.add_argument("--list", action="store_true", help="list the built-in model configurations and exit")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    _template_args(p)
    args = p.parse_args(argv)
    try:
        from blindsight.flops import builtin_models, count_flops, model_dims
        from blindsight.profile import MIXED, Profile, load
        from blindsight.attention import CATEGORIES

        if args.list:
            for name in builtin_models():
                d = model_dims(name)
                print(f"{name:15s} layers {d.num_layers:3d}  heads {d.num_heads:3d}/{d.num_kv_heads:<2d} head_dim {d.head_dim}  hidden {d.hidden_size}")
            return 0
        dims = model_dims(args.model)
        t = _check_template(args)
        if args.profile:
            prof = load(args.profile)
            profiles = {Path(args.profile).name: prof.layers}
            sink = args.sink_tokens if args.sink_tokens is not None else prof.sink_tokens
        else:
            profiles = {c: [[c] * dims.num_heads] * dims.num_layers for c in CATEGORIES}
            profiles[MIXED] = Profile.mixed(dims.num_layers, dims.num_heads).layers
            sink = args.sink_tokens if args.sink_tokens is not None else 1
        if sink < 1:
            raise BlindSightError(f"--sink-tokens must be >= 1, got {sink}")
        reports = {name: count_flops(dims, layers, t.spans, t.seq_len, sink, args.logit_positions) for name, layers in profiles.items()}
    except BlindSightError as exc:
        print(f"bs-flops: error: {exc}", file=sys.stderr)
        return 2
    record = {"model": dims.name, "seq_len": t.seq_len, "num_images": t.num_images, "image_len": t.image_len,
              "sink_tokens": sink, "profiles": {k: r.to_dict() for k, r in reports.items()}}
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(f"{dims.name}: {t.num_images} images x {t.image_len} tokens, {t.seq_len} tokens in all, sink_tokens {sink}")
    rows = [[name, f"{r.attention_dense / 1e12:.2f}", f"{r.attention_sparse / 1e12:.2f}", f"{100 * r.attention_reduction:.1f}%",
             f"{r.attention_bound:.2f}x", f"{r.prefill_dense / 1e12:.2f}", f"{r.prefill_sparse / 1e12:.2f}",
             f"{100 * r.prefill_reduction:.1f}%", f"{r.prefill_bound:.2f}x"] for name, r in reports.items()]
    print(fmt_table(["profile", "attn TFLOP", "sparse", "saved", "bound", "prefill TFLOP", "sparse", "saved", "bound"], rows))
    return 0


# ----------------------------------------------------------------- bs-bench

FULL_SIZES = ((4, 2048), (8, 1024), (16, 512))
QUICK_SIZES = ((4, 256), (8, 128))


def _machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version()}


def _op_level(sizes, cases, threads, repeats, memory, bar, explain=False, dtype="float32", provider="cpu",
              image_blocks=False, native=False) -> list[dict]:
    from blindsight.bench.op import OpShape, breakdown, causal_gqa, compiled_node, dense_baseline, feeds_for, flop_bound
    from blindsight.bench.timing import interleaved, measure_in_child, session
    from blindsight.flops import Template

    shape = OpShape(dtype=dtype, image_blocks=image_blocks)
    out = []
    for n, l in sizes:
        t = Template(n, l)
        feeds = feeds_for(shape, t)
        plain = {k: v for k, v in feeds.items() if k != "image_spans"}
        # with image blocks three sessions are alive at once (the causal GQA's arena alone
        # holds about 8 GB at 8K tokens): without arenas each run frees what it took
        arena = not image_blocks
        base = session(dense_baseline(shape), threads, provider=provider, arena=arena)
        base_feeds = feeds if image_blocks else plain
        # with image blocks the causal kernel (not exact there) is timed beside, for reference
        gqa = session(causal_gqa(shape), threads, provider=provider, arena=False) if image_blocks else None
        med, base_med, gqa_med, nat_med, why = {}, {}, {}, {}, {}
        for c in cases:
            # one compiled session at a time beside the baseline: at 8K tokens a
            # GroupQueryAttention arena alone holds S x S scores per head (GBs)
            s = session(compiled_node(shape, c), threads, provider=provider, arena=arena)
            runs = {"baseline": lambda base=base: base.run(None, base_feeds), c: lambda s=s: s.run(None, feeds)}
            if gqa is not None:
                runs["causal_gqa"] = lambda gqa=gqa: gqa.run(None, plain)
            if native:  # the same node on the native kernel, in the same loop
                sn = session(compiled_node(shape, c), threads, provider=provider, native=True, arena=arena)
                runs["native"] = lambda sn=sn: sn.run(None, feeds)
            pair = interleaved(runs, repeats, progress=bar)
            med[c], base_med[c], gqa_med[c] = pair[c], pair["baseline"], pair.get("causal_gqa")
            if native:
                nat_med[c] = pair["native"]
                del sn
            del s
            if explain:
                why[c] = breakdown(compiled_node(shape, c), feeds, threads, provider=provider)
            gc.collect()
        del base, gqa
        gc.collect()
        mem = {}
        if memory:
            for v in ["baseline", *cases, *([f"native:{c}" for c in cases] if native else [])]:
                mem[v] = measure_in_child("blindsight.bench.op", {"variant": v, "threads": threads, "shape": vars(shape), "provider": provider,
                                                                  "template": {"num_images": n, "image_len": l}})["peak_rss_mb"]
                bar.update(1)
        for c in cases:
            speedup, bound = base_med[c] / med[c], flop_bound(c, shape, t)
            out.append({"category": c, "N": n, "L": l, "seq_len": t.seq_len, "dtype": dtype, "provider": provider,
                        "image_blocks": image_blocks,
                        "baseline": "all-dense BlindSightAttention, image blocks" if image_blocks else "GroupQueryAttention",
                        "speedup": speedup, "flop_bound": bound,
                        "efficiency": speedup / bound, "time_s": med[c], "baseline_s": base_med[c],
                        "peak_rss_mb": mem.get(c), "baseline_peak_rss_mb": mem.get("baseline")})
            if image_blocks:
                out[-1]["causal_gqa_s"] = gqa_med[c]
            if native:  # the native kernel against the same baseline runs and the function body
                ns = base_med[c] / nat_med[c]
                out[-1].update(native_s=nat_med[c], native_speedup=ns, native_efficiency=ns / bound,
                               native_vs_function_body=med[c] / nat_med[c], native_peak_rss_mb=mem.get(f"native:{c}"))
            if explain:
                out[-1]["breakdown_ms"] = why[c]
    return out


def _prefill_level(case, threads, repeats, memory, work_dir, bar, provider="cpu", native=False) -> dict:
    from blindsight.bench import prefill
    from blindsight.bench.timing import interleaved, measure_in_child, session

    paths = prefill.build(case, work_dir)
    bar.update(1)
    f = prefill.feeds(case)

    def runner(sess):
        names = {i.name for i in sess.get_inputs()}
        inputs = {n: v for n, v in f.items() if n in names}
        return lambda: sess.run(None, inputs)

    # pairs, two sessions at a time, without the memory arena: at 8K tokens the
    # raw export materialises S x S scores per layer (SPEC §5) and the arenas of
    # two sessions outgrew this machine's 24 GB; every variant pays the same
    # allocation costs this way
    ratios = {}
    # "native_mix" / "native_dense": the same compiled graphs on the native kernel
    pairs = [("dense", "mix"), ("raw", "mix"), ("raw", "dense")]
    if native:
        pairs += [("dense", "native_mix"), ("dense", "native_dense")]
    for a, b in pairs:
        sa = session(paths[a], threads, provider, arena=False)
        sb = session(paths[b.removeprefix("native_")], threads, provider, arena=False, native=b.startswith("native_"))
        pair = interleaved({a: runner(sa), b: runner(sb)}, repeats, progress=bar)
        ratios[a, b] = pair[a] / pair[b]
        if (a, b) == ("dense", "mix"):
            med = dict(pair)
        elif (a, b) == ("raw", "mix"):
            med["raw"] = pair["raw"]
        elif a == "dense" and b.startswith("native_"):
            med[b] = pair[b]
        del sa, sb
        gc.collect()
    mem = {}
    if memory:
        for k, pth in paths.items():
            mem[k] = measure_in_child("blindsight.bench.prefill", {"case": vars(case), "path": str(pth), "threads": threads,
                                                                  "provider": provider})["peak_rss_mb"]
            bar.update(1)
    fl = prefill.flops(case)
    speedup = ratios["dense", "mix"]
    return {
        "model": case.dims().name, "num_layers": case.num_layers, "form": case.form, "N": case.num_images, "L": case.image_len,
        "dtype": SHORT_DTYPES[case.dtype], "provider": provider,
        "seq_len": case.template.seq_len, "speedup": speedup, "flop_bound": fl["prefill_bound"],
        "efficiency": speedup / fl["prefill_bound"], "vs_raw_export": ratios["raw", "mix"],
        "dense_vs_raw_export": ratios["raw", "dense"], "attention_flop_bound": fl["attention_bound"],
        "time_s": {k: med[k] for k in ("raw", "dense", "mix", "native_mix", "native_dense") if k in med},
        "peak_rss_mb": mem or None,
        **({"native_speedup": ratios["dense", "native_mix"], "native_efficiency": ratios["dense", "native_mix"] / fl["prefill_bound"],
            "native_dense_vs_dense": ratios["dense", "native_dense"]} if native else {}),
    }


def _decode_level(case, contexts, threads, repeats, work_dir, bar, provider="cpu") -> list[dict]:
    from blindsight.bench import decode
    from blindsight.bench.timing import interleaved, session

    paths = decode.build(case, work_dir)
    bar.update(1)
    out = []
    for context in contexts:
        f = decode.feeds(case, context)
        runs = {}
        for name in ("raw", "mix"):
            sess = session(paths[name], threads, provider)
            names = {i.name for i in sess.get_inputs()}
            inputs = {n: v for n, v in f.items() if n in names}
            runs[name] = lambda sess=sess, inputs=inputs: sess.run(None, inputs)
        med = interleaved(runs, repeats, progress=bar)
        out.append({"model": case.dims().name, "context": context, "provider": provider, "dtype": "float32",
                    "images": decode.IMAGES, "raw_s": med["raw"], "compiled_s": med["mix"],
                    "raw_tokens_per_s": 1 / med["raw"], "compiled_tokens_per_s": 1 / med["mix"],
                    "ratio": med["raw"] / med["mix"]})
        del runs
        gc.collect()
    return out


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blindsight.profile import MIXED
    from blindsight.attention import DENSITY_ORDER

    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    # sparsest first, then the mixed layer, then dense
    markers = {c: m for c, m in zip((*reversed(DENSITY_ORDER[1:]), MIXED, DENSITY_ORDER[0]), "os^Dv")}
    top = 1.0
    for r in record["op"]:
        top = max(top, r["flop_bound"], r["speedup"])
        ax.scatter(r["flop_bound"], r["speedup"], marker=markers.get(r["category"], "o"), s=50,
                   label=r["category"], color=f"C{list(markers).index(r['category'])}")
        ax.annotate(f"{r['N']}x{r['L']}", (r["flop_bound"], r["speedup"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
    xs = [1, top * 1.05]
    ax.plot(xs, xs, "k-", lw=0.8, label="FLOP bound")
    ax.plot(xs, [0.8 * x for x in xs], "k--", lw=0.8, label="0.8 x bound (target)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")  # bounds span 1x to ~50x
    ax.set_xlabel("FLOP bound (dense / allowed attention pairs)")
    ax.set_ylabel("measured speed-up vs GroupQueryAttention")
    ax.set_title(f"BlindSightAttention (fast lowering), {record['threads']} threads, fp32")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def bench_main(argv=None) -> int:
    from blindsight.bench.op import CATEGORY_CASES
    from blindsight.models.fullsize import FULL_SIZE

    p = argparse.ArgumentParser(
        prog="bs-bench",
        description="Measured speed-ups of the fast lowering (SPEC §6): op level, one BlindSightAttention node against "
        "ONNX Runtime's fastest dense causal attention (GroupQueryAttention) at 28 query / 4 KV heads, head_dim 128, "
        "fp32 (or --dtype); prefill level, a Qwen2-VL-2B-sized language model (random weights) compiled with a profile mix vs "
        "compiled all-dense vs the raw export. Variants run interleaved in one process; medians; FLOP bound and "
        "efficiency (speed-up / bound) beside every speed-up; peak memory from a fresh process per variant.",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run in under 2 minutes")
    p.add_argument("--level", choices=("op", "prefill", "decode", "model", "all"), default="all",
                   help="op: single nodes; prefill: a language model's prefill; decode: one token after a multi-image "
                   "KV cache, compiled vs raw export; model: a whole full-size language model (--model-config), time to "
                   "first token and decode; all (default): op, prefill and decode")
    p.add_argument("--model-config", default="qwen2-vl-2b", choices=FULL_SIZE,
                   help="model level: the full-size configuration, random weights (default qwen2-vl-2b); its export is "
                   "cached in --work-dir (6 GB for qwen2-vl-2b in fp32)")
    p.add_argument("--model-images", type=int, default=4, help="model level: images in the prompt (default 4)")
    p.add_argument("--model-image-len", type=int, default=1024, help="model level: tokens per image (default 1024)")
    p.add_argument("--decode-repeats", type=int, default=10, help="model level: timed decode steps per graph (default 10)")
    p.add_argument("--contexts", help="decode level: cached context lengths, comma-separated (default 1024,8192; quick 256)")
    p.add_argument("--cases", default=",".join(CATEGORY_CASES), help="op-level categories, comma-separated ('mixed': a mixed layer)")
    p.add_argument("--sizes", help="op-level N x L list, e.g. 4x2048,8x1024 (default: SPEC §6's three)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--dtype", choices=tuple(SHORT_DTYPES), default="fp32",
                   help="dtype of the op-level node and of the prefill export (default fp32; bf16 is refused with the reason)")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS),
                   help="ONNX Runtime execution provider (default cpu); on a GPU provider the nodes that fell back to the CPU are reported")
    p.add_argument("--image-blocks", action="store_true",
                   help="op level with Gemma 3's bidirectional image blocks (SPEC §2): the baseline is then the all-dense node "
                   "with the blocks (GroupQueryAttention is causal, not exact there; timed beside for reference) and the FLOP "
                   "bound counts the block pairs")
    p.add_argument("--repeats", type=int, help="timed runs per variant (default 5, quick 2)")
    p.add_argument("--prefill-layers", type=int, help="decoder layers of the prefill model (default 4, quick 2)")
    p.add_argument("--prefill-images", type=int, help="images in the prefill prompt (default 8, quick 4)")
    p.add_argument("--prefill-image-len", type=int, help="tokens per image in the prefill prompt (default 1000, quick 96)")
    p.add_argument("--form", default="attention_op", choices=("attention_op", "decomposed", "eager"), help="export form of the prefill model")
    p.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "blindsight", "bench"),
                   help="where the prefill export is cached")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--no-native", action="store_true",
                   help="skip the native-kernel variant (it runs when the kernel is built: python -m blindsight.native build)")
    p.add_argument("--breakdown", action="store_true", help="op level: also profile one run per case and report milliseconds per kernel class (where the time goes)")
    p.add_argument("--plot", help="write a PNG of speed-up against FLOP bound here")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the tables")
    p.add_argument("--output", help="also write the JSON record to this file")
    p.add_argument("--markdown", help="also write the tables as a Markdown report (BENCHMARKS.md) to this file")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: merge records written by --output (e.g. op and prefill runs) and report them")
    args = p.parse_args(argv)
    try:
        from blindsight.bench.prefill import PrefillCase
        from blindsight.records import record_path

        cases = [c for c in args.cases.split(",") if c]
        bad = [c for c in cases if c not in CATEGORY_CASES]
        if bad or not cases:
            raise BlindSightError(f"unknown case {', '.join(bad) or '(none)'}; choose from {', '.join(CATEGORY_CASES)}")
        sizes = QUICK_SIZES if args.quick else FULL_SIZES
        if args.sizes:
            try:
                sizes = tuple(tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(","))
                assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in sizes)
            except (ValueError, AssertionError):
                raise BlindSightError(f"--sizes {args.sizes!r}: expected a list like 4x2048,8x1024") from None
        dtype = SHORT_DTYPES[args.dtype]
        if dtype == "bfloat16":
            raise BlindSightError("--dtype bf16 is not benchmarked: onnxruntime's CPU provider has no bf16 kernels "
                                  "(MatMul, Softmax, GroupQueryAttention) and the benchmark feeds numpy arrays, which have no "
                                  "bfloat16; use --dtype fp16 (on --provider cuda for the GPU figures)")
        resolve_provider(args.provider)
        repeats = args.repeats or (2 if args.quick else 5)
        if repeats < 1 or args.threads < 1:
            raise BlindSightError("--repeats and --threads must be >= 1")
        case = PrefillCase(
            num_layers=args.prefill_layers or (2 if args.quick else 4),
            num_images=args.prefill_images or (4 if args.quick else 8),
            image_len=args.prefill_image_len or (96 if args.quick else 1000),
            form=args.form,
            dtype=args.dtype,
        )
        if case.num_layers < 2:
            raise BlindSightError("--prefill-layers must be >= 2 (the profile mix keeps layer 0 dense)")
        # --image-blocks at the default level runs the op level only
        do_op, do_prefill = args.level in ("op", "all"), args.level == "prefill" or (args.level == "all" and not args.image_blocks)
        do_decode = args.level == "decode" or (args.level == "all" and not args.image_blocks)
        do_model = args.level == "model"
        if do_model:
            if args.image_blocks:
                raise BlindSightError("--image-blocks is an op-level option (the model level runs the model's own mask); pass --level op")
            if args.model_images < 1 or args.model_image_len < 1 or args.decode_repeats < 1:
                raise BlindSightError("--model-images, --model-image-len and --decode-repeats must be >= 1")
            from blindsight.bench.model import ModelCase

            model_case = ModelCase(args.model_config, args.model_images, args.model_image_len, args.dtype)
            model_repeats = args.repeats or (2 if args.quick else 3)
        if args.merge:
            do_op = do_prefill = do_decode = do_model = False
        if args.image_blocks and args.level == "decode":
            raise BlindSightError("--image-blocks is an op-level option (decode steps are text, dense); pass --level op")
        from blindsight.bench.decode import DecodeCase, context_template

        try:
            contexts = [int(c) for c in (args.contexts or ("256" if args.quick else "1024,8192")).split(",") if c]
            for c in contexts:
                context_template(c)
        except ValueError as exc:
            raise BlindSightError(f"--contexts {args.contexts!r}: {exc}" if "context" in str(exc) else
                                  f"--contexts {args.contexts!r}: expected lengths like 1024,8192") from None
        decode_case = DecodeCase(num_layers=case.num_layers)
        if args.image_blocks and args.level == "prefill":
            raise BlindSightError("--image-blocks is an op-level option (the prefill model is Qwen2-VL-sized, causal); pass --level op")
        if (do_prefill or do_decode or do_model) and not args.merge:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                raise BlindSightError("the prefill, decode and model levels export a model with torch; install the export extra (pip install -e '.[export]') or pass --level op") from None
        from tqdm import tqdm

        memory = not args.no_memory
        from blindsight import native as native_kernel

        native = not args.no_native and args.provider == "cpu" and native_kernel.available()
        total = 0
        if do_op:
            per_case = 2 + bool(args.image_blocks) + bool(native)
            total += len(sizes) * (per_case * len(cases) * repeats + ((len(cases) * (2 if native else 1) + 1) if memory else 0))
        if do_prefill:
            total += 1 + (10 if native else 6) * repeats + (3 if memory else 0)
        if do_decode:
            total += 1 + 2 * repeats * len(contexts)
        if do_model:
            total += 1 + 3 * model_repeats + 2 * args.decode_repeats + (3 if memory else 0)
        record = {"machine": _machine(), "threads": args.threads, "repeats": repeats, "quick": args.quick,
                  "dtype": dtype, "provider": args.provider,
                  "native": native_kernel.summary() if native else None}
        for path in args.merge or []:
            try:
                part = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise BlindSightError(f"--merge {path}: not a bs-bench JSON record ({exc})") from None
            if not isinstance(part, dict):
                raise BlindSightError(f"--merge {path}: not a bs-bench JSON record (expected an object)")
            # op rows of several runs (e.g. causal and --image-blocks) add up; the rest is the last run's
            rows = record.get("op", []) + list(part.get("op") or [])
            record.update({k: v for k, v in part.items()
                           if k in ("machine", "threads", "repeats", "quick", "dtype", "provider", "native", "prefill", "decode",
                                    "model")})
            if rows:
                record["op"] = rows
        with tqdm(total=total, desc="bs-bench", file=sys.stderr, disable=None) as bar:
            if do_op:
                record["op"] = _op_level(sizes, cases, args.threads, repeats, memory, bar, args.breakdown, dtype, args.provider,
                                         args.image_blocks, native)
            if do_prefill:
                record["prefill"] = _prefill_level(case, args.threads, repeats, memory, Path(args.work_dir), bar, args.provider, native)
            if do_decode:
                record["decode"] = _decode_level(decode_case, contexts, args.threads, repeats, Path(args.work_dir), bar, args.provider)
            if do_model:
                from blindsight.bench import model as model_level

                record["model"] = model_level.run(model_case, Path(args.work_dir), args.threads, model_repeats, args.decode_repeats,
                                                  args.provider, native=True if native else False, memory=memory, progress=bar)
        if args.plot and record.get("op"):
            _plot(record, Path(args.plot))
        if args.markdown:
            tmp = Path(args.markdown).with_name(f".{Path(args.markdown).name}.tmp")
            tmp.write_text(markdown(record, args.plot and record_path(args.plot, Path(args.markdown).resolve().parent)))
            os.replace(tmp, args.markdown)
        if args.output:
            tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, args.output)
    except BlindSightError as exc:
        print(f"bs-bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    print(render(record))
    return 0


def render(record: dict) -> str:
    """The tables of a bs-bench record (also used for BENCHMARKS.md)."""
    parts = []
    m = record["machine"]
    parts.append(f"machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; {record['threads']} threads, "
                 f"medians of {record['repeats']} interleaved runs")
    for blocks in (False, True):
        op = [r for r in record.get("op") or () if bool(r.get("image_blocks")) == blocks]
        if not op:
            continue
        rows = []
        for r in op:
            mem = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f}"
            row = [r["category"], f"{r['N']}x{r['L']}", r["seq_len"], f"{r['baseline_s']:.3f}", f"{r['time_s']:.3f}",
                   f"{r['speedup']:.2f}x", f"{r['flop_bound']:.2f}x", f"{r['efficiency']:.2f}", mem]
            rows.append(row + [f"{r['causal_gqa_s']:.3f}"] if blocks else row)
        kinds = "; ".join(f"{d}, {p} provider" for d, p in sorted({(r.get("dtype", "float32"), r.get("provider", "cpu")) for r in op}))
        if blocks:
            parts.append("\nop level, Gemma 3 image blocks: BlindSightAttention (fast) vs the all-dense node with the blocks "
                         f"(exact dense; causal GroupQueryAttention, not exact here, timed beside), 28 q / 4 kv heads, head_dim 128, {kinds}; "
                         "FLOP bounds count the block pairs")
            head = ["category", "N x L", "S", "dense s", "ours s", "speed-up", "FLOP bound", "efficiency", "peak MB ours / dense",
                    "causal GQA s"]
        else:
            parts.append(f"\nop level: BlindSightAttention (fast) vs GroupQueryAttention, 28 q / 4 kv heads, head_dim 128, {kinds}")
            head = ["category", "N x L", "S", "GQA s", "ours s", "speed-up", "FLOP bound", "efficiency", "peak MB ours / GQA"]
        parts.append(fmt_table(head, rows))
        nat = [r for r in op if r.get("native_speedup") is not None]
        if nat:
            rows = [[r["category"], f"{r['N']}x{r['L']}", r["seq_len"], f"{r['baseline_s']:.3f}", f"{r['time_s']:.3f}",
                     f"{r['native_s']:.3f}", f"{r['native_speedup']:.2f}x", f"{r['flop_bound']:.2f}x",
                     f"{r['native_efficiency']:.2f}", f"{r['native_vs_function_body']:.2f}x",
                     "" if r.get("native_peak_rss_mb") is None else f"{r['native_peak_rss_mb']:.0f}"] for r in nat]
            parts.append(f"\nnative kernel on the same node ({record.get('native') or 'blindsight.native'}), "
                         f"timed in the same loop as the {'dense node' if blocks else 'GroupQueryAttention'} and the function body")
            parts.append(fmt_table(["category", "N x L", "S", "dense s" if blocks else "GQA s", "body s", "native s",
                                    "speed-up", "FLOP bound", "efficiency", "vs body", "peak MB"], rows))
    if record.get("op"):
        explained = [r for r in record["op"] if r.get("breakdown_ms")]
        if explained:
            classes = sorted({k for r in explained for k in r["breakdown_ms"]})
            rows = [[r["category"], f"{r['N']}x{r['L']}"] + [f"{r['breakdown_ms'].get(k, 0):.0f}" for k in classes] for r in explained]
            parts.append("\nwhere the time goes (ms per run, ORT profiler, one profiled session per case)")
            parts.append(fmt_table(["category", "N x L"] + classes, rows))
    pf = record.get("prefill")
    if pf:
        t = pf["time_s"]
        mem = pf.get("peak_rss_mb") or {}
        rows = [["raw export", f"{t['raw']:.2f}", "", "", "", f"{mem.get('raw', 0):.0f}" if mem else ""],
                ["compiled all-dense", f"{t['dense']:.2f}", f"{pf['dense_vs_raw_export']:.2f}x vs raw", "", "", f"{mem.get('dense', 0):.0f}" if mem else ""],
                ["compiled profile mix", f"{t['mix']:.2f}", f"{pf['speedup']:.2f}x vs dense", f"{pf['flop_bound']:.2f}x", f"{pf['efficiency']:.2f}",
                 f"{mem.get('mix', 0):.0f}" if mem else ""]]
        parts.append(f"\nprefill level: {pf['model']}, export form {pf['form']}, {pf['N']} images x {pf['L']} tokens = {pf['seq_len']} tokens "
                     f"(mix vs raw export: {pf['vs_raw_export']:.2f}x; attention FLOP bound {pf['attention_flop_bound']:.2f}x)")
        if "native_mix" in t:
            rows += [["compiled all-dense, native", f"{t['native_dense']:.2f}", f"{pf['native_dense_vs_dense']:.2f}x vs dense", "", "", ""],
                     ["compiled profile mix, native", f"{t['native_mix']:.2f}", f"{pf['native_speedup']:.2f}x vs dense",
                      f"{pf['flop_bound']:.2f}x", f"{pf['native_efficiency']:.2f}", ""]]
        parts.append(fmt_table(["graph", "seconds", "speed-up", "Amdahl bound", "efficiency", "peak MB"], rows))
    dec = record.get("decode")
    if dec:
        parts.append(f"\ndecode level: {dec[0]['model']}, one token after {dec[0]['images']} images (KV-cache export, eager form), "
                     "compiled with the profile mix vs the raw export; decode steps are text queries, dense for every category")
        rows = [[r["context"], f"{1000 * r['raw_s']:.1f}", f"{1000 * r['compiled_s']:.1f}", f"{r['raw_tokens_per_s']:.1f}",
                 f"{r['compiled_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x"] for r in dec]
        parts.append(fmt_table(["context", "raw ms", "compiled ms", "raw tok/s", "compiled tok/s", "compiled vs raw"], rows))
    if record.get("model"):
        from blindsight.bench.model import render as render_model

        parts.append(render_model(record["model"]))
    return "\n".join(parts)


def markdown(record: dict, plot: str | None = None) -> str:
    """BENCHMARKS.md: the machine, the tables, the plot and how to reproduce them."""
    m = record["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, Python {m['python']}; "
        f"{record['threads']} intra-op threads, fp32, medians of {record['repeats']} interleaved runs after a warm-up "
        "(SPEC §6). The machine is shared, so absolute seconds drift between runs; the ratios come from variants "
        "timed in the same loop.",
        "",
        "Reproduce (about 25 minutes on 2 cores; the prefill level needs the `export` extra):",
        "",
        "```bash",
        "bs-bench --level op --output op.json && bs-bench --level prefill --output prefill.json",
        "bs-bench --merge op.json prefill.json --markdown BENCHMARKS.md --plot docs/bench/speedup.png",
        "```",
        "",
        "```",
        render(record),
        "```",
        "",
    ]
    if plot:
        lines += [f"![measured speed-up against FLOP bound]({plot})", ""]
    return "\n".join(lines)
