"""Tiny random-weight configurations for the supported VLM language-model families.

Only the *language model* prefill is of interest here; the vision towers of the
qwen configs are kept as small as possible so that building the full
``*ForConditionalGeneration`` model stays cheap.
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "gemma3")

# Tiny text dimensions shared by all families.
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_VOCAB = 128
TINY_INTERMEDIATE = 128
TINY_SLIDING_WINDOW = 8
# mrope_section must sum to head_dim // 2 (it splits the rotary frequencies).
TINY_MROPE_SECTION = [2, 3, 3]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _text_kwargs(num_kv_heads: int, num_layers: int) -> dict[str, Any]:
    if TINY_HEADS % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_attention_heads={TINY_HEADS}")
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
    )


def tiny_config(family: str, *, num_kv_heads: int = 2, num_layers: int = 2, seed: int = 0):
    """Return a tiny transformers config for ``family``.

    * ``qwen2_vl`` / ``qwen2_5_vl``: the full VLM config (``Qwen2VLConfig`` /
      ``Qwen2_5_VLConfig``) with a tiny text and vision part.
    * ``gemma3``: a ``Gemma3TextConfig`` whose layers are all sliding-window
      layers (window ``TINY_SLIDING_WINDOW``) except the last one, which is a
      full-attention layer.

    ``num_kv_heads`` < 4 gives grouped-query attention, ``num_kv_heads=4`` plain
    multi-head attention.  ``seed`` is stored on the config (``_blindsight_seed``)
    and used by :func:`blindsight.models.export.load_language_model` to seed the
    random weight initialisation.
    """
    _check_family(family)
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1")
    text = _text_kwargs(num_kv_heads, num_layers)

    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text.update(
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": list(TINY_MROPE_SECTION)},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        vision = dict(depth=1, embed_dim=32, hidden_size=TINY_HIDDEN, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision,
                            image_token_id=TINY_VOCAB - 4, video_token_id=TINY_VOCAB - 3,
                            vision_start_token_id=TINY_VOCAB - 2, vision_end_token_id=TINY_VOCAB - 1)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text.update(
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                             "mrope_section": list(TINY_MROPE_SECTION)},
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=TINY_HIDDEN, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                               image_token_id=TINY_VOCAB - 4, video_token_id=TINY_VOCAB - 3,
                               vision_start_token_id=TINY_VOCAB - 2, vision_end_token_id=TINY_VOCAB - 1)
    else:  # gemma3
        from transformers import Gemma3TextConfig

        layer_types = ["sliding_attention"] * (num_layers - 1) + ["full_attention"]
        if num_layers == 1:
            layer_types = ["sliding_attention"]
        cfg = Gemma3TextConfig(
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

    cfg._blindsight_seed = int(seed)
    return cfg
