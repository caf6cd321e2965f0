"""The supported VLM families, one registry entry each: everything that differs
between Qwen2-VL, Qwen2.5-VL and Gemma 3 lives here, and the rest of the code
reads attributes of ``get(family)`` instead of testing family names.

Cheap to import: transformers classes are named by string and resolved with
:func:`transformers_class` when needed; torch, transformers and onnxruntime
are never imported here at module level.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from blindsight.errors import BlindSightError, SpanError
from blindsight.attention import spans
from blindsight.attention.spans import Delimiters
from blindsight.configs import TINY_HEAD_DIM, TINY_HIDDEN, TINY_MROPE_SECTION, TINY_SLIDING_WINDOW, TINY_VOCAB

QWEN_VISION = "qwen"  # patch sequence + image_grid_thw; index tensors computed on the host
SIGLIP_VISION = "siglip"  # fixed-size images [N, 3, H, W], a fixed number of soft tokens each


class FamilyError(BlindSightError, ValueError):
    """A model family name the registry does not know."""


@dataclasses.dataclass(frozen=True)
class Family:
    #: transformers ``model_type`` of the full VLM config; template.json's ``family``
    name: str
    #: human name, for messages
    title: str
    #: image delimiter ids of the family's released tokenizer
    delimiters: Delimiters
    #: template.json ``position_ids``: "mrope3" (3-row M-RoPE [3, B, S]) or "1d" ([B, S])
    position_ids: str
    # transformers class names (resolved lazily by transformers_class)
    config_class: str
    model_class: str  # the full VLM (*ForConditionalGeneration)
    processor_class: str
    #: builds the tiny random config of blindsight.models.configs.tiny_config from its text kwargs
    tiny_config: Callable[["Family", dict], Any]
    #: config attributes holding the image token ids (the first set one of image_token_attrs wins)
    image_token_attrs: tuple[str, ...]
    image_start_attr: str
    image_end_attr: str
    #: kind of vision tower: QWEN_VISION or SIGLIP_VISION
    vision_tower: str
    #: inputs of the exported vision.onnx, in order
    vision_inputs: tuple[str, ...]
    #: Qwen2.5-VL's tower attends within windows (window_index / cu_window_seqlens inputs)
    windowed_vision: bool = False
    #: the LM head output is soft-capped with the text config's final_logit_softcapping
    logit_softcapping: bool = False
    #: the token embedding scales by sqrt(hidden); transformers' embedding module carries it,
    #: so embed.onnx does too (nothing to add by hand)
    embedding_scale: bool = False
    #: a text-only config (tiny_config's) and the model class for it; None: always the full VLM
    text_config_class: str | None = None
    text_model_class: str | None = None
    #: model_type of the family's text-only checkpoints (bs-export refuses them with a hint)
    text_model_type: str | None = None
    # prompts (blindsight.runtime.prompt), formats over the tokens {start}, {image}, {end}:
    #: what the chat template writes for one image
    image_placeholder: str = "{start}{image}{end}"
    #: the token of the rendered placeholder that expansion replaces
    expansion_key: str = "{image}"
    #: what it becomes; {images} is the image token repeated once per image token
    image_expansion: str = "{images}"
    #: extra keyword arguments of the image processor call
    image_processor_kwargs: tuple[tuple[str, Any], ...] = ()
    #: what the family's processor returns beside input_ids, 1 marking an image token
    token_type_key: str = "mm_token_type_ids"
    #: an image's soft tokens attend each other in both directions during prefill
    #: (Gemma 3: transformers builds it from token_type_ids); the exports take
    #: ``token_type_ids`` and compiled nodes carry ``image_blocks`` = 1
    image_blocks: bool = False

    @property
    def mrope_positions(self) -> bool:
        """Position ids have 3 rows (M-RoPE): [3, B, S] instead of [B, S]."""
        return self.position_ids == "mrope3"

    def model_class_for(self, config) -> str:
        """The model class of a full VLM config, or of the family's text-only config."""
        if self.text_model_class is None or getattr(config, "model_type", None) == self.name:
            return self.model_class
        return self.text_model_class

    def config_token_ids(self, config) -> dict[str, int]:
        """template.json's image_token_id, image_start_id and image_end_id from a transformers config."""
        *first, last = self.image_token_attrs
        image = next((getattr(config, a) for a in first if getattr(config, a, None)), None) or getattr(config, last)
        return dict(image_token_id=int(image), image_start_id=int(getattr(config, self.image_start_attr)),
                    image_end_id=int(getattr(config, self.image_end_attr)))

    def config_delimiters(self, config) -> Delimiters:
        """The image delimiters a checkpoint's config records (tiny checkpoints use small ids)."""
        return Delimiters(start=int(getattr(config, self.image_start_attr)), end=int(getattr(config, self.image_end_attr)))


def transformers_class(name: str):
    """A transformers class by name (imports transformers)."""
    return getattr(importlib.import_module("transformers"), name)


# ----------------------------------------------------------- tiny random configs
def _tiny_qwen(family: Family, text: dict, vision: dict):
    text = dict(
        text,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": list(TINY_MROPE_SECTION)},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers_class(family.config_class)(
        text_config=text, vision_config=vision,
        image_token_id=TINY_VOCAB - 4, video_token_id=TINY_VOCAB - 3,
        vision_start_token_id=TINY_VOCAB - 2, vision_end_token_id=TINY_VOCAB - 1)


def _tiny_qwen2_vl(family: Family, text: dict):
    return _tiny_qwen(family, text, dict(depth=1, embed_dim=32, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2,
                                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2))


def _tiny_qwen2_5_vl(family: Family, text: dict):
    return _tiny_qwen(family, text, dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                         out_hidden_size=TINY_HIDDEN, patch_size=14, spatial_merge_size=2,
                                         temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0]))


def _tiny_gemma3(family: Family, text: dict):
    """A text-only config: all layers slide (window TINY_SLIDING_WINDOW) except the last."""
    num_layers = text["num_hidden_layers"]
    layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
    if num_layers == 1:
        layer_types = ["sliding_attention"]
    return transformers_class(family.text_config_class)(
        **text,
        head_dim=TINY_HEAD_DIM,
        query_pre_attn_scalar=TINY_HEAD_DIM,
        sliding_window=TINY_SLIDING_WINDOW,
        layer_types=layer_types,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


# ----------------------------------------------------------------- the registry
# Image delimiters of the released tokenizers: Qwen2-VL and Qwen2.5-VL
# <|vision_start|> / <|vision_end|>; Gemma 3 <start_of_image> / <end_of_image>
# (the config's boi/eoi_token_index).
_QWEN_DELIMITERS = Delimiters(start=151652, end=151653)
_QWEN_VISION_INPUTS = ("pixel_values", "vision_position_ids", "cu_seqlens")
_QWEN = dict(delimiters=_QWEN_DELIMITERS, position_ids="mrope3", image_token_attrs=("image_token_id",),
             image_start_attr="vision_start_token_id", image_end_attr="vision_end_token_id", vision_tower=QWEN_VISION)

REGISTRY: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="qwen2_vl", title="Qwen2-VL", config_class="Qwen2VLConfig",
               model_class="Qwen2VLForConditionalGeneration", processor_class="Qwen2VLProcessor",
               tiny_config=_tiny_qwen2_vl, vision_inputs=_QWEN_VISION_INPUTS, **_QWEN),
        Family(name="qwen2_5_vl", title="Qwen2.5-VL", config_class="Qwen2_5_VLConfig",
               model_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
               tiny_config=_tiny_qwen2_5_vl, vision_inputs=_QWEN_VISION_INPUTS + ("window_index", "cu_window_seqlens"),
               windowed_vision=True, **_QWEN),
        Family(name="gemma3", title="Gemma 3", delimiters=Delimiters(start=255999, end=256000), position_ids="1d",
               config_class="Gemma3Config", model_class="Gemma3ForConditionalGeneration",
               processor_class="Gemma3Processor", tiny_config=_tiny_gemma3,
               image_token_attrs=("image_token_id", "image_token_index"),
               image_start_attr="boi_token_index", image_end_attr="eoi_token_index",
               vision_tower=SIGLIP_VISION, vision_inputs=("pixel_values",),
               logit_softcapping=True, embedding_scale=True,
               text_config_class="Gemma3TextConfig", text_model_class="Gemma3ForCausalLM", text_model_type="gemma3_text",
               image_placeholder="{start}", expansion_key="{start}", image_expansion="\n\n{start}{images}{end}\n\n",
               image_processor_kwargs=(("do_pan_and_scan", False),), token_type_key="token_type_ids",
               image_blocks=True),
    )
}
FAMILIES = tuple(REGISTRY)


def image_blocks(model_type) -> bool:
    """Whether a family name or text-only model_type attends within its images both
    ways (Gemma 3); names outside the registry (SmolLM2's llama) never do."""
    return any(f.image_blocks and model_type in (f.name, f.text_model_type) for f in REGISTRY.values())


def get(name: str) -> Family:
    """The registry entry of ``name``; an unknown name is a one-line FamilyError."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise FamilyError(f"unknown family {name!r}; expected one of {', '.join(FAMILIES)}") from None


def find_spans(input_ids, family: str):
    """:func:`blindsight.attention.find_spans` with the image delimiters of
    ``family``'s released tokenizer; an unknown name is a SpanError."""
    if family not in REGISTRY:
        raise SpanError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return spans.find_spans(input_ids, REGISTRY[family].delimiters)
