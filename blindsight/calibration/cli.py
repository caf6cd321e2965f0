"""bs-profile: calibrate a per-head profile from calibration prompts (and report on it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from blindsight.errors import BlindSightError, run_cli

DEFAULT_TEMPLATE = "8:256"


def _parser() -> argparse.ArgumentParser:
    from blindsight.calibration.categorize import DEFAULT_MIN_FRACTION, DEFAULT_THRESHOLD
    from blindsight.calibration.runner import DEFAULT_PROMPTS, DEFAULT_SEED
    from blindsight.calibration.sweep import DEFAULT_SWEEP
    from blindsight.models.pretrained import DEFAULT_MODEL, PRETRAINED

    names = ", ".join(PRETRAINED)
    p = argparse.ArgumentParser(
        prog="bs-profile",
        description=(
            "Run a model with eager attention over deterministic multi-image calibration prompts; for every "
            "layer and query head measure each category's recall (attention mass on its allowed keys, mean "
            "over image-token queries), pick per prompt the sparsest category with recall >= threshold, and "
            "keep a sparse category only where at least --min-fraction of the prompts chose it (or a sparser "
            "one); else fall back to the next denser category. Writes a profile v1 for bs-compile. "
            f"Built-in text-only weights ({names}) use surrogate images: text segments wrapped in image "
            "delimiter tokens."
        ),
        epilog="example: bs-profile --model gemma3-270m -o gemma3-270m.profile.json --report report/ --sweep",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in weights ({names}; default {DEFAULT_MODEL}) or a local Hugging Face "
                        "Qwen2-VL / Qwen2.5-VL / Gemma 3 directory")
    p.add_argument("-o", "--output", default="profile.json", help="profile to write (default: profile.json)")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help=f"calibration prompts (default {DEFAULT_PROMPTS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"prompt seed (default {DEFAULT_SEED})")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD,
                   help=f"recall threshold: a constant (default {DEFAULT_THRESHOLD}) or FIRST:LAST, linear in "
                        "depth from the first to the last layer (e.g. 0.85:0.95)")
    p.add_argument("--min-fraction", type=float, default=DEFAULT_MIN_FRACTION,
                   help=f"fraction of prompts that must choose a sparse category (default {DEFAULT_MIN_FRACTION})")
    p.add_argument("--mask", choices=("image", "causal"), default="image",
                   help="attention mask of the prompts: image (default: the family's VLM mask, for Gemma 3 "
                        "bidirectional within each image) or causal, a surrogate mode for the built-in text-only "
                        "weights, which were trained causal and collapse under bidirectional segments they never "
                        "saw (Gemma 3 270M: 72.5%% vs 30.5%% dense accuracy on bs-eval's 200 prompts)")
    p.add_argument("--sink-tokens", type=int, default=1, help="leading tokens of each image that are sinks (default 1)")
    p.add_argument("--report", metavar="DIR",
                   help="also write DIR/heatmap.png and DIR/report.json (counts, FLOPs saved for --template)")
    p.add_argument("--prompt-shape", metavar="IMAGES:TOKENS",
                   help="calibrate on prompts of IMAGES images of about TOKENS tokens each, e.g. 16:1024 for the "
                        "long prompts a deployment sees (default: 3-5 drawn 224 px images on a VLM, 4-6 segments of "
                        "about 60 tokens on the built-in weights); the model runs eager attention, so a prompt of S "
                        "tokens holds S x S x heads scores per layer")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"IMAGES:TOKENS for the report's FLOP figures (default {DEFAULT_TEMPLATE})")
    p.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, metavar="T1,T2,...",
                   help=f"with --report: threshold sweep (default list {DEFAULT_SWEEP}) -> DIR/sweep.md, "
                        "sweep.json, sweep.png: FLOPs saved vs KL / top-1 agreement / accuracy")
    p.add_argument("--sweep-prompts", type=int, default=32, help="task prompts per sweep point (default 32)")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of the summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def _check(args):
    from blindsight.calibration.categorize import ThresholdSchedule
    from blindsight.calibration.report import parse_template
    from blindsight.calibration.sweep import parse_thresholds
    from blindsight.models import pretrained

    schedule = ThresholdSchedule.parse(args.threshold)
    if not 0.0 < args.min_fraction <= 1.0:
        raise BlindSightError(f"--min-fraction {args.min_fraction} must be in (0, 1], e.g. 0.75")
    if args.prompts < 1 or args.sweep_prompts < 1:
        raise BlindSightError("--prompts and --sweep-prompts must be at least 1")
    if args.sink_tokens < 1:
        raise BlindSightError("--sink-tokens must be at least 1")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise BlindSightError(f"output folder {out.parent} does not exist; create it or choose another -o")
    if args.sweep and not args.report:
        raise BlindSightError("--sweep writes into the report folder: add --report DIR")
    template = parse_template(args.template)
    shape = parse_template(args.prompt_shape) if args.prompt_shape else None
    if shape is not None and shape.num_images < 1:
        raise BlindSightError(f"--prompt-shape {args.prompt_shape}: calibration needs at least one image, e.g. 16:1024")
    if shape is not None and args.model not in pretrained.PRETRAINED and (Path(args.model) / "config.json").is_file():
        from blindsight.calibration.vlm_prompts import check_image_tokens

        fixed = json.loads((Path(args.model) / "config.json").read_text()).get("mm_tokens_per_image")
        check_image_tokens(fixed, shape.image_len, f"--prompt-shape {args.prompt_shape}")
    sweeps = parse_thresholds(args.sweep) if args.sweep else []
    if args.model not in pretrained.PRETRAINED and not (Path(args.model) / "config.json").is_file():
        pretrained.load(args.model)  # raises the one-line error naming the choices
    if args.mask == "causal" and args.model not in pretrained.PRETRAINED:
        pretrained.load(args.model, mask="causal")  # refused in one line before the model is read
    return schedule, template, shape, sweeps


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(args) -> dict:
    from blindsight import profile as profile_io
    from blindsight.calibration import report
    from blindsight.calibration.runner import calibrate
    from blindsight.calibration.sweep import sweep
    from blindsight.records import record_path

    schedule, template, shape, sweeps = _check(args)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bar
    result = calibrate(
        args.model, num_prompts=args.prompts, seed=args.seed, threshold=schedule,
        min_fraction=args.min_fraction, sink_tokens=args.sink_tokens, progress=not args.quiet, mask=args.mask,
        shape=shape,
    )
    prof = result.profile
    profile_io.save(prof, args.output)
    record = {
        "profile": record_path(args.output),
        "model": prof.model,
        "threshold": str(schedule),
        "min_fraction": args.min_fraction,
        "num_prompts": args.prompts,
        "prompt_shape": args.prompt_shape,
        "prompt_tokens": prof.calibration["prompt_tokens"],
        "tokens_per_image": prof.calibration["tokens_per_image"],
        "mask": result.loaded.mask_description,
        "counts": prof.counts(),
    }
    if args.report:
        folder = Path(args.report)
        folder.mkdir(parents=True, exist_ok=True)
        flops = report.template_flops(prof, result.loaded.model.config, template)
        title = f"{prof.model}\nthreshold {schedule}, min fraction {args.min_fraction}, {args.prompts} prompts"
        record["heatmap"] = record_path(report.heatmap(prof, folder / "heatmap.png", title))
        record["flops"] = flops
        if sweeps:
            rows = sweep(result.loaded, result.recalls, sweeps, args.min_fraction, args.sweep_prompts,
                         sink_tokens=args.sink_tokens, progress=not args.quiet)
            table = report.sweep_table(rows)
            _write_text(folder / "sweep.md", f"{prof.model}\n\n{table}\n")
            _write_text(folder / "sweep.json", json.dumps({"model": prof.model, "rows": rows}, indent=1) + "\n")
            report.sweep_plot(rows, folder / "sweep.png", f"threshold sweep, {prof.model}")
            record["sweep"] = rows
            record["sweep_table"] = table
        _write_text(folder / "report.json", json.dumps(record, indent=1) + "\n")
    return record


def _span(stats: dict) -> str:
    return str(stats["min"]) if stats["min"] == stats["max"] else f"{stats['min']}-{stats['max']}"


def summary(record: dict) -> str:
    from blindsight.attention import DENSITY_ORDER

    c = record["counts"]
    lines = [
        f"wrote {record['profile']}: {record['model']}",
        f"threshold {record['threshold']}, min fraction {record['min_fraction']}, {record['num_prompts']} prompts "
        f"of {_span(record['prompt_tokens'])} tokens ({_span(record['tokens_per_image'])} per image); "
        f"heads: {', '.join(f'{k} {c[k]}' for k in DENSITY_ORDER)}",
    ]
    if "flops" in record:
        f = record["flops"]
        lines.append(
            f"{f['template']}: attention FLOPs -{f['attention_flop_reduction']:.1%}, "
            f"prefill FLOPs -{f['prefill_flop_reduction']:.1%} (bound {f['attention_bound']:.2f}x)"
        )
        lines.append(f"heatmap: {record['heatmap']}")
    if "sweep_table" in record:
        lines.append(record["sweep_table"])
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    code, record = run_cli("bs-profile", lambda: run(args), args.debug)
    if code:
        return code
    print(json.dumps(record, indent=1) if args.json else summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
