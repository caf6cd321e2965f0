"""A bs-export directory of Qwen2.5-VL or Qwen2-VL as one onnxruntime-genai multimodal model.

:func:`write_genai_vlm` writes a folder that onnxruntime-genai (0.18.0, model
type ``qwen2_5_vl`` for both: genai has no ``qwen2_vl`` type, and what the type
fixes is the same for the two families, see :data:`GENAI_TYPES`) loads as a whole VLM: its own image processor, then the
vision, embedding and decoder sessions, the decoder compiled with a head
profile. genai feeds each session fixed inputs, so two graphs are wrapped:

- ``embed.genai.onnx``: genai merges no image features itself; it hands the
  embedding session ``input_ids`` and ``image_features`` and expects the merged
  ``inputs_embeds`` back.
- ``language_model.genai.onnx``: genai passes no extra input to the decoder,
  so ``image_spans`` cannot be fed; the wrapper computes it from ``input_ids``
  (which genai feeds a decoder that declares it). genai runs the whole prompt
  in one decoder call, so the spans found in a call's ids are the prompt's;
  a decode step holds one text token and no span, which is exact because text
  queries attend densely in every category (docs/specification.md §2).

``vision.onnx`` takes index tensors that genai does not compute; the caller
adds them to the processor's output (:func:`blindsight.runtime.genai.add_vision_inputs`).
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
from blindsight.compiler.pipeline import compile_model
from blindsight.errors import ModelError
from blindsight.staging import staged_dir

TEMPLATE = "template.json"
EMBED = "embed.genai.onnx"
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
                f"feed it with blindsight.runtime.genai.add_vision_inputs")


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


def _external_files(proto: onnx.ModelProto) -> set[str]:
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


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
        "vision": {"filename": template["files"]["vision"], "config_filename": PROCESSOR_CONFIG,
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
    preprocessor = _read_json(export_dir / "preprocessor_config.json")
    if not preprocessor:
        raise ModelError(f"{export_dir} has no preprocessor_config.json; export again with bs-export")
    processor = processor_config(preprocessor, template["vision"])
    config = genai_config(template, _read_json(export_dir / "config.json"),
                          _read_json(export_dir / "generation_config.json"), library.name if library else None)
    vision = _load(export_dir / files["vision"])
    embed = embed_wrapper(_load(export_dir / files["embed"]), int(template["image_token_id"]), int(template["hidden_size"]))
    source_lm = _load(export_dir / files["language_model"])
    data = _external_files(vision) | _external_files(embed) | _external_files(source_lm)
    compiled_name = f".{Path(files['language_model']).stem}.compiled.onnx"
    with staged_dir(out_dir) as tmp:
        for name in sorted(data | {files["vision"]}):
            if not (export_dir / name).is_file():
                raise ModelError(f"{export_dir} has no {name}, which its graphs name as external data; export again")
            _link_or_copy(export_dir / name, tmp / name)
        for name in COPIED:  # copies: an edit of a hard-linked text file would write through into the export
            if (export_dir / name).is_file():
                shutil.copy2(export_dir / name, tmp / name)
        # compile beside the weights so the compiled graph's external-data references stay valid
        _link_or_copy(export_dir / files["language_model"], tmp / files["language_model"])
        result = compile_model(tmp / files["language_model"], profile, tmp / compiled_name, lowering)
        _save(decoder_wrapper(_load(tmp / compiled_name), int(template["image_start_id"]), int(template["image_end_id"])),
              tmp / DECODER)
        (tmp / compiled_name).unlink()
        (tmp / files["language_model"]).unlink()
        _save(embed, tmp / EMBED)
        if library is not None:
            shutil.copy2(library, tmp / library.name)
        (tmp / PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
        (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    result.output = out_dir / DECODER
    return GenaiVlmResult(out_dir, result, library.name if library is not None else None)
