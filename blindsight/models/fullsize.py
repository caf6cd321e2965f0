"""Full-size random VLM checkpoints in the published configurations
(Qwen2-VL-2B, Qwen2.5-VL-3B/7B, Gemma 3 4B), written to disk tensor by tensor.

No pretrained VLM weights install here, and speed, memory and exactness need
none: the architecture comes from the packaged configs
(:mod:`blindsight.models.full_configs`), the weights are drawn at random. The
model is built on the meta device (no storage), then every tensor is drawn and
written into safetensors shards of at most ``shard_bytes``, so the writer never
holds more than one shard: a 7B checkpoint is written in a few hundred MB.

The tokenizer and processor files come from the tiny checkpoints' builders
(:mod:`blindsight.models.checkpoints`): byte-level, special tokens at small ids
recorded in the config as the real checkpoints record theirs (consumers read
them from there). The vocabulary size, and so the embedding and LM head, are
the real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from blindsight import families
from blindsight.errors import BlindSightError

#: name -> packaged config file
FULL_SIZE = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "gemma-3-4b")
SHARD_BYTES = 1 << 30
MARKER = "blindsight_random.json"


def _spec(name: str) -> dict:
    if name not in FULL_SIZE:
        raise BlindSightError(f"unknown full-size configuration {name!r}; expected one of {', '.join(FULL_SIZE)}")
    return json.loads(resources.files("blindsight.models.full_configs").joinpath(f"{name}.json").read_text())


def full_config(name: str, overrides: dict | None = None):
    """(transformers config, model class, tokenizer, processor saver) of ``name``;
    ``overrides`` ({"text_config": {...}, "vision_config": {...}}) shrinks it for tests."""
    from blindsight.models.checkpoints import _BUILDERS

    spec = _spec(name)
    family = families.get(spec["family"])
    build, save_processor = _BUILDERS[family.vision_tower]
    tiny, model_class, tokenizer = build(family, 2, 2)
    data = tiny.to_dict()
    text = {k: v for k, v in data["text_config"].items() if k not in ("layer_types", "rope_parameters", "sliding_window_pattern")}
    text.update(spec["text_config"], **(overrides or {}).get("text_config", {}))
    vision = data["vision_config"]
    vision.update(spec["vision_config"], **(overrides or {}).get("vision_config", {}))
    data.update(spec["top"], text_config=text, vision_config=vision)
    data.pop("transformers_version", None)
    config = type(tiny).from_dict(data)
    return config, model_class, tokenizer, save_processor


def _fill(name: str, shape, family: str, dtype):
    """A random tensor for parameter ``name``, drawn in ``dtype`` (no float32
    copy of a large table): matrices N(0, 0.02) as transformers initialises
    them, biases 0, norm scales at identity (Gemma's RMSNorm scales by 1 + w, so
    0 there; LayerNorm and Qwen's RMSNorm by w, so 1)."""
    import torch

    if len(shape) >= 2:
        return torch.randn(shape, dtype=dtype).mul_(0.02)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name or name.endswith(("ln_q.weight", "ln.weight")):
        is_layer_norm = "vision" in name or "visual" in name
        return torch.zeros(shape, dtype=dtype) if family == "gemma3" and not is_layer_norm else torch.ones(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype).mul_(0.02)


def write_random_checkpoint(name: str, out_dir, *, dtype: str = "fp16", seed: int = 0, shard_bytes: int = SHARD_BYTES,
                            progress: bool = True, overrides: dict | None = None) -> Path:
    """Write a random checkpoint directory of full-size ``name`` at ``out_dir``.

    Assembled in a temporary sibling and renamed into place: a failure leaves
    no half-written checkpoint."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from blindsight.models.dtype import torch_dtype

    spec = _spec(name)
    config, model_class, tokenizer, save_processor = full_config(name, overrides)
    tdtype = torch_dtype(dtype)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=tdtype)
    # shared tensors (tied embeddings) once, under their first name, as save_pretrained keeps them
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in model.state_dict()]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.manual_seed(seed)
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        weight_map, shard, shard_size, files = {}, {}, 0, []

        def flush():
            nonlocal shard, shard_size
            if shard:
                fname = f"model-{len(files) + 1:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                files.append(fname)
                weight_map.update({k: fname for k in shard})
                shard, shard_size = {}, 0

        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {name}", disable=not progress) as bar:
            for pname, t in tensors:
                value = _fill(pname, tuple(t.shape), spec["family"], tdtype)
                if shard_size + value.numel() * value.element_size() > shard_bytes:
                    flush()
                shard[pname] = value
                shard_size += value.numel() * value.element_size()
                bar.update(value.numel() * value.element_size())
            flush()
        # names as the shards hold them; the loader reads the index
        renamed = {}
        for i, f in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(tmp / f, tmp / final)
            renamed[f] = final
        index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        config.architectures = [model_class.__name__]
        config.dtype = tdtype
        config.save_pretrained(tmp)
        save_processor(families.get(spec["family"]), tokenizer, tmp)
        (tmp / MARKER).write_text(json.dumps({"config": name, "source": spec["_source"], "dtype": dtype, "seed": seed,
                                              "random_weights": True, "overrides": overrides or {}}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parameter_count(name: str) -> int:
    """Parameters of the whole VLM (shared tensors once), from a meta-device build."""
    import torch

    config, model_class, _, _ = full_config(name)
    with torch.device("meta"):
        model = model_class._from_config(config)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    import argparse
    import sys

    from blindsight.errors import run_cli
    from blindsight.models.dtype import DTYPES

    p = argparse.ArgumentParser(
        prog="python -m blindsight.models.fullsize",
        description="Write a random-weights checkpoint directory in a published full-size configuration "
        "(architecture from the packaged config.json, weights drawn N(0, 0.02), written shard by shard); "
        "bs-export takes it like any Hugging Face checkpoint.",
        epilog="example: python -m blindsight.models.fullsize qwen2-vl-2b -o ckpt/qwen2-vl-2b --dtype fp16 && "
        "bs-export ckpt/qwen2-vl-2b -o onnx/qwen2-vl-2b --dtype fp16",
    )
    p.add_argument("name", choices=FULL_SIZE, help="configuration")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create (replaced if it exists)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="dtype of the weights (default fp16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    code, out = run_cli(p.prog, lambda: write_random_checkpoint(args.name, args.output, dtype=args.dtype, seed=args.seed,
                                                                progress=not args.quiet))
    if code == 0:
        print(f"wrote {out} ({args.name}, random {args.dtype} weights)", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
