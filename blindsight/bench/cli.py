"""bs-bench's command line: its arguments, checked, and the levels they ask for
(each level's runner is in its module: :mod:`~blindsight.bench.op`,
:mod:`~blindsight.bench.prefill`, :mod:`~blindsight.bench.decode`,
:mod:`~blindsight.bench.model`; the reports in :mod:`~blindsight.bench.render`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from blindsight.errors import BlindSightError
from blindsight.attention.schema import SHORT_DTYPES
from blindsight.bench.render import markdown, plot, render
from blindsight.bench.timing import machine
from blindsight.runtime.session import PROVIDERS, resolve_provider

FULL_SIZES = ((4, 2048), (8, 1024), (16, 512))
QUICK_SIZES = ((4, 256), (8, 128))


def main(argv=None) -> int:
    from blindsight.bench.op import CATEGORY_CASES
    from blindsight.models.fullsize import FULL_SIZE

    p = argparse.ArgumentParser(
        prog="bs-bench",
        description="Measured speed-ups of the fast lowering (docs/specification.md §6): op level, one BlindSightAttention node against "
        "ONNX Runtime's fastest dense causal attention (GroupQueryAttention) at 28 query / 4 KV heads, head_dim 128, "
        "fp32 (or --dtype); prefill level, a Qwen2-VL-2B-sized language model (random weights) compiled with a profile mix vs "
        "compiled all-dense vs the raw export. Variants run interleaved in one process; medians; FLOP bound and "
        "efficiency (speed-up / bound) beside every speed-up; peak memory from a fresh process per variant.",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run in under 2 minutes")
    p.add_argument("--level", choices=("op", "prefill", "decode", "model", "genai", "all"), default="all",
                   help="op: single nodes; prefill: a language model's prefill; decode: one token after a multi-image "
                   "KV cache, compiled vs raw export; model: a whole full-size language model (--model-config), time to "
                   "first token and decode; genai: onnxruntime-genai running its builder's decoder vs the same decoder compiled "
                   "(all-dense and the mix), time to first token and decode, per --genai-precisions (needs the genai and "
                   "export extras); all (default): op, prefill and decode")
    p.add_argument("--model-config", default=None, choices=FULL_SIZE,
                   help="model and genai levels: the full-size configuration, random weights (default qwen2-vl-2b; genai "
                   "level qwen2.5-vl-3b); its export is cached in --work-dir (6 GB for qwen2-vl-2b in fp32)")
    p.add_argument("--genai-precisions", default="fp32,int4",
                   help="genai level: the builder's precisions to time, comma-separated (default fp32,int4)")
    p.add_argument("--model-images", type=int, default=4, help="model level: images in the prompt (default 4)")
    p.add_argument("--model-image-len", type=int, default=1024, help="model level: tokens per image (default 1024)")
    p.add_argument("--decode-repeats", type=int, default=10, help="model level: timed decode steps per graph (default 10)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="model level: prefill through the KV cache in chunks of this many tokens (default: one call); "
                   "what long prompts need: activations and attention buffers sized by the chunk")
    p.add_argument("--model-graphs", default="raw,dense,mix",
                   help="model level: the graphs to time, comma-separated, mix always among them (default raw,dense,mix); "
                   "leave raw out where its eager attention would dominate the run (long prompts at full depth)")
    p.add_argument("--model-layers", type=int, default=None,
                   help="model level: keep the first N decoder layers of the configuration (default: all; full width "
                   "and vocabulary either way), for long prompts when full depth does not fit the time")
    p.add_argument("--contexts", help="decode level: cached context lengths, comma-separated (default 1024,8192; quick 256)")
    p.add_argument("--cases", default=",".join(CATEGORY_CASES), help="op-level categories, comma-separated ('mixed': a mixed layer)")
    p.add_argument("--sizes", help="op-level N x L list, e.g. 4x2048,8x1024 (default: docs/specification.md §6's three)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--dtype", choices=tuple(SHORT_DTYPES), default="fp32",
                   help="dtype of the op-level node and of the prefill export (default fp32; bf16 is refused with the reason)")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS),
                   help="ONNX Runtime execution provider (default cpu); on a GPU provider the nodes that fell back to the CPU are reported")
    p.add_argument("--image-blocks", action="store_true",
                   help="op level with Gemma 3's bidirectional image blocks (docs/specification.md §2): the baseline is then the all-dense node "
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
        do_genai = args.level == "genai"
        if do_genai:
            from blindsight.bench import genai as genai_level

            if args.decode_repeats < 1 or args.model_images < 1 or args.model_image_len < 1:
                raise BlindSightError("--model-images, --model-image-len and --decode-repeats must be >= 1")
            genai_case = genai_level.GenaiCase(args.model_config or "qwen2.5-vl-3b", args.model_images, args.model_image_len,
                                               args.model_layers or 4,
                                               tuple(x for x in args.genai_precisions.split(",") if x), args.decode_repeats)
            genai_level.check(genai_case)
            genai_repeats = args.repeats or (2 if args.quick else 3)
        if do_model:
            if args.image_blocks:
                raise BlindSightError("--image-blocks is an op-level option (the model level runs the model's own mask); pass --level op")
            if args.model_images < 1 or args.model_image_len < 1 or args.decode_repeats < 1:
                raise BlindSightError("--model-images, --model-image-len and --decode-repeats must be >= 1")
            if (args.chunk_size is not None and args.chunk_size < 1) or (args.model_layers is not None and args.model_layers < 2):
                raise BlindSightError("--chunk-size must be >= 1 and --model-layers >= 2 (the profile mix keeps layer 0 dense)")
            from blindsight.bench.model import GRAPHS, ModelCase

            model_graphs = tuple(g for g in GRAPHS if g in args.model_graphs.split(","))
            unknown = [g for g in args.model_graphs.split(",") if g not in GRAPHS]
            if unknown or "mix" not in model_graphs:
                raise BlindSightError(f"--model-graphs {args.model_graphs!r}: choose from {', '.join(GRAPHS)}, mix included")

            overrides = {"text_config": {"num_hidden_layers": args.model_layers}} if args.model_layers else None
            model_case = ModelCase(args.model_config or "qwen2-vl-2b", args.model_images, args.model_image_len, args.dtype, overrides,
                                   chunk=args.chunk_size)
            model_repeats = args.repeats or (2 if args.quick else 3)
        if args.merge:
            do_op = do_prefill = do_decode = do_model = do_genai = False
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
        if (do_prefill or do_decode or do_model or do_genai) and not args.merge:
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
            total += 1 + len(model_graphs) * (model_repeats + (1 if memory else 0)) + (min(len(model_graphs), 2) + 1) * args.decode_repeats
        if do_genai:
            total += len(genai_case.precisions) * (1 + 3 * (genai_repeats + 1))
        record = {"machine": machine(), "threads": args.threads, "repeats": repeats, "quick": args.quick,
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
                                    "model", "genai")})
            if rows:
                record["op"] = rows
        from blindsight.bench import decode, op, prefill

        with tqdm(total=total, desc="bs-bench", file=sys.stderr, disable=None) as bar:
            if do_op:
                record["op"] = op.run(sizes, cases, args.threads, repeats, memory, bar, args.breakdown, dtype, args.provider,
                                         args.image_blocks, native)
            if do_prefill:
                record["prefill"] = prefill.run(case, args.threads, repeats, memory, Path(args.work_dir), bar, args.provider, native)
            if do_decode:
                record["decode"] = decode.run(decode_case, contexts, args.threads, repeats, Path(args.work_dir), bar, args.provider)
            if do_model:
                from blindsight.bench import model as model_level

                record["model"] = model_level.run(model_case, Path(args.work_dir), args.threads, model_repeats, args.decode_repeats,
                                                  args.provider, native=True if native else False, memory=memory, progress=bar,
                                                  graphs=model_graphs)
            if do_genai:
                record["genai"] = genai_level.run(genai_case, Path(args.work_dir), args.threads, genai_repeats,
                                                  native=None if native else False, progress=bar)
        if args.plot and record.get("op"):
            plot(record, Path(args.plot))
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

