"""bs-run: answer a question about images with a bs-export directory in ONNX Runtime."""

from __future__ import annotations

import argparse
import json
import sys

from blindsight.errors import BlindSightError
from blindsight.runtime.session import PROVIDERS

EPILOG = """\
Images go where the prompt has an <image> marker (one per image), or before the
text when it has none. --model compiled (default) runs OUT_DIR/language_model.blindsight.onnx
(made by bs-compile), dense runs the plain export, or give a path.

example:
  bs-export ./Qwen2-VL-2B-Instruct -o qwen-onnx
  bs-profile --model ./Qwen2-VL-2B-Instruct -o qwen-onnx/profile.json
  bs-compile qwen-onnx/language_model.onnx --profile qwen-onnx/profile.json -o qwen-onnx/language_model.blindsight.onnx
  bs-run qwen-onnx --image a.png --image b.png --prompt "What differs between the two pictures?"
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bs-run", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by bs-export")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several")
    p.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="greedy tokens to generate (default 32)")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime execution provider (default cpu)")
    p.add_argument("--model", default="compiled", metavar="compiled|dense|PATH",
                   help="which language model to run (default compiled)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="prefill the prompt through the KV cache in chunks of N tokens (default: one call); bounds the "
                   "prefill's activation and attention memory by N instead of the prompt length; same answer")
    p.add_argument("--prepack", default="auto", choices=("auto", "on", "off"),
                   help="ONNX Runtime's MatMul weight pre-packing: about 1.1x sooner first token for a private packed copy "
                   "that replaces the mapped weights; auto (default) turns it off where that copy would not fit in memory")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--no-native", action="store_true",
                   help="run BlindSightAttention on the function bodies even when the native kernel is built")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"bs-run: error: --max-new-tokens is {args.max_new_tokens}; give 1 or more", file=sys.stderr)
        return 2
    try:
        from blindsight.runtime.pipeline import Pipeline

        pipe = Pipeline(args.out_dir, provider=args.provider, compiled=args.model, threads=args.threads,
                        native=False if args.no_native else None, chunk_size=args.chunk_size, prepack=args.prepack,
                        keep_prefill_feeds=args.provider != "cpu")
        result = pipe.generate(args.image, args.prompt, args.max_new_tokens, chat=not args.no_chat)
        placement = None
        if args.provider != "cpu":
            # a GPU provider that hands nodes back to the CPU costs the speed: say which
            from blindsight.runtime.placement import node_placement

            placement = node_placement(pipe.model_path, pipe.prefill_feeds, args.provider, args.threads)
            print(placement.summary(), file=sys.stderr)
    except BlindSightError as exc:
        print(f"bs-run: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        record = result.to_dict()
        record.update(provider=args.provider, images=len(args.image), sparse=pipe.sparse, attention=pipe.attention,
                      prepack=pipe.prepack,
                      placement=placement.to_dict() if placement is not None else None)
        print(json.dumps(record))
        return 0
    print(result.text)
    kind = f"compiled (BlindSight attention: {pipe.attention})" if pipe.sparse else "dense"
    print(f"\n[{kind} model, {args.provider}] prompt {result.prefill_tokens} tokens, {len(result.image_spans)} image(s); "
          f"time to first token {result.ttft_s * 1000:.1f} ms (prefill {result.prefill_s * 1000:.1f} ms"
          f"{f' in {result.prefill_chunks} chunks' if result.prefill_chunks > 1 else ''}); "
          f"{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s after the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
