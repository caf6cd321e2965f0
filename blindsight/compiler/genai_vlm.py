"""A bs-export directory of Qwen2.5-VL or Qwen2-VL as one onnxruntime-genai multimodal model.

:func:`write_genai_vlm` writes a folder that onnxruntime-genai (0.18.0, model
type ``qwen2_5_vl`` for both: genai has no ``qwen2_vl`` type, and what the type
fixes is the same for the two families, see :data:`GENAI_TYPES`) loads as a whole VLM: its own image processor, then the
vision, embedding and decoder sessions, the decoder compiled with a head
profile. genai feeds each session fixed inputs, so the three graphs are wrapped:

- ``embed.genai.onnx``: genai merges no image features itself; it hands the
  embedding session ``input_ids`` and ``image_features`` and expects the merged
  ``inputs_embeds`` back.
- ``language_model.genai.onnx``: genai passes no extra input to the decoder,
  so ``image_spans`` cannot be fed; the wrapper computes it from ``input_ids``
  (which genai feeds a decoder that declares it). genai runs the whole prompt
  in one decoder call, so the spans found in a call's ids are the prompt's;
  a decode step holds one text token and no span, which is exact because text
  queries attend densely in every category (docs/specification.md §2).

- ``vision.genai.onnx``: the export's tower takes index tensors that genai does not
  compute; the wrapper takes ``image_grid_thw`` [1, 3] for one image and computes
  them in the graph, and genai calls it once per image.
docs/genai.md ("The whole VLM in genai") records what genai does and what
this covers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from blindsight.compiler.genai import GENAI_CONFIG, GenaiCompileResult, _link_or_copy, check_output_folder, native_library
from blindsight.compiler.pipeline import compile_model, external_data_files
from blindsight.errors import ModelError
from blindsight.staging import staged_dir

TEMPLATE = "template.json"
EMBED = "embed.genai.onnx"
VISION = "vision.genai.onnx"
#: set in the folder's copy of template.json: its tower computes the index inputs itself
#: (blindsight.runtime.genai.add_vision_inputs then adds nothing)
INDEX_IN_GRAPH = "vision_index_in_graph"
DECODER = "language_model.genai.onnx"
# genai's default vision.config_filename is processor_config.json, the name of
# the transformers file that bs-export copies: another name keeps both.
PROCESSOR_CONFIG = "genai_processor_config.json"
#: genai model type of each bs-export family that genai runs as a whole VLM. Qwen2-VL
#: runs under ``qwen2_5_vl``: the type fixes the image processor (the two families
#: share transformers' Qwen2VLImageProcessor), the M-RoPE position ids (equal for
#: images; they differ only in a video's temporal step) and the three-session
#: pipeline; the towers differ, and each folder carries its own export's tower.
GENAI_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_5_vl"}
#: copied when present: what genai's tokenizer reads, and what the runtime helper and a chat UI read
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
          "generation_config.json", "config.json", TEMPLATE)
_SPANS = "image_spans"
_UNSUPPORTED = {
    "gemma3": "genai's gemma3 type, its processor and the image blocks' token_type_ids input are not covered",
}


def is_export_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / TEMPLATE).is_file()


class GenaiVlmResult(GenaiCompileResult):
    def summary(self) -> str:
        kernel = (f"native kernel {self.custom_ops_library} as the decoder's custom_ops_library" if self.custom_ops_library
                  else "function bodies (no custom_ops_library)")
        return (f"{self.decoder.summary()}; genai VLM folder {self.out_dir} ({GENAI_CONFIG}; {kernel}); "
                "its tower computes its index inputs, once per image")


def read_template(export_dir: Path) -> dict:
    path = export_dir / TEMPLATE
    try:
        template = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); pass a directory written by bs-export") from None
    if not isinstance(template, dict) or template.get("format") != "blindsight-export":
        raise ModelError(f"{path} is not a bs-export template; pass a directory written by bs-export")
    family = template.get("family")
    if family not in GENAI_TYPES:
        why = _UNSUPPORTED.get(family, "not a family this tool knows")
        raise ModelError(f"{export_dir} is a {family} export; only {', '.join(GENAI_TYPES)} bs-exports are written "
                         f"as a genai VLM ({why})")
    for key in ("files", "vision", "vision_inputs", "image_token_id", "image_start_id", "image_end_id", "hidden_size",
                "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        if key not in template:
            raise ModelError(f"{path} has no {key!r}; export again with bs-export")
    for role, name in template["files"].items():
        if not (export_dir / name).is_file():
            raise ModelError(f"{export_dir} has no {name} (template.json's {role} graph); export again with bs-export")
    if not (export_dir / "tokenizer.json").is_file():
        raise ModelError(f"{export_dir} has no tokenizer.json, which genai's tokenizer reads; export again with bs-export")
    return template


def _load(path: Path) -> onnx.ModelProto:
    # the weights stay in their files: a wrapper only adds nodes in front or behind
    return onnx.load(str(path), load_external_data=False)


def _vi(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


class _Nodes:
    """New nodes for ``graph``, named apart from every name already in it."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.input} | \
            {i.name for i in graph.initializer} | {o.name for o in graph.output}
        self.nodes: list[onnx.NodeProto] = []

    def name(self, base: str) -> str:
        name, k = f"bs_{base}", 0
        while name in self.taken:
            k += 1
            name = f"bs_{base}_{k}"
        self.taken.add(name)
        return name

    def add(self, op: str, inputs, out: str | None = None, **attrs) -> str:
        out = out or self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value) -> str:
        out = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(value), out)))
        return out


def embed_wrapper(proto: onnx.ModelProto, image_token_id: int, hidden: int) -> onnx.ModelProto:
    """embed.onnx plus an ``image_features`` [num_image_tokens, hidden] input whose rows
    replace the embeddings of the image tokens, in order."""
    graph = proto.graph
    out = next(o for o in graph.output if o.name == "inputs_embeds")
    elem = out.type.tensor_type.elem_type
    b = _Nodes(graph)
    token = b.name("token_embeds")
    for node in graph.node:
        node.output[:] = [token if o == out.name else o for o in node.output]
        node.input[:] = [token if i == out.name else i for i in node.input]
    is_image = b.add("Equal", ["input_ids", b.const(np.int64(image_token_id))])
    flat = b.add("Reshape", [b.add("Cast", [is_image], to=TensorProto.INT64), b.const(np.array([-1], np.int64))])
    # the image tokens' rank among image tokens is their feature row; every other token
    # reads row -1, the appended zero row, so a prompt without images and genai's
    # [0, hidden] features of a decode step need no branch
    rank = b.add("Sub", [b.add("CumSum", [flat, b.const(np.int64(0))]), b.const(np.int64(1))])
    row = b.add("Reshape", [rank, b.add("Shape", ["input_ids"])])
    zero = b.add("Cast", [b.const(np.zeros((1, hidden), np.float32))], to=elem)
    rows = b.add("Gather", [b.add("Concat", ["image_features", zero], axis=0), row], axis=0)
    mask = b.add("Unsqueeze", [is_image, b.const(np.array([-1], np.int64))])
    b.add("Where", [mask, rows, token], out=out.name)
    graph.node.extend(b.nodes)
    graph.input.append(_vi("image_features", elem, ["num_image_tokens", hidden]))
    return proto


def vision_wrapper(proto: onnx.ModelProto, template: dict) -> onnx.ModelProto:
    """vision.onnx taking ``image_grid_thw`` int64 [1, 3] (one image) in place of its
    index inputs, which the graph now computes as blindsight.vision_inputs does.

    With a static 1 in front, genai (0.18.0) calls the tower once per image, slicing
    ``pixel_values`` and ``image_grid_thw`` for each (its loop for multi-image
    prompts), so each image's patches attend within that image only, as the
    project's pipeline runs it; and no Python step feeds the tower."""
    graph = proto.graph
    index_inputs = [i for i in graph.input if i.name != "pixel_values"]
    dtypes = {i.name: i.type.tensor_type.elem_type for i in index_inputs}
    for item in index_inputs:
        graph.input.remove(item)
    graph.input.append(_vi("image_grid_thw", TensorProto.INT64, [1, 3]))
    b = _Nodes(graph)
    vision = template["vision"]
    m = int(vision["spatial_merge_size"])

    def i64(*values):
        return b.const(np.array(values, np.int64))

    def scalar(tensor, k):
        return b.add("Gather", [tensor, b.const(np.int64(k))], axis=0)

    def vec(*parts):  # 1-D int64 from scalars and 1-D pieces
        return b.add("Concat", [b.add("Reshape", [p, i64(-1)]) for p in parts], axis=0)

    grid = b.add("Reshape", ["image_grid_thw", i64(3)])
    t, h, w = (scalar(grid, k) for k in range(3))
    zero, one, merge = b.const(np.int64(0)), b.const(np.int64(1)), b.const(np.int64(m))
    hw = b.add("Mul", [h, w])
    out = {}
    # cu_seqlens: one segment of h * w patches per frame
    out["cu_seqlens"] = b.add("Range", [zero, b.add("Add", [b.add("Mul", [t, hw]), one]), hw])
    # vision_position_ids: (row, column) of every patch in merge-block order, per frame
    rows = b.add("Expand", [b.add("Unsqueeze", [b.add("Range", [zero, h, one]), i64(1)]), vec(h, w)])
    cols = b.add("Expand", [b.add("Unsqueeze", [b.add("Range", [zero, w, one]), i64(0)]), vec(h, w)])
    pairs = b.add("Concat", [b.add("Unsqueeze", [rows, i64(-1)]), b.add("Unsqueeze", [cols, i64(-1)])], axis=-1)
    blocks = b.add("Reshape", [pairs, vec(b.add("Div", [h, merge]), merge, b.add("Div", [w, merge]), merge, i64(2))])
    ordered = b.add("Reshape", [b.add("Transpose", [blocks], perm=[0, 2, 1, 3, 4]), i64(-1, 2)])
    out["vision_position_ids"] = b.add("Tile", [ordered, vec(t, one)])
    if "window_index" in dtypes:
        # Qwen2.5-VL: the merged tokens of each frame in windows of `win` a side, padded with -100
        win = int(vision["window_size"]) // m // int(vision["patch_size"])
        wconst = b.const(np.int64(win))
        lh, lw = b.add("Div", [h, merge]), b.add("Div", [w, merge])
        index = b.add("Reshape", [b.add("Range", [zero, b.add("Mul", [t, b.add("Mul", [lh, lw])]), one]), vec(t, lh, lw)])
        pad_h = b.add("Sub", [wconst, b.add("Mod", [lh, wconst])])
        pad_w = b.add("Sub", [wconst, b.add("Mod", [lw, wconst])])
        padded = b.add("Pad", [index, vec(i64(0, 0, 0, 0), pad_h, pad_w), b.const(np.int64(-100))])
        nh = b.add("Div", [b.add("Add", [lh, pad_h]), wconst])
        nw = b.add("Div", [b.add("Add", [lw, pad_w]), wconst])
        windows = b.add("Reshape", [padded, vec(t, nh, wconst, nw, wconst)])
        windows = b.add("Reshape", [b.add("Transpose", [windows], perm=[0, 1, 3, 2, 4]), i64(-1, win * win)])
        valid = b.add("Not", [b.add("Equal", [windows, b.const(np.int64(-100))])])
        out["window_index"] = b.add("Compress", [b.add("Reshape", [windows, i64(-1)]), b.add("Reshape", [valid, i64(-1)])])
        seqlens = b.add("ReduceSum", [b.add("Cast", [valid], to=TensorProto.INT64), i64(1)], keepdims=0)
        cu = b.add("Concat", [i64(0), b.add("Mul", [b.add("CumSum", [seqlens, zero]), b.const(np.int64(m * m))])], axis=0)
        # empty windows repeat a boundary; drop the repeats, as unique_consecutive does
        count = b.add("Shape", [cu])
        later = b.add("Slice", [cu, i64(1), count])
        earlier = b.add("Slice", [cu, i64(0), b.add("Sub", [count, i64(1)])])
        keep = b.add("Concat", [b.const(np.array([True])), b.add("Not", [b.add("Equal", [later, earlier])])], axis=0)
        out["cu_window_seqlens"] = b.add("Compress", [cu, keep])
    missing = set(dtypes) - set(out)
    if missing:
        raise ModelError(f"vision.onnx takes {sorted(missing)}, which the genai wrapper does not compute; export again")
    for name, elem in dtypes.items():
        b.add("Identity" if elem == TensorProto.INT64 else "Cast", [out[name]], out=name,
              **({} if elem == TensorProto.INT64 else {"to": elem}))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(b.nodes + existing)
    return proto


def decoder_wrapper(proto: onnx.ModelProto, start_id: int, end_id: int) -> onnx.ModelProto:
    """A compiled language model whose ``image_spans`` come from a new ``input_ids``
    int64 [1, seq_len] input: one span per start/end delimiter pair in the call's ids,
    at absolute positions (past = attention_mask's length - seq_len)."""
    graph = proto.graph
    spans_in = [i for i in graph.input if i.name == _SPANS]
    if not spans_in:
        raise ModelError(f"the compiled language model has no {_SPANS} input; nothing to wrap")
    graph.input.remove(spans_in[0])
    embeds = next(i for i in graph.input if i.name == "inputs_embeds")
    seq_dim = embeds.type.tensor_type.shape.dim[1]
    graph.input.append(_vi("input_ids", TensorProto.INT64, [1, seq_dim.dim_param or seq_dim.dim_value or "seq_len"]))
    b = _Nodes(graph)
    flat = b.add("Reshape", ["input_ids", b.const(np.array([-1], np.int64))])
    past = b.add("Sub", [b.add("Shape", ["attention_mask"], start=1, end=2), b.add("Shape", ["input_ids"], start=1, end=2)])
    column = b.const(np.array([-1, 1], np.int64))
    starts = b.add("Reshape", [b.add("NonZero", [b.add("Equal", [flat, b.const(np.int64(start_id))])]), column])
    ends = b.add("Reshape", [b.add("NonZero", [b.add("Equal", [flat, b.const(np.int64(end_id))])]), column])
    ends = b.add("Add", [ends, b.const(np.int64(1))])  # exclusive: the span holds its end delimiter
    b.add("Add", [b.add("Concat", [starts, ends], axis=1), past], out=_SPANS)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(b.nodes + existing)
    return proto


def processor_config(preprocessor: dict, vision: dict) -> dict:
    """genai's (ort-extensions') image pipeline with transformers' Qwen2VLImageProcessor settings."""
    size = preprocessor.get("size") or {}
    min_pixels = size.get("shortest_edge", preprocessor.get("min_pixels"))
    max_pixels = size.get("longest_edge", preprocessor.get("max_pixels"))
    if min_pixels is None or max_pixels is None:
        raise ModelError("preprocessor_config.json has no size.shortest_edge/longest_edge (min/max pixels); "
                         "export again with bs-export from a checkpoint with a Qwen2-VL image processor")
    patch = int(preprocessor.get("patch_size", vision["patch_size"]))
    merge = int(preprocessor.get("merge_size", vision["spatial_merge_size"]))
    temporal = int(preprocessor.get("temporal_patch_size", vision["temporal_patch_size"]))

    def op(name, kind, **attrs):
        return {"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}

    return {"processor": {"name": "qwen2_5_image_processor", "transforms": [
        op("decode_image", "DecodeImage", color_space="RGB"),
        op("convert_to_rgb", "ConvertRGB"),
        op("resize", "Resize", smart_resize=1, min_pixels=int(min_pixels), max_pixels=int(max_pixels),
           patch_size=patch, merge_size=merge),
        op("rescale", "Rescale", rescale_factor=float(preprocessor.get("rescale_factor", 1 / 255))),
        op("normalize", "Normalize", mean=[float(v) for v in preprocessor["image_mean"]],
           std=[float(v) for v in preprocessor["image_std"]], qwen2_5_vl=1),
        op("patch_image", "PatchImage", patch_size=patch, temporal_patch_size=temporal, merge_size=merge),
    ]}}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); export again with bs-export") from None


def genai_config(template: dict, checkpoint: dict, generation: dict, library: str | None) -> dict:
    text = checkpoint.get("text_config") or checkpoint
    vision = checkpoint.get("vision_config") or {}
    eos = [int(t) for t in template.get("eos_token_ids") or []]
    pad = template.get("pad_token_id")
    decoder = {
        "filename": DECODER,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": int(template["head_dim"]),
        "hidden_size": int(template["hidden_size"]),
        "num_attention_heads": int(template["num_heads"]),
        "num_hidden_layers": int(template["num_layers"]),
        "num_key_value_heads": int(template["num_kv_heads"]),
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    if library is not None:
        decoder["session_options"]["custom_ops_library"] = library
    context = int(text.get("max_position_embeddings") or checkpoint.get("max_position_embeddings") or 32768)
    model = {
        "type": GENAI_TYPES[template["family"]],
        "bos_token_id": int(generation.get("bos_token_id", pad if pad is not None else eos[0])),
        "eos_token_id": eos if len(eos) != 1 else eos[0],
        "pad_token_id": int(pad if pad is not None else eos[0]),
        "vocab_size": int(template["vocab_size"]),
        "context_length": context,
        "image_token_id": int(template["image_token_id"]),
        "video_token_id": int(template.get("video_token_id", -1)),
        "vision_start_token_id": int(template["image_start_id"]),
        "decoder": decoder,
        "embedding": {"filename": EMBED, "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "vision": {"filename": VISION, "config_filename": PROCESSOR_CONFIG,
                   "spatial_merge_size": int(template["vision"]["spatial_merge_size"]),
                   "patch_size": int(template["vision"]["patch_size"]),
                   "tokens_per_second": float(vision.get("tokens_per_second", 2.0)),
                   "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                   "outputs": {"image_features": "image_features"}},
    }
    # the wrapped decoder's cache inputs and outputs are separate tensors (bs-export's graph
    # grows the present by concatenation), as onnxruntime's loop feeds them
    search = {"do_sample": False, "max_length": context, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def _save(proto: onnx.ModelProto, path: Path) -> None:
    onnx.save(proto, str(path))


def write_vision_and_embedding(export_dir: Path, template: dict, dest: Path, extra_data: set[str] = frozenset()) -> None:
    """What every genai VLM folder of an export holds besides its decoder: the wrapped
    tower and embedding, their weight files (and ``extra_data``, other graphs' weights)
    linked, genai's processor config, and copies of the tokenizer and config files,
    template.json marked as computing the tower's index inputs in the graph."""
    preprocessor = _read_json(export_dir / "preprocessor_config.json")
    if not preprocessor:
        raise ModelError(f"{export_dir} has no preprocessor_config.json; export again with bs-export")
    processor = processor_config(preprocessor, template["vision"])
    files = template["files"]
    vision = vision_wrapper(_load(export_dir / files["vision"]), template)
    embed = embed_wrapper(_load(export_dir / files["embed"]), int(template["image_token_id"]), int(template["hidden_size"]))
    for name in sorted(external_data_files(vision) | external_data_files(embed) | set(extra_data)):
        if not (export_dir / name).is_file():
            raise ModelError(f"{export_dir} has no {name}, which its graphs name as external data; export again")
        _link_or_copy(export_dir / name, dest / name)
    for name in COPIED:  # copies: an edit of a hard-linked text file would write through into the export
        if (export_dir / name).is_file():
            shutil.copy2(export_dir / name, dest / name)
    (dest / TEMPLATE).write_text(json.dumps({**template, INDEX_IN_GRAPH: True}, indent=1) + "\n")
    _save(vision, dest / VISION)
    _save(embed, dest / EMBED)
    (dest / PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")


def write_genai_vlm(export_dir, profile, out_dir, lowering: str = "fast", native: bool | None = None,
                    overwrite: bool = False) -> GenaiVlmResult:
    """Write an onnxruntime-genai folder ``out_dir`` running the bs-export directory
    ``export_dir`` as a whole VLM, its language model compiled with ``profile``
    (an existing non-empty ``out_dir`` only with ``overwrite``: it is replaced whole).
    ``native``: name the native kernel as the decoder's custom_ops_library when it is
    built (None), always (True: an error when it is not built) or never (False)."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if not is_export_dir(export_dir):
        raise ModelError(f"{export_dir} is not a bs-export directory (no {TEMPLATE}); run bs-export MODEL_DIR -o {export_dir}")
    template = read_template(export_dir)
    if template.get("dtype", "float32") == "bfloat16":
        raise ModelError(f"{export_dir} is a bf16 export; write the genai folder from an fp32 or fp16 export "
                         "(bs-export --dtype fp32|fp16)")
    check_output_folder(export_dir, out_dir, overwrite, "the export directory")
    library = native_library(native)
    files = template["files"]
    config = genai_config(template, _read_json(export_dir / "config.json"),
                          _read_json(export_dir / "generation_config.json"), library.name if library else None)
    source_lm = _load(export_dir / files["language_model"])
    compiled_name = f".{Path(files['language_model']).stem}.compiled.onnx"
    with staged_dir(out_dir) as tmp:
        write_vision_and_embedding(export_dir, template, tmp, extra_data=external_data_files(source_lm))
        # compile beside the weights so the compiled graph's external-data references stay valid
        _link_or_copy(export_dir / files["language_model"], tmp / files["language_model"])
        result = compile_model(tmp / files["language_model"], profile, tmp / compiled_name, lowering)
        _save(decoder_wrapper(_load(tmp / compiled_name), int(template["image_start_id"]), int(template["image_end_id"])),
              tmp / DECODER)
        (tmp / compiled_name).unlink()
        (tmp / files["language_model"]).unlink()
        if library is not None:
            shutil.copy2(library, tmp / library.name)
        (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    result.output = out_dir / DECODER
    return GenaiVlmResult(out_dir, result, library.name if library is not None else None)
