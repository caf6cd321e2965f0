"""bs-compile: rewrite every attention core of an exported VLM language model."""

from __future__ import annotations

import argparse
import sys

from blindsight.compiler.genai import compile_genai_folder, is_genai_folder
from blindsight.compiler.genai_vlm import is_export_dir, write_genai_vlm
from blindsight.compiler.pipeline import compile_model
from blindsight.errors import ModelError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bs-compile",
        description=(
            "Replace every attention core of an ONNX language-model export by one "
            "ai.blindsight::BlindSightAttention node configured from a head profile. "
            "The compiled model gains an int64 input 'image_spans' [N, 2] (start, end of "
            "each image in the prompt) and runs in stock ONNX Runtime. Given an onnxruntime-genai "
            "model folder (genai_config.json beside the decoder), it writes a new genai folder -o "
            "with the compiled decoder, never touching the source folder. Given a bs-export directory "
            "(Qwen2.5-VL or Qwen2-VL) with --genai, it writes an onnxruntime-genai folder -o that runs the whole VLM "
            "(genai's image processor, vision, embedding and the compiled decoder)."
        ),
        epilog="examples: bs-compile lm.onnx --profile profile.json -o lm.blindsight.onnx; "
        "bs-compile genai-qwen2.5-vl/ --profile profile.json -o genai-qwen2.5-vl.blindsight/; "
        "bs-compile export/ --genai --profile profile.json -o export.genai/",
    )
    p.add_argument("model", help="ONNX model (a bs-export language model), an onnxruntime-genai model folder, "
                   "or a bs-export directory with --genai")
    p.add_argument("--profile", required=True, help="head profile JSON (format blindsight-profile v1)")
    p.add_argument("-o", "--output", help="output path (default: MODEL.blindsight.onnx beside the input)")
    p.add_argument(
        "--lowering",
        choices=("fast", "reference"),
        default="fast",
        help="fast: skip masked-out work on ONNX Runtime's fastest kernels (default); "
        "reference: explicit per-head mask with dense compute, for validation",
    )
    p.add_argument("--genai", action="store_true",
                   help="MODEL is a bs-export directory: write an onnxruntime-genai folder -o running the whole VLM")
    p.add_argument("--overwrite", action="store_true",
                   help="genai folders: replace a non-empty output folder (it is replaced whole, never merged)")
    p.add_argument("--no-native", action="store_true",
                   help="genai folders: do not name the native kernel as the decoder's custom_ops_library "
                   "(by default it is named when built: python -m blindsight.native build)")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def work():
        native = False if args.no_native else None
        if args.genai:
            if not is_export_dir(args.model):
                raise ModelError(f"--genai takes a bs-export directory (with template.json); {args.model} is not one")
            if not args.output:
                raise ModelError("--genai writes a new folder: pass -o OUT_DIR")
            return write_genai_vlm(args.model, args.profile, args.output, args.lowering, native=native,
                                   overwrite=args.overwrite)
        if is_export_dir(args.model):
            raise ModelError(f"{args.model} is a bs-export directory: compile its language model "
                             f"(bs-compile {args.model}/language_model.onnx ...), or pass --genai -o OUT_DIR "
                             f"for an onnxruntime-genai folder")
        if is_genai_folder(args.model):
            if not args.output:
                raise ModelError("an onnxruntime-genai folder compiles into a new folder: pass -o OUT_DIR")
            return compile_genai_folder(args.model, args.profile, args.output, args.lowering,
                                        native=native, overwrite=args.overwrite)
        return compile_model(args.model, args.profile, args.output, args.lowering)

    code, result = run_cli("bs-compile", work, args.debug)
    if code:
        return code
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
