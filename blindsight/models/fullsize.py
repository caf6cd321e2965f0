"""Full-size random VLM checkpoints in the published configurations
(Qwen2-VL-2B, Qwen2.5-VL-3B/7B, Gemma 3 4B), written to disk tensor by tensor.

No pretrained VLM weights install here, and speed, memory and exactness need
none: the architecture comes from the packaged configs
(:mod:`blindsight.configs`), the weights are drawn at random. The
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
from pathlib import Path

from blindsight import configs, families
from blindsight.errors import BlindSightError
from blindsight.staging import staged_dir

#: the packaged configurations (blindsight.configs) written as random checkpoints
FULL_SIZE = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "gemma-3-4b")
SHARD_BYTES = 1 << 30
MARKER = "blindsight_random.json"


def _spec(name: str) -> dict:
    if name not in FULL_SIZE:
        raise BlindSightError(f"unknown full-size configuration {name!r}; expected one of {', '.join(FULL_SIZE)}")
    return configs.load(name)


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


def published_names(model, names: list[str]) -> dict[str, str]:
    """In-memory parameter name -> the name a published checkpoint stores it under.

    transformers 5 renames a checkpoint's tensors when it loads them (Qwen2-VL's
    ``visual.*`` becomes ``model.visual.*``) and reverts that in ``save_pretrained``;
    tools that read the safetensors themselves (llama.cpp's converter, genai's
    builder) expect the published names. transformers' own reversal is asked here
    with one placeholder tensor per name, matched back by identity."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    placeholders = {n: torch.empty(0) for n in names}
    reverted = revert_weight_conversion(model, dict(placeholders))
    back = {id(t): n for n, t in reverted.items()}
    if len(reverted) != len(names) or any(id(t) not in back for t in placeholders.values()):
        return {n: n for n in names}  # a conversion that merges or splits tensors: keep transformers' names
    return {n: back[id(t)] for n, t in placeholders.items()}


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
    saved = model.state_dict().keys()
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in saved]
    stored = published_names(model, [n for n, _ in tensors])
    out = Path(out_dir)
    with staged_dir(out) as tmp:
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
                shard[stored[pname]] = value
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
        save_processor(families.get(spec["family"]), tokenizer, tmp, config)
        (tmp / MARKER).write_text(json.dumps({"config": name, "source": spec["_source"], "dtype": dtype, "seed": seed,
                                              "random_weights": True, "overrides": overrides or {}}) + "\n")
    return out


def parameter_count(name: str) -> int:
    """Parameters of the whole VLM (shared tensors once), from a meta-device build."""
    import torch

    config, model_class, _, _ = full_config(name)
    with torch.device("meta"):
        model = model_class._from_config(config)
    return sum(p.numel() for p in model.parameters())


def _twin_buffers(family: str, config, model_class, dtype) -> dict:
    """Non-trainable buffers (rotary inverse frequencies, Gemma's embedding scale)
    of the KV-cache wrapper, computed for real on a CPU twin of ``config`` that
    keeps the dimensions they depend on but one decoder layer per layer type, a
    16-token vocabulary and a one-block vision tower."""
    import copy


    from blindsight.models.export_kv import language_model_with_cache

    twin = copy.deepcopy(config)
    text = getattr(twin, "text_config", twin)
    types = list(dict.fromkeys(getattr(text, "layer_types", None) or []))
    text.num_hidden_layers = max(1, len(types))
    if types:
        text.layer_types = types
    text.vocab_size, text.intermediate_size = 16, 16
    for holder in (twin, text):  # the twin's embedding has no padding row (the buffers do not depend on it)
        if getattr(holder, "pad_token_id", None) is not None:
            holder.pad_token_id = None
    vision = getattr(twin, "vision_config", None)
    for attr in ("depth", "num_hidden_layers"):
        if vision is not None and hasattr(vision, attr):
            setattr(vision, attr, 1)
    if vision is not None and hasattr(vision, "fullatt_block_indexes"):
        vision.fullatt_block_indexes = [0]
    model = model_class._from_config(twin, dtype=dtype).eval()
    return {n: b.detach() for n, b in language_model_with_cache(family, model).named_buffers()}


def _fold_weight_transposes(graph) -> dict:
    """Replace every ``Transpose(initializer)`` whose initializer has no other use
    by a new initializer of the transposed shape (its data is written later):
    ``{new name: (source initializer name, perm)}``."""
    import onnx_ir as ir

    out = {}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or len(src.uses()) != 1 or src.shape is None:
            continue
        dims = list(src.shape.numpy())
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(reversed(range(len(dims))))
        folded = node.outputs[0]
        if folded.is_graph_output():
            continue
        new = ir.Value(name=f"{src.name}.T" if src.name + ".T" not in graph.initializers else f"{folded.name}.weight",
                       shape=ir.Shape([dims[i] for i in perm]), type=src.type)
        graph.initializers.add(new)  # its data is drawn and written with the others
        folded.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.initializers.pop(src.name)
        out[new.name] = (src.name, list(perm))
    return out


def export_language_model_structure(name: str, out_path, *, dtype: str = "fp16", seed: int = 0, overrides: dict | None = None,
                                    progress: bool = True, weights=None, logits: str = "last") -> Path:
    """The KV-cache language model of full-size ``name`` (the graph bs-export
    writes as language_model.onnx) without ever holding its weights: traced on
    the meta device, every initializer then drawn at random (``weights(name) ->
    ndarray`` replaces the draw, e.g. a real model's state dict in tests) and
    streamed into one external-data file (``weights(name)`` returning None falls
    back to the draw), buffers computed for real. A weight read only through a
    Transpose (every Linear's MatMul) is written transposed and the Transpose
    dropped, as bs-export's constant folding does: ONNX Runtime would otherwise
    fold it at load into a private in-memory copy, where an untouched external
    initializer stays a read-only file mapping that sessions share.

    ``logits`` as bs-export's (``"last"``: the LM head runs on the last position).

    For checkpoints whose export does not fit in memory (7B in 24 GB)."""
    import numpy as np
    import onnx_ir as ir
    import onnxscript
    import torch
    from tqdm.auto import tqdm

    from blindsight.attention.schema import IMAGE_BLOCKS_METADATA
    from blindsight.models.dtype import cast_mixed_norms, torch_dtype
    from blindsight.models.export import MAX_IR_VERSION
    from blindsight.models.export_kv import LOGITS_METADATA, trace_language_model_with_cache

    spec = _spec(name)
    family = spec["family"]
    config, model_class, _, _ = full_config(name, overrides)
    tdtype = torch_dtype(dtype)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=tdtype).eval()
    program = trace_language_model_with_cache(family, model, optimize=False, logits=logits)
    buffers = _twin_buffers(family, config, model_class, tdtype)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_name = out.name + ".data"
    tmp_model, tmp_data = out.with_name(f".{out.name}.tmp"), out.with_name(f".{data_name}.tmp")
    inits = program.model.graph.initializers
    transposed = _fold_weight_transposes(program.model.graph)
    external = set()
    torch.manual_seed(seed)
    try:
        offset = 0
        total = sum(int(np.prod(v.shape.numpy())) for v in inits.values())
        with open(tmp_data, "wb") as fh, tqdm(total=total, unit="value", unit_scale=True, desc=f"weights of {name}",
                                               disable=not progress) as bar:
            for key, value in inits.items():
                shape = tuple(value.shape.numpy())
                source, perm = transposed.get(key, (key, None))
                source_shape = shape if perm is None else tuple(shape[perm.index(i)] for i in range(len(shape)))
                given = weights(source) if weights is not None else None
                if given is not None:
                    arr = np.asarray(given)
                elif source in buffers:
                    arr = buffers[source].numpy()
                else:
                    arr = _fill(source, source_shape, family, tdtype).numpy()
                arr = np.ascontiguousarray(arr if perm is None else arr.transpose(perm))
                if tuple(arr.shape) != shape:
                    raise ValueError(f"initializer {key}: drawn shape {arr.shape}, graph shape {shape}")
                bar.update(arr.size)
                if arr.nbytes < 1024:
                    value.const_value = ir.tensor(arr, name=key)
                    continue
                pad = (-offset) % 64  # aligned, as ONNX Runtime maps external data
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(arr.tobytes())
                value.const_value = ir.ExternalTensor(data_name, offset, arr.nbytes, ir.DataType.from_numpy(arr.dtype),
                                                      shape=ir.Shape(arr.shape), name=key, base_dir=str(out.parent))
                external.add(key)
                offset += arr.nbytes
        os.replace(tmp_data, out.parent / data_name)

        def keep_weights(node):  # folding a weight's Transpose would read it into memory
            return False if any(i is not None and i.name in external for i in node.inputs) else None

        onnxscript.optimizer.optimize_ir(program.model, should_fold=keep_weights)
        cast_mixed_norms(program.model)
        if families.get(family).image_blocks:
            program.model.metadata_props[IMAGE_BLOCKS_METADATA] = "1"
        program.model.metadata_props[LOGITS_METADATA] = logits
        program.model.metadata_props["blindsight.random_weights"] = json.dumps({"config": name, "dtype": dtype, "seed": seed})
        program.model.ir_version = min(program.model.ir_version, MAX_IR_VERSION)
        ir.save(program.model, tmp_model)
        os.replace(tmp_model, out)
    except BaseException:
        for f in (tmp_model, tmp_data):
            f.unlink(missing_ok=True)
        raise
    return out


#: tiny random checkpoints (2 layers, 4 heads of 16: seconds to write and export) by family
TINY = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-gemma3": "gemma3"}


def main(argv=None) -> int:
    """bs-checkpoint: a random-weights Hugging Face checkpoint directory."""
    import argparse
    import sys

    from blindsight.errors import run_cli
    from blindsight.models.dtype import DTYPES

    p = argparse.ArgumentParser(
        prog="bs-checkpoint",
        description="Write a random-weights Hugging Face checkpoint directory (config, weights, tokenizer, image "
        "processor, chat template) that bs-export takes like a downloaded one: a tiny one (2 layers, 4 query heads "
        "of 16; seconds) for trying the tools, or a published full-size configuration (architecture from the "
        "packaged config.json, weights drawn N(0, 0.02), written shard by shard) for speed and memory.",
        epilog="examples: bs-checkpoint tiny-qwen2-vl -o tiny-qwen2-vl && bs-export tiny-qwen2-vl -o qwen-onnx; "
        "bs-checkpoint qwen2-vl-2b -o ckpt/qwen2-vl-2b --dtype fp16 && bs-export ckpt/qwen2-vl-2b -o onnx/qwen2-vl-2b --dtype fp16",
    )
    p.add_argument("name", choices=(*TINY, *FULL_SIZE), help="configuration")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create (replaced if it exists)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16",
                   help="dtype of a full-size checkpoint's weights (default fp16; tiny ones are fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def write():
        if args.name in TINY:
            from blindsight.models.checkpoints import make_tiny_checkpoint

            return make_tiny_checkpoint(TINY[args.name], args.output, seed=args.seed)
        return write_random_checkpoint(args.name, args.output, dtype=args.dtype, seed=args.seed, progress=not args.quiet)

    code, out = run_cli(p.prog, write)
    if code == 0:
        dtype = "fp32" if args.name in TINY else args.dtype
        print(f"wrote {out} ({args.name}, random {dtype} weights)", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
