"""bs-quantize: int8 weights for an exported graph or a whole bs-export directory."""

from __future__ import annotations

import argparse
import sys

from blindsight.compiler.genai_vlm import is_export_dir
from blindsight.compiler.quantize import quantize_export, quantize_file
from blindsight.errors import ModelError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bs-quantize",
        description=(
            "Give the MatMuls of an ONNX graph int8 weights (dynamic quantization: weights int8 per output "
            "column, activations quantized per tensor at run time; ONNX Runtime's CPU provider runs them as "
            "integer GEMMs). The LM head stays float32 unless --lm-head int8. Given a bs-export directory, it "
            "writes a new export "
            "directory -o with the vision tower and the language model quantized and every other file copied; "
            "compile its language model with bs-compile as usual. This trades accuracy for speed: see "
            "docs/quantization.md for what it changed, and check your own task with bs-eval --weights int8."
        ),
        epilog="examples: bs-quantize export/ -o export.int8/ && bs-compile export.int8/language_model.onnx "
        "--profile profile.json -o export.int8/language_model.blindsight.onnx; "
        "bs-quantize lm.blindsight.onnx -o lm.blindsight.int8.onnx",
    )
    p.add_argument("model", help="an ONNX graph (language model, compiled or not, or vision tower) "
                   "or a bs-export directory")
    p.add_argument("-o", "--output", help="output path (a graph: default MODEL.int8.onnx beside the input; "
                   "a directory: required)")
    p.add_argument("--weights", choices=("int8",), default="int8",
                   help="weight format (int8: symmetric per column, the only one so far)")
    p.add_argument("--lm-head", choices=("float32", "int8"), default="float32",
                   help="the LM head (a MatMul whose result is a graph output; in a directory, the language "
                        "model's): float32 (default) or int8 too, which reads a quarter of the bytes in every decode "
                        "step and moves the logits further (docs/quantization.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="directories: replace a non-empty output folder (it is replaced whole, never merged)")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    lm_head = args.lm_head == "int8"

    def work():
        if is_export_dir(args.model):
            if not args.output:
                raise ModelError("a bs-export directory quantizes into a new folder: pass -o OUT_DIR")
            return quantize_export(args.model, args.output, overwrite=args.overwrite, lm_head=lm_head)
        return quantize_file(args.model, args.output, lm_head=lm_head)

    code, result = run_cli("bs-quantize", work, args.debug)
    if code:
        return code
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
