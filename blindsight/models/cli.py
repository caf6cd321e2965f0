"""bs-export: a local Hugging Face VLM checkpoint -> ONNX files the runtime and bs-compile take."""

from __future__ import annotations

import argparse
import json
import sys

from blindsight.errors import run_cli
from blindsight.models.dtype import DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bs-export",
        description=(
            "Export a Qwen2-VL, Qwen2.5-VL or Gemma 3 checkpoint directory (config + weights + "
            "processor files) to ONNX: vision.onnx (pixels -> image features), embed.onnx "
            "(token ids -> embeddings) and language_model.onnx (prefill and decode with a KV cache), "
            "plus template.json (token ids, positions, files) and the processor files. "
            "Compile the language model with bs-compile, then answer with bs-run."
        ),
        epilog="example: bs-export ./Qwen2-VL-2B-Instruct -o ./qwen2vl-onnx && "
        "bs-compile ./qwen2vl-onnx/language_model.onnx --profile p.json -o ./qwen2vl-onnx/language_model.blindsight.onnx",
    )
    p.add_argument("model_dir", help="local Hugging Face checkpoint directory (nothing is downloaded)")
    p.add_argument("-o", "--output", required=True, help="export directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="float type of the weights and of every float input and output (default fp32)")
    p.add_argument("--logits", choices=("last", "all"), default="last",
                   help="positions the language model's LM head runs on: 'last' (default: the chunk's last "
                   "position, all that generation reads; at long prompts every position's logits would cost "
                   "S x vocabulary memory) or 'all' (every position, e.g. to score a prompt)")
    p.add_argument("--vision-attention", choices=("fused", "chunked"), default="fused",
                   help="the vision tower's attention: 'fused' (default: ONNX Runtime's MultiHeadAttention where a "
                   "call holds one image, as the runtime calls it; the same numbers, about half the attention's "
                   "time) or 'chunked' (exported softmax in query chunks only)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print template.json as JSON instead of a summary line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from blindsight.models.export_vlm import export_vlm

    code, result = run_cli(
        "bs-export", lambda: export_vlm(args.model_dir, args.output, progress=not args.quiet, overwrite=args.overwrite, dtype=args.dtype,
                                      logits=args.logits, vision_attention=args.vision_attention), args.debug
    )
    if code:
        return code
    if args.json:
        print(json.dumps({"output": str(result.out_dir), "template": result.template}, indent=2))
    else:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
