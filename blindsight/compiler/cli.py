"""bs-compile: rewrite every attention core of an exported VLM language model."""

from __future__ import annotations

import argparse
import sys

from blindsight.compiler.pipeline import compile_model
from blindsight.errors import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bs-compile",
        description=(
            "Replace every attention core of an ONNX language-model export by one "
            "ai.blindsight::BlindSightAttention node configured from a head profile. "
            "The compiled model gains an int64 input 'image_spans' [N, 2] (start, end of "
            "each image in the prompt) and runs in stock ONNX Runtime."
        ),
        epilog="example: bs-compile lm.onnx --profile profile.json -o lm.blindsight.onnx",
    )
    p.add_argument("model", help="ONNX model (an export of the language model's prefill)")
    p.add_argument("--profile", required=True, help="head profile JSON (format blindsight-profile v1)")
    p.add_argument("-o", "--output", help="output path (default: MODEL.blindsight.onnx beside the input)")
    p.add_argument(
        "--lowering",
        choices=("fast", "reference"),
        default="fast",
        help="fast: skip masked-out work on ONNX Runtime's fastest kernels (default); "
        "reference: explicit per-head mask with dense compute, for validation",
    )
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    code, result = run_cli("bs-compile", lambda: compile_model(args.model, args.profile, args.output, args.lowering), args.debug)
    if code:
        return code
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
