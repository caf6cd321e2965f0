"""bs-flops: attention and whole-prefill FLOPs of one prompt, dense vs BlindSight."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blindsight.errors import BlindSightError
from blindsight.tables import fmt_table


def _template_args(p: argparse.ArgumentParser, images=8, image_len=1024):
    g = p.add_argument_group("prompt template (docs/specification.md §6)")
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


#: the full-size configurations bs-checkpoint writes, and the prompt lengths --scaling reports
SCALING_MODELS = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "gemma-3-4b")
SCALING_LENGTHS = (4096, 16384, 32768, 65536)


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BlindSightError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BlindSightError(f"{what} takes positive integers, got {text!r}")
    return values


def scaling_template(length: int, image_len: int, prefix: int = 24, gap: int = 8, question: int = 32):
    """The benchmark template's prompt (images of ``image_len`` tokens) nearest ``length`` tokens:
    4,096 gives 4 images of 1,024 (4,184 tokens), the model-level benchmark's prompt."""
    from blindsight.flops import Template

    n = max(0, round((length - prefix - question) / (gap + image_len)))
    return Template(n, image_len, prefix, gap, question)


def scaling(models, lengths, image_len: int, profile=None, sink_tokens: int = 1, logit_positions: int = 1) -> list[dict]:
    """Per model and prompt length: the attention share of a dense prefill's FLOPs
    and the attention and whole-prefill bounds of ``profile`` (default: the mixed
    profile, layer 0 dense as calibrated profiles keep it)."""
    from blindsight.flops import count_flops, model_dims
    from blindsight.profile import Profile

    rows = []
    for name in models:
        dims = model_dims(name)
        layers = profile.layers if profile is not None else Profile.mixed(dims.num_layers, dims.num_heads, first_dense=True).layers
        for length in lengths:
            t = scaling_template(length, image_len)
            r = count_flops(dims, layers, t.spans, t.seq_len, sink_tokens, logit_positions)
            rows.append({"model": dims.name, "length": length, "seq_len": t.seq_len, "num_images": t.num_images,
                         "image_len": image_len, "attention_share": r.attention_dense / r.prefill_dense,
                         "attention_bound": r.attention_bound, "prefill_bound": r.prefill_bound,
                         "prefill_dense_tflop": r.prefill_dense / 1e12})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="bs-flops",
        description="Attention and whole-prefill FLOPs of one prompt, dense vs BlindSight, with the speed-up bounds. "
        "Attention FLOPs of a head = 4 x head_dim x allowed causal (q, k) pairs (docs/specification.md §2); the prefill adds the "
        "Q/K/V/O projections, the gated MLP and the LM head (1 position unless --logit-positions). Sliding-window "
        "layers (Gemma 3) are counted with their window.",
    )
    p.add_argument("--model", default="qwen2-vl-7b", help="built-in name (see --list) or a transformers config.json / checkpoint directory")
    p.add_argument("--profile", help="head profile JSON (format v1); without it, one row per uniform category and the bench's mixed layer")
    p.add_argument("--sink-tokens", type=int, default=None, help="sink tokens per image (default: the profile's, else 1)")
    p.add_argument("--logit-positions", type=int, default=1, help="positions the LM head runs on (default 1: the last)")
    p.add_argument("--list", action="store_true", help="list the built-in model configurations and exit")
    p.add_argument("--scaling", action="store_true",
                   help="where BlindSight matters: for each of --models at each of --lengths (prompts of --image-len-token "
                   "images in the benchmark template), the attention share of a dense prefill and the attention and "
                   "whole-prefill bounds of the profile (default: the mixed profile, layer 0 dense)")
    p.add_argument("--models", default=",".join(SCALING_MODELS),
                   help=f"--scaling: comma-separated built-in names or config paths (default {','.join(SCALING_MODELS)})")
    p.add_argument("--lengths", default=",".join(map(str, SCALING_LENGTHS)),
                   help=f"--scaling: prompt lengths in tokens (default {','.join(map(str, SCALING_LENGTHS))})")
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
        if args.scaling:
            return _print_scaling(args)
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


def _print_scaling(args) -> int:
    from blindsight.profile import load

    lengths = _int_list(args.lengths, "--lengths")
    models = [m for m in args.models.split(",") if m.strip()]
    if args.image_len < 1:
        raise BlindSightError(f"--image-len must be >= 1, got {args.image_len}")
    prof = load(args.profile) if args.profile else None
    sink = args.sink_tokens if args.sink_tokens is not None else (prof.sink_tokens if prof else 1)
    rows = scaling(models, lengths, args.image_len, prof, sink, args.logit_positions)
    if args.json:
        print(json.dumps({"image_len": args.image_len, "sink_tokens": sink, "logit_positions": args.logit_positions,
                          "profile": args.profile or "mixed (layer 0 dense)", "rows": rows}, indent=1))
        return 0
    print(f"where BlindSight matters: images of {args.image_len} tokens, profile {args.profile or 'mixed (layer 0 dense)'}; "
          "attention share = attention FLOPs / dense prefill FLOPs")
    table = [[r["model"], f"{r['seq_len']:,}", str(r["num_images"]), f"{100 * r['attention_share']:.0f}%",
              f"{r['attention_bound']:.2f}x", f"{r['prefill_bound']:.2f}x", f"{r['prefill_dense_tflop']:.1f}"] for r in rows]
    print(fmt_table(["model", "tokens", "images", "attn share", "attn bound", "prefill bound", "dense TFLOP"], table))
    return 0
