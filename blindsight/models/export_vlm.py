"""bs-export as a function: a local Hugging Face VLM checkpoint directory ->
an export directory (vision.onnx, embed.onnx, language_model.onnx with a KV
cache, template.json, the processor files). Layout: docs/export-contract.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from blindsight import families
from blindsight.errors import BlindSightError
from blindsight.families import FAMILIES
from blindsight.staging import staged_dir

from blindsight.passes.query_chunks import DEFAULT_ROWS

from .dtype import DTYPE_NAMES, check_dtype, torch_dtype
from .export import _text_config

FORMAT = "blindsight-export"
VERSION = 1
#: how the vision tower's attention runs (blindsight.passes.fused_attention)
VISION_ATTENTION = ("fused", "chunked")
FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "language_model": "language_model.onnx"}
# What a checkpoint holds besides weights: tokenizer, processors, templates, configs.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack", ".ckpt")


class ExportError(BlindSightError, ValueError):
    """A checkpoint directory bs-export cannot take."""


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    template: dict

    def summary(self) -> str:
        t = self.template
        return (
            f"exported {t['family']} ({t['num_layers']} layers, {t['num_heads']} heads, "
            f"{t['num_kv_heads']} KV heads) -> {self.out_dir}: {', '.join(t['files'].values())}, template.json"
        )


def detect_family(model_dir) -> tuple[str, object]:
    """(family, config) of a checkpoint directory, or ExportError saying why not."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint directory (config + weights)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ExportError(f"{model_dir}/config.json cannot be read by transformers ({type(exc).__name__}: {exc})") from None
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        text_only = next((f for f in families.REGISTRY.values() if family and f.text_model_type == family), None)
        hint = f" (a text-only {text_only.title} has no vision tower; use a {text_only.model_class} checkpoint)" if text_only else ""
        raise ExportError(f"model type {family!r} is not supported; bs-export takes {', '.join(FAMILIES)}{hint}")
    return family, config


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, (list, tuple)) else [x])]


def _eos_ids(model_dir: Path, config) -> list[int]:
    gen = model_dir / "generation_config.json"
    ids: list[int] = []
    if gen.is_file():
        ids = _as_list(json.loads(gen.read_text()).get("eos_token_id"))
    if not ids:
        ids = _as_list(getattr(config, "eos_token_id", None)) or _as_list(getattr(_text_config(config), "eos_token_id", None))
    return sorted(set(ids))


def _siglip_fields(spec, config, text) -> dict:
    vision = config.vision_config
    return dict(
        **spec.config_token_ids(config),
        position_ids=spec.position_ids,
        tokens_per_image=int(config.mm_tokens_per_image),
        sliding_window=getattr(text, "sliding_window", None),
        layer_types=list(getattr(text, "layer_types", None) or []),
        vision={"image_size": vision.image_size, "num_channels": vision.num_channels},
        vision_inputs=list(spec.vision_inputs),
    )


def _qwen_fields(spec, config, text) -> dict:
    vision = config.vision_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return dict(
        **spec.config_token_ids(config),
        video_token_id=getattr(config, "video_token_id", None),
        position_ids=spec.position_ids,
        mrope_section=list(rope.get("mrope_section", [])),
        spatial_merge_size=int(vision.spatial_merge_size),
        vision={
            "spatial_merge_size": int(vision.spatial_merge_size),
            "patch_size": int(vision.patch_size),
            "temporal_patch_size": int(vision.temporal_patch_size),
            "window_size": int(getattr(vision, "window_size", 0) or 0),
        },
        vision_inputs=list(spec.vision_inputs),
    )


# template.json's family-specific part, by kind of vision tower
_TOWER_FIELDS = {families.SIGLIP_VISION: _siglip_fields, families.QWEN_VISION: _qwen_fields}


def build_template(family: str, config, model_dir: Path) -> dict:
    text = _text_config(config)
    heads = text.num_attention_heads
    t = {
        "format": FORMAT,
        "version": VERSION,
        "family": family,
        "num_layers": text.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "eos_token_ids": _eos_ids(model_dir, config),
        "pad_token_id": getattr(config, "pad_token_id", None) if getattr(config, "pad_token_id", None) is not None else getattr(text, "pad_token_id", None),
        "files": dict(FILES),
        # Gemma 3: image soft tokens attend each other (token_type_ids input; docs/export-contract.md)
        "bidirectional_image_attention": families.get(family).image_blocks,
    }
    spec = families.get(family)
    t.update(_TOWER_FIELDS[spec.vision_tower](spec, config, text))
    return t


def load_vlm(family: str, model_dir: Path, dtype: str = "fp32"):
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="eager", dtype=torch_dtype(dtype))
    except OSError as exc:
        raise ExportError(f"cannot load the weights of {model_dir} ({exc}); is the checkpoint complete?") from None
    return model.eval()


def _qwen_trace_example(family: str, template: dict) -> dict:
    """Two small images for tracing the Qwen vision tower (shapes stay dynamic)."""
    import numpy as np

    from .export_vision import qwen_vision_feeds

    v = template["vision"]
    m = v["spatial_merge_size"]
    grid = np.array([[1, 2 * m, 2 * m], [1, 4 * m, 2 * m]], dtype=np.int64)
    width = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(-1).sum()), width)).astype(np.float32)
    return qwen_vision_feeds(family, v, pixels, grid)


def copy_processor_files(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for f in sorted(model_dir.iterdir()):
        if not f.is_file() or f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, out_dir / f.name)
        copied.append(f.name)
    return copied


def export_vlm(model_dir, out_dir, *, progress: bool = False, overwrite: bool = False, dtype: str = "fp32",
               logits: str = "last", vision_query_rows: int | None = DEFAULT_ROWS,
               vision_attention: str = "fused") -> ExportResult:
    """Export the checkpoint at ``model_dir`` into ``out_dir``.

    ``dtype`` (fp32, fp16, bf16): the weights are loaded in it, and every float
    input and output of the three graphs has it (template.json: ``"dtype"``).
    ``logits``: ``"last"`` (the language model's LM head runs on the chunk's last
    position only: what generation reads) or ``"all"`` (every position; template.json:
    ``"logits"``). ``vision_query_rows``: the vision tower's attention runs that many
    queries at a time (None: one call holds every patch against every other).
    ``vision_attention``: ``"fused"`` (ONNX Runtime's MultiHeadAttention where a call
    holds one image, the chunks otherwise) or ``"chunked"`` (the chunks only).

    The directory is assembled in a temporary sibling and renamed into place:
    a failure never leaves a half-written export.
    """
    from tqdm import tqdm

    from .export_kv import check_logits, export_language_model_with_cache
    from .export_vision import export_embed, export_vision

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    family, config = detect_family(model_dir)
    check_dtype(dtype)
    check_logits(logits)
    if vision_attention not in VISION_ATTENTION:
        raise ExportError(f"vision attention {vision_attention!r}: choose one of {', '.join(VISION_ATTENTION)}")
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite or choose another -o")
    if out_dir.resolve() == model_dir.resolve():
        raise ExportError("the output directory is the checkpoint directory; choose another -o")
    template = build_template(family, config, model_dir)
    template["dtype"] = DTYPE_NAMES[dtype]
    template["logits"] = logits

    with staged_dir(out_dir) as tmp, tqdm(total=5, desc="bs-export", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("loading weights")
        model = load_vlm(family, model_dir, dtype)
        bar.update()
        qwen = families.get(family).vision_tower == families.QWEN_VISION
        example = _qwen_trace_example(family, template) if qwen else None
        # the language model is exported first: the vision export switches the
        # vision tower's attention implementation
        bar.set_postfix_str("language model (KV cache)")
        export_language_model_with_cache(family, model, tmp / FILES["language_model"], logits)
        bar.update()
        bar.set_postfix_str("embedding")
        export_embed(model, tmp / FILES["embed"])
        bar.update()
        bar.set_postfix_str("vision encoder")
        export_vision(family, model, tmp / FILES["vision"], example, query_rows=vision_query_rows,
                      fused=vision_attention == "fused")
        bar.update()
        bar.set_postfix_str("template and processor files")
        template["processor_files"] = copy_processor_files(model_dir, tmp)
        (tmp / "template.json").write_text(json.dumps(template, indent=2) + "\n")
        bar.update()
    return ExportResult(out_dir, template)


def load_template(out_dir) -> dict:
    path = Path(out_dir) / "template.json"
    if not path.is_file():
        raise ExportError(f"{out_dir} has no template.json: it is not a bs-export directory (run bs-export first)")
    t = json.loads(path.read_text())
    if t.get("format") != FORMAT or t.get("version") != VERSION:
        raise ExportError(f"{path} is not a {FORMAT} v{VERSION} template; re-run bs-export")
    return t
