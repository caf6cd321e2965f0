"""bs-eval: accuracy of the dense and the BlindSight-compiled model on a multi-segment task."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blindsight.errors import BlindSightError, run_cli
from blindsight.runtime.session import PROVIDERS, resolve_provider


def _parser() -> argparse.ArgumentParser:
    from blindsight.evaluation.onnx_models import WEIGHTS
    from blindsight.evaluation.runner import DEFAULT_PROMPTS
    from blindsight.models.pretrained import DEFAULT_MODEL, PRETRAINED
    from blindsight.prompts import TASK_SEED

    p = argparse.ArgumentParser(
        prog="bs-eval",
        description=(
            "Build a deterministic task of prompts with 4-6 segments each (surrogate images on text-only "
            "weights: text wrapped in image delimiter tokens); each segment shows one object of a distinct "
            "colour and the question asks the colour of one segment's object (multiple choice over the "
            "prompt's colours). Exports the model once to ONNX (cached), compiles it with the profile (fast "
            "lowering) and runs both in ONNX Runtime: accuracy of each, top-1 agreement and mean "
            "KL(dense || compiled) of the next-token distributions, and the attention FLOPs saved."
        ),
        epilog="example: bs-eval --profile gemma3-270m.profile.json --prompts 200 --json",
    )
    p.add_argument("--profile", required=True, help="head profile JSON (from bs-profile)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in weights ({', '.join(p_ for p_ in PRETRAINED if p_.startswith('gemma'))}; "
                        f"default {DEFAULT_MODEL})")
    p.add_argument("--mask", choices=("image", "causal"), default="image",
                   help="attention mask of the prompts: image (default: the family's VLM mask, for Gemma 3 "
                        "bidirectional within each image) or causal, a surrogate mode for the built-in text-only "
                        "weights, which were trained causal and collapse under bidirectional segments they never "
                        "saw (Gemma 3 270M: 72.5%% vs 30.5%% dense accuracy on bs-eval's 200 prompts)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help=f"task prompts (default {DEFAULT_PROMPTS})")
    p.add_argument("--seed", type=int, default=TASK_SEED, help=f"task seed (default {TASK_SEED})")
    p.add_argument("--work-dir", help="where the ONNX export and compiled models are cached "
                                      "(default ~/.cache/blindsight/onnx/MODEL)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS),
                   help="ONNX Runtime execution provider (default cpu); on a GPU provider the nodes that fell back to the CPU are reported")
    p.add_argument("--no-native", action="store_true",
                   help="run the compiled model on its function bodies even when the native kernel is built")
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="weights of the compiled model: fp32 (default), int8 (bs-quantize's dynamic int8 on the "
                        "compiled model, LM head float32) or int8-lm-head (the LM head int8 too); the dense model "
                        "stays fp32, so the figures measure profile and int8 together; an all-dense profile isolates "
                        "int8")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def _check(args):
    from blindsight import profile as profile_io
    from blindsight.flops import model_dims
    from blindsight.families import FAMILIES
    from blindsight.models import pretrained

    if args.prompts < 1:
        raise BlindSightError(f"--prompts {args.prompts} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise BlindSightError("--threads must be at least 1")
    resolve_provider(args.provider)
    prof = profile_io.load(args.profile)
    p = pretrained.spec(args.model) if args.model in pretrained.PRETRAINED else None
    if p is None or p.family not in FAMILIES:  # the task needs an ONNX export of the weights
        raise BlindSightError(
            f"bs-eval runs the exportable built-in weights (gemma3-270m); got {args.model!r}"
        )
    dims = model_dims(pretrained.config(args.model))  # no weights converted before the profile is known to fit
    if (prof.num_layers, prof.num_heads) != (dims.num_layers, dims.num_heads):
        raise BlindSightError(
            f"profile {args.profile} has {prof.num_layers} layers x {prof.num_heads} heads; {args.model} has "
            f"{dims.num_layers} x {dims.num_heads}: calibrate it with bs-profile --model {args.model}"
        )
    if args.work_dir and Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        raise BlindSightError(f"--work-dir {args.work_dir} is a file, not a folder")
    return prof


def ci(bounds) -> str:
    return f"{bounds[0]:.1%}-{bounds[1]:.1%}"


def table(r: dict) -> str:
    rows = [
        ("model", r["model"]),
        ("prompts", f"{r['num_prompts']} ({r['segments_per_prompt'][0]}-{r['segments_per_prompt'][1]} segments, "
                    f"{r['mean_tokens']:.0f} tokens on average)"),
        ("attention mask", r["mask"]),
        ("chance accuracy", f"{r['chance_accuracy']:.1%}"),
        ("dense accuracy", f"{r['dense_accuracy']:.1%} (95% CI {ci(r['dense_accuracy_ci95'])})"),
        ("compiled accuracy", f"{r['compiled_accuracy']:.1%} ({r['accuracy_delta_points']:+.1f} points; "
                              f"95% CI {ci(r['compiled_accuracy_ci95'])})"),
        ("top-1 agreement", f"{r['top1_agreement']:.1%}"),
        ("mean KL(dense||compiled)", f"{r['mean_kl']:.5f} (max {r['max_kl']:.4f})"),
        ("attention FLOPs saved", f"{r['attention_flop_reduction']:.1%}"),
        ("prefill FLOPs saved", f"{r['prefill_flop_reduction']:.1%}"),
        ("heads", ", ".join(f"{k} {v}" for k, v in r["profile_counts"].items())),
        ("compiled attention", r.get("attention", "")),
        ("compiled weights", r.get("weights", "fp32")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    def work():
        prof = _check(args)
        from blindsight.evaluation.runner import evaluate

        return evaluate(prof, args.model, num_prompts=args.prompts, seed=args.seed,
                        work_dir=args.work_dir, threads=args.threads, provider=args.provider, progress=not args.quiet,
                        native=False if args.no_native else None, mask=args.mask, weights=args.weights)

    code, record = run_cli("bs-eval", work, args.debug)
    if code:
        return code
    print(json.dumps(record, indent=1) if args.json else table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
